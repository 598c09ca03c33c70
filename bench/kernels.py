"""GPU throughput of compress's W4A16 / W8A16 Triton kernels against the baselines, in one run.

For each weight shape K x N and each M (rows of x): fp16 cuBLAS (F.linear), torch's tinygemm int4
(aten._weight_int4pack_mm, bf16), bitsandbytes nf4 and int8 (when importable), and ours through
QuantLinear (int4 group 128 asymmetric, int8 per channel). The device-to-device copy bandwidth is
measured in the same run; each kernel's "floor" is the time to move its bytes (weights + x + out)
at that bandwidth, and "floor%" = floor / measured. Prints a table (speed-up over fp16) and writes
JSON with the GPU, versions and date.

    python bench/kernels.py                                   # the issue's shapes and M
    python bench/kernels.py --shapes 4096x4096 --m 1,16 --quick

tinygemm and bitsandbytes are timed on random codes of the same shapes (speed only); ours is also
checked against its torch reference (``--no-check`` skips that).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# --dry-run runs this script on the CPU under TRITON_INTERPRET=1 (tiny shapes, wall-clock timing) to
# exercise its code paths where there is no GPU; it must set the variable before triton is imported.
if "--dry-run" in sys.argv:
    import os

    os.environ["TRITON_INTERPRET"] = "1"
DEV = "cuda" if torch.cuda.is_available() and "--dry-run" not in sys.argv else "cpu"

from compress.qlinear import QuantLinear
from compress.quant import QuantSpec, quantize

SHAPES = ["4096x4096", "4096x14336", "14336x4096", "8192x28672"]  # K x N (in x out features)
MS = [1, 4, 16, 64, 256, 4096]
OURS = {"ours-w4g128": QuantSpec(4, 128, False), "ours-w8": QuantSpec(8)}


def machine_info() -> dict:
    import triton

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
            "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if DEV == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, sm_count=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1))
    else:
        info["gpu"] = "none (dry run on the CPU under TRITON_INTERPRET=1)"
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        info["bitsandbytes"] = None
    return info


def bench(fn, quick: bool) -> float:
    """Median milliseconds of fn (triton.testing.do_bench flushes L2 between repetitions)."""
    import triton.testing

    if DEV != "cuda":  # dry run: one timed call
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    warmup, rep = (10, 40) if quick else (25, 100)
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def copy_bandwidth(quick: bool) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    n = 1 << 29 if DEV == "cuda" else 1 << 20  # 1 GiB of fp16
    src = torch.empty(n, dtype=torch.float16, device=DEV).normal_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), quick)
    del src, dst
    return 2 * n * 2 / (ms * 1e-3)


def _random_int4_codes(n: int, k: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=DEV)


def build_methods(w: torch.Tensor, notes: dict) -> dict:
    """name -> (forward(x_fp16) -> out, weight bytes). w: fp16 (N, K) on the GPU."""
    n, k = w.shape
    methods = {"fp16": (lambda x: F.linear(x, w), w.numel() * 2)}

    # tinygemm (torch's int4 kernel): bf16 activations, [K/group, N, 2] bf16 scales and zeros.
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack(_random_int4_codes(n, k), 8)
        sz = torch.randn(k // 128, n, 2, dtype=torch.bfloat16, device=DEV) * 0.01
        methods["tinygemm-w4g128"] = (
            lambda x: torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16), packed, 128, sz),
            n * k // 2 + sz.numel() * 2,
        )
    except (RuntimeError, AttributeError, NotImplementedError) as e:  # op missing or refused here
        notes["tinygemm-w4g128"] = f"unavailable: {str(e).splitlines()[0][:160]}"

    try:
        import bitsandbytes as bnb
    except ImportError:
        notes["bnb-nf4"] = notes["bnb-int8"] = "bitsandbytes not installed"
    else:
        if DEV != "cuda":
            raise SystemExit("dry run: uninstall bitsandbytes or run on a GPU")
        lin4 = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.float16, quant_type="nf4")
        lin4.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type="nf4")
        lin4 = lin4.cuda()
        methods["bnb-nf4"] = (lin4, n * k // 2 + (n * k // 64) * 4)
        lin8 = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=0.0)
        lin8.weight = bnb.nn.Int8Params(w.cpu(), requires_grad=False, has_fp16_weights=False)
        lin8 = lin8.cuda()
        methods["bnb-int8"] = (lin8, n * k + n * 4)

    for name, spec in OURS.items():
        layer = QuantLinear.from_quantized(quantize(w, spec, name), None, dtype=torch.float16)
        methods[name] = (layer, layer.weight_bytes())
    return methods


def check_ours(methods: dict, k: int, ms: list[int]) -> dict:
    """Relative error of ours against QuantLinear.reference_forward (fp16 and bf16 activations)."""
    from compress.kernels.linear import kernel_linear

    errs = {}
    for name in OURS:
        layer = methods[name][0]
        for m in ms:
            for dt in (torch.float16, torch.bfloat16) if DEV == "cuda" else (torch.float16,):
                x = torch.randn(m, k, dtype=dt, device=DEV)
                ref = layer.reference_forward(x.float())
                out = kernel_linear(x, layer).float()
                errs[f"{name} m={m} {str(dt)[6:]}"] = ((out - ref).norm() / ref.norm()).item()
    return errs


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out.float() - ref).norm() / ref.norm()).item()


def correctness(small: bool = False) -> dict:
    """Every kernel path on the GPU against the torch reference; returns {case: relative error} and
    the list of failures. Outputs are poisoned (NaN) before each call, so an unwritten element fails.
    Bounds: 2e-3 for fp16 (output rounding is ~3e-4), 1e-2 for bf16 (8-bit mantissa)."""
    from compress.kernels import w4a16, w8a16
    from compress.kernels._common import DECODE_MAX_M
    from compress.kernels.linear import kernel_linear

    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
    errs, failures = {}, []

    def record(case, out, ref, dt):
        errs[case] = _rel(out, ref)
        if not errs[case] < tol[dt]:
            failures.append(f"{case}: relative error {errs[case]:.2e} (bound {tol[dt]:.0e})")

    def cfg(c, split):
        return {**c.kwargs, "SPLIT_K": split if split else c.kwargs["SPLIT_K"] or 1,
                "num_warps": c.num_warps, "num_stages": c.num_stages}

    dec4, gemm4 = cfg(w4a16.DECODE_CONFIGS[-1 if small else 1], 4), cfg(w4a16.GEMM_CONFIGS[0], 1)
    dtypes = (torch.float16, torch.bfloat16) if DEV == "cuda" else (torch.float16,)  # bf16: #11584
    ms = (1, 17) if small else (1, 7, 16, 17, 300)
    torch.manual_seed(0)
    # Every format x activation dtype through one decode and one gemm config; ragged K (group -1,
    # padded) and N not a multiple of any tile.
    for group in (32, 64, 128, -1):
        k, n = (1000, 1000) if group == -1 else (1536, 1000)
        if small:
            k, n = (100, 40) if group == -1 else (3 * max(group, 64), 40)
        for sym in (False, True):
            layer = QuantLinear.from_quantized(
                quantize(torch.randn(n, k, device=DEV) * 0.02, QuantSpec(4, group, sym)),
                torch.randn(n, device=DEV) if sym else None, dtype=torch.float16)
            zeros = None if sym else layer.zeros
            for dt in dtypes:
                for m in ms:
                    x = torch.randn(m, k, dtype=dt, device=DEV)
                    out = torch.full((m, n), float("nan"), dtype=dt, device=DEV)
                    c = dec4 if m <= DECODE_MAX_M else gemm4
                    w4a16.w4a16_matmul(x, layer.qweight, layer.scales, zeros, k, group, layer.bias, out=out,
                                       config=c, path="decode" if m <= DECODE_MAX_M else "gemm")
                    record(f"w4 g{group} sym={sym} {str(dt)[6:]} m={m}", out, layer.reference_forward(x.float()), dt)
    # Every shipped config once (int4 g128 asymmetric and int8, fp16), split-K where it applies.
    k, n = (256, 40) if small else (2048, 1000)
    l4 = QuantLinear.from_quantized(quantize(torch.randn(n, k, device=DEV) * 0.02, QuantSpec(4, 128, False)),
                                    None, dtype=torch.float16)
    l8 = QuantLinear.from_quantized(quantize(torch.randn(n, k, device=DEV) * 0.02, QuantSpec(8)),
                                    torch.randn(n, device=DEV), dtype=torch.float16)
    for mod, configs in ((w4a16, w4a16.DECODE_CONFIGS + w4a16.GEMM_CONFIGS),
                         (w8a16, w8a16.DECODE_CONFIGS + w8a16.GEMM_CONFIGS)):
        for c in configs:
            decode = c.kwargs["BLOCK_M"] == 16
            m = 5 if decode else (40 if small else 200)
            x = torch.randn(m, k, dtype=torch.float16, device=DEV)
            out = torch.full((m, n), float("nan"), dtype=torch.float16, device=DEV)
            meta = cfg(c, 3 if decode else 1)
            if mod is w4a16:
                w4a16.w4a16_matmul(x, l4.qweight, l4.scales, l4.zeros, k, 128, out=out, config=meta,
                                   path="decode" if decode else "gemm")
                ref = l4.reference_forward(x.float())
            else:
                w8a16.w8a16_matmul(x, l8.qweight, l8.scales, l8.bias, out=out, config=meta,
                                   path="decode" if decode else "gemm")
                ref = l8.reference_forward(x.float())
            record(f"{mod.__name__.split('.')[-1]} config {meta}", out, ref, torch.float16)
    # The autotuned path through QuantLinear (what models run), both formats.
    for layer in (l4, l8):
        for m in (1, 17) if small else (1, 16, 17, 512):
            x = torch.randn(m, k, dtype=torch.float16, device=DEV)
            record(f"QuantLinear bits={layer.bits} autotuned m={m}", kernel_linear(x, layer),
                   layer.reference_forward(x.float()), torch.float16)
    # Split-K sums partials in a fixed order: bitwise identical across launches.
    x = torch.randn(1, k, dtype=torch.float16, device=DEV)
    a = w4a16.w4a16_matmul(x, l4.qweight, l4.scales, l4.zeros, k, 128, config=dec4)
    b = w4a16.w4a16_matmul(x, l4.qweight, l4.scales, l4.zeros, k, 128, config=dec4)
    if not torch.equal(a, b):
        failures.append("split-K decode is not deterministic across launches")
    if DEV != "cuda":
        return {"errors": errs, "failures": failures}
    # CUDA graph capture and replay of the decode path (counters reset inside the kernel).
    static_x = torch.randn(1, k, dtype=torch.float16, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        kernel_linear(static_x, l4)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        static_out = kernel_linear(static_x, l4)
    for i in range(3):
        static_x.copy_(torch.randn(1, k, dtype=torch.float16, device="cuda"))
        graph.replay()
        record(f"CUDA graph replay {i}", static_out, l4.reference_forward(static_x.float()), torch.float16)
    return {"errors": errs, "failures": failures}


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def host_overhead_us(fn, x, calls: int = 200) -> float:
    """Wall-clock microseconds per call of back-to-back launches: the CPU side of a call when it is
    slower than the kernel (what CUDA graphs remove)."""
    fn(x)
    _sync()
    t = time.perf_counter()
    for _ in range(calls):
        fn(x)
    _sync()
    return (time.perf_counter() - t) / calls * 1e6


def write_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))


def run(shapes: list[str], ms: list[int], quick: bool, check: bool, out: Path) -> dict:
    """Time every method at every (shape, M); the JSON is rewritten after each shape so that an
    interrupted run keeps what it measured."""
    bw = copy_bandwidth(quick)
    result = {"machine": machine_info(), "copy_bandwidth_TBps": bw / 1e12, "rows": [], "notes": {},
              "errors": {}, "host_us_per_call": {}}
    print(f"# {result['machine']['gpu']}  copy bandwidth {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    for shape in shapes:
        k, n = (int(v) for v in shape.lower().split("x"))
        torch.manual_seed(0)
        w = (torch.randn(n, k, device=DEV) * 0.02).to(torch.float16)
        methods = build_methods(w, result["notes"])
        if check:
            result["errors"][shape] = check_ours(methods, k, [1, 5, 64])
        if shape == shapes[0]:
            x1 = torch.randn(1, k, dtype=torch.float16, device=DEV)
            for name in ("fp16", "ours-w4g128", "ours-w8"):
                result["host_us_per_call"][f"{name} {shape} m=1"] = host_overhead_us(
                    methods[name][0], x1, 200 if DEV == "cuda" else 2)
        for m in ms:
            x = torch.randn(m, k, dtype=torch.float16, device=DEV)
            io_bytes = (m * k + m * n) * 2
            base = None
            for name, (fn, wbytes) in methods.items():
                ms_ = bench(lambda: fn(x), quick)
                base = ms_ if name == "fp16" else base
                floor_ms = (wbytes + io_bytes) / bw * 1e3
                row = {"shape": shape, "K": k, "N": n, "M": m, "method": name, "ms": ms_,
                       "speedup_vs_fp16": base / ms_, "floor_ms": floor_ms, "floor_share": floor_ms / ms_,
                       "tflops": 2 * m * n * k / (ms_ * 1e-3) / 1e12, "weight_bytes": wbytes}
                result["rows"].append(row)
            print_rows([r for r in result["rows"] if r["shape"] == shape and r["M"] == m], header=m == ms[0])
        del methods, w
        if DEV == "cuda":
            torch.cuda.empty_cache()
        write_json(result, out)
    return result


def print_rows(rows: list[dict], header: bool) -> None:
    names = [r["method"] for r in rows]
    if header:
        print(f"{'K x N':>12} {'M':>5} {'fp16 us':>9} " + " ".join(f"{nm:>22}" for nm in names[1:]))
    fp16 = rows[0]
    cells = [f"{r['speedup_vs_fp16']:5.2f}x {r['ms'] * 1e3:7.1f}us {r['floor_share'] * 100:3.0f}%" for r in rows[1:]]
    print(f"{fp16['K']:>5}x{fp16['N']:<6} {fp16['M']:>5} {fp16['ms'] * 1e3:9.1f} " + " ".join(f"{c:>22}" for c in cells),
          flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated KxN (in x out features)")
    ap.add_argument("--m", default=",".join(map(str, MS)), help="comma-separated rows of x")
    ap.add_argument("--quick", action="store_true", help="shorter timing (10 + 40 ms per point)")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness check of ours")
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU: run every code path on the CPU under TRITON_INTERPRET=1 with tiny shapes")
    ap.add_argument("--correctness", action="store_true",
                    help="only check every kernel path against the torch reference (exit 1 on failure)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/kernels.json, or "
                                                "bench/results/kernels_correctness.json with --correctness)")
    args = ap.parse_args(argv)
    if DEV != "cuda" and not args.dry_run:
        print("bench/kernels.py needs a CUDA GPU (or --dry-run)", file=sys.stderr)
        return 2
    if args.dry_run and args.out is None:
        args.out = "/tmp/compress_bench_dry_run.json"
    if args.correctness:
        t = time.perf_counter()
        result = {"machine": machine_info(), **correctness(small=args.dry_run)}
        out = Path(args.out or "bench/results/kernels_correctness.json")
        write_json(result, out)
        worst = max(result["errors"].items(), key=lambda kv: kv[1])
        print(f"# {len(result['errors'])} cases in {time.perf_counter() - t:.0f} s on {result['machine']['gpu']}; "
              f"worst {worst[0]}: {worst[1]:.2e}; wrote {out}")
        for f in result["failures"]:
            print(f"FAIL {f}")
        return 1 if result["failures"] else 0
    if args.dry_run:
        args.shapes, args.m = "256x96", "1,20"
    out = Path(args.out or "bench/results/kernels.json")
    result = run(args.shapes.split(","), [int(v) for v in args.m.split(",")], args.quick, not args.no_check, out)
    for key, value in result["notes"].items():
        print(f"# {key}: {value}")
    for key, value in result["host_us_per_call"].items():
        print(f"# host time per call, {key}: {value:.1f} us")
    worst = {s: max(e.values()) for s, e in result["errors"].items()}
    if worst:
        print(f"# ours vs torch reference, worst relative error per shape: {worst}")
    write_json(result, out)
    print(f"# wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
