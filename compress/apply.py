"""Applying a plan to a model: every path (in memory layer by layer, or block by block through
compress.walker with calibration or streamed weights) goes through one per-layer function,
``quantize_layer``, with a quantizer from compress.quantizers. Writing the result is
compress.checkpoint's job.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import apply_runtime_options, save_compressed, set_module
from .errors import CompressError
from .models import (LoadedModel, find_blocks, fingerprint, is_linear, linear_shape, linear_weight,
                     quantizable_linears)
from .plan import LayerPlan, Plan
from .qlinear import QuantLinear
from .quantizers import QuantizerConfig, quantizer_config
from .safetensors_io import CheckpointReader


def resolve_plan(plan: Plan, model: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, LayerPlan]:
    """The plan's storage for every layer of ``model`` (validated, fingerprint checked)."""
    return plan.resolve(model, quantizable_linears(model, exclude), fingerprint(model))


def quantize_layer(layer: nn.Module, lp: LayerPlan, name: str, quantizer: QuantizerConfig,
                   hessian: torch.Tensor | None = None) -> QuantLinear:
    """The one per-layer step of every apply path: a linear layer (nn.Linear or Conv1D) and its
    LayerPlan -> a QuantLinear, by ``quantizer`` (hessian: (K, K) float32 for those that need one)."""
    weight = linear_weight(layer).data
    qw = quantizer.quantize(weight, lp.spec(), name, hessian)
    bias = layer.bias.data if getattr(layer, "bias", None) is not None else None
    return QuantLinear.from_quantized(qw, bias, dtype=layer.weight.dtype)


def apply_plan(model: nn.Module, plan: Plan, quantizer: QuantizerConfig | None = None,
               progress: bool = True) -> dict[str, LayerPlan]:
    """Quantize a whole in-memory ``model`` in place, layer by layer (quantizers that need no
    calibration); returns the resolved layers.

    Every layer is quantized before any is swapped, so a bad layer (NaN weights) leaves the model
    untouched. Calibrated quantizers (GPTQ) go through ``apply_blockwise``.
    """
    quantizer = quantizer or quantizer_config(plan.quantizer)
    if quantizer.needs_hessian:
        raise CompressError(f"quantizer {quantizer.method} needs calibration: use apply_blockwise")
    resolved = resolve_plan(plan, model)
    check_servable(model, resolved, plan.target)
    swaps = {}
    for name, lp in tqdm(resolved.items(), desc="quantizing", disable=not progress, leave=False):
        if lp.bits != 16:
            swaps[name] = quantize_layer(model.get_submodule(name), lp, name, quantizer)
    for name, q in swaps.items():
        set_module(model, name, q)
    return resolved


def check_servable(model: nn.Module, resolved: dict[str, LayerPlan], target: str | None) -> dict[str, str]:
    """The layers that keep the result from loading quantized in vLLM (target "vllm" / "gguf":
    CompressError naming them; otherwise the vLLM problems, for the summary)."""
    from .servable import problems

    specs = {n: lp.spec() for n, lp in resolved.items()}
    if target in ("vllm", "gguf"):
        found = problems(specs, model, target)
        if found:
            (name, why), = list(found.items())[:1]
            more = f" (and {len(found) - 1} more layers)" if len(found) > 1 else ""
            raise CompressError(f"plan is not servable for --target {target}: layer {name}: {why}{more}; "
                                f"re-plan, or set \"target\": \"any\" in the plan")
        return {}
    return problems(specs, model, "vllm")


def apply_blockwise(model: nn.Module, resolved: dict[str, LayerPlan], quantizer: QuantizerConfig,
                    batches: list[dict], device, reader=None, dtype: torch.dtype = torch.float32,
                    progress: bool = True) -> dict:
    """Quantize block by block (compress.walker): each block's layers see the inputs the already
    quantized blocks before it produce; with ``reader`` the weights stream from the checkpoint.

    batches: calibration inputs (dicts of tensors; an ``attention_mask`` (B, T) keeps padding out
    of the Hessians). Layers outside the block stack (a planned head) are quantized after the walk
    from their own weights (with a Hessian-free fallback to round to nearest, said in a warning).
    Returns the walk's memory statistics.
    """
    from .walker import walk_blocks

    blocks = find_blocks(model)  # before the walk swaps the blocks' linears for QuantLinear
    outside = {n: lp for n, lp in resolved.items() if lp.bits != 16
               and (blocks is None or blocks.block_of(n) is None)}
    masks = [b.get("attention_mask") for b in batches]
    stats = walk_blocks(model, batches, _block_step(resolved, quantizer, masks), device=device, reader=reader,
                        dtype=dtype, progress=progress)
    if outside and quantizer.needs_hessian:
        warnings.warn(f"{len(outside)} planned layers lie outside the block stack ({next(iter(outside))}, ...): "
                      f"quantized by round to nearest, not {quantizer.method}", stacklevel=2)
    rtn = quantizer_config("rtn")
    for name, lp in outside.items():
        module = model.get_submodule(name)
        if is_linear(module):
            set_module(model, name, quantize_layer(module, lp, name, rtn))
    return stats


def _block_step(resolved: dict[str, LayerPlan], quantizer: QuantizerConfig, masks: list):
    """walk_blocks' callback: collect the block's Hessians in one pass (if the quantizer needs
    them), then quantize each planned layer of the block and swap it for a QuantLinear."""
    from .gptq import HessianAccumulator

    def run(index: int, prefix: str, block: nn.Module, inputs: list[tuple[tuple, dict]]) -> None:
        targets = {name[len(prefix):]: lp for name, lp in resolved.items()
                   if name.startswith(prefix) and lp.bits != 16}
        if not targets:
            return
        accs: dict[str, HessianAccumulator] = {}
        if quantizer.needs_hessian:
            current: list = [None]  # the mask (B, T) of the batch being run

            def hook_for(acc):
                def hook(_module, args):
                    x = args[0]  # (B, T, K)
                    mask = current[0]
                    if mask is not None and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
                        x = x[mask.to(x.device).bool()]  # (tokens, K): padding never reaches H
                    acc.add(x)
                return hook

            handles = []
            for local in targets:
                layer = block.get_submodule(local)
                accs[local] = HessianAccumulator(linear_shape(layer)[1], prefix + local)
                handles.append(layer.register_forward_pre_hook(hook_for(accs[local])))
            try:
                for (args, kwargs), mask in zip(inputs, masks):
                    current[0] = mask
                    block(*args, **kwargs)
            finally:
                for h in handles:
                    h.remove()
        for local, lp in targets.items():
            hessian = accs[local].hessian if local in accs else None
            set_module(block, local, quantize_layer(block.get_submodule(local), lp, prefix + local, quantizer,
                                                    hessian))

    return run


def apply_to_directory(model: str | Path, plan: Plan, out: Path, quantizer: QuantizerConfig, *,
                       overwrite: bool = False, low_memory: bool = False, device: str | None = None,
                       dtype: torch.dtype = torch.float32, progress: bool = True, stats: dict | None = None) -> Path:
    """The whole apply: load (whole, or empty for streaming), quantize by the right path, switch on
    runtime options, fit an anytime head if planned, save atomically. Owns the choice of path:
    in memory layer by layer when the quantizer needs no calibration and memory is not limited,
    block by block otherwise."""
    from .data import calibration_batches, load_texts
    from .models import load_config, load_model, load_tokenizer, model_kind, resolve_model_path
    from .walker import empty_model, fix_malloc_mmap_threshold

    if out.exists() and not overwrite:  # fail before the slow part
        raise CompressError(f"output directory {out} exists; pass --overwrite to replace it")
    if low_memory:  # before anything large is allocated (see walker.fix_malloc_mmap_threshold)
        fix_malloc_mmap_threshold()
    plan.quantizer = quantizer.to_dict()
    if not quantizer.needs_hessian and not low_memory:
        lm = load_model(model, dtype)
        apply_plan(lm.model, plan, quantizer, progress=progress)
    else:
        path = resolve_model_path(model)
        kind = model_kind(load_config(path))
        reader = CheckpointReader(path) if low_memory else None
        lm = (LoadedModel(empty_model(path, kind), load_tokenizer(path), kind, path)
              if low_memory else load_model(path, dtype))
        resolved = plan.resolve(lm.model, quantizable_linears(lm.model), fingerprint(lm.model))
        check_servable(lm.model, resolved, plan.target)
        if quantizer.needs_hessian:
            q = quantizer
            batches = calibration_batches(lm.tokenizer, kind, load_texts(q.data), q.samples, q.seq_len,
                                          batch_size=8, config=lm.model.config)
        else:  # no calibration; one short batch carries the walk through the blocks
            batches = calibration_batches(lm.tokenizer, kind, load_texts(None), 1, 16, 1)
        walk = apply_blockwise(lm.model, resolved, quantizer, batches,
                               device or ("cuda" if torch.cuda.is_available() else "cpu"), reader, dtype, progress)
        if stats is not None:
            stats.update(walk)
    apply_runtime_options(lm.model, plan)
    if plan.anytime is not None:
        from .anytime import fit_text_head

        lm.head = fit_text_head(lm.model, lm.tokenizer, lm.kind, plan.anytime)
    return save_compressed(lm, plan, out, overwrite=overwrite)
