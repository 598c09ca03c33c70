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
    (tokens/s = new_tokens / (time of prompt + decoding - time of the prompt alone); PyTorch uses
    transformers' cache), and the mean next-token NLL of the five TinyStories samples.
Every time is a median over ``--reps`` rounds in which each contender of a table section runs once
in turn (``interleaved_ms``: a shared machine's load then falls on all alike), with ``--threads``
threads on both sides. The machine (CPU model, load average before and after) is recorded with the results.

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

# Idle threads of either runtime spin by default; on a shared 2-core machine the spinning threads
# of one runtime (or of other processes) starve the next call, torch's OpenMP pool worst of all, so
# both runtimes wait passively unless --spin (compare the two runs). OpenMP reads this when torch loads.
SPIN = "--spin" in sys.argv
if not SPIN:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import compress  # noqa: E402
from compress.export import MatMulNBitsLinear, export_onnx, matmul_nbits_model, ort_session  # noqa: E402
from compress.plan import LayerPlan  # noqa: E402
from compress.qlinear import QuantLinear  # noqa: E402
from compress.quant import QuantSpec, quantize  # noqa: E402
from _common import cpu_name  # noqa: E402  (bench/ is the script's directory)

RESULTS = Path(__file__).resolve().parent / "results"
LAYER_SPECS = {"int4 g128 asym": QuantSpec(4, 128, False), "int4 g32 asym": QuantSpec(4, 32, False),
               "int8": QuantSpec(8)}
# int4 group per model: 128 for MiniLM (K = 384, 1536); 32 for stories260K, whose K = 64 and 172.
INT4_GROUP = {"minilm": 128, "stories260k": 32}
VARIANTS = ("fp32", "int4", "int8")
LEVELS = (0, 4)


def _session(model, threads: int):
    return ort_session(model, threads, spinning=SPIN)




def machine(threads: int) -> dict:
    import onnxruntime

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_avg_1m_before": round(os.getloadavg()[0], 2),
            "idle_threads": "spin (defaults)" if SPIN else "passive (OMP_WAIT_POLICY=PASSIVE, ORT allow_spinning=0)"}


def interleaved_ms(fns: list, reps: int, budget_s: float) -> list[float]:
    """Median ms of each callable, timed round-robin (one call of each per round) so that the load of
    a shared machine falls on all of them alike. ``reps`` rounds, fewer (at least 3) where they would
    take over ``budget_s``; two warm-up rounds first."""
    for fn in fns:
        fn()
    start = time.perf_counter()
    for fn in fns:
        fn()
    rounds = max(3, min(reps, int(budget_s / (time.perf_counter() - start))))
    times = [[] for _ in fns]
    for _ in range(rounds):
        for t, fn in zip(times, fns):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return [1e3 * statistics.median(t) for t in times]


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
    return _session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), threads)


def bench_layers(reps: int, threads: int, k: int = 4096, n: int = 4096) -> list[dict]:
    torch.manual_seed(0)
    weight = torch.randn(n, k) * 0.02
    fp32_ort = fp32_matmul_session(weight, threads)
    layers = {label: QuantLinear.from_quantized(quantize(weight, spec), None) for label, spec in LAYER_SPECS.items()}
    sessions = {(label, level): _session(matmul_nbits_model(MatMulNBitsLinear.from_quant_linear(q, torch.float32,
                                                                                                    level)), threads)
                for label, q in layers.items() for level in LEVELS}
    rows = []
    for m in (1, 64):
        x = torch.randn(m, k)
        feeds = {"A": x.numpy()}
        cases = [({"weights": "fp32", "runtime": "torch F.linear"}, lambda: F.linear(x, weight),
                  F.linear(x.double(), weight.double())),
                 ({"weights": "fp32", "runtime": "onnxruntime MatMul"}, lambda: fp32_ort.run(None, feeds)[0],
                  F.linear(x.double(), weight.double()))]
        for label, q in layers.items():
            ref = F.linear(x.double(), q.dequantized_weight(torch.float64))
            cases.append(({"weights": label, "runtime": "torch QuantLinear (dequantize + F.linear)"},
                          lambda q=q: q(x), ref))
            cases += [({"weights": label, "runtime": f"onnxruntime MatMulNBits acc{level}"},
                       lambda s=sessions[(label, level)]: s.run(None, feeds)[0], ref) for level in LEVELS]
        with torch.no_grad():
            times = interleaved_ms([fn for _, fn, _ in cases], reps, budget_s=90)
            for (row, fn, ref), ms in zip(cases, times):
                rows.append({"m": m, **row, "ms": ms, "speedup_vs_torch_fp32": times[0] / ms,
                             "rel_err": rel_err(fn(), ref)})
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
            out[(variant, level)] = (comp, _session(path, threads), rep)
            print(f"exported {path.name}: {rep.onnx_bytes:,} bytes, rel_err {rep.rel_err:.2e}", file=sys.stderr)
    return out


def bench_minilm(work: Path, reps: int, threads: int) -> list[dict]:
    from compress.data import load_texts

    exports = _exports("minilm", work, threads)
    lm = compress.load(exports[("fp32", 0)][0])
    tok = lm.tokenizer
    comps = {v: comp for (v, _), (comp, _, _) in exports.items()}
    torch_models = {v: compress.load(comp).model for v, comp in comps.items()}
    texts = load_texts()[:32]
    rows = []
    for batch in (1, 32):
        enc = tok(texts[:batch], padding="max_length", truncation=True, max_length=128, return_tensors="pt")
        feeds = {"input_ids": enc["input_ids"].numpy(), "attention_mask": enc["attention_mask"].numpy()}
        mask = enc["attention_mask"][..., None].double()

        def pooled(h):
            h = torch.as_tensor(np.asarray(h), dtype=torch.float64)
            return (h * mask).sum(1) / mask.sum(1)

        cases = [({"weights": v, "runtime": "torch"}, lambda m=m: m(**enc).last_hidden_state)
                 for v, m in torch_models.items()]
        cases += [({"weights": v, "runtime": f"onnxruntime acc{level}" if v != "fp32" else "onnxruntime",
                    "onnx_bytes": rep.onnx_bytes, "compressed_bytes": rep.compressed_bytes},
                   lambda s=sess: s.run(None, feeds)[0]) for (v, level), (_, sess, rep) in exports.items()]
        with torch.no_grad():
            ref = pooled(torch_models["fp32"](**enc).last_hidden_state)
            times = interleaved_ms([fn for _, fn in cases], reps, budget_s=150)
            base = times[0]
            for (row, fn), ms in zip(cases, times):
                rows.append({"model": "minilm", "batch": batch, "tokens": 128, **row, "ms": ms,
                             "speedup_vs_torch_fp32": base / ms, "one_minus_cos": _one_minus_cos(pooled(fn()), ref)})
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
    comps = {v: comp for (v, _), (comp, _, _) in exports.items()}
    torch_models = {v: compress.load(comp).model for v, comp in comps.items()}
    stories = load_texts(shared_data_dir() / "text" / "tinystories-sample.txt")
    ids = [torch.tensor(tok(s)["input_ids"][:128]) for s in stories]
    prompt = torch.cat(ids)[:128][None]  # (1, 128)
    cases = []  # (row, prefill, decode loop, logits of one window)
    for v, m in torch_models.items():
        cases.append(({"weights": v, "runtime": "torch"}, lambda m=m: m(input_ids=prompt, use_cache=False),
                      lambda m=m: _torch_decode(m, prompt, new_tokens),
                      lambda i, m=m: m(input_ids=i[None], use_cache=False).logits[0]))
    for (v, level), (_, sess, rep) in exports.items():
        inputs = sess.get_inputs()
        cases.append(({"weights": v, "runtime": f"onnxruntime acc{level}" if v != "fp32" else "onnxruntime",
                       "onnx_bytes": rep.onnx_bytes, "compressed_bytes": rep.compressed_bytes},
                      lambda s=sess, n=inputs: s.run(None, _ort_feeds(n, prompt, [])),
                      lambda s=sess, n=inputs: _ort_decode(s, n, prompt, new_tokens),
                      lambda i, s=sess, n=inputs: torch.from_numpy(s.run(None, _ort_feeds(n, i[None], []))[0][0])))
    rows = []
    with torch.no_grad():
        prefill = interleaved_ms([c[1] for c in cases], reps, budget_s=60)
        decode = interleaved_ms([c[2] for c in cases], 5, budget_s=120)
        for (row, _, _, logits), p_ms, d_ms in zip(cases, prefill, decode):
            rows.append({"model": "stories260k", "batch": 1, "tokens": 128, **row, "ms": p_ms,
                         "speedup_vs_torch_fp32": prefill[0] / p_ms, "decode_tokens_per_s": 1e3 * new_tokens / (d_ms - p_ms),
                         "nll": _nll([logits(i) for i in ids], ids)})
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


def _ort_decode(sess, inputs: list, prompt: torch.Tensor, new_tokens: int) -> None:
    """Greedy decoding through the exported key/value cache: the prompt, then ``new_tokens`` steps."""
    out = sess.run(None, _ort_feeds(inputs, prompt, []))
    for _ in range(new_tokens):
        nxt = torch.from_numpy(out[0][:, -1].argmax(-1, keepdims=True))
        out = sess.run(None, _ort_feeds(inputs, nxt, out[1:]))


def _torch_decode(model, prompt: torch.Tensor, new_tokens: int) -> None:
    """The same greedy loop in PyTorch with transformers' own cache."""
    out = model(input_ids=prompt, use_cache=True)
    key = "cache" if hasattr(out, "cache") else "past_key_values"
    for _ in range(new_tokens):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        out = model(input_ids=nxt, use_cache=True, **{key: getattr(out, key)})


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
             f"Idle threads: {m['idle_threads']}.", "",
             f"torch {m['torch']}, onnxruntime {m['onnxruntime']}; `python bench/onnx_cpu.py` "
             f"(medians of up to {result['reps']} interleaved rounds).", ""]
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
                  + ("decode tokens/s | " if decode else "") + f"{label} | .onnx bytes (model.safetensors) |",
                  "|---" * (7 + decode) + "|"]
        for r in rows:
            size = f"{r['onnx_bytes']:,} ({r['compressed_bytes']:,})" if "onnx_bytes" in r else ""
            tps = f"{r['decode_tokens_per_s']:.0f} | " if decode else ""
            lines.append(f"| {r['batch']} x {r['tokens']} | {r['weights']} | {r['runtime']} | {r['ms']:.2f} | "
                         f"{r['speedup_vs_torch_fp32']:.2f} | {tps}{r[metric]:.2e} | {size} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-layers", action="store_true")
    parser.add_argument("--spin", action="store_true", help="keep both runtimes' default spin-waiting threads")
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
