"""llama.cpp's side of bench/gguf_bench.py, run with the python of a venv holding llama-cpp-python (it is
no dependency of compress): reads one JSON job on stdin, writes one JSON result on stdout (logits go to
.npy files named in the job). Needs only llama_cpp and numpy. With ``--serve`` it answers one job per
line until stdin closes, keeping models loaded, so the bench can interleave llama.cpp's decode rounds
with the other engines' on a shared machine (op "round": one timed round of a model already loaded).

Jobs:
    {"op": "quantize", "src": F32.gguf, "dst": out.gguf, "type": "Q4_0" | "Q4_1" | "Q8_0" | "Q4_K_M", "threads": 2}
    {"op": "logits", "gguf": path, "windows": [[ids...], ...], "out": prefix, "threads": 2}
        -> out-<i>.npy float32 (T, V) per window, from one evaluation each (fresh cache)
    {"op": "tokenize", "gguf": path, "texts": [...]}   -> ids per text (BOS added as the file says)
    {"op": "decode", "gguf": path, "prompt": [ids], "new_tokens": N, "threads": 2, "rounds": R}
        -> median prefill ms and decode tokens/s (greedy, one token per eval through llama.cpp's cache)
    {"op": "round", "gguf": path, "prompt": [ids], "new_tokens": N, "threads": 1}     (--serve only)
        -> {"prefill_s", "decode_s", "decode_cpu_s", "tokens"}: one round, the model loaded on its first
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np


def _llama(path: str, threads: int, n_ctx: int, logits_all: bool = False):
    """llama.cpp's workers poll while idle (llama-cpp-python exposes no ggml threadpool setting):
    on a shared, oversubscribed 2-core machine two polling threads starve each other, which is why
    bench/gguf_bench.py times llama.cpp at 1 thread."""
    import llama_cpp

    return llama_cpp.Llama(path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, n_threads_batch=threads,
                           logits_all=logits_all, verbose=False, seed=0)


def quantize(job: dict) -> dict:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{job['type']}")
    params.nthread = job.get("threads", 2)
    rc = llama_cpp.llama_model_quantize(job["src"].encode(), job["dst"].encode(), params)
    return {"rc": int(rc)}


def logits(job: dict) -> dict:
    windows = job["windows"]
    m = _llama(job["gguf"], job.get("threads", 2), max(len(w) for w in windows) + 8, logits_all=True)
    files = []
    for i, ids in enumerate(windows):
        m.reset()
        m.eval(ids)
        path = f"{job['out']}-{i}.npy"
        np.save(path, np.asarray(m.scores[: len(ids)], dtype=np.float32))
        files.append(path)
    return {"files": files}


def tokenize(job: dict) -> dict:
    import llama_cpp

    m = llama_cpp.Llama(job["gguf"], vocab_only=True, verbose=False)
    return {"ids": [m.tokenize(t.encode("utf-8"), add_bos=True) for t in job["texts"]]}


def _round(m, prompt: list[int], n: int) -> tuple[float, float, float, list[int]]:
    """(prefill seconds, decode seconds, decode CPU seconds of this process, generated ids): the
    prompt, then n greedy tokens one eval each. CPU time is what a shared machine's load does not
    inflate (at 1 thread the process's CPU time is the engine's work)."""
    m.reset()
    start = time.perf_counter()
    m.eval(prompt)
    mid, cpu = time.perf_counter(), time.process_time()
    ids = []
    for _ in range(n):
        ids.append(int(np.argmax(m.scores[m.n_tokens - 1])))
        m.eval([ids[-1]])
    return mid - start, time.perf_counter() - mid, time.process_time() - cpu, ids


def decode(job: dict) -> dict:
    prompt, n = job["prompt"], job["new_tokens"]
    m = _llama(job["gguf"], job.get("threads", 2), len(prompt) + n + 8)
    times = [_round(m, prompt, n) for _ in range(job.get("rounds", 3) + 1)][1:]  # the first warms up
    return {"prefill_ms": 1e3 * statistics.median(t[0] for t in times),
            "decode_tok_s": n / statistics.median(t[1] for t in times)}


_LOADED: dict[tuple, object] = {}


def one_round(job: dict) -> dict:
    prompt, n = job["prompt"], job["new_tokens"]
    key = (job["gguf"], job.get("threads", 1), len(prompt) + n + 8)
    if key not in _LOADED:
        _LOADED[key] = _llama(*key)
    prefill, dec, cpu, ids = _round(_LOADED[key], prompt, n)
    return {"prefill_s": prefill, "decode_s": dec, "decode_cpu_s": cpu, "tokens": ids}


OPS = {"quantize": quantize, "logits": logits, "tokenize": tokenize, "decode": decode}

if __name__ == "__main__":
    if "--serve" in sys.argv:
        for line in sys.stdin:
            job = json.loads(line)
            print(json.dumps({**OPS, "round": one_round}[job["op"]](job)), flush=True)
    else:
        job = json.loads(sys.stdin.read())
        print(json.dumps(OPS[job["op"]](job)))
