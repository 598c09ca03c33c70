"""Compressed model directories on disk: a compressed-tensors checkpoint plus compress.json.

A compressed directory holds::

    model.safetensors   the checkpoint transformers and vLLM load as it is: quantized linear layers
                        as compressed-tensors "pack-quantized" tensors (compress.ct_format), every
                        other tensor as in the model
    config.json         the model's config with a ``quantization_config`` (compressed-tensors)
    compress.json       {"format": "compress.model", "version": 2, "kind": ..., "plan": {...},
                         "layers": {name: {"bits", "group_size", "symmetric", "in_features",
                                           "out_features", "bias", "stored"}},
                         "tied": {alias: name}, "servable": {"vllm": {name: reason}}}
    compress-packed.safetensors
                        only when some quantized part has no compressed-tensors form that
                        transformers loads (an int4 group that does not divide in_features; every
                        quantized embedding table): its exact packed codes for compress.load, while
                        model.safetensors holds its dequantized weight as a plain tensor in the
                        model's dtype (named in "ignore"), so other loaders still get it right
    tokenizer files     when the model has a tokenizer

Directories of version 1 (compress's own qweight / scales / zeros tensors, no quantization_config)
still load. compressed-tensors checkpoints written by other tools (llm-compressor, GPTQModel) load
too, through their quantization_config alone. Writing is atomic (a temporary sibling renamed into
place); loading never unpickles.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_directory, check_output_dir
from .ct_format import from_ct, layer_specs, quantization_config, to_ct, unsupported
from .errors import CompressError
from .models import LoadedModel, build_empty, is_conv1d, is_linear, linear_shape
from .plan import Plan
from .qlinear import QuantEmbedding, QuantLinear
from .quant import QuantizedWeight, QuantSpec, dequantize
from .safetensors_io import CheckpointReader, write_safetensors

MODEL_FORMAT = "compress.model"
MODEL_VERSION = 2
WEIGHTS = "model.safetensors"
PACKED = "compress-packed.safetensors"
META = "compress.json"
_V1_TENSORS = ("qweight", "scales", "zeros")


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_runtime_options(model: nn.Module, plan: Plan) -> None:
    """Switch on what the plan asks for at run time (HiRED token dropping); raises if unsupported."""
    if plan.token_dropping is not None:
        from .hired import HiredConfig, apply_hired

        apply_hired(model, HiredConfig.from_dict(plan.token_dropping))


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


def _scale_dtype(model: nn.Module) -> torch.dtype:
    """weight_scale's dtype: the model's when it holds fp16 scales exactly, else float32."""
    dtype = getattr(model, "dtype", torch.float32)
    return dtype if dtype in (torch.float16, torch.float32) else torch.float32


def quantized_modules(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """(name -> QuantLinear / QuantEmbedding stored in its own right, tied head -> its table):
    a head sharing a QuantEmbedding's buffers is not stored again."""
    tables = {id(m.qweight): n for n, m in model.named_modules() if isinstance(m, QuantEmbedding)}
    own, tied = {}, {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear) and id(m.qweight) in tables:
            tied[name] = tables[id(m.qweight)]
        elif isinstance(m, (QuantLinear, QuantEmbedding)):
            own[name] = m
    return own, tied


def _shape_of(m: nn.Module) -> tuple[int, int]:
    """(N, K) of a QuantLinear or a QuantEmbedding (rows, row length)."""
    return (m.out_features, m.in_features) if isinstance(m, QuantLinear) else (m.num_embeddings, m.embedding_dim)


def checkpoint_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                   dict[str, dict], dict[str, str], dict[str, str]]:
    """The tensors of a compressed in-memory model as they are stored.

    Returns (model.safetensors tensors, compress-packed.safetensors tensors, per-layer metadata,
    tied tensors (alias -> kept), layers with no compressed-tensors form and why). Tied tensors and
    tied quantized heads appear once.
    """
    scale_dtype = _scale_dtype(model)
    state = dict(model.state_dict())
    main: dict[str, torch.Tensor] = {}
    packed: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    unservable: dict[str, str] = {}
    own, tied_heads = quantized_modules(model)
    for name in list(own) + list(tied_heads):
        for t in _V1_TENSORS:
            state.pop(f"{name}.{t}", None)
    for name, m in own.items():
        n, k = _shape_of(m)
        qw = m.quantized_weight()
        if isinstance(m, QuantEmbedding):
            why = ("transformers and vLLM load embedding tables in 16 bits only (a dense copy is stored for "
                   "them; compress and the exporters read the codes)")
        elif m.from_conv1d:
            why = "a transformers Conv1D (weight stored (K, N)) has no compressed-tensors form"
        else:
            why = unsupported(m.spec, k)
        meta = {"bits": m.spec.bits, "group_size": m.spec.group_size, "symmetric": m.spec.symmetric,
                "in_features": k, "out_features": n, "bias": getattr(m, "bias", None) is not None,
                "kind": "linear" if isinstance(m, QuantLinear) else "embedding", "stored": "compressed-tensors"}
        if why is None:
            for key, t in to_ct(qw, scale_dtype).items():
                main[f"{name}.{key}"] = t
        else:
            meta["stored"] = "dense + packed"
            unservable[name] = why
            # the dense copy other loaders read, in the model's dtype
            dense = dequantize(qw, getattr(model, "dtype", torch.float32))
            main[f"{name}.weight"] = dense.t().contiguous() if getattr(m, "from_conv1d", False) else dense
            for key, t in qw.tensors().items():
                packed[f"{name}.{key}"] = t
        layers[name] = meta
    for head, table in tied_heads.items():
        layers[head] = {**layers[table], "kind": "linear", "tied_to": table,
                        "bias": model.get_submodule(head).bias is not None}
    kept, tied = _dedupe_tied({**state, **main})
    return kept, packed, layers, tied, unservable


def save_compressed(loaded: LoadedModel, plan: Plan, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a compressed directory (see the module docstring) atomically; returns its path.

    An anytime head on ``loaded.head`` is saved beside the weights (compress.anytime).
    """
    out = Path(out_dir)
    check_output_dir(out, overwrite, META)
    model = loaded.model
    main, packed, layers, tied, unservable = checkpoint_tensors(model)
    nbytes = sum(t.numel() * t.element_size() for t in (*main.values(), *packed.values()))
    groups: dict[QuantSpec, list[str]] = {}
    for name, meta in layers.items():
        if meta["stored"] == "compressed-tensors" and "tied_to" not in meta:
            groups.setdefault(QuantSpec(meta["bits"], meta["group_size"], meta["symmetric"]), []).append(name)
    ignore = [n for n, m in model.named_modules() if is_linear(m) and not isinstance(m, QuantLinear)]
    ignore += list(unservable) + [n for n, meta in layers.items() if "tied_to" in meta]
    with atomic_directory(out, marker=META, expected_bytes=nbytes) as tmp:
        write_safetensors(tmp / WEIGHTS, main, {"format": "pt"})
        if packed:
            write_safetensors(tmp / PACKED, packed, {"format": "pt"})
        model.config.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        config.pop("quantization_config", None)
        if groups:
            config["quantization_config"] = quantization_config(groups, ignore)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        meta = {"format": MODEL_FORMAT, "version": MODEL_VERSION, "kind": loaded.kind,
                "plan": plan.to_dict(), "layers": layers, "tied": tied,
                "servable": {"vllm": servable_problems(model, unservable)}}
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
        if loaded.head is not None:
            from .anytime import save_text_head

            save_text_head(loaded.head, tmp)
    return out


def servable_problems(model: nn.Module, no_ct_form: dict[str, str]) -> dict[str, str]:
    """Every layer that keeps the directory from loading quantized in vLLM, with the reason."""
    from .servable import problems

    specs = {n: m.spec if isinstance(m, QuantLinear) else QuantSpec(16)
             for n, m in model.named_modules() if is_linear(m) or isinstance(m, QuantLinear)}
    return {**problems(specs, model, "vllm"), **no_ct_form}


def read_meta(path: str | Path) -> dict:
    """compress.json of a compressed directory, checked for format and version (1 or 2); for a
    compressed-tensors checkpoint of another tool (no compress.json), the same record built from
    its quantization_config (``plan`` None, ``peer`` True)."""
    path = Path(path)
    meta_file = path / META
    if not meta_file.is_file():
        if (path / "config.json").is_file() and "quantization_config" in json.loads((path / "config.json").read_text()):
            return peer_meta(path)
        raise CompressError(f"{path} is not a compressed model directory: it has no {META}")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as exc:
        raise CompressError(f"{meta_file} is not valid JSON: {exc.msg}") from None
    if meta.get("format") != MODEL_FORMAT or meta.get("version") not in (1, MODEL_VERSION):
        raise CompressError(f"{meta_file}: format {meta.get('format')!r} version {meta.get('version')!r} "
                            f"is not {MODEL_FORMAT} version 1 or {MODEL_VERSION}")
    return meta


def peer_meta(path: Path) -> dict:
    """A compress.json equivalent for a compressed-tensors checkpoint another tool wrote."""
    from .models import load_config, model_kind

    config = load_config(path)
    if getattr(config, "quantization_config", None) is None:
        raise CompressError(f"{path} is neither a compressed directory (no {META}) nor a compressed-tensors "
                            f"checkpoint (no quantization_config in config.json)")
    kind = model_kind(config)
    del config.quantization_config
    model = build_empty(kind, config)
    names = [n for n, m in model.named_modules() if is_linear(m)]
    qconfig = json.loads((path / "config.json").read_text())["quantization_config"]
    layers = {}
    for name, spec in layer_specs(qconfig, names, str(path)).items():
        m = model.get_submodule(name)
        n, k = linear_shape(m)
        layers[name] = {"bits": spec.bits, "group_size": spec.group_size, "symmetric": spec.symmetric,
                        "in_features": k, "out_features": n, "bias": getattr(m, "bias", None) is not None,
                        "stored": "compressed-tensors"}
    return {"format": MODEL_FORMAT, "version": MODEL_VERSION, "kind": kind, "plan": None,
            "layers": layers, "tied": {}, "servable": {}, "peer": True}


def _quant_layers(path: Path, meta: dict, model: nn.Module) -> dict[str, tuple[QuantSpec, str]]:
    """name -> (spec, where its tensors are: "v1" | "ct" | "packed") for every quantized layer."""
    if meta["version"] == 1:
        return {n: (QuantSpec(m["bits"], m["group_size"], m["symmetric"]), "v1") for n, m in meta["layers"].items()}
    config = json.loads((path / "config.json").read_text())
    linear_names = [n for n, m in model.named_modules() if is_linear(m) or isinstance(m, nn.Embedding)]
    out = {}
    qconfig = config.get("quantization_config")
    if qconfig is not None:
        out = {n: (s, "ct") for n, s in layer_specs(qconfig, linear_names, str(path)).items()}
    for name, m in ({} if meta.get("peer") else meta["layers"]).items():
        if m.get("stored") == "dense + packed" and "tied_to" not in m:
            out[name] = (QuantSpec(m["bits"], m["group_size"], m["symmetric"]), "packed")
    return out


def load_compressed(path: str | Path, device: str | torch.device = "cpu",
                    active_units: int | None = None) -> LoadedModel:
    """Rebuild a compressed model without materialising full-precision weights.

    Reads compress's own directories (version 2, and version 1) and compressed-tensors
    checkpoints of other tools. The model is built with parameters on the meta device, its
    quantized layers become QuantLinear modules holding the stored codes, and every other tensor
    is assigned in place. Outputs equal those of the in-memory compressed model bit for bit. An
    anytime head, when saved, comes back as ``.head`` with ``active_units`` units switched on.
    """
    from .models import load_config, load_tokenizer

    path = Path(path)
    meta = read_meta(path)
    config = load_config(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # compress builds the quantized modules itself
    model = build_empty(meta["kind"], config)
    layers = _quant_layers(path, meta, model)
    state = CheckpointReader(path).read_all(device)
    packed_state: dict[str, torch.Tensor] = {}
    if any(where == "packed" for _, where in layers.values()):
        if not (path / PACKED).is_file():
            raise CompressError(f"{path}: {PACKED} is missing (compress.json lists dense + packed layers)")
        packed_state = CheckpointReader.single_file(path / PACKED).read_all(device)
    for alias, name in meta.get("tied", {}).items():
        if name not in state:
            raise CompressError(f"{path / WEIGHTS}: tied tensor {name} is missing")
        state[alias] = state[name]
    model_dtype = next((t.dtype for k, t in state.items() if t.is_floating_point()
                        and not k.endswith(("weight_scale", ".scales"))), torch.float32)
    kept32: list[str] = []  # layers whose peer float32 scales float16 cannot hold (from_ct keeps them)
    for name, (spec, where) in layers.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CompressError(f"{path}: quantized layer {name} is not in the model config") from None
        n, k = linear_shape(old)
        if where == "v1":
            parts = {t: state.pop(f"{name}.{t}") for t in _V1_TENSORS if f"{name}.{t}" in state}
            if "qweight" not in parts or "scales" not in parts:
                raise CompressError(f"{path / WEIGHTS}: layer {name} lacks qweight/scales")
            qw = QuantizedWeight(spec, k, parts["qweight"], parts["scales"], parts.get("zeros"))
        elif where == "ct":
            parts = {t: state.pop(f"{name}.{t}") for t in ("weight_packed", "weight_scale", "weight_zero_point",
                                                          "weight_shape") if f"{name}.{t}" in state}
            qw = from_ct(parts, spec, name)
            if qw.scales.dtype == torch.float32:
                kept32.append(name)
        else:
            state.pop(f"{name}.weight", None)  # the dense copy other loaders read
            parts = {t: packed_state[f"{name}.{t}"] for t in _V1_TENSORS if f"{name}.{t}" in packed_state}
            qw = QuantizedWeight(spec, k, parts["qweight"], parts["scales"], parts.get("zeros"))
        _check_shapes(qw, spec, n, k, name, path)
        if isinstance(old, nn.Embedding):
            set_module(model, name, QuantEmbedding.from_quantized(qw, old.padding_idx, dtype=model_dtype))
            continue
        bias = state.pop(f"{name}.bias", None)
        q = QuantLinear.from_quantized(qw, bias, dtype=bias.dtype if bias is not None else model_dtype)
        q.from_conv1d = is_conv1d(old)
        set_module(model, name, q)
    if kept32:  # another tool's float32 scales, kept: exact, but not on the kernels' float16 path
        warnings.warn(f"{path}: weight_scale of {len(kept32)} layers is float32 that float16 cannot hold exactly "
                      f"(e.g. {kept32[0]}); kept in float32 so outputs equal the checkpoint's own "
                      f"(these layers run the torch reference, not the GPU kernels; exports write them in their "
                      f"format's scale type)", stacklevel=2)
    for head, m in ({} if meta.get("peer") else meta["layers"]).items():
        if "tied_to" in m:
            table = model.get_submodule(m["tied_to"])
            if not isinstance(table, QuantEmbedding):
                raise CompressError(f"{path}: {head} is tied to {m['tied_to']}, which is not stored quantized")
            set_module(model, head, table.tied_head(state.pop(f"{head}.bias", None)))
    _assign_rest(model, state, path)
    model.eval()
    if meta.get("plan"):
        apply_runtime_options(model, Plan.from_dict(meta["plan"]))
    from .anytime import load_text_head

    head = load_text_head(path, active_units)
    return LoadedModel(model, load_tokenizer(path), meta["kind"], path, head.to(device) if head else None)


def _check_shapes(qw: QuantizedWeight, spec: QuantSpec, n: int, k: int, name: str, path: Path) -> None:
    """The stored tensors of a layer against the model's (N, K) and the format (one line)."""
    if qw.in_features != k:
        raise CompressError(f"{path}: layer {name} stores in_features {qw.in_features}, the model has {k}")
    for key, (shape, dtype) in spec.tensor_shapes(n, k).items():
        t = qw.tensors().get(key)
        # float32 scales: a peer's, kept exact by ct_format.from_ct (compress writes float16)
        ok_dtype = t is not None and (t.dtype == dtype or (key == "scales" and t.dtype == torch.float32))
        if t is None or tuple(t.shape) != shape or not ok_dtype:
            got = "missing" if t is None else f"{tuple(t.shape)} {t.dtype}"
            raise CompressError(f"{path}: layer {name} tensor {key} is {got}, expected {shape} {dtype}")


def _assign_rest(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Assign every remaining tensor; tie weights; refuse missing, unexpected or mis-shaped ones."""
    quant = {f"{n}.{b}" for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))
             for b in ("qweight", "scales", "zeros", "bias")}
    expected = {k: v for k, v in model.state_dict().items() if k not in quant}
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CompressError(f"{path / WEIGHTS} does not match the model: unexpected {unexpected[:5]}")
    for name, t in state.items():
        want = expected[name]
        # Floating tensors keep the dtype they were saved in (apply --dtype); integer ones must match.
        same_kind = t.dtype == want.dtype or (t.is_floating_point() and want.is_floating_point())
        if tuple(t.shape) != tuple(want.shape) or not same_kind:
            raise CompressError(f"{path / WEIGHTS}: tensor {name} has shape {tuple(t.shape)} {t.dtype}, "
                                f"expected {tuple(want.shape)} {want.dtype}")
    model.load_state_dict(state, assign=True, strict=False)
    if hasattr(model, "tie_weights") and any(p.device.type == "meta" for p in model.parameters()):
        model.tie_weights()  # a head tied to a 16-bit table
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise CompressError(f"{path / WEIGHTS} does not match the model: missing {left[:5]}")
