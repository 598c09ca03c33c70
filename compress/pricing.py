"""What each candidate storage costs a layer in error, for the quantizer that will run.

The analyzers measure damage at one int4 scheme (group 32 asymmetric by default) and at int8; the
planner also offers int4 at other groups and symmetries, and GPTQ repairs part of any scheme's
error. This module measures, per layer and candidate scheme, the errors that translate one into
the other (compress.planner.scheme_damage uses them):

    plain    ‖W − RTN(W)‖²                     every layer; no data
    energy   ‖W‖²
    rtn_h    tr(ΔW_rtn H ΔW_rtnᵀ)               with calibration: H = Σ xᵀx of the layer's inputs
    quant_h  tr(ΔW_q H ΔW_qᵀ), q the quantizer   (GPTQ's objective, ∝ the output error ‖X ΔWᵀ‖²),
             run at the first scheme of each width; the width's other schemes scaled by its ratio

H comes from the unmodified model's inputs, one block at a time (compress.walker), on real tokens
only; layers outside the block stack (heads, embedding tables) get ``plain`` and ``energy`` only
(GPTQ does not run on them: apply rounds them to nearest). A scheme is (bits, group_size,
symmetric) before fitting to a layer (compress.planner.layer_spec pads or widens it per layer).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .models import block_stack, linear_weight
from .quant import dequantize, quantize

Scheme = tuple[int, int, bool]  # (bits, group_size, symmetric); bits 4 or 8


@dataclass
class LayerErrors:
    """Errors of one layer per scheme (see the module docstring); rtn_h / quant_h empty without H."""

    energy: float
    plain: dict[Scheme, float]
    rtn_h: dict[Scheme, float] = field(default_factory=dict)
    quant_h: dict[Scheme, float] = field(default_factory=dict)


def _spec_of(scheme: Scheme, in_features: int, target: str):
    from .planner import layer_spec

    lp = layer_spec(scheme[0], scheme[1], scheme[2], in_features, target)
    return lp.spec() if lp.bits == scheme[0] else None  # None: the target cannot store it


@torch.no_grad()
def plain_errors(module: nn.Module, schemes: list[Scheme], target: str, H: torch.Tensor | None = None,
                 quantizer=None, name: str = "layer", tokens: int | None = None) -> LayerErrors:
    """energy and ‖W − RTN(W)‖² per scheme of one layer (weights in memory); a scheme the target
    cannot store for this layer is left out. With the layer's Hessian H (K, K) float32 (from
    ``tokens`` token rows) and ``quantizer`` (a compress.quantizers config) also rtn_h and quant_h."""
    from .gptq import output_error

    w = linear_weight(module).detach().float()  # (N, K)
    out = LayerErrors(float(w.square().sum()), {})
    if H is not None:
        H = H.to(w.device, torch.float32)
    # The quantizer runs once per width, at its first listed scheme (the analyzer's own, see
    # planner._with_analyzer_schemes); the width's other schemes take that scheme's ratio to RTN.
    # GPTQ's ratio barely depends on the group (MiniLM, same H: 0.254 of RTN's at g32, 0.247 at
    # g128, bench/results/peers-layers-cpu.md) and each run costs a GPTQ of the layer.
    ratio: dict[int, float] = {}
    for s in schemes:
        spec = _spec_of(s, w.shape[1], target)
        if spec is None:
            continue
        rtn = quantize(w, spec)
        out.plain[s] = float((dequantize(rtn) - w).square().sum())
        if H is None:
            continue
        out.rtn_h[s] = output_error(w, rtn, H)
        if s[0] not in ratio:
            out.quant_h[s] = output_error(w, quantizer.quantize(w, spec, name, H, tokens=tokens), H)
            ratio[s[0]] = out.quant_h[s] / out.rtn_h[s] if out.rtn_h[s] > 0 else 1.0
        else:
            out.quant_h[s] = out.rtn_h[s] * ratio[s[0]]
    return out


def layer_errors(lm, layers: dict[str, nn.Module], schemes: list[Scheme], target: str, quantizer=None,
                 batches: list[dict] | None = None, progress: bool = False) -> dict[str, LayerErrors]:
    """LayerErrors of every layer in ``layers`` (name -> module of ``lm.model``).

    lm: a LoadedModel, or a compress.analyze.streamed.StreamedModel (blocks read from its checkpoint
    one at a time, never all in memory). quantizer, batches: the quantizer that will run and
    calibration inputs (dicts of tensors; an ``attention_mask`` keeps padding out of H); when the
    quantizer needs a Hessian (gptq) every layer inside the block stack also gets rtn_h / quant_h.
    """
    streamed = getattr(lm, "reader", None) is not None
    needs_h = quantizer is not None and quantizer.needs_hessian
    blocks = block_stack(lm.model)
    inside = [n for n in layers if blocks is not None and blocks.block_of(n) is not None]
    # Outside the block stack everything is in memory (a streamed model loads it whole).
    out = {n: plain_errors(m, schemes, target) for n, m in layers.items() if n not in set(inside)}
    if needs_h:
        out.update(_walk_hessians(lm, inside, schemes, target, quantizer, batches, progress))
    elif streamed:
        from .analyze.streamed import unit_values

        out.update(unit_values(lm, {n: [n] for n in inside}, lambda mods: plain_errors(mods[0], schemes, target),
                               progress))
    else:
        out.update({n: plain_errors(layers[n], schemes, target) for n in inside})
    return {n: out[n] for n in layers}


def _walk_hessians(lm, names: list[str], schemes, target, quantizer, batches, progress) -> dict[str, LayerErrors]:
    """plain_errors with H of ``names`` (all inside the block stack), one block at a time from the
    unmodified model's inputs (the blocks are run, never changed)."""
    from .errors import CompressError
    from .gptq import collect_hessians, token_mask
    from .walker import walk_blocks

    if not batches:
        raise CompressError("pricing the quantizer's error needs calibration batches; none were given")
    masks = [token_mask(b) for b in batches]
    out: dict[str, LayerErrors] = {}

    def step(_index: int, prefix: str, block: nn.Module, inputs) -> None:
        local = {n[len(prefix):]: n for n in names if n.startswith(prefix)}
        if not local:
            return
        accs = collect_hessians(block, {k: block.get_submodule(k) for k in local}, inputs, masks, prefix)
        for k, n in local.items():
            out[n] = plain_errors(block.get_submodule(k), schemes, target, accs[k].hessian, quantizer, n,
                                  accs[k].n_samples)

    streamed = getattr(lm, "reader", None) is not None
    device = lm.device if streamed else next(lm.model.parameters()).device
    walk_blocks(lm.model, batches, step, device=device, reader=lm.reader if streamed else None,
                dtype=getattr(lm, "dtype", torch.float32), progress=progress, release=streamed)
    missing = [n for n in names if n not in out]
    if missing:
        raise CompressError(f"pricing: no calibration input reached {missing[:3]}")
    return out
