"""The library's front door: plan(), apply(), load(), evaluate(), inspect(), fit_head(), predict().

Each CLI command is one call to a function here; each function is a short composition of the
modules below it (models, plan, apply, evaluate).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .apply import apply_plan, apply_runtime_options, load_compressed, read_meta, save_compressed
from .data import load_texts, sample_texts
from .errors import CompressError
from .evaluate import evaluate_models, size_report
from .models import LoadedModel, fingerprint, load_model, quantizable_linears
from .plan import Plan, load_profile, uniform_plan

PROFILE_KEYS = {"bits", "group_size", "symmetric", "exclude", "include_heads", "description", "method",
                "budget", "max_bytes", "ratio", "granularity", "samples", "quantizer"}


def plan(model: str | Path, bits: int | None = None, group_size: int | None = None,
         symmetric: bool | None = None, profile: str | None = None, exclude: tuple[str, ...] = (),
         include_heads: bool = False, loaded: LoadedModel | None = None, method: str | None = None,
         budget: dict | None = None, granularity: str | None = None, data: str | Path | None = None,
         samples: int | None = None, seed: int = 0, progress: bool = True) -> Plan:
    """A plan for a model: uniform (``bits``) or sensitivity-driven (``method``).

    Uniform: every quantizable layer at ``bits`` (4 or 8). Sensitivity-driven: the analyzer
    ``method`` (compress.analyze.REGISTRY) scores units at ``granularity`` on calibration text
    ``data`` (default: the embedded corpus); with ``budget`` ({"avg_bits": 4.5} | {"max_bytes": ..}
    | {"ratio": 4}) the exact knapsack picks 4/8/16 bits per unit, without it CPTQuant's k-means.
    Arguments left as None come from ``profile`` (profiles/NAME.toml), then from the defaults
    (int4, group 32 for sensitivity plans and 128 for uniform ones, asymmetric). The plan records
    the model's path and fingerprint, and for sensitivity plans the scores as provenance.
    """
    preset = load_profile(profile) if profile else {}
    unknown = set(preset) - PROFILE_KEYS
    if unknown:
        raise CompressError(f"profile {profile}: unknown keys {sorted(unknown)} (known: {sorted(PROFILE_KEYS)})")
    method = method or preset.get("method")
    if budget is None:
        budget = {k: preset[k] for k in ("budget", "max_bytes", "ratio") if k in preset} or None
        if budget and "budget" in budget:
            budget["avg_bits"] = budget.pop("budget")
    if method and bits is not None:
        raise CompressError("give either --bits (a uniform plan) or --method (a sensitivity plan), not both")
    bits = bits if bits is not None else preset.get("bits", 4)
    group_size = group_size if group_size is not None else preset.get("group_size", 32 if method else 128)
    symmetric = symmetric if symmetric is not None else preset.get("symmetric")
    exclude = tuple(exclude) + tuple(preset.get("exclude", ()))
    include_heads = include_heads or preset.get("include_heads", False)
    lm = loaded or load_model(model)
    layers = quantizable_linears(lm.model, exclude, include_heads)
    if not layers:
        raise CompressError(f"{lm.path}: no quantizable linear layers (after exclusions {list(exclude)})")
    if method:
        p = _sensitivity_plan(lm, layers, method, budget, group_size, bool(symmetric), exclude, include_heads,
                              granularity or preset.get("granularity", "block"), data,
                              samples or preset.get("samples"), seed, progress)
    else:
        if bits not in (4, 8):
            raise CompressError(f"a uniform plan needs bits 4 or 8, got {bits}")
        p = uniform_plan(layers, bits, group_size, symmetric)
    if "quantizer" in preset:
        p.quantizer = {"method": preset["quantizer"]}
    p.model_path = str(lm.path)
    p.fingerprint = fingerprint(lm.model)
    return p


def _sensitivity_plan(lm, layers, method, budget, group_size, symmetric, exclude, include_heads,
                      granularity, data, samples, seed, progress) -> Plan:
    from .analyze import analyze
    from .planner import plan_from_sensitivity

    options = {"granularity": granularity, "group_size": group_size, "symmetric": symmetric,
               "exclude": exclude, "include_heads": include_heads, "seed": seed, "progress": progress}
    if samples:
        options["samples"] = samples
    sens = analyze(lm, method, load_texts(data), **options)
    p, chosen = plan_from_sensitivity(lm.model, layers, sens, budget, group_size, symmetric)
    p.sensitivity = sens.to_dict()
    p.sensitivity["chosen_bits"] = chosen
    return p


def apply(model: str | Path, plan_or_path: Plan | str | Path, out_dir: str | Path,
          overwrite: bool = False, progress: bool = True, quantizer: str | None = None,
          data: str | Path | None = None, samples: int = 128, seq_len: int = 512,
          low_memory: bool = False, device: str | None = None, stats: dict | None = None,
          dtype: str | None = None) -> Path:
    """Quantize ``model`` as the plan says and write the compressed directory ``out_dir``.

    quantizer: "rtn" or "gptq" (default: the plan's). GPTQ calibrates on ``samples`` sequences of
    ``seq_len`` tokens from ``data`` (default: the embedded corpus), walking the model block by
    block. low_memory: stream the weights from disk one block at a time (RTN or GPTQ), so only one
    block is ever held in full precision. ``stats``, when given, receives the walk's peak memory.
    dtype: "float16" / "bfloat16" / "float32" for everything left unquantized (embeddings, norms,
    16-bit layers); default: as loaded (float32).
    """
    from .walker import CheckpointReader, block_quantizer, empty_model, walk_blocks
    from .data import calibration_batches
    from .models import load_config, load_tokenizer, model_kind, resolve_model_path

    if low_memory:  # before anything large is allocated (see walker.fix_malloc_mmap_threshold)
        from .walker import fix_malloc_mmap_threshold

        fix_malloc_mmap_threshold()
    p = plan_or_path if isinstance(plan_or_path, Plan) else Plan.load(plan_or_path)
    method = quantizer or p.quantizer.get("method", "rtn")
    if method not in ("rtn", "gptq"):
        raise CompressError(f"unknown quantizer {method!r} (known: rtn, gptq)")
    out = Path(out_dir)
    if out.exists() and not overwrite:  # fail before the slow part
        raise CompressError(f"output directory {out} exists; pass --overwrite to replace it")
    torch_dtype = _torch_dtype(dtype)
    if method == "rtn" and not low_memory:
        lm = load_model(model, torch_dtype)
        apply_plan(lm.model, p, progress=progress)
        _finish(lm, p)
        return save_compressed(lm, p, out, overwrite=overwrite)
    path = resolve_model_path(model)
    kind = model_kind(load_config(path))
    reader = CheckpointReader(path) if low_memory else None
    lm = (LoadedModel(empty_model(path, kind), load_tokenizer(path), kind, path)
          if low_memory else load_model(path, torch_dtype))
    resolved = p.resolve(lm.model, quantizable_linears(lm.model), fingerprint(lm.model))
    if method == "gptq":
        texts = load_texts(data)
        # Encoders: one text per batch, so no padding token's activations enter a Hessian.
        batches = calibration_batches(lm.tokenizer, kind, texts, samples, seq_len,
                                      batch_size=8 if kind == "causal-lm" else 1)
        p.quantizer = {"method": "gptq", "damp": p.quantizer.get("damp", 0.01),
                       "act_order": p.quantizer.get("act_order", False), "samples": samples,
                       "seq_len": seq_len, "data": str(data) if data else "embedded corpus"}
    else:  # RTN needs no calibration; one short batch carries the walk through the blocks
        batches = calibration_batches(lm.tokenizer, kind, load_texts(None), 1, 16, 1)
    walk_stats = walk_blocks(lm.model, batches,
                             block_quantizer(resolved, method, damp=p.quantizer.get("damp", 0.01),
                                             act_order=p.quantizer.get("act_order", False)),
                             device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
                             reader=reader, dtype=torch_dtype, progress=progress)
    _quantize_outside_blocks(lm.model, resolved)
    _finish(lm, p)
    if stats is not None:
        stats.update(walk_stats)
    return save_compressed(lm, p, out, overwrite=overwrite)


def _finish(lm: LoadedModel, p: Plan) -> None:
    """After quantization: switch on HiRED, fit the anytime head on the compressed features."""
    apply_runtime_options(lm.model, p)
    if p.anytime is not None:
        from .anytime import fit_text_head

        lm.head = fit_text_head(lm.model, lm.tokenizer, lm.kind, p.anytime)


def _torch_dtype(name: str | None) -> torch.dtype:
    names = {None: torch.float32, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in names:
        raise CompressError(f"dtype {name!r} is not one of float32, float16, bfloat16")
    return names[name]


def _quantize_outside_blocks(model, resolved) -> None:
    """RTN for planned layers that live outside the block stack (an explicitly planned head)."""
    from .apply import set_module
    from .qlinear import QuantLinear

    for name, lp in resolved.items():
        module = model.get_submodule(name)
        if lp.bits != 16 and isinstance(module, torch.nn.Linear):
            set_module(model, name, QuantLinear.from_linear(module, lp.spec(), name))


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
