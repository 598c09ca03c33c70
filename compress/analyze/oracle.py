"""Oracle: the measured damage of quantizing one unit at a time — the ground truth.

For each unit and candidate width, every linear of the unit (its weight read as (N, K) through
compress.models.linear_weight, so a Conv1D's groups run along its inputs too) is fake-quantized with exactly
QuantLinear's numerics (compress.quant.fake_quantize: quantize, then dequantize once) and the
metric is measured; damage[unit][bits] = metric − reference metric, damage[unit][16] = 0, and the
score is the damage at the narrowest candidate width. Weights are restored after each trial.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..models import linear_weight
from ..quant import fake_quantize
from .base import AnalyzerConfig, UnitMap, register
from .calib import Calibration
from .perturb import PERTURBATIONS, Perturbation, run_in_memory


@dataclass
class OracleConfig(AnalyzerConfig):
    """No options beyond AnalyzerConfig: the candidate formats are ``bits``, group_size, symmetric."""


def _variants(linears, names, config: OracleConfig, state):
    """One trial per candidate width: every linear of the unit fake-quantized at it."""
    for bits in config.bits:
        spec = config.spec(bits)
        yield [fake_quantize(linear_weight(lin).detach(), spec, name) for lin, name in zip(linears, names)]


def _finish(deltas: list[float], config: OracleConfig):
    damage = {16: 0.0, **dict(zip(config.bits, deltas, strict=True))}
    return damage[min(config.bits)], damage


PERTURBATIONS["oracle"] = Perturbation(_variants, _finish)


@register("oracle", OracleConfig)
def oracle(model: nn.Module, units: UnitMap, calib: Calibration, config: OracleConfig):
    """Damage per unit and width, measured (see the module docstring)."""
    return run_in_memory("oracle", model, units, calib, config)
