"""Decode engines for bench/gguf_bench.py, timed round-robin on a shared machine.

Each engine decodes the same 128-token prompt then N greedy tokens at batch 1 through its own
key/value cache (one round). ``interleave`` runs one round of every engine in turn, repeatedly, so
the machine's load (other jobs on its 2 cores) falls on every engine alike; each round records wall
time and the CPU time of the process doing the work (at 1 thread the engine's own work, which a
busy machine inflates far less than wall time: both are reported).

    LlamaCpp   llama.cpp through bench/_llamacpp_worker.py --serve (a process of the llama-cpp-python
               venv, models kept loaded; CPU time measured inside it)
    Ort        an onnxruntime session on compress's ONNX export (past_key_values in and out), with
               the session options compress.export.ort_session sets, or variants of them; with
               inplace=True on an export_onnx(inplace_cache=True) file, decoding through
               compress.export.onnx_inplace.InplaceDecoder (the recipe a user runs: IOBinding, one
               cache buffer bound as past and present)
    Torch      a model in this process (compress.load's QuantLinear CPU path, or a dense model)
"""
from __future__ import annotations

import collections
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

WORKER = Path(__file__).resolve().parent / "_llamacpp_worker.py"


class LlamaCpp:
    """One llama.cpp model in a worker process kept alive between rounds."""

    def __init__(self, python: str, gguf: Path, threads: int = 1) -> None:
        self.gguf, self.threads = gguf, threads
        self.proc = subprocess.Popen([python, str(WORKER), "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def round(self, prompt: list[int], new: int) -> dict:
        job = {"op": "round", "gguf": str(self.gguf), "prompt": prompt, "new_tokens": new, "threads": self.threads}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"llama.cpp worker died on {self.gguf} (exit {self.proc.wait()})")
        r = json.loads(line)
        return {"prefill_s": r["prefill_s"], "decode_s": r["decode_s"], "decode_cpu_s": r["decode_cpu_s"]}

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def session_options(threads: int = 1, level: str = "all", profile: str | None = None):
    """onnxruntime SessionOptions as compress.export.ort_session makes them (``threads`` intra-op
    threads, one inter-op, idle workers sleep: fair on a shared CPU), at graph optimization ``level``
    ("all", onnxruntime's default; "extended"; "basic"), profiling to ``profile`` (a file prefix)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                     "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                     "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}[level]
    if profile:
        opts.enable_profiling, opts.profile_file_prefix = True, profile
    return opts


class Ort:
    """compress's ONNX export in onnxruntime. io_binding: the cache stays in onnxruntime's OrtValues
    between steps (no numpy round trip), else plain ``run`` with numpy arrays."""

    def __init__(self, path: Path, threads: int = 1, level: str = "all", io_binding: bool = False,
                 profile: str | None = None, inplace: bool = False) -> None:
        import onnxruntime as ort

        self.sess = ort.InferenceSession(str(path), session_options(threads, level, profile),
                                         providers=["CPUExecutionProvider"])
        self.io_binding, self.inplace = io_binding, inplace
        if inplace:
            return
        self.past = [i for i in self.sess.get_inputs() if i.name.startswith("past_key_values")]
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self.dtype = np.float16 if "float16" in self.past[0].type else np.float32
        self.heads, self.head_dim = self.past[0].shape[1], self.past[0].shape[3]

    def _prompt_feeds(self, prompt: list[int]) -> dict:
        ids = np.array([prompt], dtype=np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids),
                **{p.name: np.zeros((1, self.heads, 0, self.head_dim), self.dtype) for p in self.past}}

    def round(self, prompt: list[int], new: int) -> dict:
        if self.inplace:
            return self._round_inplace(prompt, new)
        if self.io_binding:
            return self._round_bound(prompt, new)
        start = time.perf_counter()
        out = self.sess.run(None, self._prompt_feeds(prompt))
        mid, cpu = time.perf_counter(), time.process_time()
        total = len(prompt)
        for _ in range(new):
            tok = np.array([[int(np.argmax(out[0][0, -1]))]], dtype=np.int64)
            total += 1
            out = self.sess.run(None, {"input_ids": tok, "attention_mask": np.ones((1, total), np.int64),
                                       **{p.name: v for p, v in zip(self.past, out[1:])}})
        return {"prefill_s": mid - start, "decode_s": time.perf_counter() - mid, "decode_cpu_s": time.process_time() - cpu}

    def _run_bound(self, inputs: dict, past_values) -> list:
        b = self.sess.io_binding()
        for name, value in inputs.items():
            b.bind_cpu_input(name, value)
        for p, v in zip(self.past, past_values):
            b.bind_ortvalue_input(p.name, v)
        for name in self.outputs:
            b.bind_output(name, "cpu")
        self.sess.run_with_iobinding(b)
        return b.get_outputs()

    def _round_bound(self, prompt: list[int], new: int) -> dict:
        start = time.perf_counter()
        out = self._run_bound(self._prompt_feeds(prompt), [])
        mid, cpu = time.perf_counter(), time.process_time()
        total = len(prompt)
        for _ in range(new):
            tok = np.array([[int(np.argmax(out[0].numpy()[0, -1]))]], dtype=np.int64)
            total += 1
            out = self._run_bound({"input_ids": tok, "attention_mask": np.ones((1, total), np.int64)}, out[1:])
        return {"prefill_s": mid - start, "decode_s": time.perf_counter() - mid, "decode_cpu_s": time.process_time() - cpu}

    def _round_inplace(self, prompt: list[int], new: int) -> dict:
        from compress.export.onnx_inplace import InplaceDecoder

        start = time.perf_counter()
        dec = InplaceDecoder(self.sess, max_length=len(prompt) + new)  # buffers allocated per sequence
        out = dec.step(np.array([prompt], dtype=np.int64))
        mid, cpu = time.perf_counter(), time.process_time()
        tok = np.empty((1, 1), np.int64)
        for _ in range(new):
            tok[0, 0] = int(np.argmax(out[0, -1]))
            out = dec.step(tok)
        return {"prefill_s": mid - start, "decode_s": time.perf_counter() - mid, "decode_cpu_s": time.process_time() - cpu}

    def close(self) -> None:
        self.sess = None


class Torch:
    """A Hugging Face causal LM in this process, decoding through its DynamicCache."""

    def __init__(self, model) -> None:
        self.model = model.eval()

    @torch.no_grad()
    def round(self, prompt: list[int], new: int) -> dict:
        start = time.perf_counter()
        out = self.model(input_ids=torch.tensor([prompt]), use_cache=True)
        mid, cpu = time.perf_counter(), time.process_time()
        for _ in range(new):
            out = self.model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
        return {"prefill_s": mid - start, "decode_s": time.perf_counter() - mid, "decode_cpu_s": time.process_time() - cpu}

    def close(self) -> None:
        self.model = None


def interleave(engines: dict[str, object], prompt: list[int], new: dict[str, int], rounds: int,
               log=print) -> dict[str, dict]:
    """Round-robin timing: ``rounds`` + 1 passes over every engine (the first pass warms up and is
    dropped). new: generated tokens per engine. Returns, per engine, the medians: prefill_ms,
    decode_tok_s (wall), decode_tok_cpu_s (tokens per CPU second); decode_tok_cpu_s_best (its least
    disturbed round: other jobs' bursts slow whichever engine they meet) and every round's tok/CPU-s."""
    times: dict[str, list[dict]] = {name: [] for name in engines}
    for r in range(rounds + 1):
        for name, engine in engines.items():
            t = engine.round(prompt, new[name])
            if r:
                times[name].append(t)
        log(f"pass {r} done, load {os.getloadavg()[0]:.2f}")
    out = {}
    for name, ts in times.items():
        n = new[name]
        out[name] = {"new_tokens": n, "prefill_ms": 1e3 * statistics.median(t["prefill_s"] for t in ts),
                     "decode_tok_s": n / statistics.median(t["decode_s"] for t in ts),
                     "decode_tok_cpu_s": n / statistics.median(t["decode_cpu_s"] for t in ts),
                     "decode_tok_cpu_s_best": n / min(t["decode_cpu_s"] for t in ts),
                     "rounds_tok_cpu_s": [round(n / t["decode_cpu_s"], 2) for t in ts]}
    return out


# Op types of the exported graphs by the part of the model they compute (opset 21 spells attention,
# RoPE and RMSNorm out in primitive ops; opset 23 has Attention / RotaryEmbedding / RMSNormalization).
# Mul / Add / Sigmoid serve several parts (norm scales, RoPE, SwiGLU, residuals): their own group.
OP_GROUPS = {
    "MatMulNBits (int4 projections)": ("MatMulNBits",),
    "attention: scores, softmax, mask, values": ("Attention", "GroupQueryAttention", "FusedMatMul", "Softmax", "Where", "IsNaN", "MatMul"),
    "Concat (key/value cache; shapes)": ("Concat",),
    "RoPE (rotate-half, Neg / Slice)": ("RotaryEmbedding", "Neg", "Slice", "Split", "Cos", "Sin"),
    "RMSNorm": ("RMSNormalization", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "Pow",
                "ReduceMean", "Sqrt", "Reciprocal"),
    "layout: Transpose / Reshape": ("Transpose", "Reshape", "Unsqueeze", "Squeeze", "Expand"),
    "elementwise Mul / Add / Sigmoid (SwiGLU, residuals, scales)": ("Mul", "Add", "Sigmoid", "QuickGelu", "Sub"),
    "casts (float16 graphs)": ("Cast",),
}


def profile_decode(path: Path, prompt: list[int], new: int, work: Path, **session) -> dict:
    """onnxruntime's profiler over ``new`` decode steps (after one warm-up round, prompt excluded):
    microseconds per token per op type and per OP_GROUPS part, plus the run's time outside kernels
    (the session's own overhead between nodes). Profiled times are wall times (a shared machine
    inflates them); their shares are what to read."""
    Ort(path, **session).round(prompt, 4)  # loads pages, as the timed runs had
    engine = Ort(path, profile=str(work / f"profile-{path.stem}"), **session)
    engine.round(prompt, new)
    trace = Path(engine.sess.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    runs = [e for e in events if e.get("name") == "model_run"][1:]  # decode steps only
    first = runs[0]["ts"]
    per_op, nodes = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["ts"] >= first and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
            nodes[e["args"]["op_name"]] += 1
    steps = len(runs)
    run_us = sum(r["dur"] for r in runs) / steps
    kernels_us = sum(per_op.values()) / steps
    group_of = {op: g for g, ops in OP_GROUPS.items() for op in ops}
    groups = collections.Counter()
    for op, us in per_op.items():
        groups[group_of.get(op, "other")] += us / steps
    groups["session overhead (outside kernels)"] = run_us - kernels_us
    return {"file": path.name, "steps": steps, "us_per_token": run_us,
            "groups": {g: {"us": us, "share": us / run_us} for g, us in groups.most_common()},
            "ops": {op: {"us": us / steps, "share": us / steps / run_us, "nodes_per_token": nodes[op] / steps}
                    for op, us in per_op.most_common()}}
