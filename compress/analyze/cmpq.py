"""CMPQ (CPTQuant's canonical-correlation sensitivity): rank-only, no damage prediction.

Each unit is represented by its output, mean-pooled over the real tokens of each calibration
sample: (N, d) for N samples (a block: the hidden states it returns; a linear: its output). The
score of a unit is 1 − the mean of its first canonical correlation with every other unit's
representation: a unit whose representation the rest of the network does not share is deemed
sensitive. CCA is ridge-regularised (compress.analyze.cca) since N is usually below d.

Module granularity applies the same rule to the linear layers' outputs. Correlating a linear
layer's *input* with its own *output* would tell nothing: mean pooling commutes with an affine
map, so pooled output = W · pooled input + b and that canonical correlation is 1 for every layer
(up to the ridge).

Memory: the pooled representations (N x d per unit, on the CPU) and one d x d covariance at a time.
Turn rank-only scores into per-width damage with compress.quant.relative_noise if a planner needs damage.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import CompressError
from .base import AnalyzerConfig, UnitMap, register
from .calib import Calibration
from .cca import correlation_matrix


@dataclass
class CMPQConfig(AnalyzerConfig):
    """ridge: CCA regularisation, relative to each representation's mean variance."""

    ridge: float = 0.1

    min_samples: ClassVar[int] = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ridge < 0:
            raise CompressError(f"cmpq ridge must be >= 0, got {self.ridge}")


def unit_modules(units: UnitMap) -> dict[str, nn.Module]:
    """The module whose output represents each unit: its block, or the linear itself."""
    out = {}
    for unit, names in units.units.items():
        idx = units.blocks.block_of(names[0]) if units.blocks is not None else None
        is_block = idx is not None and unit == f"{units.blocks.name}.{idx}"
        out[unit] = units.blocks.modules[idx] if is_block else units.linears[unit]
    return out


def pooling_hooks(modules: dict[str, nn.Module], calib: Calibration, current: list[int]):
    """Forward hooks appending each module's mean-pooled output (B, d) for batch ``current[0]``
    to ``reps[name]`` (on the CPU); returns (reps, handles)."""
    reps: dict[str, list[torch.Tensor]] = {name: [] for name in modules}

    def hook(name):
        def record(module, args, output):
            out = output[0] if isinstance(output, tuple) else output  # (B, T, d)
            reps[name].append(calib.pool(out, current[0]).cpu())
        return record

    return reps, [m.register_forward_hook(hook(name)) for name, m in modules.items()]


@torch.no_grad()
def pooled_outputs(model: nn.Module, modules: dict[str, nn.Module], calib: Calibration) -> dict[str, torch.Tensor]:
    """Mean-pooled output of each named module on every calibration sample: float32 (N, d) each."""
    current = [0]
    reps, handles = pooling_hooks(modules, calib, current)
    try:
        for b in tqdm(range(len(calib.batches)), desc="cmpq: pooling outputs", disable=not calib.progress,
                      leave=False):
            current[0] = b
            calib.forward(model, b)
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(r) for name, r in reps.items()}


def check_units(units: UnitMap, config: CMPQConfig) -> None:
    if len(units.units) < 2:
        raise CompressError(f"cmpq compares units with each other and needs at least 2; the model has "
                            f"{len(units.units)} at {config.granularity} granularity")


def scores_from(reps: dict[str, torch.Tensor], n_samples: int, config: CMPQConfig):
    """(scores, None, provenance) from each unit's pooled outputs (N, d_u), in unit order."""
    widest = max(x.shape[1] for x in reps.values())
    if n_samples <= widest:
        warnings.warn(f"cmpq: {n_samples} calibration samples for representations up to {widest} wide: "
                      f"the canonical correlations rest on the ridge ({config.ridge}); more samples make them "
                      f"less so", stacklevel=3)
    rho = correlation_matrix(reps, config.ridge)
    n = rho.shape[0]
    mean_other = (rho.sum(1) - 1) / (n - 1)
    scores = {u: 1.0 - mean_other[i].item() for i, u in enumerate(reps)}
    return scores, None, {"ridge": config.ridge, "correlation": rho.tolist()}


@register("cmpq", CMPQConfig)
def cmpq(model: nn.Module, units: UnitMap, calib: Calibration, config: CMPQConfig):
    """Scores 1 − mean canonical correlation with the other units (see the module docstring)."""
    check_units(units, config)
    return scores_from(pooled_outputs(model, unit_modules(units), calib), calib.n_samples, config)
