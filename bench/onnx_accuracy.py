"""What each MatMulNBits accuracy_level costs in accuracy, against what the quantization itself costs,
and what it buys in speed (onnxruntime, CPU).

For each model, plan (int4 g32 asymmetric, int8) and dtype of the unquantized parts (float32, and
float16: compress apply's default), the compressed directory is exported at accuracy_level 0, 1, 2
and 4 (3 is bfloat16 compute, which the CPU provider does not run faster) and measured on held-out
text:

  causal LM (stories260K): 16 windows of 128 tokens of TinyStories text (needs the shared data);
      quant_kl   mean KL(fp32 model || torch compressed model) per token: the quantization's own cost
      added_kl   mean KL(torch compressed || onnxruntime export): what the export adds
      top1       next-token agreement of the export with the torch compressed model
      ratio      added_kl / quant_kl (the default level must keep it <= 0.10)
  encoder (all-MiniLM-L6-v2): 64 texts, mean-pooled embeddings; quant = 1 - cos(fp32, torch
      compressed), added = 1 - cos(torch compressed, export), ratio = added / quant.
  ms_1x1 / ms_1x128: median time of one forward of batch 1 at 1 and 128 tokens (no cache), both
      threads, every level of a (model, plan, dtype) timed round-robin.

    python bench/onnx_accuracy.py                 # writes bench/results/onnx_accuracy.{json,md}
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import compress  # noqa: E402
from compress.data import shared_data_dir  # noqa: E402
from compress.export import export_onnx, logit_agreement, ort_session  # noqa: E402
from compress.export.validate import to_numpy  # noqa: E402
from compress.models import load_model  # noqa: E402
from _common import cpu_name, markdown_table  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LEVELS = (0, 1, 2, 4)
PLANS = {"int4 g32 asym": {"bits": 4, "group_size": 32, "symmetric": False}, "int8": {"bits": 8}}
DTYPES = ("float32", "float16")


def _text() -> str:
    data = shared_data_dir()
    if data is None:
        sys.exit("needs the shared data (TinyStories text and stories260K)")
    return (data / "text" / "tinystories-sample.txt").read_text()


def _windows(tokenizer, text: str, n: int, length: int) -> list[torch.Tensor]:
    ids = tokenizer(text)["input_ids"]
    step = max(length, (len(ids) - length) // n)
    return [torch.tensor([ids[i:i + length]]) for i in range(0, step * n, step) if i + length <= len(ids)][:n]


def _median_ms(fns, rounds: int) -> list[float]:
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(rounds):
        for t, fn in zip(times, fns):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return [1e3 * statistics.median(t) for t in times]


def causal_rows(work: Path, threads: int, rounds: int) -> list[dict]:
    text = _text()
    ref = load_model("stories260k")
    windows = _windows(ref.tokenizer, text, 16, 128)
    with torch.no_grad():
        ref_logits = [ref.model(input_ids=w, use_cache=False).logits[0].double() for w in windows]
    rows = []
    for plan_name, spec in PLANS.items():
        for dtype in DTYPES:
            comp = compress.apply("stories260k", compress.plan("stories260k", **spec), work / f"s-{plan_name}-{dtype}",
                                  progress=False, dtype=dtype, overwrite=True)
            lm = compress.load(comp)
            with torch.no_grad():
                torch_logits = [lm.model(input_ids=w, use_cache=False).logits[0].double() for w in windows]
            quant_kl = statistics.fmean(logit_agreement(r, t)[0] for r, t in zip(ref_logits, torch_logits))
            sessions, level_rows = [], []
            for level in LEVELS:
                path = work / f"s-{plan_name}-{dtype}-{level}.onnx"
                rep = export_onnx(comp, path, accuracy_level=level, overwrite=True)
                sess = ort_session(path, threads, spinning=False)
                got = [torch.from_numpy(np.asarray(sess.run(None, _feeds(w))[0][0], dtype=np.float64)) for w in windows]
                agree = [logit_agreement(t, g) for t, g in zip(torch_logits, got)]
                added = statistics.fmean(a[0] for a in agree)
                total = statistics.fmean(logit_agreement(r, g)[0] for r, g in zip(ref_logits, got))
                sessions.append(sess)
                level_rows.append({"model": "stories260k", "plan": plan_name, "dtype": dtype, "level": level,
                                   "quant_kl": quant_kl, "added_kl": added, "ratio": added / quant_kl,
                                   "top1": statistics.fmean(a[1] for a in agree), "total_kl_vs_fp32": total,
                                   "export_check_kl": rep.kl, "onnx_bytes": rep.onnx_bytes})
            rows += _timed(level_rows, sessions, rounds)
            print(f"stories260k {plan_name} {dtype} done", file=sys.stderr)
    return rows


def _feeds(ids: torch.Tensor) -> dict:
    return {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy())}


def _timed(level_rows: list[dict], sessions: list, rounds: int) -> list[dict]:
    """Add ms_1x1 and ms_1x128 to each row, every level timed round-robin."""
    one, long = torch.tensor([[5]]), torch.arange(3, 131)[None]
    for key, ids in (("ms_1x1", one), ("ms_1x128", long)):
        feeds = _feeds(ids)
        times = _median_ms([lambda s=s: s.run(None, feeds) for s in sessions], rounds)
        for row, ms in zip(level_rows, times):
            row[key] = ms
    return level_rows


def encoder_rows(work: Path, threads: int, rounds: int) -> list[dict]:
    texts = [t for t in _text().split("\n") if len(t) > 80][:64]
    ref = load_model("minilm")
    tok = ref.tokenizer
    batch = tok(texts, padding="max_length", truncation=True, max_length=128, return_tensors="pt")
    mask = batch["attention_mask"]

    def pool(h):  # (B, T, D) -> (B, D), mean over real tokens
        h = torch.as_tensor(h).double()
        return (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)

    with torch.no_grad():
        ref_emb = pool(ref.model(**batch).last_hidden_state)
    rows = []
    for plan_name, spec in PLANS.items():
        spec = {**spec, "group_size": 128} if spec["bits"] == 4 else spec  # MiniLM's K = 384, 1536
        for dtype in DTYPES:
            comp = compress.apply("minilm", compress.plan("minilm", **spec), work / f"m-{plan_name}-{dtype}",
                                  progress=False, dtype=dtype, overwrite=True)
            lm = compress.load(comp)
            with torch.no_grad():
                torch_emb = pool(lm.model(**batch).last_hidden_state.float())
            quant = float((1 - F.cosine_similarity(ref_emb, torch_emb)).mean())
            sessions, level_rows = [], []
            for level in LEVELS:
                path = work / f"m-{plan_name}-{dtype}-{level}.onnx"
                rep = export_onnx(comp, path, accuracy_level=level, overwrite=True)
                sess = ort_session(path, threads, spinning=False)
                out = sess.run(None, {"input_ids": batch["input_ids"].numpy(), "attention_mask": mask.numpy()})[0]
                emb = pool(np.asarray(out, dtype=np.float64))
                added = float((1 - F.cosine_similarity(torch_emb, emb)).mean())
                sessions.append(sess)
                level_rows.append({"model": "minilm", "plan": plan_name.replace("g32", "g128"), "dtype": dtype,
                                   "level": level, "quant_1mcos": quant, "added_1mcos": added,
                                   "ratio": added / quant, "onnx_bytes": rep.onnx_bytes})
            rows += _timed(level_rows, sessions, rounds)
            print(f"minilm {plan_name} {dtype} done", file=sys.stderr)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--out", default=str(RESULTS / "onnx_accuracy"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime

    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        causal = causal_rows(Path(tmp), args.threads, args.rounds)
        encoder = encoder_rows(Path(tmp), args.threads, args.rounds)
    meta = {"command": "python bench/onnx_accuracy.py " + " ".join(sys.argv[1:]), "cpu": cpu_name(),
            "cores": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.time() - started)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({"machine": meta, "causal": causal, "encoder": encoder},
                                                   indent=1) + "\n")
    md = [f"# ONNX accuracy_level: accuracy added vs the quantization's own, and speed\n",
          f"`{meta['command']}` on {meta['cpu']} ({args.threads} threads), onnxruntime {meta['onnxruntime']}, "
          f"{meta['date']}\n",
          markdown_table(causal, ["plan", "dtype", "level", "quant_kl", "added_kl", "ratio", "top1",
                                  "total_kl_vs_fp32", "ms_1x1", "ms_1x128"],
                         "## stories260K (16 x 128 TinyStories tokens; KL in nats per token)"),
          markdown_table(encoder, ["plan", "dtype", "level", "quant_1mcos", "added_1mcos", "ratio", "ms_1x1",
                                   "ms_1x128"], "## all-MiniLM-L6-v2 (64 texts, mean-pooled; 1 - cos)")]
    Path(args.out + ".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
