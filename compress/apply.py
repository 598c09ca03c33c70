"""Applying a plan to a model: every path (in memory layer by layer, or block by block through
compress.walker with calibration or streamed weights) goes through one per-layer function,
``quantize_layer``, with a quantizer from compress.quantizers. Writing the result is
compress.checkpoint's job.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .atomic import check_output_dir
from .checkpoint import META, apply_runtime_options, save_compressed, set_module
from .errors import CompressError
from .models import (LoadedModel, find_blocks, fingerprint, is_conv1d, is_linear, linear_weight,
                     quantizable_linears, tied_heads)
from .plan import LayerPlan, Plan
from .qlinear import QuantEmbedding, QuantLinear
from .quantizers import QuantizerConfig, quantizer_config
from .safetensors_io import CheckpointReader


def resolve_plan(plan: Plan, model: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, LayerPlan]:
    """The plan's storage for every layer of ``model`` (validated, fingerprint checked)."""
    return plan.resolve(model, quantizable_linears(model, exclude), fingerprint(model))


def quantize_layer(layer: nn.Module, lp: LayerPlan, name: str, quantizer: QuantizerConfig,
                   hessian: torch.Tensor | None = None, drift: torch.Tensor | None = None,
                   tokens: int | None = None) -> QuantLinear | QuantEmbedding:
    """The one per-layer step of every apply path: a linear layer (nn.Linear or Conv1D) or an
    embedding table and its LayerPlan -> a QuantLinear / QuantEmbedding, by ``quantizer``
    (hessian, drift: (K, K) float32 for those that need them, tokens: the token rows behind
    hessian, see QuantizerConfig.quantize; tables are rounded to nearest)."""
    weight = linear_weight(layer).data
    if isinstance(layer, nn.Embedding):
        qw = quantizer_config("rtn").quantize(weight, lp.spec(), name)
        return QuantEmbedding.from_quantized(qw, layer.padding_idx, dtype=layer.weight.dtype)
    qw = quantizer.quantize(weight, lp.spec(), name, hessian, drift, tokens)
    bias = layer.bias.data if getattr(layer, "bias", None) is not None else None
    q = QuantLinear.from_quantized(qw, bias, dtype=layer.weight.dtype)
    q.from_conv1d = is_conv1d(layer)  # its dense form, where one is written, is (K, N)
    return q


def retie_heads(model: nn.Module, tied: dict[str, str]) -> None:
    """After quantization: a head that was tied to a now-quantized table shares its buffers."""
    for head, table in tied.items():
        emb = model.get_submodule(table)
        if isinstance(emb, QuantEmbedding):
            old = model.get_submodule(head)
            bias = old.bias.data if getattr(old, "bias", None) is not None else None
            set_module(model, head, emb.tied_head(bias))


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
    tied = tied_heads(model)
    swaps = {}
    for name, lp in tqdm(resolved.items(), desc="quantizing", disable=not progress, leave=False):
        if lp.bits != 16 and name not in tied:
            swaps[name] = quantize_layer(model.get_submodule(name), lp, name, quantizer)
    for name, q in swaps.items():
        set_module(model, name, q)
    retie_heads(model, tied)
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
    from .gptq import token_mask
    from .walker import walk_blocks

    blocks = find_blocks(model)  # before the walk swaps the blocks' linears for QuantLinear
    outside = {n: lp for n, lp in resolved.items() if lp.bits != 16
               and (blocks is None or blocks.block_of(n) is None)}
    masks = [token_mask(b) for b in batches]
    stats = walk_blocks(model, batches, _block_step(resolved, quantizer, masks), device=device, reader=reader,
                        dtype=dtype, progress=progress, reference=quantizer.needs_reference)
    tied = tied_heads(model)
    outside_linears = [n for n in outside if is_linear(model.get_submodule(n)) and n not in tied]
    if outside_linears and quantizer.needs_hessian:
        warnings.warn(f"{len(outside_linears)} planned layers lie outside the block stack ({outside_linears[0]}, ...): "
                      f"quantized by round to nearest, not {quantizer.method}", stacklevel=2)
    rtn = quantizer_config("rtn")
    for name, lp in outside.items():
        module = model.get_submodule(name)
        if name not in tied and (is_linear(module) or isinstance(module, nn.Embedding)):
            set_module(model, name, quantize_layer(module, lp, name, rtn))
    retie_heads(model, tied)
    return stats


def _block_step(resolved: dict[str, LayerPlan], quantizer: QuantizerConfig, masks: list):
    """walk_blocks' callback: collect the block's Hessians in one pass (if the quantizer needs
    them; with the full-precision stream's drift if it needs that too), then quantize each planned
    layer of the block and swap it for a QuantLinear."""
    from .gptq import collect_hessians

    def run(index: int, prefix: str, block: nn.Module, inputs: list[tuple[tuple, dict]],
            reference: list[tuple[tuple, dict]] | None = None) -> None:
        targets = {name[len(prefix):]: lp for name, lp in resolved.items()
                   if name.startswith(prefix) and lp.bits != 16}
        if not targets:
            return
        accs = {}
        if quantizer.needs_hessian:  # one pass over the block's inputs, real tokens only
            accs = collect_hessians(block, {local: block.get_submodule(local) for local in targets}, inputs,
                                    masks, prefix, reference=reference)
        for local, lp in targets.items():
            acc = accs.get(local)
            set_module(block, local, quantize_layer(block.get_submodule(local), lp, prefix + local, quantizer,
                                                    acc.hessian if acc else None, acc.drift if acc else None,
                                                    acc.n_samples if acc else None))

    return run


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_FP16_MAX = 65504.0


def source_dtype(path: Path) -> torch.dtype | None:
    """The floating dtype a model directory's checkpoint stores its weights in (None if unknown)."""
    from .safetensors_io import DTYPES as ST, read_header

    for f in sorted(path.glob("*.safetensors")):
        _, header = read_header(f)
        for entry in header.values():
            dtype = ST.get(entry["dtype"])
            if dtype is not None and dtype.is_floating_point:
                return dtype
    return None


def storage_dtype(requested: str | None, model: nn.Module, source: torch.dtype | None) -> tuple[torch.dtype, str]:
    """The dtype of everything left unquantized, and why.

    requested: "float32" / "float16" / "bfloat16", or None: the checkpoint's dtype when it is 16-bit,
    else float16 unless a tensor's values overflow it (then bfloat16). An explicit float16 that a
    tensor overflows is an error naming the tensor and its largest magnitude.
    """
    if requested is not None and requested not in DTYPES:
        raise CompressError(f"dtype {requested!r} is not one of {', '.join(DTYPES)}")
    if requested is None and source in (torch.float16, torch.bfloat16):
        return source, "as the checkpoint stores it"
    want = DTYPES[requested] if requested else torch.float16
    if want == torch.float16:
        for name, p in _unquantized(model):
            big = p.detach().abs().max().item() if p.numel() else 0.0
            if big > _FP16_MAX:
                if requested:
                    raise CompressError(f"tensor {name} holds values up to {big:.4g}, beyond float16's "
                                        f"{_FP16_MAX:.0f}; use --dtype bfloat16 or float32")
                return torch.bfloat16, f"{name} holds values up to {big:.4g}, beyond float16"
    return want, ("as asked" if requested else "the default for a float32 checkpoint")


def _unquantized(model: nn.Module):
    """(name, tensor) of every parameter and quantized-module bias left in full precision."""
    for name, p in model.named_parameters():
        yield name, p
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear) and m.bias is not None:
            yield f"{name}.bias", m.bias


def cast_unquantized(model: nn.Module, dtype: torch.dtype) -> None:
    """Store every parameter (and QuantLinear bias, QuantEmbedding output) in ``dtype``; the
    packed codes, scales and zero points keep their own dtypes. Buffers such as rotary tables stay
    as built. Tied parameters stay tied (each Parameter is converted in place once)."""
    for p in {id(p): p for p in model.parameters()}.values():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.bias is not None:
            m.bias = m.bias.to(dtype)
        elif isinstance(m, QuantEmbedding):
            m.dtype = dtype
    if hasattr(model, "config"):
        model.config.dtype = dtype  # what config.json says the weights are (torch_dtype)


def apply_to_directory(model: str | Path, plan: Plan, out: Path, quantizer: QuantizerConfig, *,
                       overwrite: bool = False, low_memory: bool = False, device: str | None = None,
                       dtype: str | None = None, progress: bool = True, stats: dict | None = None) -> Path:
    """The whole apply: load (whole, or empty for streaming) in float32, quantize by the right path,
    store the rest in 16 bits by default (``storage_dtype``), switch on runtime options, fit an
    anytime head if planned, save atomically. Owns the choice of path: in memory layer by layer
    when the quantizer needs no calibration and memory is not limited, block by block otherwise.
    ``stats`` receives the summary: dtype and why, quantizer, calibration, seconds, peak memory."""
    import time

    from .data import calibration_batches, load_texts
    from .models import load_config, load_model, load_tokenizer, model_kind, resolve_model_path
    from .walker import empty_model, fix_malloc_mmap_threshold

    t0 = time.perf_counter()
    if dtype is not None and dtype not in DTYPES:
        raise CompressError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    check_output_dir(out, overwrite, META)  # fail before the slow part
    if low_memory:  # before anything large is allocated (see walker.fix_malloc_mmap_threshold)
        fix_malloc_mmap_threshold()
    plan.quantizer = quantizer.to_dict()
    path = resolve_model_path(model)
    summary: dict = {"quantizer": quantizer.to_dict()}
    if not quantizer.needs_hessian and not low_memory:
        lm = load_model(path, torch.float32)
        apply_plan(lm.model, plan, quantizer, progress=progress)
    else:
        kind = model_kind(load_config(path))
        reader = CheckpointReader(path) if low_memory else None
        lm = (LoadedModel(empty_model(path, kind), load_tokenizer(path), kind, path)
              if low_memory else load_model(path, torch.float32))
        resolved = plan.resolve(lm.model, quantizable_linears(lm.model), fingerprint(lm.model))
        check_servable(lm.model, resolved, plan.target)
        if quantizer.needs_hessian:
            q = quantizer
            batches = calibration_batches(lm.tokenizer, kind, load_texts(q.data), q.samples, q.seq_len,
                                          batch_size=8, config=lm.model.config)
            summary["calibration"] = {"data": q.data or "embedded corpus (Python documentation)",
                                      "sequences": sum(len(b["input_ids"]) for b in batches)}
        else:  # no calibration; one short batch carries the walk through the blocks
            batches = calibration_batches(lm.tokenizer, kind, load_texts(None), 1, 16, 1)
        summary.update(apply_blockwise(lm.model, resolved, quantizer, batches,
                                       device or ("cuda" if torch.cuda.is_available() else "cpu"), reader,
                                       torch.float32, progress))
    target_dtype, why = storage_dtype(dtype, lm.model, source_dtype(path))
    cast_unquantized(lm.model, target_dtype)
    summary["dtype"], summary["dtype_reason"] = str(target_dtype).replace("torch.", ""), why
    apply_runtime_options(lm.model, plan)
    if plan.anytime is not None:
        from .anytime import fit_text_head

        lm.head = fit_text_head(lm.model, lm.tokenizer, lm.kind, plan.anytime)
    from .evaluate import size_report, stored_checkpoint_bytes

    summary["size"] = size_report(lm.model).to_dict()
    summary["source_bytes"] = stored_checkpoint_bytes(path)
    written = save_compressed(lm, plan, out, overwrite=overwrite)
    summary["directory_bytes"] = sum(f.stat().st_size for f in written.iterdir() if f.is_file())
    summary["servable"] = json.loads((written / "compress.json").read_text()).get("servable", {})
    summary["seconds"] = time.perf_counter() - t0
    if stats is not None:
        stats.update(summary)
    return written
