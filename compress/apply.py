"""Applying a plan to a model, and saving / loading compressed model directories.

A compressed directory holds::

    model.safetensors   every tensor of the compressed model (QuantLinear buffers packed)
    config.json         the model's transformers config
    compress.json       {"format": "compress.model", "version": 1, "kind": ..., "plan": {...},
                         "layers": {name: {"bits", "group_size", "symmetric", "in_features",
                                           "out_features", "bias"}}, "tied": {alias: name}}
    tokenizer files     when the model has a tokenizer

It is written to a temporary sibling directory and renamed when complete, so a failure never
leaves a half-written output. Loading never unpickles: safetensors for tensors, JSON for the rest.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .atomic import atomic_directory
from .errors import CompressError
from .models import (LoadedModel, build_empty, find_blocks, fingerprint, is_linear, linear_shape, linear_weight,
                     quantizable_linears)
from .plan import LayerPlan, Plan
from .qlinear import QuantLinear
from .quant import QuantSpec
from .quantizers import QuantizerConfig, quantizer_config
from .safetensors_io import CheckpointReader, write_safetensors

MODEL_FORMAT = "compress.model"
MODEL_VERSION = 1
WEIGHTS = "model.safetensors"
META = "compress.json"


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


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
    swaps = {}
    for name, lp in tqdm(resolved.items(), desc="quantizing", disable=not progress, leave=False):
        if lp.bits != 16:
            swaps[name] = quantize_layer(model.get_submodule(name), lp, name, quantizer)
    for name, q in swaps.items():
        set_module(model, name, q)
    return resolved


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
        if quantizer.needs_hessian:
            q = quantizer
            batches = calibration_batches(lm.tokenizer, kind, load_texts(q.data), q.samples, q.seq_len,
                                          batch_size=8)
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


def apply_runtime_options(model: nn.Module, plan: Plan) -> None:
    """Switch on what the plan asks for at run time (HiRED token dropping); raises if unsupported."""
    if plan.token_dropping is not None:
        from .hired import HiredConfig, apply_hired

        apply_hired(model, HiredConfig.from_dict(plan.token_dropping))


def _layer_meta(model: nn.Module) -> dict[str, dict]:
    return {
        name: {"bits": m.bits, "group_size": m.group_size, "symmetric": m.symmetric,
               "in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}
        for name, m in model.named_modules() if isinstance(m, QuantLinear)
    }


def _dedupe_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that share storage with an earlier one (tied embeddings); map alias -> kept."""
    seen: dict[tuple, str] = {}
    kept, tied = {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            tied[name] = seen[key]
        else:
            seen[key] = name
            kept[name] = t
    return kept, tied


def save_compressed(loaded: LoadedModel, plan: Plan, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a compressed directory (see the module docstring) atomically; returns its path.

    An anytime head on ``loaded.head`` is saved beside the weights (compress.anytime).
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise CompressError(f"output directory {out} exists; pass --overwrite to replace it")
    with atomic_directory(out) as tmp:
        model = loaded.model
        state, tied = _dedupe_tied(model.state_dict())
        write_safetensors(tmp / WEIGHTS, state, {"format": "pt"})
        model.config.save_pretrained(tmp)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        meta = {"format": MODEL_FORMAT, "version": MODEL_VERSION, "kind": loaded.kind,
                "plan": plan.to_dict(), "layers": _layer_meta(model), "tied": tied}
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
        if loaded.head is not None:
            from .anytime import save_text_head

            save_text_head(loaded.head, tmp)
    return out


def read_meta(path: str | Path) -> dict:
    """compress.json of a compressed directory, checked for format and version."""
    path = Path(path)
    meta_file = path / META
    if not meta_file.is_file():
        raise CompressError(f"{path} is not a compressed model directory: it has no {META}")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as exc:
        raise CompressError(f"{meta_file} is not valid JSON: {exc.msg}") from None
    if meta.get("format") != MODEL_FORMAT or meta.get("version") != MODEL_VERSION:
        raise CompressError(f"{meta_file}: format {meta.get('format')!r} version {meta.get('version')!r} "
                            f"is not {MODEL_FORMAT} version {MODEL_VERSION}")
    return meta


def load_compressed(path: str | Path, device: str | torch.device = "cpu",
                    active_units: int | None = None) -> LoadedModel:
    """Rebuild a compressed model without materialising full-precision weights.

    The model is built with parameters on the meta device (accelerate's ``init_empty_weights``;
    buffers such as rotary tables are real), its planned layers are swapped for empty QuantLinear
    modules, and the saved tensors are assigned in place. Outputs equal those of the in-memory
    compressed model bit for bit. An anytime head, when saved, comes back as ``.head`` with
    ``active_units`` hidden units switched on (default: as saved).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .models import load_config, load_tokenizer

    path = Path(path)
    meta = read_meta(path)
    config = load_config(path)
    model = build_empty(meta["kind"], config)
    for name, lm in meta["layers"].items():
        spec = QuantSpec(lm["bits"], lm["group_size"], lm["symmetric"])
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CompressError(f"{path}: layer {name} in {META} is not in the model config") from None
        dtype = old.weight.dtype if isinstance(old, nn.Linear) else torch.float32
        set_module(model, name, QuantLinear(lm["in_features"], lm["out_features"], spec, lm["bias"],
                                            dtype=dtype, device="meta"))
    try:
        state = load_file(path / WEIGHTS, device=str(device))
    except (SafetensorError, OSError) as exc:
        raise CompressError(f"{path / WEIGHTS} is truncated or corrupted: {exc}") from None
    for alias, name in meta.get("tied", {}).items():
        if name not in state:
            raise CompressError(f"{path / WEIGHTS}: tied tensor {name} is missing")
        state[alias] = state[name]
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise CompressError(f"{path / WEIGHTS} does not match the model: missing {sorted(missing)[:5]}, "
                            f"unexpected {sorted(unexpected)[:5]}")
    for name, t in model.state_dict().items():
        # Floating tensors keep the dtype they were saved in (apply --dtype); integer codes must match.
        same_kind = t.dtype == state[name].dtype or (t.is_floating_point() and state[name].is_floating_point()
                                                     and name.rpartition(".")[2] != "scales")
        if t.shape != state[name].shape or not same_kind:
            raise CompressError(f"{path / WEIGHTS}: tensor {name} has shape {tuple(state[name].shape)} "
                                f"{state[name].dtype}, expected {tuple(t.shape)} {t.dtype}")
    model.load_state_dict(state, assign=True, strict=True)
    if meta.get("tied") and hasattr(model, "tie_weights"):
        model.tie_weights()
    model.eval()
    apply_runtime_options(model, Plan.from_dict(meta["plan"]))
    from .anytime import load_text_head

    head = load_text_head(path, active_units)
    return LoadedModel(model, load_tokenizer(path), meta["kind"], path, head.to(device) if head else None)
