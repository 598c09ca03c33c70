"""The library's front door: plan(), apply(), load(), evaluate(), inspect(), fit_head(), predict().

Each CLI command is one call to a function here; each function is a short composition of the
modules below it (models, plan, apply, evaluate).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .apply import load_compressed, read_meta
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
         seed: int = 0, progress: bool = True) -> Plan:
    """A plan for a model: uniform (``bits``) or sensitivity-driven (``method`` and/or a budget).

    Uniform: every quantizable layer at ``bits`` (4 or 8). Sensitivity-driven: the analyzer
    ``method`` (compress.analyze.REGISTRY) scores units at ``granularity`` on calibration text
    ``data``; with a budget (``budget`` average bits, or {"avg_bits": ...} | {"max_bytes": ...} |
    {"ratio": ...}; or ``max_bytes`` such as "12MB"; or ``ratio`` vs fp16) the exact knapsack
    picks 4/8/16 bits per unit, without one CPTQuant's k-means. See compress.planner for the
    defaults and the accounting.
    """
    from .planner import build_plan, make_budget

    budget = make_budget(budget, max_bytes, ratio)
    return build_plan(loaded or (lambda: load_model(model)), model_name=str(model), bits=bits, group_size=group_size, symmetric=symmetric,
                      profile=profile, exclude=exclude, include_heads=include_heads, method=method,
                      budget=budget, granularity=granularity, data=data, samples=samples, seed=seed,
                      progress=progress)


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
    memory. dtype: "float16" / "bfloat16" / "float32" for everything left unquantized.
    """
    from .apply import apply_to_directory
    from .quantizers import quantizer_config

    p = plan_or_path if isinstance(plan_or_path, Plan) else Plan.load(plan_or_path)
    section = dict(p.quantizer)
    if quantizer is not None and quantizer != section.get("method"):
        section = {"method": quantizer}
    options = {"data": str(data) if data is not None else None, "samples": samples, "seq_len": seq_len,
               **quantizer_options}
    config = quantizer_config(section, "quantizer", **options)
    return apply_to_directory(model, p, Path(out_dir), config, overwrite=overwrite, low_memory=low_memory,
                              device=device, dtype=_torch_dtype(dtype), progress=progress, stats=stats)


def _torch_dtype(name: str | None) -> torch.dtype:
    names = {None: torch.float32, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in names:
        raise CompressError(f"dtype {name!r} is not one of float32, float16, bfloat16")
    return names[name]


def analyze(model: str | Path, methods: list[str] | None = None, granularity: str = "block",
            data: str | Path | None = None, samples: int | None = None, seed: int = 0) -> dict:
    """Every (or each named) analyzer on a model, with its Spearman correlation to the oracle and
    its time: {"rows": [...], "methods": [...]} (see compress.analyze.analyzer_report)."""
    from .analyze import REGISTRY, analyzer_report

    common = {"seed": seed}
    if samples:
        common["samples"] = samples
    rows = analyzer_report(load_model(model), load_texts(data), methods, granularity=granularity, **common)
    return {"rows": rows, "methods": sorted(REGISTRY)}


def analysis_json(result: dict) -> dict:
    """api.analyze's result as plain JSON (each row's Sensitivity as its dict)."""
    return {"rows": [{k: v for k, v in r.items() if k != "sensitivity"} | {"sensitivity": r["sensitivity"].to_dict()}
                     for r in result["rows"]], "methods": result["methods"]}


def load(path: str | Path, device: str | torch.device = "cpu", active_units: int | None = None) -> LoadedModel:
    """A compressed directory as a ready model (``.model``) with its tokenizer (``.tokenizer``)
    and, when one was fitted, its anytime head (``.head``) with ``active_units`` units on."""
    return load_compressed(path, device, active_units)


def fit_head(path: str | Path, labels: str | Path, **options) -> Path:
    """Fit an anytime head on a compressed directory's features and save it there.

    options: the plan's anytime keys (task, units, units_per_step, active_units, learning_rate,
    max_length). The directory's plan records the section; the head files are written atomically.
    """
    import json

    from .apply import META
    from .anytime import anytime_config, fit_text_head, save_text_head

    lm = load_compressed(path)
    section = anytime_config({"labels": str(labels), **options})
    head = fit_text_head(lm.model, lm.tokenizer, lm.kind, section)
    save_text_head(head, path)
    meta = read_meta(path)
    meta["plan"]["anytime"] = {k: v for k, v in section.items() if v is not None}
    tmp = Path(path) / f".{META}.tmp"
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    tmp.replace(Path(path) / META)
    return Path(path)


def predict(path: str | Path, texts: list[str], active_units: int | None = None) -> list:
    """Labels (or values) for texts from a compressed directory's anytime head."""
    from .anytime import predict_texts

    lm = load_compressed(path, active_units=active_units)
    if lm.head is None:
        raise CompressError(f"{path} has no anytime head; fit one with `compress head {path} --labels FILE`")
    return predict_texts(lm.model, lm.tokenizer, lm.head, texts)


def evaluate(compressed: str | Path, reference: str | Path | None = None, data: str | Path | None = None,
             samples: int | None = None, seq_len: int = 256, seed: int = 0, progress: bool = True) -> dict:
    """Quality against the uncompressed model, and size, of a compressed directory.

    reference: the original model (default: the path recorded in the plan). data: evaluation text
    (default: the embedded corpus). samples: texts for encoders (default 512), windows of
    ``seq_len`` tokens for causal LMs (default 64).
    """
    comp = load_compressed(compressed)
    meta = read_meta(compressed)
    ref_path = reference or meta["plan"]["model"]["path"]
    if not ref_path:
        raise CompressError(f"{compressed}: no reference model recorded; pass --reference")
    ref = load_model(ref_path)
    recorded = meta["plan"]["model"].get("fingerprint")
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
    """The plan, sizes and per-layer storage of a compressed directory (reads no weights)."""
    meta = read_meta(path)
    files = {f.name: f.stat().st_size for f in Path(path).iterdir() if f.is_file()}
    return {"kind": meta["kind"], "plan": meta["plan"], "layers": meta["layers"], "files": files}
