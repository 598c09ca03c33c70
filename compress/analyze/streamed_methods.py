"""Each analyzer on a StreamedModel, through compress.analyze.streamed's BlockRunner.

See compress.analyze.streamed for the plan of each walk. State keys in the StateStore:
("h", i, b) the unmodified input of block i for batch b (i = n_blocks: the last block's output),
("ref", b) the unmodified logits ("kl"), (("t", k), b) trial k's state, ("g", k, b) the gradient
of loss k with respect to the hidden state at the block being walked back through.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..errors import CompressError
from .base import AnalyzerConfig, UnitMap, patched
from .calib import Calibration
from .cmpq import check_units, pooling_hooks, scores_from, unit_modules
from .gradient import KINDS, GradientSums, capture_linears, grad_weights, scored
from .perturb import PERTURBATIONS, collect
from .store import StateStore
from .streamed import BlockRunner, StreamedModel


class _Stored:
    """calib._ref as a view of the store's ("ref", b) entries."""

    def __init__(self, store: StateStore, name: str) -> None:
        self.store, self.name = store, name

    def __getitem__(self, b: int) -> torch.Tensor:
        return self.store.get((self.name, b))


def run_streamed(method: str, lm: StreamedModel, units: UnitMap, calib: Calibration, config: AnalyzerConfig):
    """(scores, damage | None, provenance) of ``method`` with the blocks streamed (module docstring)."""
    if method not in PERTURBATIONS and method not in KINDS and method != "cmpq":
        raise CompressError(f"{method} has no streamed (low-memory) implementation")
    if method == "cmpq":
        check_units(units, config)  # before anything is read
    with StateStore(lm.state_budget, lm.offload_dir) as store:
        runner = BlockRunner(lm, units, calib, store)
        runner.prepare()
        if method in PERTURBATIONS:
            result = _perturbation(method, runner, units, calib, config)
        elif method in KINDS:
            result = scored(_gradient((method,), runner, units, calib, config)[method], config)
        else:
            result = _cmpq(runner, units, calib, config)
        scores, damage, extra = result
        extra = {**extra, "low_memory": True, "state_budget_bytes": store.budget,
                 "offloaded_bytes": store.peak_disk}
    return scores, damage, extra


# ---- the reference and the perturbation methods --------------------------------------------------

def _tokens(calib: Calibration) -> int:
    return sum(calib.tokens(b) for b in range(len(calib.batches)))


@torch.no_grad()
def _metric(runner: BlockRunner, key) -> float:
    """The calibration metric when the last block's output of batch b is stored under key(b)."""
    calib = runner.calib
    total = 0.0
    for b in range(runner.n_batches):
        total += calib._batch_metric(runner.tail(runner.get(key(b)), b), b)
    return total / _tokens(calib)


@torch.no_grad()
def _reference(runner: BlockRunner) -> float:
    """Walk the unmodified blocks keeping every block's input; the reference metric, logits ("kl")
    or embeddings (encoders) recorded as Calibration.reference records them."""
    calib, store, last = runner.calib, runner.store, runner.n_blocks
    runner.walk("h", desc="reference pass")
    if calib.kind == "encoder":
        calib._ref = []
    elif calib.metric_name == "mean_kl":
        calib._ref = _Stored(store, "ref")
    total = 0.0
    for b in range(runner.n_batches):
        out = runner.tail(runner.get(("h", last, b)), b)
        if calib.kind == "encoder":
            calib._ref.append(calib.pool(out, b).cpu())
        elif calib.metric_name == "mean_kl":
            store.put(("ref", b), out)
        total += calib._batch_metric(out, b)
    calib.base = total / _tokens(calib)
    return calib.base


def _groups(runner: BlockRunner, units: UnitMap) -> list[tuple[int | None, list[str]]]:
    """Units in unit order, consecutive units of one block grouped; a unit outside the blocks alone."""
    groups: list[tuple[int | None, list[str]]] = []
    for unit, names in units.units.items():
        idx = runner.block_of(names[0])
        if idx is not None and groups and groups[-1][0] == idx:
            groups[-1][1].append(unit)
        else:
            groups.append((idx, [unit]))
    return groups


def _perturbation(method: str, runner: BlockRunner, units: UnitMap, calib: Calibration, config: AnalyzerConfig):
    perturbation = PERTURBATIONS[method]
    base = _reference(runner)
    state = perturbation.state(config)  # created once, drawn from in unit order as in memory
    deltas: dict[str, list[float]] = {}
    for idx, members in tqdm(_groups(runner, units), desc=f"{method} {config.granularity} (streamed)",
                             disable=not config.progress):
        if idx is None:
            deltas[members[0]] = _outside_trials(perturbation, runner, units, members[0], config, state, base)
        else:
            deltas.update(_block_trials(perturbation, runner, units, idx, members, config, state, base))
    return collect(method, perturbation, units, config, deltas)


def _block_trials(perturbation, runner: BlockRunner, units: UnitMap, i: int, members: list[str],
                  config: AnalyzerConfig, state, base: float) -> dict[str, list[float]]:
    """Every trial of the units of block i: the perturbed block from its recorded inputs, then the
    later blocks for all the group's trials at once, then the tail."""
    store, owner = runner.store, []
    with runner.block(i) as block, torch.no_grad():
        for unit in members:
            linears, names = units.modules_of(unit), units.units[unit]
            for weights in perturbation.variants(linears, names, config, state):
                key = ("t", len(owner))
                owner.append(unit)
                with patched(linears, weights):
                    for b in range(runner.n_batches):
                        store.put((key, b), runner.run_block(i, block, runner.get(("h", i, b)), b))
    keys = [("t", k) for k in range(len(owner))]
    runner.walk(None, i + 1, keys=keys)
    out: dict[str, list[float]] = {u: [] for u in members}
    for key, unit in zip(keys, owner):
        out[unit].append(_metric(runner, lambda b: (key, b)) - base)
        for b in range(runner.n_batches):
            store.pop((key, b))
    return out


def _outside_trials(perturbation, runner: BlockRunner, units: UnitMap, unit: str, config: AnalyzerConfig,
                    state, base: float) -> list[float]:
    """Trials of a unit outside the blocks: the tail only when the first block's input is unchanged
    by it (an output head), else a walk from the embeddings."""
    linears, names = units.modules_of(unit), units.units[unit]
    store, last, out = runner.store, runner.n_blocks, []
    for weights in perturbation.variants(linears, names, config, state):
        with patched(linears, weights):
            first = runner.first_inputs()
            if all(torch.equal(h.cpu(), store.get(("h", 0, b))) for b, h in enumerate(first)):
                out.append(_metric(runner, lambda b: ("h", last, b)) - base)
                continue
            for b, h in enumerate(first):
                store.put(("x", b), h)
            runner.walk(None, 0, keys=["x"])
            out.append(_metric(runner, lambda b: ("x", b)) - base)
            for b in range(runner.n_batches):
                store.pop(("x", b))
    return out


# ---- taylor and fisher ------------------------------------------------------------------------------

def _gradient(kinds: tuple[str, ...], runner: BlockRunner, units: UnitMap, calib: Calibration,
              config) -> dict[str, dict[str, dict[int, float]]]:
    """GradientSums over the streamed blocks: forward walk, tail, then the blocks backwards."""
    sums = GradientSums(units, calib, config, kinds)
    store, last, n_losses = runner.store, runner.n_blocks, len(sums.loss_kinds)
    gen = torch.Generator(device=calib.device).manual_seed(config.seed)
    runner.walk("h", desc="forward pass")

    def backward(names, modules, run, first_block: bool):
        """One stage (the tail, or a block) for every batch: run(b) -> (output, input state, loss
        iterator | None); each loss's gradient with respect to the stage's input is stored."""
        sums.open(names, modules)
        captured: dict = {}
        hooks = capture_linears(dict(zip(names, modules)), captured) if sums.per_sample else []
        try:
            with grad_weights(modules) as weights:
                for b in range(runner.n_batches):
                    with torch.enable_grad():
                        out, h, losses = run(b)
                        for k, kind in enumerate(sums.loss_kinds):
                            want_w, want_out = sums.targets(kind)
                            loss = next(losses) if losses is not None else out
                            upstream = None if losses is not None else runner.get(("g", k, b))
                            targets = ([] if first_block else [h]) + (weights if want_w else []) \
                                + ([captured[n][1] for n in names] if want_out else [])
                            if not targets:
                                continue
                            grads = torch.autograd.grad(loss, targets, grad_outputs=upstream,
                                                        retain_graph=k < n_losses - 1)
                            if not first_block:
                                store.put(("g", k, b), grads[0])
                            rest = grads[0 if first_block else 1:]
                            nw = len(weights) if want_w else 0
                            sums.add(kind, names, modules, rest[:nw], rest[nw:], captured, key=(b, k))
                    if first_block:
                        for k in range(n_losses):
                            store.pop(("g", k, b), None)
                    captured.clear()
        finally:
            for hk in hooks:
                hk.remove()
        sums.close(names)

    # Outside the blocks: the head runs in the tail; what runs before the first block (an embedding
    # table as a unit, an input projection) gets the gradient at the first block's input at the end.
    early = [n for n in units.linears if n in runner.before_blocks]
    outside = [n for n in units.linears if runner.block_of(n) is None and n not in runner.before_blocks]

    def tail(b):
        h = runner.get(("h", last, b)).detach().requires_grad_(True)
        out = runner.tail(h, b)
        store.pop(("h", last, b))
        return out, h, sums.losses(calib, out, b, gen)

    backward(outside, [units.linears[n] for n in outside], tail, False)
    for i in tqdm(reversed(range(last)), total=last, desc="backward pass", disable=not config.progress,
                  leave=False):
        with runner.block(i) as block:
            names = [n for n in units.linears if runner.block_of(n) == i]

            def run(b, i=i, block=block):
                h = runner.get(("h", i, b)).detach().requires_grad_(i > 0 or bool(early))
                store.pop(("h", i, b))
                return runner.run_block(i, block, h, b), h, None

            backward(names, [units.linears[n] for n in names], run, i == 0 and not early)
    if early:
        backward(early, [units.linears[n] for n in early], lambda b: (runner.first_input(b), None, None), True)
    return sums.damage()


# ---- cmpq -------------------------------------------------------------------------------------------

def _cmpq(runner: BlockRunner, units: UnitMap, calib: Calibration, config):
    """Pooled outputs of every unit's module during one walk (blocks) and the tail (linears outside)."""
    modules = unit_modules(units)
    reps, handles = pooling_hooks(modules, calib, runner.current)
    try:
        runner.walk("h", keep=False, desc="cmpq: pooling outputs")
        with torch.no_grad():
            for b in range(runner.n_batches):
                runner.current[0] = b
                runner.tail(runner.get(("h", runner.n_blocks, b)), b)
    finally:
        for h in handles:
            h.remove()
    return scores_from({name: torch.cat(r) for name, r in reps.items()}, calib.n_samples, config)
