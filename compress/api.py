"""The library's front door: plan(), apply(), load(), evaluate(), inspect(), fit_head(), predict().

Each CLI command is one call to a function here; each function is a short composition of the
modules below it (models, plan, apply, evaluate).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .apply import apply_to_directory
from .checkpoint import load_compressed, read_meta
from .data import load_texts, sample_texts
from .errors import CompressError
from .evaluate import evaluate_models, size_report
from .models import LoadedModel, fingerprint, load_model
from .plan import Plan

def plan(model: str | Path, bits: int | None = None, group_size: int | None = None,
         symmetric: bool | None = None, profile: str | None = None, exclude: tuple[str, ...] = (),
         include_heads: bool = False, loaded: LoadedModel | None = None, method: str | None = None,
         budget: dict | float | None = None, max_bytes: str | int | None = None, ratio: float | None = None,
         granularity: str | None = None, data: str | Path | None = None, samples: int | None = None,
         seed: int = 0, progress: bool = True, device: str | None = None, target: str | None = None,
         budget_scope: str | None = None, metric: str | None = None, low_memory: bool = False,
         quantizer: str | dict | None = None) -> Plan:
    """A plan for a model: uniform (``bits``) or sensitivity-driven (``method`` and/or a budget).

    Uniform: every quantizable layer at ``bits`` (4 or 8). Sensitivity-driven: the analyzer
    ``method`` (compress.analyze.REGISTRY) scores units at ``granularity`` on calibration text
    ``data``; with a budget (``budget`` average bits, or {"avg_bits": ...} | {"max_bytes": ...} |
    {"ratio": ...}; or ``max_bytes`` such as "12MB"; or ``ratio`` vs fp16) the exact knapsack
    picks 4/8/16 bits per unit, without one CPTQuant's k-means. See compress.planner for the
    defaults and the accounting. device: where the analyzer runs the model (default: the CPU).
    target: "vllm" | "gguf" | "any": where the result must load (compress.servable; default vllm
    for causal LMs, any otherwise). budget_scope: "linears" (average bits over the quantizable
    linears, the default) or "model" (over every weight). Whole-model budgets also make embedding
    tables planner units (compress.planner.plans_embeddings). metric: the analyzer's causal-LM
    damage measure, "kl" (default) or "nll". low_memory: the analyzer streams the weights from the
    safetensors checkpoint one block at a time (compress.analyze.streamed; the same plan).
    quantizer: the quantizer apply will run ("rtn" / "gptq" or a plan "quantizer" section),
    recorded in the plan; a budget is then spent on the errors that quantizer leaves.
    """
    from .planner import build_plan, make_budget

    budget = make_budget(budget, max_bytes, ratio, budget_scope)
    where = check_device(device)
    if loaded is None and low_memory:
        from .analyze.streamed import load_streamed

        loaded = lambda: load_streamed(model, where)  # noqa: E731 (loaded once the options are checked)
    return build_plan(loaded or (lambda: _move(load_model(model), where)), model_name=str(model), bits=bits, group_size=group_size, symmetric=symmetric,
                      profile=profile, exclude=exclude, include_heads=include_heads, method=method,
                      budget=budget, granularity=granularity, data=data, samples=samples, seed=seed,
                      progress=progress, target=target, metric=metric, low_memory=low_memory,
                      quantizer=quantizer)


def apply(model: str | Path, plan_or_path: Plan | str | Path, out_dir: str | Path,
          overwrite: bool = False, progress: bool = True, quantizer: str | None = None,
          data: str | Path | None = None, samples: int | None = None, seq_len: int | None = None,
          low_memory: bool = False, device: str | None = None, stats: dict | None = None,
          dtype: str | None = None, **quantizer_options) -> Path:
    """Quantize ``model`` as the plan says and write the compressed directory ``out_dir``.

    quantizer: a name from compress.quantizers.REGISTRY (default: the plan's); its options
    (data, samples, seq_len and e.g. damp=, act_order= for gptq) override the plan's and are
    validated against the quantizer (an option it does not take is an error). low_memory: stream
    the weights from disk one block at a time. ``stats``, when given, receives the walk's peak
    memory. dtype: "float16" / "bfloat16" / "float32" for everything left unquantized (default:
    the checkpoint's 16-bit dtype, float16 for a float32 checkpoint; compress.apply.storage_dtype).
    """
    from .quantizers import quantizer_config

    p = plan_or_path if isinstance(plan_or_path, Plan) else Plan.load(plan_or_path)
    section = dict(p.quantizer)
    if quantizer is not None and quantizer != section.get("method"):
        section = {"method": quantizer}
    options = {"data": str(data) if data is not None else None, "samples": samples, "seq_len": seq_len,
               **quantizer_options}
    config = quantizer_config(section, "quantizer", **options)
    return apply_to_directory(model, p, Path(out_dir), config, overwrite=overwrite, low_memory=low_memory,
                              device=check_device(device), dtype=dtype, progress=progress, stats=stats)


def analyze(model: str | Path, methods: list[str] | None = None, granularity: str = "block",
            data: str | Path | None = None, samples: int | None = None, seed: int = 0,
            device: str | None = None, metric: str | None = None, eval_data: str | Path | None = None,
            low_memory: bool = False) -> dict:
    """Every (or each named) analyzer on a model, with its Spearman correlation to the oracle and
    its time: {"rows": [...], "methods": [...]} (see compress.analyze.analyzer_report). device:
    where the model runs (default: the CPU). metric: the causal-LM damage measure of every
    analyzer and the oracle ("kl" default, or "nll"). eval_data: the oracle's own text (default:
    ``data``, the analyzers' calibration text). low_memory: weights streamed block by block."""
    from .analyze import REGISTRY, analyzer_report

    common = {"seed": seed}
    if samples:
        common["samples"] = samples
    if metric:
        common["causal_metric"] = metric
    where = check_device(device)
    if low_memory:
        from .analyze.streamed import load_streamed

        lm = load_streamed(model, where)
    else:
        lm = _move(load_model(model), where)
    oracle_texts = load_texts(eval_data) if eval_data is not None else None
    rows = analyzer_report(lm, load_texts(data), methods, granularity=granularity, oracle_texts=oracle_texts,
                           **common)
    return {"rows": rows, "methods": sorted(REGISTRY)}


def analysis_json(result: dict) -> dict:
    """api.analyze's result as plain JSON (each row's Sensitivity as its dict)."""
    return {"rows": [{k: v for k, v in r.items() if k != "sensitivity"} | {"sensitivity": r["sensitivity"].to_dict()}
                     for r in result["rows"]], "methods": result["methods"]}


def load(path: str | Path, device: str | torch.device = "cpu", active_units: int | None = None) -> LoadedModel:
    """A compressed directory as a ready model (``.model``) with its tokenizer (``.tokenizer``)
    and, when one was fitted, its anytime head (``.head``) with ``active_units`` units on."""
    return load_compressed(path, device, active_units)


def fit_head(path: str | Path, labels: str | Path, device: str | None = None, **options) -> dict:
    """Fit an anytime head on a compressed directory's features and save it into that directory.

    options: the plan's anytime keys (task, units, units_per_step, active_units, learning_rate,
    max_length, holdout). The head goes beside the weights (DIR/anytime.safetensors and
    DIR/anytime.json, each written atomically) and DIR's plan records the section. Returns the
    fit report of compress.anytime.text.fit_text_head (rows fitted and held out; accuracy, or
    R^2 and RMSE, of each part at the active and at all units) with ``task``, ``units`` and
    ``files`` (the paths written).
    device: where the encoder computes the embeddings (the head is fitted on the CPU).
    """
    import json

    from .checkpoint import META
    from .anytime import anytime_config, fit_text_head, save_text_head

    lm = _serve_on(load_compressed(path), check_device(device))
    section = anytime_config({"labels": str(labels), **options})
    head = fit_text_head(lm.model, lm.tokenizer, lm.kind, section)
    files = save_text_head(head, path)
    meta = read_meta(path)
    meta["plan"]["anytime"] = {k: v for k, v in section.items() if v is not None}
    from .atomic import atomic_write_text

    atomic_write_text(Path(path) / META, json.dumps(meta, indent=1, allow_nan=False) + "\n", overwrite=True)
    return {**head.meta["fit_report"], "task": section["task"], "units": head.n_units,
            "files": [str(f) for f in files]}


def predict(path: str | Path, texts: list[str], active_units: int | None = None,
            device: str | None = None, proba: bool = False) -> list:
    """Labels (or values) for texts from a compressed directory's anytime head; with ``proba``,
    one ``{class: probability}`` mapping per text instead (classification heads only). device: where
    the encoder runs; its embeddings come back to the CPU, where the (small) head runs."""
    from .anytime import predict_texts

    lm = _serve_on(load_compressed(path, active_units=active_units), check_device(device))
    if lm.head is None:
        raise CompressError(f"{path} has no anytime head; fit one with `compress head {path} --labels FILE`")
    return predict_texts(lm.model, lm.tokenizer, lm.head, texts, proba=proba)


def evaluate(compressed: str | Path, reference: str | Path | None = None, data: str | Path | None = None,
             samples: int | None = None, seq_len: int = 256, seed: int = 0, progress: bool = True,
             device: str | None = None) -> dict:
    """Quality against the uncompressed model, and size, of a compressed directory.

    reference: the original model (default: the path recorded in the plan). data: evaluation text
    (default: the embedded corpus). samples: texts for encoders (default 512), windows of
    ``seq_len`` tokens for causal LMs (default 64). device: where both models run (default: the
    CPU); their outputs come back to the CPU, where the metrics are computed.
    """
    where = check_device(device)
    comp = _serve_on(load_compressed(compressed), where)
    meta = read_meta(compressed)
    recorded_model = (meta["plan"] or {}).get("model") or {}  # a peer's checkpoint records none
    ref_path = reference or recorded_model.get("path")
    if not ref_path:
        raise CompressError(f"{compressed}: no reference model recorded; pass --reference")
    ref = _serve_on(load_model(ref_path), where)
    recorded = recorded_model.get("fingerprint")
    if recorded and recorded != fingerprint(ref.model):
        raise CompressError(f"reference {ref.path} is not the model {compressed} was made from "
                            f"(fingerprint {fingerprint(ref.model)} vs {recorded})")
    texts = load_texts(data)
    if samples is None:
        samples = 512 if comp.kind == "encoder" else 64
    if comp.kind == "encoder":
        texts = texts[:samples] if data else sample_texts(texts, samples, seed)
    quality = evaluate_models(comp.model, ref.model, comp.kind, comp.tokenizer, texts,
                              seq_len=seq_len, n_sequences=samples, progress=progress)
    return {"model": str(compressed), "reference": str(ref.path), "kind": comp.kind,
            "quality": quality, "size": size_report(comp.model).to_dict(),
            "reference_size": size_report(ref.model).to_dict()}


def inspect(path: str | Path) -> dict:
    """The plan, files, per-layer storage and totals of a compressed directory, with its files
    verified (reads headers, no weights).

    Verified: compress.json and config.json parse; every ``*.safetensors`` header parses and each
    tensor's byte range lies inside its file, matches its dtype and shape and overlaps no other;
    every layer compress.json lists has tensors. Any failure is a CompressError naming the file.
    Returns {"kind", "plan", "layers", "files": {name: bytes}, "totals": {...}}.
    """
    import json

    path = Path(path)
    meta = read_meta(path)
    files = {f.name: f.stat().st_size for f in sorted(path.iterdir()) if f.is_file()}
    try:
        json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise CompressError(f"{path} has no config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CompressError(f"{path / 'config.json'} is not valid JSON: {exc}") from None
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise CompressError(f"{path} has no *.safetensors weights")
    tensors: dict[str, int] = {}  # name -> bytes, over every weights file
    for file in weights:
        tensors.update(_verify_safetensors(file))
    names = set(tensors) | set(meta.get("tied", {}))
    for layer in meta["layers"]:
        if not any(n.startswith(f"{layer}.") for n in names):
            raise CompressError(f"{path}: layer {layer} listed in compress.json has no tensors in "
                                f"{', '.join(f.name for f in weights)}")
    by_bits: dict[str, dict[str, int]] = {}
    for lm in meta["layers"].values():
        row = by_bits.setdefault(str(lm["bits"]), {"layers": 0, "weights": 0})
        row["layers"] += 1
        row["weights"] += lm["in_features"] * lm["out_features"]
    totals = {"files": len(files), "file_bytes": sum(files.values()), "tensors": len(tensors),
              "tensor_bytes": sum(tensors.values()), "weights_files": [f.name for f in weights],
              "quantized_layers": len(meta["layers"]), "quantized_by_bits": dict(sorted(by_bits.items()))}
    return {"kind": meta["kind"], "plan": meta["plan"], "layers": meta["layers"], "files": files,
            "totals": totals}


def _verify_safetensors(file: Path) -> dict[str, int]:
    """{tensor name: bytes} of one safetensors file whose every byte range was checked."""
    from .safetensors_io import DTYPES, read_header

    try:
        base, header = read_header(file)
        entries = [(name, e["dtype"], [int(d) for d in e["shape"]], [int(o) for o in e["data_offsets"]])
                   for name, e in header.items()]
    except CompressError:
        raise
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise CompressError(f"{file}: malformed safetensors header ({type(exc).__name__}: {exc})") from None
    data_bytes = file.stat().st_size - base
    spans, out = [], {}
    for name, dtype, shape, (start, end) in entries:
        if dtype not in DTYPES:
            raise CompressError(f"{file}: tensor {name} has unknown dtype {dtype}")
        need = DTYPES[dtype].itemsize
        for d in shape:
            need *= d
        if not 0 <= start <= end <= data_bytes:
            raise CompressError(f"{file}: tensor {name} spans bytes {start:,}-{end:,} of a data section of "
                                f"{data_bytes:,} bytes")
        if end - start != need:
            raise CompressError(f"{file}: tensor {name} spans {end - start:,} bytes, its shape {shape} {dtype} "
                                f"needs {need:,}")
        spans.append((start, end, name))
        out[name] = end - start
    spans.sort()
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise CompressError(f"{file}: tensors {a} and {b} overlap (bytes {start_b:,}-{end_a:,})")
    return out


# Exporter options by format, with the CLI flag that sets each (for the error naming a misplaced one).
_EXPORT_OPTIONS = {
    "onnx": {"accuracy_level": "--accuracy-level", "opset": "--opset", "tolerance": "--tolerance",
             "kl_tolerance": "kl_tolerance", "external_data": "--external-data", "past_key_values": "--past",
             "inplace_cache": "--inplace-cache", "max_length": "--max-length"},
    "gguf": {"allow_f16": "--allow-f16", "progress": "progress", "float_type": "float_type"},
}


def export(model_dir: str | Path, output: str | Path, format: str | None = None, device: str | None = None,
           **options):
    """Export a compressed directory and return the exporter's report.

    format: "onnx" (compress.export.export_onnx) or "gguf" (compress.export.export_gguf); default:
    "gguf" for an output ending in .gguf, else "onnx". options: that exporter's keyword options
    (overwrite and validate for both); one meant for the other format is a CompressError naming it.
    device: only the CPU for now (onnxruntime's CPU provider is the validator, and it is checked
    against the torch reference on the CPU).
    """
    from .export import export_gguf, export_onnx

    fmt = format or ("gguf" if Path(output).suffix.lower() == ".gguf" else "onnx")
    if fmt not in _EXPORT_OPTIONS:
        raise CompressError(f"export format {fmt!r} is not one of {', '.join(_EXPORT_OPTIONS)}")
    other = next(f for f in _EXPORT_OPTIONS if f != fmt)
    wrong = [_EXPORT_OPTIONS[other][k] for k in options if k in _EXPORT_OPTIONS[other]]
    if wrong:
        raise CompressError(f"{', '.join(wrong)}: {other} export options, not for --format {fmt}")
    where = check_device(device)
    if where is not None and where.type != "cpu":
        raise CompressError(f"export runs on the CPU (onnxruntime validates it there); --device {device} "
                            "is not supported yet: omit it or pass --device cpu")
    return export_gguf(model_dir, output, **options) if fmt == "gguf" else export_onnx(model_dir, output, **options)


def check_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a torch.device, checked to exist here (None stays None: each function's default).

    CompressError for a name torch does not know ("gpu") and for an accelerator this machine lacks.
    """
    if device is None:
        return None
    try:
        where = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise CompressError(f"device {device!r} is not a torch device name (e.g. cpu, cuda, cuda:1, mps)") from None
    if where.type == "cpu":
        return where
    if where.type == "meta":
        raise CompressError("device meta holds no data; give cpu or an accelerator such as cuda")
    if where.type == "mps":
        available, count = torch.backends.mps.is_available(), 1
    else:
        backend = getattr(torch, where.type, None)
        available = bool(getattr(backend, "is_available", lambda: False)())
        count = getattr(backend, "device_count", lambda: 1)() if available else 0
    if not available:
        raise CompressError(f"device {device}: no {where.type} device is available on this machine "
                            f"(torch {torch.__version__})")
    if where.index is not None and where.index >= count:
        raise CompressError(f"device {device}: this machine has {count} {where.type} device(s), "
                            f"numbered 0-{count - 1}")
    return where


def _move(lm: LoadedModel, device: torch.device | None) -> LoadedModel:
    """The model moved to ``device`` (None: left where it is); for callers that read the model's
    device and put their inputs there (the analyzers)."""
    if device is not None:
        lm.model.to(device)
    return lm


def _serve_on(lm: LoadedModel, device: torch.device | None) -> LoadedModel:
    """The model moved to ``device`` with its inputs moved there and its outputs moved back to
    where the inputs were (accelerate's AlignDevicesHook, io_same_device), for callers that build
    CPU batches and compute their metrics on the CPU (evaluate, the anytime heads)."""
    if device is None:
        return lm
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    lm.model.to(device)
    add_hook_to_module(lm.model, AlignDevicesHook(execution_device=device, io_same_device=True))
    return lm
