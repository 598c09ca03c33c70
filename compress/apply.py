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
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .atomic import atomic_directory
from .errors import CompressError
from .models import LoadedModel, build_empty, fingerprint, quantizable_linears
from .plan import LayerPlan, Plan
from .qlinear import QuantLinear
from .quant import QuantSpec

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


def apply_plan(model: nn.Module, plan: Plan, progress: bool = True) -> dict[str, LayerPlan]:
    """Quantize ``model`` in place as the plan says (round to nearest); returns the resolved layers.

    Every layer is quantized before any is swapped, so a bad layer (NaN weights) leaves the model
    untouched. GPTQ plans go through ``compress.gptq_apply`` instead (they need calibration data).
    """
    resolved = resolve_plan(plan, model)
    swaps = {}
    for name, lp in tqdm(resolved.items(), desc="quantizing", disable=not progress, leave=False):
        if lp.bits == 16:
            continue
        swaps[name] = QuantLinear.from_linear(model.get_submodule(name), lp.spec(), name)
    for name, q in swaps.items():
        set_module(model, name, q)
    return resolved


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


_ST_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file one tensor at a time.

    safetensors' own save_file first builds the whole file in memory, which doubles the peak of a
    block-by-block apply; this writes the same format (JSON header padded to 8 bytes, then each
    tensor's little-endian bytes in header order) with one tensor in flight.
    """
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _ST_NAMES:
            raise CompressError(f"cannot store tensor {name} of dtype {t.dtype} in safetensors")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for t in tensors.values():
            if t.numel():
                f.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))


def save_compressed(loaded: LoadedModel, plan: Plan, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a compressed directory (see the module docstring) atomically; returns its path.

    An anytime head on ``loaded.head`` is saved beside the weights (compress.heads).
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
