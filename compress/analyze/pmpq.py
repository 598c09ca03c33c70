"""PMPQ (pruning probe): rank-only sensitivity from magnitude pruning.

For each unit in turn, every linear layer of the unit loses its ``sparsity`` fraction of
smallest-magnitude weights (set to zero; each layer pruned on its own, so layers of different
scales lose the same share); the score is the increase of the calibration metric. The original
weights are put back after each trial.
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
class PMPQConfig(AnalyzerConfig):
    """sparsity: the share of each linear's weights zeroed in a trial, in (0, 1)."""

    sparsity: float = 0.3

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.sparsity < 1:
            raise CompressError(f"pmpq sparsity must be in (0, 1), got {self.sparsity}")


def magnitude_pruned(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """A copy of weight (N, K) with its round(sparsity·N·K) smallest-|w| entries set to zero."""
    k = round(sparsity * weight.numel())
    out = weight.detach().clone(memory_format=torch.contiguous_format)  # a Conv1D's (N, K) is a view
    if k:
        idx = weight.detach().abs().flatten().topk(k, largest=False).indices
        out.view(-1)[idx] = 0
    return out


def _variants(linears, names, config: PMPQConfig, state):
    yield [magnitude_pruned(linear_weight(lin), config.sparsity) for lin in linears]


PERTURBATIONS["pmpq"] = Perturbation(_variants, lambda deltas, config: (deltas[0], None),
                                     extra=lambda config: {"sparsity": config.sparsity})


@register("pmpq", PMPQConfig)
def pmpq(model: nn.Module, units: UnitMap, calib: Calibration, config: PMPQConfig):
    """Scores: metric increase with each unit magnitude-pruned to ``sparsity``."""
    return run_in_memory("pmpq", model, units, calib, config)
