"""TDMPQ as its released code measures it: a zeroth-order probe, rank-only.

The TDMPQ paper describes a Taylor-expansion score, but its released code perturbs each layer's
weights with Gaussian noise and records the loss change; this is that probe. For each unit and
each of ``probes`` seeded draws, every linear of the unit gets W + noise_scale · std(W) · ε with
ε ~ N(0, 1) elementwise (std per layer); the score is the mean metric increase over the draws.
The gradient-based first-order score the paper names is ``taylor`` (compress.analyze.gradient).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CompressError
from ..models import linear_weight
from .base import AnalyzerConfig, UnitMap, register
from .calib import Calibration
from .perturb import PERTURBATIONS, Perturbation, run_in_memory


@dataclass
class TDMPQConfig(AnalyzerConfig):
    """noise_scale: noise std relative to each weight matrix's std; probes: draws averaged."""

    noise_scale: float = 0.1
    probes: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.noise_scale <= 0:
            raise CompressError(f"tdmpq noise_scale must be > 0, got {self.noise_scale}")
        if self.probes < 1:
            raise CompressError(f"tdmpq probes must be at least 1, got {self.probes}")


def noisy(weight: torch.Tensor, scale: float, gen: torch.Generator) -> torch.Tensor:
    """weight (N, K) + scale · std(weight) · ε, ε drawn on the CPU from ``gen`` (device-independent)."""
    eps = torch.randn(weight.shape, generator=gen, dtype=torch.float32).to(weight.device, weight.dtype)
    return weight.detach() + scale * weight.detach().float().std().item() * eps


def _variants(linears, names, config: TDMPQConfig, gen: torch.Generator):
    for _ in range(config.probes):
        yield [noisy(linear_weight(lin), config.noise_scale, gen) for lin in linears]


PERTURBATIONS["tdmpq"] = Perturbation(
    _variants, lambda deltas, config: (sum(deltas) / len(deltas), None),
    state=lambda config: torch.Generator().manual_seed(config.seed),
    extra=lambda config: {"noise_scale": config.noise_scale, "probes": config.probes})


@register("tdmpq", TDMPQConfig)
def tdmpq(model: nn.Module, units: UnitMap, calib: Calibration, config: TDMPQConfig):
    """Scores: mean metric increase under ``probes`` Gaussian weight perturbations per unit."""
    return run_in_memory("tdmpq", model, units, calib, config)
