"""GGUF export against llama.cpp itself: correctness, quality at equal file size, decode speed (CPU).

Not part of CI: llama.cpp comes from llama-cpp-python built from its sdist into a venv of its own
(it is no dependency of compress), and bench/_llamacpp_worker.py runs there:

    python3 -m venv /work/bench-venvs/llamacpp
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF" \\
        /work/bench-venvs/llamacpp/bin/pip install --no-binary llama-cpp-python llama-cpp-python==0.3.36 numpy
    python bench/gguf.py [--llamacpp-python PATH]      # writes bench/results/gguf-cpu.{json,md}

1. Correctness (stories260K, needs the shared data): llama.cpp runs compress's GGUF files; its
   logits against the torch compressed model (rel error, KL, top-1) and its tokenizer against
   Hugging Face's on the evaluation text. An F32 export anchors llama.cpp to torch's fp32 model.
2. Quality at equal file size (stories260K): KL(fp32 torch || llama.cpp) per token on 32 windows of
   128 held-out TinyStories tokens (the first half of the text calibrates, the second evaluates) for
   llama.cpp's own Q4_0 / Q4_1 / Q8_0 / Q4_K_M (quantized by llama.cpp from compress's F32 GGUF)
   and for compress plans at the same file size: uniform int4 g32 symmetric with GPTQ (Q4_0 blocks),
   and the planner (fisher, module granularity, --target gguf, GPTQ) with the largest max_bytes
   whose GGUF file is no larger than llama.cpp's (bisection over max_bytes).
3. Decode tokens/s at batch 1 (128-token prompt, then greedy tokens one at a time through each
   runtime's key/value cache), 2 threads: llama.cpp (compress's Q4_0 GGUF, llama.cpp's own Q4_0 and
   F16), compress's ONNX Runtime export (float32 and float16 graphs, accuracy_level 4), and torch
   (the compressed model's QuantLinear CPU path), on stories260K and on a random-weight Llama of
   206 M parameters (hidden 1024, 16 layers, ffn 2816, stories260K's tokenizer).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# This script is named gguf.py: with its directory first on sys.path, `import gguf` (inside
# compress) would import it instead of the gguf package. Its directory goes last (for _common).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

import numpy as np  # noqa: E402
import torch  # noqa: E402

import compress  # noqa: E402
from compress.data import shared_data_dir  # noqa: E402
from compress.errors import CompressError  # noqa: E402
from compress.export import export_gguf, export_onnx, logit_agreement, ort_session  # noqa: E402
from compress.models import load_model, resolve_model_path  # noqa: E402
from compress.plan import LayerPlan  # noqa: E402
from _common import cpu_name, markdown_table  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
WORKER = Path(__file__).resolve().parent / "_llamacpp_worker.py"
LLAMACPP_TYPES = ("Q4_0", "Q4_1", "Q8_0", "Q4_K_M")


class LlamaCpp:
    """Runs jobs of bench/_llamacpp_worker.py with the llama-cpp-python venv's interpreter."""

    def __init__(self, python: str, threads: int) -> None:
        self.python, self.threads = python, threads

    def __call__(self, **job) -> dict:
        job.setdefault("threads", self.threads)
        res = subprocess.run([self.python, str(WORKER)], input=json.dumps(job), capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"llama.cpp worker failed on {job['op']}: {res.stderr.strip()[-2000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])

    def logits(self, gguf: Path, windows: list[list[int]], work: Path) -> list[torch.Tensor]:
        files = self(op="logits", gguf=str(gguf), windows=windows, out=str(work / f"{gguf.stem}-logits"))["files"]
        return [torch.from_numpy(np.load(f)).double() for f in files]


def _texts() -> tuple[str, str]:
    data = shared_data_dir()
    if data is None:
        sys.exit("needs the shared data (stories260K and TinyStories text)")
    text = (data / "text" / "tinystories-sample.txt").read_text()
    half = len(text) // 2
    return text[:half], text[half:]


def _windows(tokenizer, text: str, n: int, length: int) -> list[list[int]]:
    ids = tokenizer(text)["input_ids"]
    step = (len(ids) - length) // n
    return [ids[i * step: i * step + length] for i in range(n)]


def _torch_logits(model, windows) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=torch.tensor([w]), use_cache=False).logits[0].double() for w in windows]


def _mean_kl(ref, got) -> tuple[float, float]:
    pairs = [logit_agreement(r, g) for r, g in zip(ref, got)]
    return statistics.fmean(p[0] for p in pairs), statistics.fmean(p[1] for p in pairs)


def _all16(model) -> "compress.plan.Plan":
    p = compress.plan(model, bits=8, target="any")
    p.layers = {n: LayerPlan(16) for n in p.layers}
    return p


def quality(work: Path, lcpp: LlamaCpp, calib: Path, eval_text: str) -> tuple[list[dict], list[dict]]:
    """Sections 1 and 2 of the module docstring; returns (correctness rows, quality rows)."""
    src = resolve_model_path("stories260k")
    ref = load_model(src)
    windows = _windows(ref.tokenizer, eval_text, 32, 128)
    ref_logits = _torch_logits(ref.model, windows)
    checks, rows = [], []

    f32_dir = compress.apply(src, _all16(src), work / "s-f32", dtype="float32", progress=False)
    f32 = work / "s-F32.gguf"
    export_gguf(f32_dir, f32, float_type="F32")
    kl, top1 = _mean_kl(ref_logits, lcpp.logits(f32, windows, work))
    checks.append({"gguf": "compress F32 (all 16-bit layers, float32)", "vs": "torch fp32 model", "kl": kl, "top1": top1})
    texts = [eval_text[i:i + 300] for i in range(0, 3000, 300)]
    hf_ids = [ref.tokenizer(t)["input_ids"] for t in texts]
    same = sum(a == b for a, b in zip(lcpp(op="tokenize", gguf=str(f32), texts=texts)["ids"], hf_ids))
    checks.append({"gguf": "compress F32", "vs": "Hugging Face tokenizer", "tokenized_same": f"{same}/{len(texts)}"})

    for kind in LLAMACPP_TYPES:
        dst = work / f"s-llamacpp-{kind}.gguf"
        if lcpp(op="quantize", src=str(f32), dst=str(dst), type=kind)["rc"] != 0:
            continue
        kl, top1 = _mean_kl(ref_logits, lcpp.logits(dst, windows, work))
        rows.append({"model": "stories260K", "gguf": f"llama.cpp {kind}", "bytes": dst.stat().st_size,
                     "kl_vs_fp32": kl, "top1_vs_fp32": top1})
        print(f"llama.cpp {kind}: {dst.stat().st_size:,} B, KL {kl:.4g}", file=sys.stderr)

    def ours(label: str, plan, name: str, quantizer: str = "gptq", measure: bool = True) -> dict:
        comp = compress.apply(src, plan, work / name, quantizer=quantizer, progress=False,
                              data=str(calib) if quantizer == "gptq" else None,
                              overwrite=True, **(GPTQ if quantizer == "gptq" else {}))
        path = work / f"{name}.gguf"
        rep = export_gguf(comp, path, overwrite=True, allow_f16=True)
        row = {"model": "stories260K", "gguf": label, "bytes": rep.gguf_bytes, "f16_fallback": len(rep.f16_fallback),
               "types": rep.tensor_types}
        if not measure:
            return row
        got = lcpp.logits(path, windows, work)
        row["kl_vs_fp32"], row["top1_vs_fp32"] = _mean_kl(ref_logits, got)
        lm = compress.load(comp)
        lm.model.float()
        tl = _torch_logits(lm.model, windows)
        rel = max(float((g - t).abs().max() / t.abs().max()) for g, t in zip(got, tl))
        kl_t, top1_t = _mean_kl(tl, got)
        checks.append({"gguf": label, "vs": "torch compressed model", "rel_err": rel, "kl": kl_t, "top1": top1_t})
        return row

    uniform = compress.plan(src, bits=4, group_size=32, symmetric=True, target="any")
    rows.append(ours("compress uniform int4 g32 sym, GPTQ", uniform, "s-uniform"))
    planner = _Planner(src, calib)
    for target in [r for r in rows if r["gguf"].startswith("llama.cpp") and r["gguf"] != "llama.cpp Q4_1"]:
        rows.append(planner.at_size(target, ours))
    return checks, rows


# Calibration (planner and GPTQ) from the first half of the TinyStories sample only, never the
# evaluated half: a few 128-token windows is all it holds.
GPTQ = {"samples": 6, "seq_len": 128}  # the calibration half of the TinyStories sample is ~950 tokens


class _Planner:
    """compress's planner (fisher, module granularity, --target gguf, a whole-model max_bytes) with the
    analysis run once and the knapsack re-solved per budget (what compress.plan does in one call)."""

    def __init__(self, src: Path, calib: Path) -> None:
        from compress.analyze import analyze
        from compress.data import load_texts
        from compress.models import fingerprint
        from compress.planner import plan_units_modules

        self.src, self.lm = src, load_model(src)
        self.layers = plan_units_modules(self.lm.model, (), False)
        self.sens = analyze(self.lm, "fisher", load_texts(str(calib)), granularity="module", group_size=32,
                            symmetric=False, exclude=(), include_heads=False, seed=0, progress=False,
                            include_embeddings=True, samples=6)
        self.fingerprint = fingerprint(self.lm.model)

    def plan(self, max_bytes: int):
        from compress.planner import plan_from_sensitivity

        p, _ = plan_from_sensitivity(self.lm.model, self.layers, self.sens, {"max_bytes": max_bytes}, 32, False, "gguf")
        p.model_path, p.fingerprint = str(self.src), self.fingerprint
        return p

    def at_size(self, target: dict, ours, steps: int = 4) -> dict:
        """The planner's GGUF (GPTQ) with the largest max_bytes whose file is <= target["bytes"]
        (file sizes found by bisection with round to nearest: they depend on the plan alone)."""
        size, label = target["bytes"], f"compress planner at {target['gguf']}'s size"
        lo, hi, best = int(0.4 * size), int(2.0 * size), None
        for _ in range(steps):
            mid = (lo + hi) // 2
            try:
                plan = self.plan(mid)
            except CompressError:  # below the feasible range
                lo = mid + 1
                continue
            got = ours(label, plan, "s-search", quantizer="rtn", measure=False)["bytes"]
            if got <= size:
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
        if best is None:
            return {"model": "stories260K", "gguf": label, "bytes": None, "note": "no plan fits"}
        row = ours(label, self.plan(best), f"s-plan-{target['gguf'][-4:]}")
        row["max_bytes"] = best
        print(f"{label}: max_bytes {best:,} -> {row['bytes']:,} B, KL {row['kl_vs_fp32']:.4g}", file=sys.stderr)
        return row


# ---- decode speed -------------------------------------------------------------------------------


def _random_llama(work: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_model("stories260k").tokenizer
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    path = work / "random-206m"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    del model
    return path


def _ort_decode_tok_s(path: Path, prompt: list[int], new: int, threads: int, rounds: int) -> tuple[float, float]:
    sess = ort_session(path, threads, spinning=False)
    inputs = sess.get_inputs()
    past_inputs = [i for i in inputs if i.name.startswith("past_key_values")]
    np_dtype = np.float16 if "float16" in past_inputs[0].type else np.float32
    heads, size = past_inputs[0].shape[1], past_inputs[0].shape[3]

    def run() -> tuple[float, float]:
        past = [np.zeros((1, heads, 0, size), np_dtype) for _ in past_inputs]
        ids = np.array([prompt], dtype=np.int64)
        start = time.perf_counter()
        out = sess.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids),
                              **{i.name: p for i, p in zip(past_inputs, past)}})
        mid = time.perf_counter()
        total = len(prompt)
        for _ in range(new):
            tok = np.array([[int(np.argmax(out[0][0, -1]))]], dtype=np.int64)
            total += 1
            out = sess.run(None, {"input_ids": tok, "attention_mask": np.ones((1, total), np.int64),
                                  **{i.name: p for i, p in zip(past_inputs, out[1:])}})
        return mid - start, time.perf_counter() - mid

    times = [run() for _ in range(rounds + 1)][1:]
    return 1e3 * statistics.median(t[0] for t in times), new / statistics.median(t[1] for t in times)


def _torch_decode_tok_s(comp: Path, prompt: list[int], new: int, rounds: int) -> tuple[float, float]:
    model = compress.load(comp).model

    def run() -> tuple[float, float]:
        with torch.no_grad():
            start = time.perf_counter()
            out = model(input_ids=torch.tensor([prompt]), use_cache=True)
            mid = time.perf_counter()
            cache = out.past_key_values
            for _ in range(new):
                tok = out.logits[:, -1:].argmax(-1)
                out = model(input_ids=tok, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
            return mid - start, time.perf_counter() - mid

    times = [run() for _ in range(rounds + 1)][1:]
    return 1e3 * statistics.median(t[0] for t in times), new / statistics.median(t[1] for t in times)


def speed(work: Path, lcpp: LlamaCpp, threads: int, eval_text: str, small_only: bool) -> list[dict]:
    rows = []
    models = {"stories260K": resolve_model_path("stories260k")}
    if not small_only:
        models["random Llama 206M"] = _random_llama(work)
    for label, src in models.items():
        big = label != "stories260K"
        new, torch_new, rounds = (64, 16, 2) if big else (64, 64, 2)
        tok = load_model(src).tokenizer
        prompt = _windows(tok, eval_text, 1, 128)[0]
        int4 = compress.plan(src, bits=4, group_size=32, symmetric=True, target="any")
        dirs = {dt: compress.apply(src, int4, work / f"{label}-int4-{dt}", dtype=dt, progress=False, overwrite=True)
                for dt in ("float32", "float16")}
        f16_dir = compress.apply(src, _all16(src), work / f"{label}-f16", dtype="float16", progress=False,
                                 overwrite=True)
        ggufs = {"compress int4 g32 sym (Q4_0)": work / f"{label}-ours-q4_0.gguf",
                 "compress 16-bit (F16)": work / f"{label}-f16.gguf"}
        export_gguf(dirs["float16"], ggufs["compress int4 g32 sym (Q4_0)"], allow_f16=True, overwrite=True)
        export_gguf(f16_dir, ggufs["compress 16-bit (F16)"], overwrite=True)
        ggufs["llama.cpp Q4_0 (its quantizer)"] = work / f"{label}-llamacpp-q4_0.gguf"
        lcpp(op="quantize", src=str(ggufs["compress 16-bit (F16)"]), dst=str(ggufs["llama.cpp Q4_0 (its quantizer)"]),
             type="Q4_0")
        for name, path in ggufs.items():
            # 1 thread: no hand-offs between polling workers (see the worker); both for compress's file.
            for n_threads in sorted({1, threads}) if name.startswith("compress int4") else [1]:
                r = lcpp(op="decode", gguf=str(path), prompt=prompt, new_tokens=new, rounds=rounds, threads=n_threads)
                rows.append({"model": label, "runtime": f"llama.cpp, {name}", "threads": n_threads,
                             "bytes": path.stat().st_size, "prefill_ms": r["prefill_ms"],
                             "decode_tok_s": r["decode_tok_s"]})
                print(rows[-1], file=sys.stderr)
        for dt in ("float32", "float16"):
            path = work / f"{label}-{dt}.onnx"
            rep = export_onnx(dirs[dt], path, past_key_values=True, accuracy_level=4, overwrite=True)
            ms, tps = _ort_decode_tok_s(path, prompt, new, threads, rounds)
            rows.append({"model": label, "runtime": f"compress ONNX Runtime int4 g32 sym, {dt} graph, accuracy_level 4",
                         "threads": threads, "bytes": rep.onnx_bytes, "prefill_ms": ms, "decode_tok_s": tps})
            print(rows[-1], file=sys.stderr)
        ms, tps = _torch_decode_tok_s(dirs["float32"], prompt, torch_new, rounds)
        rows.append({"model": label, "runtime": "torch, compressed int4 g32 sym (QuantLinear CPU path, float32)",
                     "threads": threads, "bytes": None, "prefill_ms": ms, "decode_tok_s": tps})
        print(rows[-1], file=sys.stderr)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llamacpp-python", default="/work/bench-venvs/llamacpp/bin/python",
                    help="python of the venv with llama-cpp-python")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--small-only", action="store_true", help="skip the 206 M random Llama")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "gguf-cpu"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lcpp = LlamaCpp(args.llamacpp_python, args.threads)
    version = subprocess.run([args.llamacpp_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    started = time.time()
    calib_text, eval_text = _texts()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        calib = work / "calibration.txt"
        calib.write_text(calib_text)
        checks, rows = ([], []) if args.skip_quality else quality(work, lcpp, calib, eval_text)
        speed_rows = speed(work, lcpp, args.threads, eval_text, args.small_only)
    meta = {"command": "python bench/gguf.py " + " ".join(sys.argv[1:]), "cpu": cpu_name(), "cores": os.cpu_count(),
            "threads": args.threads, "llama_cpp_python": version, "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.time() - started), "load_avg_1m_after": round(os.getloadavg()[0], 2)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({"machine": meta, "correctness": checks, "quality": rows,
                                                    "speed": speed_rows}, indent=1, default=str) + "\n")
    md = ["# GGUF: compress's export in llama.cpp, against llama.cpp's own quantizer\n",
          f"`{meta['command']}` on {meta['cpu']} ({args.threads} threads), llama-cpp-python {version}, "
          f"{meta['date']}, {meta['seconds']} s, load average after {meta['load_avg_1m_after']} "
          f"(a shared machine: times are indicative)\n"]
    if checks:
        md.append(markdown_table(checks, ["gguf", "vs", "rel_err", "kl", "top1", "tokenized_same"],
                                 "## llama.cpp running compress's files (stories260K, 32 x 128 tokens)"))
        md.append(markdown_table(rows, ["gguf", "bytes", "max_bytes", "kl_vs_fp32", "top1_vs_fp32", "f16_fallback"],
                                 "## Quality at equal file size (stories260K; KL(fp32 || llama.cpp) in nats per token)"))
    md.append(markdown_table(speed_rows, ["model", "runtime", "threads", "bytes", "prefill_ms", "decode_tok_s"],
                             "## Decode at batch 1 (128-token prompt; greedy)"))
    Path(args.out + ".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
