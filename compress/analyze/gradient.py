"""Gradient-based damage predictions: ``taylor`` (first order) and ``fisher`` (diagonal second order).

Both price the actual quantization error ΔW = fake_quantize(W) − W of every linear at each
candidate width (QuantLinear's numerics) against gradients of the calibration metric, collected
in one pass over the data; damage[unit][bits] sums over the unit's linears.

Probe gradients. The metrics that measure distance from the unmodified model (an encoder's
1 − cos(e, e_ref), a causal LM's KL(p_ref ‖ p)) are at their minimum there, with zero gradient,
so their first-order term vanishes and the second-order (Gauss–Newton) term is the prediction.
Random probes give it without per-sample passes: for encoders g = ∂(uᵀê)/∂W with u ~ N(0, I) and
ê the normalised embedding, so that E[(g · ΔW)²] = ‖δê‖² ≈ 2 (1 − cos); for causal LMs g is the
gradient of the NLL of labels drawn from the model's own next-token distribution, so that
E[(g · ΔW)²] = ΔWᵀ F ΔW ≈ 2 KL with F the Fisher (the Hessian of the KL at the reference). Probes of
different samples / positions are independent with zero mean, so one backward pass per batch of
their sum serves every sample of the batch. ``probes`` draws per batch are averaged.

  fisher  ½ Σ E[g²] ⊙ ΔW²: the diagonal of that Gauss–Newton / Fisher matrix (all metrics; for
          "nll" the Fisher is also the expected Hessian of the NLL).
  taylor  KL and 1 − cos: ½ E[(Σ g ⊙ ΔW)²], the linearised prediction with every interaction
          between weights kept (not only the diagonal), with g · ΔW formed per sample.
          NLL: Σ |ḡ ⊙ ΔW| with ḡ the gradient of the mean NLL on the calibration labels: the
          first-order Taylor term, its terms in absolute value so that errors cannot cancel.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import CompressError
from ..models import linear_weight
from ..quant import fake_quantize
from .base import AnalyzerConfig, UnitMap, register, weight_layout
from .calib import Calibration

KINDS = ("taylor", "fisher")


@dataclass
class GradientConfig(AnalyzerConfig):
    """probes: random probe draws per batch, one backward pass each (see the module docstring)."""

    probes: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.probes < 1:
            raise CompressError(f"{self.method} probes must be at least 1, got {self.probes}")


@dataclass
class TaylorConfig(GradientConfig):
    """First-order Taylor score; see the module docstring."""


@dataclass
class FisherConfig(GradientConfig):
    """Diagonal Fisher score; see the module docstring."""


def capture_linears(linears: dict[str, nn.Module], store: dict) -> list:
    """Forward hooks keeping each linear's input x (..., K) (detached) and output (..., N) (nn.Linear
    and Conv1D alike); the model goes on with a copy of the output, so an in-place op downstream
    cannot alter the tensor we differentiate."""
    def hook(name):
        def keep(module, args, output):
            store[name] = (args[0].detach(), output)
            return output.clone()
        return keep

    return [lin.register_forward_hook(hook(n)) for n, lin in linears.items()]


@contextmanager
def grad_weights(modules: list[nn.Module]) -> Iterator[list[nn.Parameter]]:
    """Each linear's weight as a fresh Parameter sharing its storage and requiring grad, for the
    duration; the original Parameter object comes back afterwards.

    A weight tied to another module (an output head sharing the input embedding) is thereby
    differentiated through this module's use only: the trial a gradient predicts quantizes the
    head and leaves the embedding as it is (as the oracle's trials do, base.patched).
    """
    saved = [m._parameters["weight"] for m in modules]
    fresh = [nn.Parameter(p.detach(), requires_grad=True) for p in saved]
    try:
        for m, p in zip(modules, fresh):
            m._parameters["weight"] = p
        yield fresh
    finally:
        for m, p in zip(modules, saved):
            m._parameters["weight"] = p


class GradientSums:
    """The sums one gradient pass accumulates per linear layer, and their reduction to damage.

    Shared by the in-memory pass (gradient_damage: every linear open at once) and the streamed
    one (compress.analyze.streamed: one block's linears open at a time, closed, i.e. reduced to
    one float per width, as soon as their block is done). Per open linear: ΔW per width, and
    g_sum (first-order taylor) or f_sum (fisher), each (N, K) float32 = (out, in).

    losses(calib, out, b, gen) gives the losses of one batch in order: "first" (the mean NLL on
    the calibration labels, first-order taylor) then ``n_probes`` "probe" losses (module
    docstring); ``targets(kind)`` says whether a loss needs weight gradients and/or the gradients
    of the linears' outputs (per-sample taylor), ``add`` takes them.
    """

    def __init__(self, units: UnitMap, calib: Calibration, config: GradientConfig, kinds: tuple[str, ...]) -> None:
        self.units, self.config, self.kinds = units, config, kinds
        want_taylor, self.want_fisher = "taylor" in kinds, "fisher" in kinds
        self.first_order = calib.metric_name == "mean_nll"  # the only metric with a nonzero gradient
        self.per_sample = want_taylor and not self.first_order
        self.want_first = want_taylor and self.first_order
        self.n_probes = config.probes if self.want_fisher or self.per_sample else 0
        self.total = sum(calib.tokens(b) for b in range(len(calib.batches)))
        self.loss_kinds = ["first"] * self.want_first + ["probe"] * self.n_probes
        self.deltas: dict[str, dict[int, torch.Tensor]] = {}  # per-sample taylor only: used in add
        self.modules: dict[str, nn.Module] = {}
        self.g_sum: dict[str, torch.Tensor] = {}
        self.f_sum: dict[str, torch.Tensor] = {}
        self.reduced: dict[str, dict[str, dict[int, float]]] = {}  # linear -> kind -> bits -> float
        self.sq = {u: {b: 0.0 for b in config.bits} for u in units.units}
        # Per-sample g · ΔW of a unit whose linears are differentiated in different stages (a streamed
        # pass reaches a head at the tail and the table tied to it at the embeddings): (unit, key) ->
        # (linears seen, {bits: partial (B,)}), squared once every linear of the unit has added.
        self.pending: dict[tuple, tuple[set, dict[int, torch.Tensor]]] = {}

    def _delta(self, name: str, bits: int) -> torch.Tensor:
        """ΔW = fake_quantize(W) − W of an open linear at ``bits``, float32 (N, K)."""
        w = linear_weight(self.modules[name]).detach()
        return (fake_quantize(w, self.config.spec(bits), name) - w).float()

    def open(self, names: list[str], modules: list[nn.Module]) -> None:
        """Start the sums of these linears (their weights must stay real until ``close``). ΔW is
        formed here only where ``add`` needs it (per-sample taylor); otherwise at ``close``, one
        width at a time, so fisher holds no ΔW while it accumulates."""
        for n, m in zip(names, modules):
            self.modules[n] = m
            w = linear_weight(m).detach()  # (N, K)
            if self.per_sample:
                self.deltas[n] = {b: self._delta(n, b) for b in self.config.bits}
            if self.want_first:
                self.g_sum[n] = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
            if self.want_fisher:
                self.f_sum[n] = torch.zeros(w.shape, dtype=torch.float32, device=w.device)

    def losses(self, calib: Calibration, out: torch.Tensor, b: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
        """The losses of batch b (``loss_kinds`` in order), from the model's output ``out``;
        probe labels are drawn from ``gen`` when each loss is asked for."""
        if calib.kind == "causal-lm":
            logits = calib.positions(out).float()
            flat = logits.reshape(-1, logits.shape[-1])  # (positions, V)
            if self.want_first:
                labels = calib.batch(b)["input_ids"][:, 1:].reshape(-1)
                yield F.cross_entropy(flat, labels, reduction="sum") / self.total
            if self.n_probes:
                probs = flat.detach().softmax(-1)
            for _ in range(self.n_probes):
                drawn = torch.multinomial(probs, 1, generator=gen).squeeze(1)
                yield F.cross_entropy(flat, drawn, reduction="sum")
        else:
            e = F.normalize(calib.pool(out, b), dim=-1)  # (B, C)
            for _ in range(self.n_probes):
                yield (torch.randn(e.shape, generator=gen, device=e.device) * e).sum()

    def targets(self, kind: str) -> tuple[bool, bool]:
        """(weight gradients wanted, linear-output gradients wanted) for a loss of ``kind``."""
        return (True, False) if kind == "first" else (self.want_fisher, self.per_sample)

    def add(self, kind: str, names: list[str], modules: list[nn.Module], weight_grads, output_grads,
            captured: dict, key=None) -> None:
        """One loss's gradients for the open linears ``names``: weight_grads in the modules' own
        layout (a Conv1D's (K, N)), output_grads (..., N) with ``captured`` inputs (per-sample
        taylor). key: the (batch, loss) these gradients belong to, needed when a unit's linears
        come in separate calls (see ``pending``)."""
        if kind == "first":
            for n, m, g in zip(names, modules, weight_grads):
                self.g_sum[n] += weight_layout(m, g).float()
            return
        if self.want_fisher:
            for n, m, g in zip(names, modules, weight_grads):
                self.f_sum[n] += weight_layout(m, g).float().square()
        if self.per_sample:
            dy = dict(zip(names, output_grads))
            for unit, members in self.units.units.items():
                present = [n for n in members if n in dy]
                if not present:
                    continue
                # g_s · ΔW = Σ_t δy_t · (ΔW x_t): x (B, T, K), δy (B, T, N) -> (B,)
                d = {bits: sum((dy[n].float() * self._delta_out(n, captured[n][0], bits)).flatten(1).sum(1)
                               for n in present) for bits in self.config.bits}
                if len(present) < len(members):
                    if key is None:
                        raise ValueError(f"unit {unit} differentiated in parts needs a key")
                    seen, partial = self.pending.setdefault((unit, key), (set(), {}))
                    seen.update(present)
                    for bits in d:
                        partial[bits] = partial[bits] + d[bits] if bits in partial else d[bits]
                    if len(seen) < len(members):
                        continue
                    d = self.pending.pop((unit, key))[1]
                for bits in self.config.bits:
                    self.sq[unit][bits] += d[bits].double().square().sum().item()

    def _delta_out(self, name: str, x: torch.Tensor, bits: int) -> torch.Tensor:
        """ΔW applied to a captured input: x (B, T, K) @ ΔWᵀ for a linear; for an embedding
        table the input is token ids (B, T) and ΔW x is the looked-up rows of ΔE."""
        if isinstance(self.units.linears[name], nn.Embedding):
            return self.deltas[name][bits][x]
        return x.float() @ self.deltas[name][bits].T

    def close(self, names: list[str]) -> None:
        """Reduce these linears' sums to one float per kind and width, and free their tensors."""
        probed = self.total * self.config.probes
        for n in names:
            self.deltas.pop(n, None)
            g, f = self.g_sum.pop(n, None), self.f_sum.pop(n, None)
            out = {"fisher": {}, "taylor": {}}
            for b in self.config.bits if f is not None or g is not None else ():
                d = self._delta(n, b)
                if f is not None:
                    out["fisher"][b] = (f / probed * d.square()).sum().item()
                if g is not None:
                    out["taylor"][b] = (g.abs() * d.abs()).sum().item()
            self.reduced[n] = out
            del self.modules[n]

    def damage(self) -> dict[str, dict[str, dict[int, float]]]:
        """kind -> unit -> {bits: predicted damage}, once every linear is closed."""
        probed = self.total * self.config.probes
        out: dict[str, dict[str, dict[int, float]]] = {}
        for kind in self.kinds:
            out[kind] = {}
            for unit, members in self.units.units.items():
                dmg = {16: 0.0}
                for bits in self.config.bits:
                    if kind == "fisher":
                        dmg[bits] = 0.5 * sum(self.reduced[n]["fisher"][bits] for n in members)
                    elif self.first_order:
                        dmg[bits] = sum(self.reduced[n]["taylor"][bits] for n in members)
                    else:
                        dmg[bits] = 0.5 * self.sq[unit][bits] / probed
                out[kind][unit] = dmg
        return out


def gradient_damage(model: nn.Module, units: UnitMap, calib: Calibration, config: GradientConfig,
                    kinds: tuple[str, ...] = KINDS) -> dict[str, dict[str, dict[int, float]]]:
    """kind -> unit -> {bits: predicted damage} for the requested ``kinds``, from one data pass.

    For the second-order taylor form, (g · ΔW) is needed per sample, not per batch (a batch's sum
    is one draw of a chi-square-like quantity; N samples give N draws): it is formed from each
    linear's input x and output gradient δy as Σ_t δy_t · (ΔW x_t), one extra matmul per width.
    """
    names = list(units.linears)
    modules = [units.linears[n] for n in names]
    sums = GradientSums(units, calib, config, kinds)
    sums.open(names, modules)
    gen = torch.Generator(device=calib.device).manual_seed(config.seed)
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = capture_linears(units.linears, captured) if sums.per_sample else []
    last = len(sums.loss_kinds) - 1
    try:
        for p in params:
            p.requires_grad_(False)
        with grad_weights(modules) as weights:
            for b in tqdm(range(len(calib.batches)), desc=f"{'+'.join(kinds)} gradients",
                          disable=not config.progress):
                with torch.enable_grad():
                    out = calib.forward(model, b)
                    for k, (kind, loss) in enumerate(zip(sums.loss_kinds, sums.losses(calib, out, b, gen))):
                        want_w, want_out = sums.targets(kind)
                        targets = (weights if want_w else []) + ([captured[n][1] for n in names] if want_out else [])
                        grads = torch.autograd.grad(loss, targets, retain_graph=k < last)
                        nw = len(weights) if want_w else 0
                        sums.add(kind, names, modules, grads[:nw], grads[nw:], captured)
    finally:
        for h in hooks:
            h.remove()
        captured.clear()
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    sums.close(names)
    return sums.damage()


def scored(damage: dict[str, dict[int, float]], config: GradientConfig):
    """(scores, damage, provenance): the score of a unit is its damage at the narrowest width."""
    return {u: d[min(config.bits)] for u, d in damage.items()}, damage, {"probes": config.probes}


def _scored(kind: str, model: nn.Module, units: UnitMap, calib: Calibration, config: GradientConfig):
    return scored(gradient_damage(model, units, calib, config, (kind,))[kind], config)


@register("taylor", TaylorConfig)
def taylor(model: nn.Module, units: UnitMap, calib: Calibration, config: TaylorConfig):
    """First-order Taylor damage (module docstring); score = damage at the narrowest width."""
    return _scored("taylor", model, units, calib, config)


@register("fisher", FisherConfig)
def fisher(model: nn.Module, units: UnitMap, calib: Calibration, config: FisherConfig):
    """Diagonal-Fisher damage (module docstring); score = damage at the narrowest width."""
    return _scored("fisher", model, units, calib, config)
