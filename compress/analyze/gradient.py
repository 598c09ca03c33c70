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


def _capture_linears(linears: dict[str, nn.Module], store: dict) -> list:
    """Forward hooks keeping each linear's input x (..., K) (detached) and output (..., N) (nn.Linear
    and Conv1D alike); the model goes on with a copy of the output, so an in-place op downstream
    cannot alter the tensor we differentiate."""
    def hook(name):
        def keep(module, args, output):
            store[name] = (args[0].detach(), output)
            return output.clone()
        return keep

    return [lin.register_forward_hook(hook(n)) for n, lin in linears.items()]


def gradient_damage(model: nn.Module, units: UnitMap, calib: Calibration, config: GradientConfig,
                    kinds: tuple[str, ...] = KINDS) -> dict[str, dict[str, dict[int, float]]]:
    """kind -> unit -> {bits: predicted damage} for the requested ``kinds``, from one data pass.

    For the second-order taylor form, (g · ΔW) is needed per sample, not per batch (a batch's sum
    is one draw of a chi-square-like quantity; N samples give N draws): it is formed from each
    linear's input x and output gradient δy as Σ_t δy_t · (ΔW x_t), one extra matmul per width.
    """
    names = list(units.linears)
    modules = [units.linears[n] for n in names]
    # Gradients are taken with respect to the Parameters (a Conv1D's is (K, N)); ΔW, g_sum and f_sum
    # are kept as (N, K) = (out, in), so the quantization groups run along K for every layer type.
    weights = [m.weight for m in modules]
    oriented = [linear_weight(m).detach() for m in modules]  # (N, K) each
    deltas = {n: {b: (fake_quantize(w, config.spec(b), n) - w).float() for b in config.bits}
              for n, w in zip(names, oriented)}
    want_taylor, want_fisher = "taylor" in kinds, "fisher" in kinds
    first_order = calib.metric_name == "mean_nll"  # the only metric with a nonzero gradient
    per_sample = want_taylor and not first_order
    g_sum = {n: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for n, w in zip(names, oriented)} \
        if want_taylor and first_order else {}
    f_sum = {n: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for n, w in zip(names, oriented)} \
        if want_fisher else {}
    sq = {u: {b: 0.0 for b in config.bits} for u in units.units}
    n_probes = config.probes if want_fisher or per_sample else 0
    gen = torch.Generator(device=calib.device).manual_seed(config.seed)
    total = sum(calib.tokens(b) for b in range(len(calib.batches)))
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = _capture_linears(units.linears, captured) if per_sample else []
    try:
        for p in params:
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        for b in tqdm(range(len(calib.batches)), desc=f"{'+'.join(kinds)} gradients", disable=not config.progress):
            with torch.enable_grad():
                out = calib.forward(model, b)
                if calib.kind == "causal-lm":
                    logits = calib.positions(out).float()
                    flat = logits.reshape(-1, logits.shape[-1])  # (positions, V)
                    if g_sum:
                        labels = calib.batch(b)["input_ids"][:, 1:].reshape(-1)
                        loss = F.cross_entropy(flat, labels, reduction="sum") / total
                        grads = torch.autograd.grad(loss, weights, retain_graph=n_probes > 0)
                        for n, m, g in zip(names, modules, grads):
                            g_sum[n] += weight_layout(m, g).float()
                    probs = flat.detach().softmax(-1)

                    def probe_loss():
                        drawn = torch.multinomial(probs, 1, generator=gen).squeeze(1)
                        return F.cross_entropy(flat, drawn, reduction="sum")
                else:
                    e = F.normalize(calib.pool(out, b), dim=-1)  # (B, C)

                    def probe_loss():
                        return (torch.randn(e.shape, generator=gen, device=e.device) * e).sum()
                for p in range(n_probes):
                    targets = (weights if want_fisher else []) + [captured[n][1] for n in names if per_sample]
                    grads = torch.autograd.grad(probe_loss(), targets, retain_graph=p < n_probes - 1)
                    if want_fisher:
                        for n, m, g in zip(names, modules, grads[: len(names)]):
                            f_sum[n] += weight_layout(m, g).float().square()
                    if per_sample:
                        dy = dict(zip(names, grads[len(names) if want_fisher else 0 :]))
                        for unit, members in units.units.items():
                            for bits in config.bits:
                                # g_s · ΔW = Σ_t δy_t · (ΔW x_t): x (B, T, K), δy (B, T, N) -> (B,)
                                d = sum((dy[n].float() * (captured[n][0].float() @ deltas[n][bits].T))
                                        .flatten(1).sum(1) for n in members)
                                sq[unit][bits] += d.double().square().sum().item()
    finally:
        for h in hooks:
            h.remove()
        captured.clear()
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    out: dict[str, dict[str, dict[int, float]]] = {}
    probed = total * config.probes
    for kind in kinds:
        out[kind] = {}
        for unit, members in units.units.items():
            dmg = {16: 0.0}
            for bits in config.bits:
                if kind == "fisher":
                    dmg[bits] = 0.5 * sum((f_sum[n] / probed * deltas[n][bits].square()).sum().item()
                                          for n in members)
                elif first_order:
                    dmg[bits] = sum((g_sum[n].abs() * deltas[n][bits].abs()).sum().item() for n in members)
                else:
                    dmg[bits] = 0.5 * sq[unit][bits] / probed
            out[kind][unit] = dmg
    return out


def _scored(kind: str, model: nn.Module, units: UnitMap, calib: Calibration, config: GradientConfig):
    damage = gradient_damage(model, units, calib, config, (kind,))[kind]
    return {u: d[min(config.bits)] for u, d in damage.items()}, damage, {"probes": config.probes}


@register("taylor", TaylorConfig)
def taylor(model: nn.Module, units: UnitMap, calib: Calibration, config: TaylorConfig):
    """First-order Taylor damage (module docstring); score = damage at the narrowest width."""
    return _scored("taylor", model, units, calib, config)


@register("fisher", FisherConfig)
def fisher(model: nn.Module, units: UnitMap, calib: Calibration, config: FisherConfig):
    """Diagonal-Fisher damage (module docstring); score = damage at the narrowest width."""
    return _scored("fisher", model, units, calib, config)
