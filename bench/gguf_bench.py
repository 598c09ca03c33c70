"""GGUF export against llama.cpp itself: correctness, quality at equal file size, decode speed (CPU).

Not part of CI: llama.cpp comes from llama-cpp-python built from its sdist into a venv of its own
(it is no dependency of compress), and bench/_llamacpp_worker.py runs there:

    python3 -m venv /work/bench-venvs/llamacpp
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF" \\
        /work/bench-venvs/llamacpp/bin/pip install --no-binary llama-cpp-python llama-cpp-python==0.3.36 numpy
    python bench/gguf_bench.py [--skip-quality] [--models 206m]   # updates bench/results/gguf-cpu.{json,md}

(Named gguf_bench.py, not gguf.py: a script's directory is first on sys.path, and a gguf.py there
would stand in for the gguf package that compress imports.)

1. Correctness (stories260K, needs the shared data): llama.cpp runs compress's GGUF files; its
   logits against the torch compressed model (rel error, KL, top-1) and its tokenizer against
   Hugging Face's on the evaluation text. An F32 export anchors llama.cpp to torch's fp32 model.
2. Quality at equal file size (stories260K): KL(fp32 torch || llama.cpp) per token on 32 windows of
   128 held-out TinyStories tokens (the first half of the text calibrates, the second evaluates) for
   llama.cpp's own Q4_0 / Q4_1 / Q8_0 / Q4_K_M (quantized by llama.cpp from compress's F32 GGUF)
   and for compress plans at the same file size: uniform int4 g32 symmetric with GPTQ (Q4_0 blocks),
   and the planner (fisher, module granularity, --target gguf, GPTQ) with the largest max_bytes
   whose GGUF file is no larger than llama.cpp's (bisection over max_bytes).
3. Decode at batch 1 (128-token prompt, then greedy tokens one at a time through each engine's
   key/value cache), every engine at 1 thread (the machine's 2 cores are shared with other jobs;
   llama.cpp's polling workers starve each other there), timed round-robin (bench/_decode_engines.py)
   so the load falls on all alike: wall tokens/s and tokens per CPU second. Engines: llama.cpp on
   compress's F16 and Q4_0 files and on llama.cpp's own Q4_0; compress's ONNX export in onnxruntime
   (dense fp32; int4 g32 at opset 21 and 23, float32 and float16 graphs, accuracy_level 4 and 0,
   session variants, and --inplace-cache decoded through onnx_inplace.InplaceDecoder); torch (dense fp32, and the compressed model's QuantLinear CPU path). Then
   onnxruntime's profiler splits an ONNX decode step by op type. Models: stories260K (``--models
   stories260k``) and a random-weight Llama of 206 M parameters (hidden 1024, 16 layers, ffn 2816,
   stories260K's tokenizer; ``--models 206m``).

Results merge into the existing JSON: a run replaces only the sections (and models) it measured.
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

from compress import api  # noqa: E402  (compress.plan would be the submodule once imported)
from compress.data import shared_data_dir  # noqa: E402
from compress.errors import CompressError  # noqa: E402
from compress.export import export_gguf, export_onnx, logit_agreement  # noqa: E402
from compress.models import load_model, resolve_model_path  # noqa: E402
from compress.plan import LayerPlan, Plan  # noqa: E402
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


def _all16(model) -> "Plan":
    p = api.plan(model, bits=8, target="any")
    p.layers = {n: LayerPlan(16) for n in p.layers}
    return p


def quality(work: Path, lcpp: LlamaCpp, calib: Path, eval_text: str) -> tuple[list[dict], list[dict]]:
    """Sections 1 and 2 of the module docstring; returns (correctness rows, quality rows)."""
    src = resolve_model_path("stories260k")
    ref = load_model(src)
    windows = _windows(ref.tokenizer, eval_text, 32, 128)
    ref_logits = _torch_logits(ref.model, windows)
    checks, rows = [], []

    f32_dir = api.apply(src, _all16(src), work / "s-f32", dtype="float32", progress=False)
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
        comp = api.apply(src, plan, work / name, quantizer=quantizer, progress=False,
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
        lm = api.load(comp)
        lm.model.float()
        tl = _torch_logits(lm.model, windows)
        rel = max(float((g - t).abs().max() / t.abs().max()) for g, t in zip(got, tl))
        kl_t, top1_t = _mean_kl(tl, got)
        checks.append({"gguf": label, "vs": "torch compressed model", "rel_err": rel, "kl": kl_t, "top1": top1_t})
        return row

    uniform = api.plan(src, bits=4, group_size=32, symmetric=True, target="any")
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

MODELS = {"stories260k": "stories260K", "206m": "random Llama 206M"}
REFERENCE = "llama.cpp Q4_0 (llama.cpp's quantizer)"
# (engine, weights, export options, session options): compress's ONNX exports timed. "auto" levels are
# the exporter's default (4-bit layers at accuracy_level 4).
INPLACE = ("ONNX int4 g32, float32 graph, opset 23, accuracy_level 4, in-place cache (--inplace-cache: "
           "GroupQueryAttention, InplaceDecoder's IOBinding)")
ONNX_ENGINES = [
    ("ONNX fp32 (16-bit layers as dense MatMul), opset 23", "dense-float32", {"opset": 23}, {}),
    ("ONNX int4 g32, float32 graph, opset 21, accuracy_level 4", "int4-float32", {"opset": 21}, {}),
    ("ONNX int4 g32, float32 graph, opset 23, accuracy_level 4", "int4-float32", {"opset": 23}, {}),
    ("ONNX int4 g32, float32 graph, opset 23, accuracy_level 4, graph optimization basic", "int4-float32",
     {"opset": 23}, {"level": "basic"}),
    ("ONNX int4 g32, float32 graph, opset 23, accuracy_level 4, cache kept in OrtValues (I/O binding)",
     "int4-float32", {"opset": 23}, {"io_binding": True}),
    (INPLACE, "int4-float32", {"opset": 23, "inplace_cache": True}, {"inplace": True}),
    ("ONNX int4 g32, float32 graph, opset 23, accuracy_level 0", "int4-float32", {"opset": 23, "accuracy_level": 0}, {}),
    ("ONNX int4 g32, float16 graph and cache, opset 21, accuracy_level 4", "int4-float16", {"opset": 21}, {}),
    ("ONNX int4 g32, float16 graph and cache, opset 23, accuracy_level 4", "int4-float16", {"opset": 23}, {}),
]
TORCH_INT4 = "torch int4 g32 (compress.load, QuantLinear CPU path, float32)"
PROFILED = ("ONNX int4 g32, float32 graph, opset 21, accuracy_level 4",
            "ONNX int4 g32, float32 graph, opset 23, accuracy_level 4", INPLACE)


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


def _engines(label: str, src: Path, work: Path, lcpp: LlamaCpp) -> tuple[dict, dict[str, dict]]:
    """Every engine of section 3 for one model: (engines by name, row fields by name: bytes, notes)."""
    from _decode_engines import LlamaCpp as LlamaCppServer
    from _decode_engines import Ort, Torch

    tag = label.replace(" ", "-")
    int4 = api.plan(src, bits=4, group_size=32, symmetric=True, target="any", progress=False)
    dense = _all16(src)
    dirs = {"int4-float32": (int4, "float32"), "int4-float16": (int4, "float16"),
            "dense-float32": (dense, "float32"), "dense-float16": (dense, "float16")}
    dirs = {k: api.apply(src, p, work / f"{tag}-{k}", dtype=dt, progress=False, overwrite=True) for k, (p, dt) in dirs.items()}
    engines, info = {}, {}

    ggufs = {"llama.cpp F16 (compress's file)": work / f"{tag}-f16.gguf",
             "llama.cpp Q4_0 (compress's int4 g32 sym)": work / f"{tag}-ours-q4_0.gguf",
             REFERENCE: work / f"{tag}-llamacpp-q4_0.gguf"}
    export_gguf(dirs["dense-float16"], ggufs["llama.cpp F16 (compress's file)"], overwrite=True)
    export_gguf(dirs["int4-float16"], ggufs["llama.cpp Q4_0 (compress's int4 g32 sym)"], allow_f16=True, overwrite=True)
    if lcpp(op="quantize", src=str(ggufs["llama.cpp F16 (compress's file)"]), dst=str(ggufs[REFERENCE]), type="Q4_0")["rc"]:
        raise RuntimeError("llama.cpp could not quantize to Q4_0")
    for name, path in ggufs.items():
        engines[name] = LlamaCppServer(lcpp.python, path, threads=1)
        info[name] = {"bytes": path.stat().st_size}

    exported: dict[tuple, Path | str] = {}
    for name, weights, export_opts, session_opts in ONNX_ENGINES:
        key = (weights, tuple(sorted(export_opts.items())))
        if key not in exported:
            inplace = "-inplace" if export_opts.get("inplace_cache") else ""
            path = work / f"{tag}-{weights}-{export_opts['opset']}-{export_opts.get('accuracy_level', 'auto')}{inplace}.onnx"
            try:
                export_onnx(dirs[weights], path, past_key_values=True, overwrite=True, **export_opts)
                exported[key] = path
            except (CompressError, RuntimeError) as exc:  # onnxruntime's errors are RuntimeErrors
                exported[key] = f"export failed: {str(exc).splitlines()[0][:160]}"
            print(f"{name}: {exported[key]}", file=sys.stderr)
        if isinstance(exported[key], str):
            info[name] = {"note": exported[key]}
            continue
        engines[name] = Ort(exported[key], threads=1, **session_opts)
        info[name] = {"bytes": exported[key].stat().st_size, "file": exported[key], "session": session_opts}

    engines["torch fp32 (dense F.linear)"] = Torch(load_model(src).model.float())
    engines[TORCH_INT4] = Torch(api.load(dirs["int4-float32"]).model)
    info.update({"torch fp32 (dense F.linear)": {}, TORCH_INT4: {}})
    return engines, info


def speed(work: Path, lcpp: LlamaCpp, eval_text: str, models: list[str], rounds: int) -> tuple[list[dict], dict, dict]:
    """Section 3: (rows, run facts per model, ONNX profiles per model)."""
    import onnxruntime

    from _decode_engines import interleave, profile_decode

    rows, runs, profiles = [], {}, {}
    for key in models:
        label = MODELS[key]
        started, load_before = time.time(), os.getloadavg()
        src = resolve_model_path("stories260k") if key == "stories260k" else _random_llama(work)
        prompt = _windows(load_model(src).tokenizer, eval_text, 1, 128)[0]
        engines, info = _engines(label, src, work, lcpp)
        new = {name: (16 if name == TORCH_INT4 and key == "206m" else 64) for name in engines}  # ~1 tok/s there
        load_timed = os.getloadavg()
        timed = interleave(engines, prompt, new, rounds, log=lambda m: print(m, file=sys.stderr))
        load_after = os.getloadavg()
        ref, ref_best = timed[REFERENCE]["decode_tok_cpu_s"], timed[REFERENCE]["decode_tok_cpu_s_best"]
        for name, facts in info.items():  # every engine, those whose export failed included
            row = {"model": label, "engine": name, "threads": 1, "bytes": facts.get("bytes"), "note": facts.get("note")}
            if name in timed:
                row.update(timed[name])
                row["cpu_vs_llamacpp_q4_0"] = timed[name]["decode_tok_cpu_s"] / ref
                row["best_vs_llamacpp_q4_0"] = timed[name]["decode_tok_cpu_s_best"] / ref_best
            rows.append(row)
            print(row, file=sys.stderr)
        for engine in engines.values():
            engine.close()
        profiles[label] = [profile_decode(info[name]["file"], prompt, 32, work, **info[name]["session"]) for name in PROFILED
                           if "file" in info.get(name, {})]
        runs[label] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "seconds": round(time.time() - started), "rounds": rounds, "threads": 1,
                       "load_avg_before": [round(x, 2) for x in load_before],
                       "load_avg_at_timing_start": [round(x, 2) for x in load_timed],
                       "load_avg_after_timing": [round(x, 2) for x in load_after],
                       "onnxruntime": onnxruntime.__version__, "torch": torch.__version__}
    return rows, runs, profiles


# ---- results ------------------------------------------------------------------------------------


def _render(res: dict) -> str:
    """bench/results/gguf-cpu.md from the whole JSON (every section, whichever run measured it)."""
    meta = res.get("machine", {})
    md = ["# GGUF: compress's export in llama.cpp, against llama.cpp's own quantizer\n"]
    if res.get("correctness"):
        md.append(f"Sections 1-2: `{meta['command']}` on {meta['cpu']}, llama-cpp-python {meta['llama_cpp_python']}, "
                  f"{meta['date']}, {meta['seconds']} s, load average after {meta['load_avg_1m_after']} "
                  f"(a shared machine: times are indicative)\n")
        md.append(markdown_table(res["correctness"], ["gguf", "vs", "rel_err", "kl", "top1", "tokenized_same"],
                                 "## llama.cpp running compress's files (stories260K, 32 x 128 tokens)"))
        md.append(markdown_table(res["quality"], ["gguf", "bytes", "max_bytes", "kl_vs_fp32", "top1_vs_fp32", "f16_fallback"],
                                 "## Quality at equal file size (stories260K; KL(fp32 || llama.cpp) in nats per token)"))
    md.append("## Decode at batch 1 (128-token prompt; greedy)\n")
    for label in MODELS.values():
        rows = [r for r in res.get("speed", []) if r["model"] == label]
        if not rows:
            continue
        run = res.get("speed_runs", {}).get(label, {})
        if "engine" not in rows[0]:  # rows of this script's earlier version (sequential, 2 threads for ONNX)
            md.append(markdown_table(rows, ["runtime", "threads", "bytes", "prefill_ms", "decode_tok_s"],
                                     f"### {label} ({run.get('note', '')})"))
            continue
        md.append(f"### {label}\n\n`{run['command']}` on {run['cpu']} ({run['cores']} cores shared with other jobs), "
                  f"{run['date']}; every engine at 1 thread, timed round-robin ({run['rounds']} rounds after a "
                  f"warm-up, medians); 1/5/15-min load average {run['load_avg_at_timing_start']} as timing started, "
                  f"{run['load_avg_after_timing']} after; onnxruntime {run['onnxruntime']}, llama-cpp-python "
                  f"{run['llama_cpp_python']}, torch {run['torch']}. tok/CPU-s: tokens per CPU second of the "
                  f"process doing the work (what the load inflates least), median and best round; vs Q4_0: "
                  f"those against {REFERENCE}'s.\n")
        md.append(markdown_table(rows, ["engine", "bytes", "prefill_ms", "decode_tok_s", "decode_tok_cpu_s",
                                        "cpu_vs_llamacpp_q4_0", "decode_tok_cpu_s_best", "best_vs_llamacpp_q4_0",
                                        "rounds_tok_cpu_s", "new_tokens", "note"]))
        for prof in res.get("profiles", {}).get(label, []):
            md.append(markdown_table([{"part": g, "us_per_token": v["us"], "share": v["share"]} for g, v in prof["groups"].items()],
                                     ["part", "us_per_token", "share"],
                                     f"#### onnxruntime profile of {prof['file']} ({prof['steps']} decode steps, "
                                     f"{prof['us_per_token']:.0f} us per token in the profiled run)"))
            top = [{"op": op, "nodes_per_token": v["nodes_per_token"], "us_per_token": v["us"], "share": v["share"]}
                   for op, v in list(prof["ops"].items())[:12]]
            md.append(markdown_table(top, ["op", "nodes_per_token", "us_per_token", "share"]))
    return "\n".join(md)


def _merge(path: Path, new: dict, measured_models: list[str]) -> dict:
    """The existing results with the sections of this run replaced (speed rows per model)."""
    res = json.loads(path.read_text()) if path.exists() else {}
    if res and "speed_runs" not in res:  # written by this script's earlier version: say how its rows were made
        old = res.get("machine", {})
        res["speed_runs"] = {"stories260K": {"note": f"earlier version of this script: `{old.get('command')}`, "
                                                     f"{old.get('date')}, llama.cpp 1 and 2 threads, ONNX Runtime and "
                                                     f"torch 2 threads, timed one after another; load average after "
                                                     f"{old.get('load_avg_1m_after')}"}}
    for key in ("machine", "correctness", "quality"):
        if key in new:
            res[key] = new[key]
    if "speed" in new:
        res["speed"] = [r for r in res.get("speed", []) if r["model"] not in measured_models] + new["speed"]
        res.setdefault("speed_runs", {}).update(new["speed_runs"])
        res.setdefault("profiles", {}).update(new["profiles"])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llamacpp-python", default="/work/bench-venvs/llamacpp/bin/python",
                    help="python of the venv with llama-cpp-python")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp's quantizer and logits (sections 1-2)")
    ap.add_argument("--models", default="stories260k,206m", help=f"decode section models, of {', '.join(MODELS)}")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per engine (after one warm-up)")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "gguf-cpu"))
    args = ap.parse_args()
    models = [m for m in args.models.split(",") if m]
    if any(m not in MODELS for m in models):
        sys.exit(f"--models takes {', '.join(MODELS)}; got {args.models}")
    torch.set_num_threads(1)  # torch is timed at 1 thread like every engine (section 3)
    lcpp = LlamaCpp(args.llamacpp_python, args.threads)
    version = subprocess.run([args.llamacpp_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    started = time.time()
    calib_text, eval_text = _texts()
    command = "python bench/gguf_bench.py " + " ".join(sys.argv[1:])
    new: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.skip_quality:
            calib = work / "calibration.txt"
            calib.write_text(calib_text)
            new["correctness"], new["quality"] = quality(work, lcpp, calib, eval_text)
            new["machine"] = {"command": command, "cpu": cpu_name(), "cores": os.cpu_count(), "threads": args.threads,
                              "llama_cpp_python": version, "torch": torch.__version__,
                              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                              "seconds": round(time.time() - started), "load_avg_1m_after": round(os.getloadavg()[0], 2)}
        if not args.skip_speed:
            new["speed"], new["speed_runs"], new["profiles"] = speed(work, lcpp, eval_text, models, args.rounds)
            for run in new["speed_runs"].values():
                run.update({"command": command, "cpu": cpu_name(), "cores": os.cpu_count(), "llama_cpp_python": version})
    out = Path(args.out + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    res = _merge(out, new, [MODELS[m] for m in models])
    out.write_text(json.dumps(res, indent=1, default=str) + "\n")
    md = _render(res)
    Path(args.out + ".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
