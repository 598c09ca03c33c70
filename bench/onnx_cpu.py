"""onnxruntime (CPU) against PyTorch (CPU) for fp32, int4 and int8: one layer and whole models.

Per layer: a 4096 x 4096 weight, x of M = 1 and 64 rows. Baselines: torch fp32 ``F.linear`` and
the PyTorch compressed layer (QuantLinear's CPU path: dequantize, then F.linear); onnxruntime runs
a single MatMulNBits node built from the same QuantLinear (``compress.export.matmul_nbits_model``)
at accuracy_level 0 (float compute) and 4 (int8 activations), and a one-node fp32 MatMul. Accuracy:
max |y - reference| / max |reference| against ``QuantLinear.reference_forward`` in float64.

End to end: models exported by ``compress.export.export_onnx`` (fp32 = a plan that keeps every
layer at 16 bits, so it goes through the same exporter), int4 (asymmetric, group ``INT4_GROUP``)
and int8:
  * all-MiniLM-L6-v2 at batch 1 and 32, 128 tokens (texts of the embedded corpus, padded): latency,
    and accuracy as 1 - cos of the mean-pooled embedding against the fp32 PyTorch model;
  * stories260K (needs the shared data), exported with its key/value cache: prefill of 128 tokens
    at batch 1, then greedy decoding of ``new_tokens`` tokens one at a time through the cache
    (tokens/s; PyTorch uses transformers' cache), and the mean next-token NLL of the five
    TinyStories samples.
Every figure is a median over ``--reps`` runs after warm-up (fewer, at least 3, where they would
take over 10 s), with ``--threads`` threads on both sides. The machine (CPU model, load average before and after) is recorded with the results.

    python bench/onnx_cpu.py                      # writes bench/results/onnx_cpu.{json,md}
    python bench/onnx_cpu.py --reps 10 --skip-layers
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import compress
from compress.export import MatMulNBitsLinear, export_onnx, matmul_nbits_model, ort_session
from compress.plan import LayerPlan
from compress.qlinear import QuantLinear
from compress.quant import QuantSpec, quantize

RESULTS = Path(__file__).resolve().parent / "results"
LAYER_SPECS = {"int4 g128 asym": QuantSpec(4, 128, False), "int4 g32 asym": QuantSpec(4, 32, False),
               "int8": QuantSpec(8)}
# int4 group per model: 128 for MiniLM (K = 384, 1536); 32 for stories260K, whose K = 64 and 172.
INT4_GROUP = {"minilm": 128, "stories260k": 32}
VARIANTS = ("fp32", "int4", "int8")
LEVELS = (0, 4)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(threads: int) -> dict:
    import onnxruntime

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_avg_1m_before": round(os.getloadavg()[0], 2)}


def median_ms(fn, reps: int, warmup: int = 2, budget_s: float = 10.0) -> float:
    """Median wall time in ms over ``reps`` calls (fewer, at least 3, when that exceeds budget_s)."""
    for _ in range(warmup):
        start = time.perf_counter()
        fn()
    reps = max(3, min(reps, int(budget_s / (time.perf_counter() - start))))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def rel_err(y, ref) -> float:
    y, ref = np.asarray(y, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.abs(y - ref).max() / np.abs(ref).max())


def fp32_matmul_session(weight: torch.Tensor, threads: int):
    """One-node ONNX MatMul: A float32 (M, K) @ W^T (K, N)."""
    from onnx import TensorProto, helper, numpy_helper

    n, k = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "W"], ["Y"])], "matmul",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        [numpy_helper.from_array(weight.t().contiguous().numpy(), "W")])
    return ort_session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), threads)


def bench_layers(reps: int, threads: int, k: int = 4096, n: int = 4096) -> list[dict]:
    torch.manual_seed(0)
    weight = torch.randn(n, k) * 0.02
    rows = []
    fp32_ort = fp32_matmul_session(weight, threads)
    for m in (1, 64):
        x = torch.randn(m, k)
        base = median_ms(lambda: F.linear(x, weight), reps)
        rows.append({"m": m, "weights": "fp32", "runtime": "torch F.linear", "ms": base, "rel_err": 0.0})
        y = fp32_ort.run(None, {"A": x.numpy()})[0]
        rows.append({"m": m, "weights": "fp32", "runtime": "onnxruntime MatMul",
                     "ms": median_ms(lambda: fp32_ort.run(None, {"A": x.numpy()}), reps),
                     "rel_err": rel_err(y, F.linear(x.double(), weight.double()))})
        for label, spec in LAYER_SPECS.items():
            q = QuantLinear.from_quantized(quantize(weight, spec), None)
            ref = F.linear(x.double(), q.dequantized_weight(torch.float64))
            rows.append({"m": m, "weights": label, "runtime": "torch QuantLinear (dequantize + F.linear)",
                         "ms": median_ms(lambda: q(x), reps), "rel_err": rel_err(q(x), ref)})
            for level in LEVELS:
                sess = ort_session(matmul_nbits_model(MatMulNBitsLinear.from_quant_linear(q, torch.float32, level)),
                                   threads)
                y = sess.run(None, {"A": x.numpy()})[0]
                rows.append({"m": m, "weights": label, "runtime": f"onnxruntime MatMulNBits acc{level}",
                             "ms": median_ms(lambda: sess.run(None, {"A": x.numpy()}), reps),
                             "rel_err": rel_err(y, ref)})
        for r in rows:
            if r["m"] == m:
                r["speedup_vs_torch_fp32"] = base / r["ms"]
        print(f"layer M={m} done", file=sys.stderr)
    return rows


def _plan(model: str, variant: str):
    """Uniform plans (``compress.plan``: int4 asymmetric, padded where the group does not divide K)."""
    if variant == "int8":
        return compress.plan(model, bits=8)
    p = compress.plan(model, bits=4, group_size=INT4_GROUP[model], symmetric=False)
    if variant == "fp32":
        p.layers = {name: LayerPlan(16) for name in p.layers}
    return p


def _exports(model: str, work: Path, threads: int, past: bool = False) -> dict:
    """{(variant, level): (compressed dir, onnx session, export report)} for one model."""
    out = {}
    for variant in VARIANTS:
        comp = compress.apply(model, _plan(model, variant), work / f"{model}-{variant}", progress=False)
        for level in (LEVELS if variant != "fp32" else (0,)):
            path = work / f"{model}-{variant}-acc{level}.onnx"
            rep = export_onnx(comp, path, accuracy_level=level, past_key_values=past)
            out[(variant, level)] = (comp, ort_session(path, threads), rep)
            print(f"exported {path.name}: {rep.onnx_bytes:,} bytes, rel_err {rep.rel_err:.2e}", file=sys.stderr)
    return out


def bench_minilm(work: Path, reps: int, threads: int) -> list[dict]:
    from compress.data import load_texts

    exports = _exports("minilm", work, threads)
    lm = compress.load(exports[("fp32", 0)][0])
    fp32, tok = lm.model, lm.tokenizer
    texts = load_texts()[:32]
    rows = []
    for batch in (1, 32):
        enc = tok(texts[:batch], padding="max_length", truncation=True, max_length=128, return_tensors="pt")
        feeds = {"input_ids": enc["input_ids"].numpy(), "attention_mask": enc["attention_mask"].numpy()}
        mask = enc["attention_mask"][..., None].double()

        def pooled(h):
            h = torch.as_tensor(np.asarray(h), dtype=torch.float64)
            return (h * mask).sum(1) / mask.sum(1)

        with torch.no_grad():
            ref = pooled(fp32(**enc).last_hidden_state)
        torch_ms = {}
        for (variant, level), (comp, sess, rep) in exports.items():
            if variant not in torch_ms:
                model = compress.load(comp).model
                with torch.no_grad():
                    emb = pooled(model(**enc).last_hidden_state)
                    torch_ms[variant] = median_ms(lambda: model(**enc), reps)
                rows.append({"model": "minilm", "batch": batch, "tokens": 128, "weights": variant,
                             "runtime": "torch", "ms": torch_ms[variant], "one_minus_cos": _one_minus_cos(emb, ref)})
            emb = pooled(sess.run(None, feeds)[0])
            rows.append({"model": "minilm", "batch": batch, "tokens": 128, "weights": variant,
                         "runtime": f"onnxruntime acc{level}" if variant != "fp32" else "onnxruntime",
                         "ms": median_ms(lambda: sess.run(None, feeds), reps),
                         "one_minus_cos": _one_minus_cos(emb, ref), "onnx_bytes": rep.onnx_bytes,
                         "compressed_bytes": rep.compressed_bytes})
        print(f"minilm batch {batch} done", file=sys.stderr)
    return rows


def _one_minus_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((1 - F.cosine_similarity(a, b, dim=-1)).mean())


def bench_stories(work: Path, reps: int, threads: int, new_tokens: int = 64) -> list[dict]:
    from compress.data import load_texts, shared_data_dir

    if shared_data_dir() is None:
        print("stories260K skipped: no shared data", file=sys.stderr)
        return []
    exports = _exports("stories260k", work, threads, past=True)
    tok = compress.load(exports[("fp32", 0)][0]).tokenizer
    stories = load_texts(shared_data_dir() / "text" / "tinystories-sample.txt")
    ids = [torch.tensor(tok(s)["input_ids"][:128]) for s in stories]
    prompt = torch.cat(ids)[:128][None]  # (1, 128)
    rows, torch_done = [], set()
    for (variant, level), (comp, sess, rep) in exports.items():
        if variant not in torch_done:
            torch_done.add(variant)
            model = compress.load(comp).model
            with torch.no_grad():
                nll = _nll([model(input_ids=i[None], use_cache=False).logits[0] for i in ids], ids)
                ms = median_ms(lambda: model(input_ids=prompt, use_cache=False), reps)
                tps = _torch_decode_tps(model, prompt, new_tokens)
            rows.append({"model": "stories260k", "batch": 1, "tokens": 128, "weights": variant, "runtime": "torch",
                         "ms": ms, "decode_tokens_per_s": tps, "nll": nll})
        inputs = sess.get_inputs()
        logits = [torch.from_numpy(sess.run(None, _ort_feeds(inputs, i[None], []))[0][0]) for i in ids]
        rows.append({"model": "stories260k", "batch": 1, "tokens": 128, "weights": variant,
                     "runtime": f"onnxruntime acc{level}" if variant != "fp32" else "onnxruntime",
                     "ms": median_ms(lambda: sess.run(None, _ort_feeds(inputs, prompt, [])), reps),
                     "decode_tokens_per_s": _ort_decode_tps(sess, inputs, prompt, new_tokens),
                     "nll": _nll(logits, ids), "onnx_bytes": rep.onnx_bytes, "compressed_bytes": rep.compressed_bytes})
    print("stories260k done", file=sys.stderr)
    return rows


def _ort_feeds(inputs: list, ids: torch.Tensor, past: list) -> dict:
    """Feeds for the exported decoder (``inputs``: the session's NodeArgs); empty past when ``past`` is []."""
    if not past:
        _, heads, _, size = inputs[2].shape  # (batch, heads, past_sequence, size)
        past = [np.zeros((ids.shape[0], heads, 0, size), np.float32)] * (len(inputs) - 2)
    total = ids.shape[1] + past[0].shape[2]
    return {"input_ids": ids.numpy(), "attention_mask": np.ones((ids.shape[0], total), np.int64),
            **{i.name: p for i, p in zip(inputs[2:], past)}}


def _ort_decode_tps(sess, inputs: list, prompt: torch.Tensor, new_tokens: int) -> float:
    """Greedy decoding through the exported key/value cache: new tokens per second after the prompt."""
    out = sess.run(None, _ort_feeds(inputs, prompt, []))
    start = time.perf_counter()
    for _ in range(new_tokens):
        nxt = torch.from_numpy(out[0][:, -1].argmax(-1, keepdims=True))
        out = sess.run(None, _ort_feeds(inputs, nxt, out[1:]))
    return new_tokens / (time.perf_counter() - start)


def _torch_decode_tps(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """The same greedy loop in PyTorch with transformers' own cache."""
    out = model(input_ids=prompt, use_cache=True)
    key = "cache" if hasattr(out, "cache") else "past_key_values"
    start = time.perf_counter()
    for _ in range(new_tokens):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        out = model(input_ids=nxt, use_cache=True, **{key: getattr(out, key)})
    return new_tokens / (time.perf_counter() - start)


def _nll(logits: list[torch.Tensor], ids: list[torch.Tensor]) -> float:
    """Mean next-token negative log-likelihood over all windows. logits (T, V), ids (T,)."""
    total, count = 0.0, 0
    for lg, i in zip(logits, ids):
        total += float(F.cross_entropy(lg[:-1].float(), i[1:], reduction="sum"))
        count += len(i) - 1
    return total / count


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# onnxruntime vs PyTorch on the CPU ({m['cpu']}, {m['threads']} threads, "
             f"{m['date'][:10]}, load avg {m['load_avg_1m_before']} -> {m['load_avg_1m_after']})", "",
             f"torch {m['torch']}, onnxruntime {m['onnxruntime']}; `python bench/onnx_cpu.py` "
             f"(median of up to {result['reps']} runs).", ""]
    if result["layers"]:
        lines += ["## One layer, 4096 x 4096", "",
                  "| M | weights | runtime | ms | x vs torch fp32 | rel err |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['m']} | {r['weights']} | {r['runtime']} | {r['ms']:.3f} | "
                  f"{r['speedup_vs_torch_fp32']:.2f} | {r['rel_err']:.1e} |" for r in result["layers"]]
        lines.append("")
    for model, metric, label in (("minilm", "one_minus_cos", "1 - cos vs fp32 torch (mean-pooled)"),
                                 ("stories260k", "nll", "next-token NLL (5 TinyStories samples)")):
        rows = [r for r in result["models"] if r["model"] == model]
        if not rows:
            continue
        decode = model == "stories260k"
        lines += [f"## {model} end to end", "",
                  f"| batch x tokens | weights | runtime | {'prefill ' if decode else ''}ms | x vs torch fp32 | "
                  + ("decode tokens/s | " if decode else "") + f"{label} | file bytes |",
                  "|---" * (7 + decode) + "|"]
        for r in rows:
            base = next(b["ms"] for b in rows if b["batch"] == r["batch"] and b["weights"] == "fp32"
                        and b["runtime"] == "torch")
            size = f"{r['onnx_bytes']:,}" if "onnx_bytes" in r else ""
            tps = f"{r['decode_tokens_per_s']:.0f} | " if decode else ""
            lines.append(f"| {r['batch']} x {r['tokens']} | {r['weights']} | {r['runtime']} | {r['ms']:.2f} | "
                         f"{base / r['ms']:.2f} | {tps}{r[metric]:.2e} | {size} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-layers", action="store_true")
    parser.add_argument("--skip-models", action="store_true")
    parser.add_argument("--name", default="onnx_cpu", help="results file stem under bench/results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {"machine": machine(args.threads), "reps": args.reps, "layers": [], "models": []}
    if not args.skip_layers:
        result["layers"] = bench_layers(args.reps, args.threads)
    if not args.skip_models:
        with tempfile.TemporaryDirectory() as tmp:
            result["models"] = bench_minilm(Path(tmp), args.reps, args.threads)
            result["models"] += bench_stories(Path(tmp), args.reps, args.threads)
    result["machine"]["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    (RESULTS / f"{args.name}.md").write_text(table + "\n")
    print(table)
    print(f"wrote {RESULTS / args.name}.json and .md")


if __name__ == "__main__":
    main()
