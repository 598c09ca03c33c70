"""`compress` command line: thin commands, each one library call (see compress.api).

Every command ends in one of three ways: exit 0; a user error (bad input, a full disk, a path that
cannot be written) as one line "compress: error: ..." on stderr and exit 2; or an interrupt
(Ctrl-C, SIGTERM) as one line and exit 130 / 143, with unfinished output removed.
"""
from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from .errors import CompressError, Interrupted

DEVICE_HELP = "where the model runs: cpu, cuda, cuda:1, mps (default: {})"
# The default named here is compress.analyze.base.DEFAULT_CAUSAL_METRIC (--metric passes None when not
# given, so the analyzers decide; not imported here: it would import torch before the signal handlers).
METRIC_HELP = ("causal-LM damage measure: kl (KL from the unmodified model's next-token distributions, the "
               "default; keeps the unmodified logits, samples x seq_len x vocab float32: 32 x 128 tokens of a "
               "128k vocabulary are 2.1 GB, spilled to $TMPDIR beyond half the free memory with --low-memory) "
               "or nll (change in mean next-token NLL, keeps nothing; noisier: a unit's damage can come out "
               "negative); encoders always use 1 - cosine")


def to_strict_json(obj) -> object:
    """``obj`` as plain JSON values: NaN and ±inf become null (JSON has neither), tuples lists,
    tensors / numpy values their Python values, Paths and anything else their string."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k if isinstance(k, (str, int, float, bool)) or k is None else str(k): to_strict_json(v)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_strict_json(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return to_strict_json(obj.tolist())
    return str(obj)


def _write_json(obj: dict, path: str | None) -> None:
    """Write ``obj`` as strict JSON (allow_nan=False after to_strict_json), atomically; a report
    of an earlier run at ``path`` is replaced."""
    if path:
        from .atomic import atomic_write_text

        text = json.dumps(to_strict_json(obj), indent=1, allow_nan=False)
        atomic_write_text(Path(path), text + "\n", overwrite=True)
        print(f"wrote {path}")


def _table_value(v):
    """A value for format_table: a missing figure (NaN, None) shows as n/a."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return v


QUANTIZER_OPTIONS = ("act_order", "mse", "refit", "fp_target", "token_damp")


def add_quantizer_options(p, scope: str) -> None:
    """--act-order / --mse / --refit / --fp-target / --token-damp, shared by plan and apply (``scope`` says
    what they do there)."""
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: quantize columns by decreasing Hessian diagonal, with static groups (default: on; "
                        f"--no-act-order for the paper's natural order); {scope}")
    p.add_argument("--mse", action=argparse.BooleanOptionalAction, default=None,
                   help="rtn and gptq: scales from a clip-ratio search per group minimising the (diag H-weighted) "
                        "reconstruction error instead of each group's min-max range (default: off; slower, "
                        f"same storage format); {scope}")
    p.add_argument("--refit", type=int, metavar="ROUNDS",
                   help="GPTQ: rounds of least-squares scales for GPTQ's codes on the Hessian, each after the "
                        "first re-running GPTQ under them, kept only where they lower its objective (default 1; 0 "
                        f"= off; same storage format); {scope}")
    p.add_argument("--fp-target", type=float, metavar="ALPHA",
                   help="GPTQ: how far each layer aims at the full-precision model's outputs rather than its "
                        "own output on the inputs the quantized layers before it give (GPTQv2-style asymmetric "
                        "calibration; 0 = off, 1 = the whole least-squares step; default 0.25; one more block "
                        f"pass per batch); {scope}")
    p.add_argument("--token-damp", type=float, metavar="C",
                   help="GPTQ: damp a layer whose Hessian comes from n calibration tokens of K inputs at least "
                        "C * K / n (at most 1) of mean(diag H), since few tokens for the width make H noisy "
                        f"(default 1; 0 = --damp alone); {scope}")


def cmd_plan(args) -> None:
    from . import api
    from .evaluate import format_table
    from .planner import plan_summary, plan_table, plot_plan, scored_unit_bits

    if Path(args.output).exists() and not args.overwrite:  # before any analysis
        raise CompressError(f"{args.output} exists; pass --overwrite to replace it")
    p = api.plan(args.model, bits=args.bits, group_size=args.group_size, symmetric=args.symmetric,
                 profile=args.profile, exclude=tuple(args.exclude), include_heads=args.include_heads,
                 method=args.method, budget=args.budget, max_bytes=args.max_bytes, ratio=args.ratio,
                 granularity=args.granularity, data=args.data, samples=args.samples, seed=args.seed,
                 target=args.target, budget_scope=args.budget_scope,
                 device=args.device, metric=args.metric, low_memory=args.low_memory,
                 quantizer=_plan_quantizer(args))
    p.save(args.output, overwrite=args.overwrite)
    if p.sensitivity and p.units:
        from .analyze import Sensitivity

        sens = Sensitivity.from_dict(p.sensitivity)
        chosen = scored_unit_bits(p, sens)
        print(plan_table(sens, chosen))
        png = plot_plan(sens, chosen, Path(args.output).with_suffix(".png"))
        if png:
            print(f"wrote {png}")
    print(format_table(plan_summary(p), f"plan for {p.model_path} -> {args.output}"))


def _plan_quantizer(args) -> dict | str | None:
    """The plan's quantizer section from `compress plan`'s options: the name, with --act-order /
    --mse / --refit / --fp-target when given (validated against the quantizer by compress.quantizers)."""
    options = {k: getattr(args, k) for k in QUANTIZER_OPTIONS if getattr(args, k) is not None}
    if not options:
        return args.quantizer
    from .quantizers import quantizer_config

    return quantizer_config(args.quantizer or "rtn", "compress plan", **options).to_dict()


def cmd_apply(args) -> None:
    from . import api

    stats: dict = {}
    out = api.apply(args.model, args.plan, args.output, overwrite=args.overwrite, quantizer=args.quantizer,
                    data=args.data, samples=args.samples, seq_len=args.seq_len, low_memory=args.low_memory,
                    device=args.device, stats=stats, dtype=args.dtype, act_order=args.act_order,
                    damp=args.damp, mse=args.mse, refit=args.refit, fp_target=args.fp_target,
                    token_damp=args.token_damp)
    from .evaluate import format_table

    print(format_table(apply_summary(stats), f"wrote {out}"))


def apply_summary(stats: dict) -> list[tuple[str, object]]:
    """Rows of the table ``compress apply`` prints (from api.apply's ``stats``)."""
    size = stats["size"]
    q = stats["quantizer"]
    rows = [("quantizer", ", ".join(f"{k}={v}" for k, v in q.items() if k not in ("data", "samples", "seq_len")))]
    if "calibration" in stats:
        cal = stats["calibration"]
        rows.append(("calibration", f"{cal['sequences']} sequences of {q.get('seq_len')} tokens from {cal['data']}"))
    rows.append(("unquantized parts stored as", f"{stats['dtype']} ({stats['dtype_reason']})"))
    rows.append(("quantized layers / avg bits", f"{size['quantized_layers']} / {size['avg_bits_quantized']:.2f}"))
    for kind, nbytes in size["by_kind"].items():
        if nbytes:
            rows.append((f"bytes: {kind}", nbytes))
    rows.append(("weight bytes (as loaded)", size["total_bytes"]))
    rows.append(("ratio vs fp16", round(size["ratio_vs_fp16"], 3)))
    if stats.get("source_bytes"):
        rows.append(("ratio vs the checkpoint as stored", round(stats["source_bytes"] / size["total_bytes"], 3)))
    rows.append(("directory bytes", stats["directory_bytes"]))
    vllm = stats.get("servable", {}).get("vllm", {})
    if vllm:
        name, why = next(iter(vllm.items()))
        rows.append(("not loadable quantized by vLLM", f"{len(vllm)} parts, e.g. {name}: {why}"))
    if "peak_rss_bytes" in stats:
        rows.append(("peak memory", f"{stats['peak_rss_bytes'] / 2**20:,.0f} MiB resident"
                     + (f", {stats['peak_cuda_bytes'] / 2**20:,.0f} MiB on the GPU" if "peak_cuda_bytes" in stats
                        else "")))
    rows.append(("time", f"{stats['seconds']:.1f} s"))
    return rows


_SIZE_LABELS = {"total_bytes": "weight bytes", "quantized_layers": "quantized layers",
                "avg_bits_quantized": "avg bits (quantized layers)", "ratio_vs_fp16": "ratio vs fp16",
                "ratio_vs_fp32": "ratio vs fp32"}


def cmd_eval(args) -> None:
    from . import api
    from .evaluate import format_table

    res = api.evaluate(args.model_dir, reference=args.reference, data=args.data, samples=args.samples,
                       seq_len=args.seq_len, device=args.device)
    size, ref_size = res["size"], res["reference_size"]
    rows = list(res["quality"].items())
    rows += [(label, size[key]) for key, label in _SIZE_LABELS.items() if key in size]
    if "total_bytes" in ref_size:
        rows.insert(len(res["quality"]) + 1, ("reference weight bytes", ref_size["total_bytes"]))
    print(format_table([(k, _table_value(v)) for k, v in rows], f"{res['model']} vs {res['reference']} ({res['kind']})"))
    _write_json(res, args.json)


def cmd_analyze(args) -> None:
    from . import api
    from .analyze import format_report

    methods = None if args.methods == "all" else [m.strip() for m in args.methods.split(",")]
    res = api.analyze(args.model, methods, granularity=args.granularity, data=args.data, samples=args.samples,
                      seed=args.seed, device=args.device, metric=args.metric, eval_data=args.eval_data,
                      low_memory=args.low_memory)
    print(format_report(res["rows"]))
    _write_json(api.analysis_json(res), args.json)


def cmd_export(args) -> None:
    from . import api
    from .evaluate import format_table

    given = {"accuracy_level": args.accuracy_level, "opset": args.opset, "tolerance": args.tolerance,
             "external_data": args.external_data or None, "past_key_values": args.past or None,
             "allow_f16": args.allow_f16 or None, "inplace_cache": args.inplace_cache or None,
             "max_length": args.max_length}
    options = {k: v for k, v in given.items() if v is not None}
    report = api.export(args.model_dir, args.output, format=args.format, device=args.device,
                        overwrite=args.overwrite, validate=not args.no_validate, **options)
    print(format_table(report.rows(), f"exported {args.model_dir} ({report.kind})"))
    _write_json(report.to_dict(), args.json)


def cmd_head(args) -> None:
    from . import api
    from .evaluate import format_table

    options = {k: v for k, v in {"task": args.task, "units": args.units, "units_per_step": args.units_per_step,
                                 "active_units": args.active_units, "holdout": args.holdout}.items()
               if v is not None}
    report = api.fit_head(args.model_dir, args.labels, device=args.device, **options)
    names = {"accuracy": "accuracy", "r2": "R^2", "rmse": "RMSE"}
    rows = [(f"{part} {names[k]} ({s['units']} units)", "n/a" if v is None else v)
            for s in report["scores"] for part, key in (("train", "train"), ("held-out", "heldout"))
            if s[key] is not None for k, v in s[key].items()]
    held = (f"{report['heldout_rows']} held out, holdout {report['holdout']}" if report["heldout_rows"]
            else "none held out: too few rows" if report["holdout"] else "none held out: holdout 0")
    print(format_table(rows, f"{report['task']} head, {report['units']} units, fitted on "
                             f"{report['train_rows']} of {report['rows']} labelled rows ({held})"))
    print(f"wrote {' and '.join(report['files'])} (into {args.model_dir}, beside the weights; "
          f"its compress.json records the anytime section)")


def cmd_predict(args) -> None:
    from . import api

    texts = args.text or [line.strip() for line in sys.stdin if line.strip()]
    preds = api.predict(args.model_dir, texts, args.units, device=args.device, proba=args.proba)
    if args.proba:  # a header naming the probability columns, then label, probabilities, text
        print("\t".join(["label", *(map(str, preds[0]) if preds else ()), "text"]))
        for text, probs in zip(texts, preds):
            label = max(probs, key=probs.get)
            print("\t".join([str(label), *(f"{p:.4f}" for p in probs.values()), text]))
        return
    for text, label in zip(texts, preds):
        print(f"{label}\t{text}")


def cmd_inspect(args) -> None:
    from . import api

    info = api.inspect(args.model_dir)
    totals = info["totals"]
    plan = info["plan"] or {}
    width = max((len(n) for n in info["layers"]), default=10)
    print(f"{args.model_dir} ({info['kind']}), quantizer {(plan.get('quantizer') or {}).get('method')}")
    for name, size in info["files"].items():
        print(f"  {name:<28} {size:>14,d} bytes")
    print(f"  {'total (' + str(totals['files']) + ' files)':<28} {totals['file_bytes']:>14,d} bytes")
    print(f"  {'layer':<{width}}  bits  group  sym   shape")
    for name, lm in info["layers"].items():
        group = lm["group_size"] if lm["bits"] == 4 else "-"
        print(f"  {name:<{width}}  {lm['bits']:>4}  {group:>5}  {str(lm['symmetric'])[0]:>3}   "
              f"{lm['out_features']}x{lm['in_features']}")
    kinds = ", ".join(f"int{b}: {r['layers']} layers, {r['weights']:,} weights"
                      for b, r in totals["quantized_by_bits"].items())
    print(f"quantized layers: {totals['quantized_layers']}" + (f" ({kinds})" if kinds else ""))
    print(f"verified: {totals['tensors']} tensors, {totals['tensor_bytes']:,} bytes in "
          f"{', '.join(totals['weights_files'])}; every byte range lies within its file")
    _write_json(info, args.json)


def cmd_convert_llama2c(args) -> None:
    from .llama2c import convert_llama2c

    out = convert_llama2c(args.checkpoint, args.tokenizer, args.output, overwrite=args.overwrite)
    print(f"wrote {out} (a Hugging Face LlamaForCausalLM directory)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("compress")
    except PackageNotFoundError:  # run from a checkout that was never installed
        from . import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command; each action has a help text (tests check)."""
    from .quantizers import REGISTRY as QUANTIZERS

    parser = argparse.ArgumentParser(prog="compress", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"compress {_version()}",
                        help="print the installed version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="one of the commands below; `compress COMMAND --help` explains its options")
    model_help = "local model directory, or a named model: minilm, stories260k"

    p = sub.add_parser("plan", help="write a plan: uniform (--bits) or sensitivity-driven (--method)")
    p.add_argument("model", help=model_help)
    p.add_argument("--bits", type=int, choices=(4, 8), help="bits for every quantizable layer")
    p.add_argument("--group-size", type=int, help="int4 group size along in_features: 32, 64, 128 or -1")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=None,
                     help="symmetric quantization (no zero points; int8 is always symmetric)")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false",
                     help="asymmetric int4 (a zero point per group; the default for int4)")
    p.add_argument("--profile", help="named preset in profiles/ (int4-g128, int4-g32, int8, mixed-5.5) or a .toml file")
    p.add_argument("--exclude", action="append", default=[],
                   help="glob over layer names to keep at 16 bits (repeatable)")
    p.add_argument("--include-heads", action="store_true", help="also quantize output heads (lm_head, pooler)")
    p.add_argument("--method", help="sensitivity analyzer: cmpq, pmpq, tdmpq, taylor, fisher, oracle")
    b = p.add_mutually_exclusive_group()
    b.add_argument("--budget", type=float, help="average bits per quantizable weight (e.g. 4.5)")
    b.add_argument("--max-bytes", help="size of the whole model (fp16 for unquantized parts), e.g. 12MB")
    b.add_argument("--ratio", type=float, help="compression ratio vs fp16 of the whole model")
    p.add_argument("--granularity", choices=("block", "module"), help="unit scored: a transformer block or a layer")
    p.add_argument("--data", help="calibration text (.txt / .jsonl / dataset dir; default: embedded corpus)")
    p.add_argument("--samples", type=int, help="calibration samples for the analyzer")
    p.add_argument("--seed", type=int, default=0, help="random seed of the analyzer's sampling (default 0)")
    p.add_argument("--device", help=DEVICE_HELP.format("cpu") + "; used by the analyzer")
    p.add_argument("--metric", choices=("kl", "nll"), help=METRIC_HELP)
    p.add_argument("--low-memory", action="store_true", help="stream the weights from the safetensors checkpoint one block at a time (the rest of the model on the meta device; block states beyond half the free memory go to $TMPDIR): the same scores in bounded memory")
    p.add_argument("--quantizer", choices=sorted(QUANTIZERS),
                   help="the quantizer apply will run, recorded in the plan: rtn (default) or gptq; with a budget, "
                        "each candidate is priced with that quantizer's error (GPTQ's Hessian-weighted error, "
                        "measured on the calibration text)")
    add_quantizer_options(p, "recorded in the plan, and the budget is priced with them")
    p.add_argument("-o", "--output", required=True, help="plan JSON to write (and a PNG beside it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing plan file")
    p.add_argument("--budget-scope", choices=("linears", "model"),
                   help="what --budget averages over: the quantizable linear layers (default) or every weight "
                        "of the model; a whole-model budget (this, --max-bytes, --ratio) also lets fisher / "
                        "taylor / oracle plans quantize embedding tables (not under --target vllm)")
    p.add_argument("--target", choices=("vllm", "gguf", "any"),
                   help="where the result must load quantized: vllm (fused q/k/v and gate/up share a scheme, "
                        "groups divide K; the default for causal LMs), gguf (llama.cpp: int4 group 32, int8, "
                        "K a multiple of 32), any (everything compress runs; the default otherwise)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("apply", help="apply a plan and write a compressed model directory")
    p.add_argument("model", help=model_help + " (the model the plan was made for)")
    p.add_argument("--plan", required=True, help="plan JSON written by `compress plan`")
    p.add_argument("-o", "--output", required=True, help="compressed model directory to write")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output directory that compress wrote (never a regular file)")
    p.add_argument("--quantizer", choices=sorted(QUANTIZERS),
                   help="per-layer quantizer: rtn (round to nearest) or gptq (default: the plan's, else rtn)")
    p.add_argument("--data", help="calibration text for GPTQ (default: embedded corpus)")
    p.add_argument("--samples", type=int, help="calibration sequences for GPTQ (default 128)")
    p.add_argument("--seq-len", type=int, help="tokens per GPTQ calibration sequence (default 512)")
    p.add_argument("--damp", type=float,
                   help="GPTQ damping, a fraction of mean(diag H), the least any layer gets (default 0.01; see --token-damp)")
    add_quantizer_options(p, "override the plan's")
    p.add_argument("--low-memory", action="store_true",
                   help="stream weights from disk one block at a time (only one block in full precision)")
    p.add_argument("--device", help=DEVICE_HELP.format("cuda if available, else cpu")
                   + "; where blocks are processed")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="dtype of everything left unquantized (default: the checkpoint's when 16-bit, else float16, "
                        "or bfloat16 if a value overflows float16)")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("eval", help="quality and size of a compressed model against the original")
    p.add_argument("model_dir", help="compressed model directory written by `compress apply`")
    p.add_argument("--reference", help="original model (default: the path recorded in the plan)")
    p.add_argument("--data", help=".txt / .jsonl / dataset directory (default: embedded corpus)")
    p.add_argument("--samples", type=int, help="texts (encoders, default 512) or windows (causal LMs, default 64)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window for causal LMs (default 256)")
    p.add_argument("--device", help=DEVICE_HELP.format("cpu") + "; metrics are computed on the CPU")
    p.add_argument("--json", help="also write the figures as strict JSON here (NaN as null)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("analyze", help="score layers with each analyzer; Spearman vs the oracle and time")
    p.add_argument("model", help=model_help)
    p.add_argument("--methods", default="all", help="comma-separated analyzer names, or all (default)")
    p.add_argument("--granularity", choices=("block", "module"), default="block",
                   help="unit scored: a transformer block (default) or a layer")
    p.add_argument("--data", help="calibration text (default: embedded corpus)")
    p.add_argument("--samples", type=int, help="calibration samples per analyzer")
    p.add_argument("--seed", type=int, default=0, help="random seed of the analyzers' sampling (default 0)")
    p.add_argument("--device", help=DEVICE_HELP.format("cpu"))
    p.add_argument("--metric", choices=("kl", "nll"), help=METRIC_HELP)
    p.add_argument("--eval-data", help="the oracle's own text, held out from --data (default: --data)")
    p.add_argument("--low-memory", action="store_true", help="stream the weights from the safetensors checkpoint one block at a time (the rest of the model on the meta device; block states beyond half the free memory go to $TMPDIR): the same scores in bounded memory")
    p.add_argument("--json", help="also write the rows (with every score) as strict JSON here")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("export", help="export a compressed directory to ONNX (MatMulNBits, validated in "
                                      "onnxruntime) or GGUF (llama.cpp / ollama, read back with gguf)")
    p.add_argument("model_dir", help="compressed model directory written by `compress apply`")
    p.add_argument("-o", "--output", required=True, help="the .onnx or .gguf file to write")
    p.add_argument("--format", choices=("onnx", "gguf"),
                   help="onnx, or gguf for Llama / Mistral / Qwen2 causal LMs (default: gguf for a .gguf output)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--allow-f16", action="store_true",
                   help="gguf: store layers no GGUF block type holds (K not a multiple of 32) as F16 of "
                        "their dequantized weight, listed in the summary (default: refuse, naming them)")
    p.add_argument("--accuracy-level", type=int, choices=range(5),
                   help="onnx: MatMulNBits accuracy_level, the speed/accuracy trade: 0 = float activations (adds "
                        "only float rounding), 4 = int8 activations (2-6x faster single-token products; adds ~1%% "
                        "of int4's own KL but ~130%% of int8's). Default: 4 for 4-bit layers, 0 for 8-bit ones, "
                        "keeping the export within 10%% of the quantization's KL (bench/results/onnx_accuracy.md)")
    p.add_argument("--opset", type=int, help="onnx: ONNX opset, 18-23 (default 23 with onnxruntime >= 1.23 installed, else 21: "
                        "opset 23's fused attention / RoPE / RMSNorm decode faster)")
    p.add_argument("--tolerance", type=float,
                   help="onnx: largest relative error vs PyTorch accepted (default: by accuracy level)")
    p.add_argument("--past", action="store_true", help="onnx, causal LMs: key/value cache inputs and outputs")
    p.add_argument("--inplace-cache", action="store_true",
                   help="onnx, causal LMs at opset 23 (float32): the cache updated in place by com.microsoft "
                        "GroupQueryAttention (inputs input_ids, seqlens_k, total_sequence_length and past buffers "
                        "bound as present too; compress.export.onnx_inplace.InplaceDecoder runs it); implies --past")
    p.add_argument("--max-length", type=int,
                   help="onnx --inplace-cache: longest sequence (RoPE table rows; default max_position_embeddings, "
                        "at most 4096)")
    p.add_argument("--external-data", action="store_true",
                   help="onnx: weights in <output>.data (automatic over 2 GB)")
    p.add_argument("--no-validate", action="store_true",
                   help="skip the check (onnx: onnxruntime vs PyTorch; gguf: reading every tensor back)")
    p.add_argument("--device", help="only cpu for now: the export is validated against the model on the CPU")
    p.add_argument("--json", help="also write the report as strict JSON here")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("head", help="fit an anytime (gradient-boosted) head on a compressed encoder's embeddings")
    p.add_argument("model_dir", help="compressed text-encoder directory; the head is written into it")
    p.add_argument("--labels", required=True, help=".jsonl or .csv with columns text,label")
    p.add_argument("--task", choices=("classification", "regression"),
                   help="what the labels are (default: classification)")
    p.add_argument("--units", type=int, help="hidden units in all (T·J; default 100)")
    p.add_argument("--units-per-step", type=int, help="units trained per boosting step (J; default 5)")
    p.add_argument("--active-units", type=int, help="units switched on when loading (default: all)")
    p.add_argument("--holdout", type=float, help="share of the labelled rows kept out of the fit (per "
                   "class) to report held-out accuracy or R^2 / RMSE; 0 fits on all rows (default 0.2)")
    p.add_argument("--device", help=DEVICE_HELP.format("cpu") + "; the encoder's embeddings (the head fits on the CPU)")
    p.set_defaults(func=cmd_head)

    p = sub.add_parser("predict", help="classify texts with a compressed model's anytime head")
    p.add_argument("model_dir", help="compressed directory with an anytime head (`compress head`)")
    p.add_argument("text", nargs="*", help="texts (default: one per line on stdin)")
    p.add_argument("--units", type=int, help="active hidden units (fewer: faster, less accurate)")
    p.add_argument("--proba", action="store_true", help="print each class's probability "
                   "(a header line names the columns); classification heads only")
    p.add_argument("--device", help=DEVICE_HELP.format("cpu") + "; the encoder (the head runs on the CPU)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("inspect", help="show a compressed directory's plan, files, layers and totals; verify its files")
    p.add_argument("model_dir", help="compressed model directory written by `compress apply`")
    p.add_argument("--json", help="also write what is shown as strict JSON here")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("convert-llama2c", help="convert a llama2.c checkpoint and tokenizer into a Hugging Face "
                                                "Llama directory that every command reads")
    p.add_argument("checkpoint", help="llama2.c model file (.bin, legacy v0 format: header + float32 tensors)")
    p.add_argument("tokenizer", help="llama2.c tokenizer file (.bin, e.g. tokenizer.bin or tok512.bin)")
    p.add_argument("-o", "--output", required=True, help="the model directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=cmd_convert_llama2c)
    return parser


def _install_signal_handlers() -> Callable[[], None]:
    """Make SIGINT and SIGTERM raise errors.Interrupted (a KeyboardInterrupt), so that the atomic
    writers' cleanup runs for both; returns a function restoring the previous handlers.

    A signal the caller ignores (SIG_IGN, e.g. SIGINT of a background job) stays ignored. A second
    signal while the first unwinds is dropped, so it cannot cut the removal of temporary files
    short (SIGKILL still ends the process).
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    fired: list[int] = []

    def handler(signum, _frame):
        if fired:
            return
        fired.append(signum)
        raise Interrupted(signum)

    previous = {}
    for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
        if signal.getsignal(sig) is default:
            previous[sig] = signal.signal(sig, handler)

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


def _os_error_line(exc: OSError) -> str:
    """One line for an OSError: what failed and on which path."""
    what = exc.strerror or str(exc)
    paths = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    return f"{what}: {paths}" if paths else what


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot raise BrokenPipeError again."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (0, 2 for a user error, 128 + signal number)."""
    restore = _install_signal_handlers()
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        print(f"compress: interrupted ({signal.Signals(signum).name}); unfinished output removed", file=sys.stderr)
        return 128 + signum
    except CompressError as exc:
        print(f"compress: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `compress inspect DIR | head`: the reader left, nothing to report
        _silence_stdout()
        return 141
    except OSError as exc:  # the environment, not the input: a permission, a missing device, a full disk
        print(f"compress: error: {_os_error_line(exc)}", file=sys.stderr)
        return 2
    finally:
        restore()
    return 0


if __name__ == "__main__":
    sys.exit(main())
