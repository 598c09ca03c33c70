"""`compress` command line: thin commands, each one library call (see compress.api)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import CompressError
from .quantizers import REGISTRY as QUANTIZERS


def _write_json(obj: dict, path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(obj, indent=1, default=str) + "\n")
        print(f"wrote {path}")


def cmd_plan(args) -> None:
    from . import api
    from .evaluate import format_table
    from .planner import plan_summary, plan_table, plot_plan

    if Path(args.output).exists() and not args.overwrite:  # before any analysis
        raise CompressError(f"{args.output} exists; pass --overwrite to replace it")
    p = api.plan(args.model, bits=args.bits, group_size=args.group_size, symmetric=args.symmetric,
                 profile=args.profile, exclude=tuple(args.exclude), include_heads=args.include_heads,
                 method=args.method, budget=args.budget, max_bytes=args.max_bytes, ratio=args.ratio,
                 granularity=args.granularity, data=args.data, samples=args.samples, seed=args.seed)
    p.save(args.output, overwrite=args.overwrite)
    if p.sensitivity and p.units:
        from .analyze import Sensitivity

        sens = Sensitivity.from_dict(p.sensitivity)
        chosen = {u: lp.bits for u, lp in p.units.items()}
        print(plan_table(sens, chosen))
        png = plot_plan(sens, chosen, Path(args.output).with_suffix(".png"))
        if png:
            print(f"wrote {png}")
    print(format_table(plan_summary(p), f"plan for {p.model_path} -> {args.output}"))


def cmd_apply(args) -> None:
    from . import api

    stats: dict = {}
    out = api.apply(args.model, args.plan, args.output, overwrite=args.overwrite, quantizer=args.quantizer,
                    data=args.data, samples=args.samples, seq_len=args.seq_len, low_memory=args.low_memory,
                    device=args.device, stats=stats, dtype=args.dtype, act_order=args.act_order,
                    damp=args.damp)
    print(f"wrote {out}")
    if stats:
        print(f"peak memory: {stats['peak_rss_bytes'] / 2**20:,.0f} MiB resident"
              + (f", {stats['peak_cuda_bytes'] / 2**20:,.0f} MiB on the GPU" if "peak_cuda_bytes" in stats else ""))


def cmd_eval(args) -> None:
    from . import api
    from .evaluate import format_table

    res = api.evaluate(args.model_dir, reference=args.reference, data=args.data, samples=args.samples,
                       seq_len=args.seq_len)
    size, ref_size = res["size"], res["reference_size"]
    rows = list(res["quality"].items()) + [
        ("weight bytes", size["total_bytes"]),
        ("reference weight bytes", ref_size["total_bytes"]),
        ("quantized layers", size["quantized_layers"]),
        ("avg bits (quantized layers)", size["avg_bits_quantized"]),
        ("ratio vs fp16", size["ratio_vs_fp16"]),
        ("ratio vs fp32", size["ratio_vs_fp32"]),
    ]
    print(format_table(rows, f"{res['model']} vs {res['reference']} ({res['kind']})"))
    _write_json(res, args.json)


def cmd_analyze(args) -> None:
    from . import api
    from .analyze import format_report

    methods = None if args.methods == "all" else [m.strip() for m in args.methods.split(",")]
    res = api.analyze(args.model, methods, granularity=args.granularity, data=args.data, samples=args.samples,
                      seed=args.seed)
    print(format_report(res["rows"]))
    _write_json(api.analysis_json(res), args.json)


def cmd_export(args) -> None:
    from .evaluate import format_table
    from .export import export_onnx

    report = export_onnx(args.model_dir, args.output, overwrite=args.overwrite, validate=not args.no_validate,
                         accuracy_level=args.accuracy_level, opset=args.opset, tolerance=args.tolerance,
                         external_data=True if args.external_data else None, past_key_values=args.past)
    print(format_table(report.rows(), f"exported {args.model_dir} ({report.kind})"))
    _write_json(report.to_dict(), args.json)


def cmd_head(args) -> None:
    from . import api

    options = {k: v for k, v in {"task": args.task, "units": args.units, "units_per_step": args.units_per_step,
                                 "active_units": args.active_units}.items() if v is not None}
    api.fit_head(args.model_dir, args.labels, **options)
    print(f"wrote {args.model_dir}/anytime.safetensors and anytime.json")


def cmd_predict(args) -> None:
    from . import api

    texts = args.text or [line.strip() for line in sys.stdin if line.strip()]
    for text, label in zip(texts, api.predict(args.model_dir, texts, args.units)):
        print(f"{label}\t{text}")


def cmd_inspect(args) -> None:
    from . import api

    info = api.inspect(args.model_dir)
    width = max((len(n) for n in info["layers"]), default=10)
    print(f"{args.model_dir} ({info['kind']}), quantizer {info['plan'].get('quantizer', {}).get('method')}")
    for name, size in sorted(info["files"].items()):
        print(f"  {name:<24} {size:>14,d} bytes")
    print(f"  {'layer':<{width}}  bits  group  sym   shape")
    for name, lm in info["layers"].items():
        group = lm["group_size"] if lm["bits"] == 4 else "-"
        print(f"  {name:<{width}}  {lm['bits']:>4}  {group:>5}  {str(lm['symmetric'])[0]:>3}   "
              f"{lm['out_features']}x{lm['in_features']}")
    _write_json(info, args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compress", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="write a plan: uniform (--bits) or sensitivity-driven (--method)")
    p.add_argument("model", help="local model directory, or a named model: minilm, stories260k")
    p.add_argument("--bits", type=int, choices=(4, 8), help="bits for every quantizable layer")
    p.add_argument("--group-size", type=int, help="int4 group size along in_features: 32, 64, 128 or -1")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=None)
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false")
    p.add_argument("--profile", help="named preset in profiles/ or a .toml file")
    p.add_argument("--exclude", action="append", default=[], help="glob over layer names to keep at 16 bits")
    p.add_argument("--include-heads", action="store_true", help="also quantize output heads (lm_head, pooler)")
    p.add_argument("--method", help="sensitivity analyzer: cmpq, pmpq, tdmpq, taylor, fisher, oracle")
    b = p.add_mutually_exclusive_group()
    b.add_argument("--budget", type=float, help="average bits per quantizable weight (e.g. 4.5)")
    b.add_argument("--max-bytes", help="size of the whole model (fp16 for unquantized parts), e.g. 12MB")
    b.add_argument("--ratio", type=float, help="compression ratio vs fp16 of the whole model")
    p.add_argument("--granularity", choices=("block", "module"), help="unit scored: a transformer block or a layer")
    p.add_argument("--data", help="calibration text (.txt / .jsonl / dataset dir; default: embedded corpus)")
    p.add_argument("--samples", type=int, help="calibration samples for the analyzer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", required=True, help="plan JSON to write (and a PNG beside it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing plan file")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("apply", help="apply a plan and write a compressed model directory")
    p.add_argument("model")
    p.add_argument("--plan", required=True)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--quantizer", choices=sorted(QUANTIZERS),
                   help="per-layer quantizer: rtn (round to nearest) or gptq (default: the plan's, else rtn)")
    p.add_argument("--data", help="calibration text for GPTQ (default: embedded corpus)")
    p.add_argument("--samples", type=int, help="calibration sequences for GPTQ (default 128)")
    p.add_argument("--seq-len", type=int, help="tokens per GPTQ calibration sequence (default 512)")
    p.add_argument("--damp", type=float, help="GPTQ damping, a fraction of mean(diag H) (default 0.01)")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: quantize columns by decreasing Hessian diagonal (static groups)")
    p.add_argument("--low-memory", action="store_true",
                   help="stream weights from disk one block at a time (only one block in full precision)")
    p.add_argument("--device", help="where blocks are processed (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="dtype of everything left unquantized (default: float32 as loaded)")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("eval", help="quality and size of a compressed model against the original")
    p.add_argument("model_dir")
    p.add_argument("--reference", help="original model (default: the path recorded in the plan)")
    p.add_argument("--data", help=".txt / .jsonl / dataset directory (default: embedded corpus)")
    p.add_argument("--samples", type=int, help="texts (encoders, default 512) or windows (causal LMs, default 64)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window for causal LMs")
    p.add_argument("--json", help="also write the figures as JSON here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("analyze", help="score layers with each analyzer; Spearman vs the oracle and time")
    p.add_argument("model")
    p.add_argument("--methods", default="all", help="comma-separated analyzer names, or all")
    p.add_argument("--granularity", choices=("block", "module"), default="block")
    p.add_argument("--data", help="calibration text (default: embedded corpus)")
    p.add_argument("--samples", type=int, help="calibration samples per analyzer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the rows (with every score) as JSON here")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("export", help="export a compressed directory to ONNX (MatMulNBits), validated in onnxruntime")
    p.add_argument("model_dir")
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--accuracy-level", type=int, default=4, choices=range(5),
                   help="MatMulNBits accuracy_level: 4 = int8 activations (fastest on CPU), 0 = float")
    p.add_argument("--opset", type=int, default=21)
    p.add_argument("--tolerance", type=float, help="largest relative error vs PyTorch accepted")
    p.add_argument("--past", action="store_true", help="causal LMs: key/value cache inputs and outputs")
    p.add_argument("--external-data", action="store_true", help="weights in <output>.data (automatic over 2 GB)")
    p.add_argument("--no-validate", action="store_true", help="skip the onnxruntime comparison")
    p.add_argument("--json", help="also write the report as JSON here")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("head", help="fit an anytime (gradient-boosted) head on a compressed encoder's embeddings")
    p.add_argument("model_dir")
    p.add_argument("--labels", required=True, help=".jsonl or .csv with columns text,label")
    p.add_argument("--task", choices=("classification", "regression"))
    p.add_argument("--units", type=int, help="hidden units in all (T·J; default 100)")
    p.add_argument("--units-per-step", type=int, help="units trained per boosting step (J; default 5)")
    p.add_argument("--active-units", type=int, help="units switched on when loading (default: all)")
    p.set_defaults(func=cmd_head)

    p = sub.add_parser("predict", help="classify texts with a compressed model's anytime head")
    p.add_argument("model_dir")
    p.add_argument("text", nargs="*", help="texts (default: one per line on stdin)")
    p.add_argument("--units", type=int, help="active hidden units (fewer: faster, less accurate)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("inspect", help="show a compressed directory's plan, files and layers")
    p.add_argument("model_dir")
    p.add_argument("--json")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CompressError as exc:
        print(f"compress: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
