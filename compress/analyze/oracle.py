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
from tqdm.auto import tqdm

from ..models import linear_weight
from ..quant import fake_quantize
from .base import AnalyzerConfig, UnitMap, register
from .calib import Calibration


@dataclass
class OracleConfig(AnalyzerConfig):
    """No options beyond AnalyzerConfig: the candidate formats are ``bits``, group_size, symmetric."""


@register("oracle", OracleConfig)
def oracle(model: nn.Module, units: UnitMap, calib: Calibration, config: OracleConfig):
    """Damage per unit and width, measured (see the module docstring)."""
    calib.reference(model)
    damage = {}
    for unit in tqdm(units.units, desc=f"oracle {config.granularity}", disable=not config.progress):
        linears = units.modules_of(unit)
        names = units.units[unit]
        damage[unit] = {16: 0.0}
        for bits in config.bits:
            spec = config.spec(bits)
            trial = [fake_quantize(linear_weight(lin).detach(), spec, name) for lin, name in zip(linears, names)]
            damage[unit][bits] = calib.trial(model, linears, trial, units.start[unit])
    scores = {u: d[min(config.bits)] for u, d in damage.items()}
    return scores, damage, {}
