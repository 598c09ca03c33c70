"""Perturbation methods (oracle, pmpq, tdmpq) as data: their trials, defined once for every run.

A perturbation method changes one unit at a time and measures the metric change. What differs
between methods is only which trial weights a unit gets and how the measured changes become a
score, so each method is a ``Perturbation``; ``run_in_memory`` measures its trials on a model in
memory (compress.analyze.calib), compress.analyze.streamed on blocks streamed from disk. Both ask
for a unit's variants in unit order, so seeded draws (tdmpq's noise) are the same in both.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .base import AnalyzerConfig, UnitMap

# variants(linears, names, config, state) -> one list of (N, K) trial weights per trial of the unit
Variants = Callable[[list[nn.Module], list[str], AnalyzerConfig, object], Iterator[list[torch.Tensor]]]
# finish(deltas, config) -> (score, damage {bits: change} or None): deltas in the order variants gave them
Finish = Callable[[list[float], AnalyzerConfig], tuple[float, dict[int, float] | None]]


@dataclass(frozen=True)
class Perturbation:
    """One perturbation method: its trials per unit and how their metric changes are reduced.

    state(config): what the trials of every unit share, created once per run (tdmpq: the seeded
    generator); extra(config): the method's provenance entries.
    """

    variants: Variants
    finish: Finish
    state: Callable[[AnalyzerConfig], object] = lambda config: None
    extra: Callable[[AnalyzerConfig], dict] = lambda config: {}


PERTURBATIONS: dict[str, Perturbation] = {}


def collect(method: str, perturbation: Perturbation, units: UnitMap, config: AnalyzerConfig,
            deltas: dict[str, list[float]]):
    """(scores, damage | None, provenance) from each unit's measured deltas, in unit order."""
    scores, damage = {}, {}
    for unit in units.units:
        scores[unit], damage[unit] = perturbation.finish(deltas[unit], config)
    return scores, (damage if all(d is not None for d in damage.values()) else None), perturbation.extra(config)


def run_in_memory(method: str, model: nn.Module, units: UnitMap, calib, config: AnalyzerConfig):
    """Measure every trial of ``method`` on a model in memory: blocks before the unit's are skipped
    (Calibration.trial), the original weights put back after each trial."""
    perturbation = PERTURBATIONS[method]
    calib.reference(model)
    state = perturbation.state(config)
    deltas: dict[str, list[float]] = {}
    for unit in tqdm(units.units, desc=f"{method} {config.granularity}", disable=not config.progress):
        linears, names = units.modules_of(unit), units.units[unit]
        deltas[unit] = [calib.trial(model, linears, weights, units.start[unit])
                        for weights in perturbation.variants(linears, names, config, state)]
    return collect(method, perturbation, units, config, deltas)
