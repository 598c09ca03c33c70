"""Every byte counts: planned models at equal bytes against uniform int4, embeddings included.

stories260K (tied 512 x 64 table): uniform int4 g32 (RTN, GPTQ) gives a size in bytes; the planner
(fisher, module units, the table and its tied head one unit, target any) is then given exactly that
size as --max-bytes, and llama.cpp's Q4_K_M file size of the model (281,472 B); KL(fp32 || model)
on 64 sequences of 256 tokens sampled from the fp32 model (bench/quality.py's protocol).
MiniLM: fisher, module, --ratio 3 (vs the fp16 model): 1 - mean cosine of mean-pooled embeddings on
512 WikiText-2 lines (bench/quality.py's protocol), RTN and GPTQ.
Sizes are the bytes compress.load holds (packed codes, scales, zero points, everything else in
fp16: the default), the same accounting the budget uses; the directory also keeps a dense 16-bit
copy of quantized tables for transformers, reported beside it.

    python bench/bytes.py       # writes bench/results/bytes-cpu.{json,md}; needs ../shared/data
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

import compress
from compress.data import load_texts, shared_data_dir
from compress.evaluate import embedding_fidelity, lm_metrics, pooled_embeddings, sample_sequences, size_report
from compress.models import load_model
from _common import cpu_name, markdown_table  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def calibration(quantizer: str, data, seq_len: int) -> dict:
    """GPTQ's calibration options (round to nearest takes none, and refuses them)."""
    return {"data": data, "samples": 128, "seq_len": seq_len} if quantizer == "gptq" else {}
LLAMACPP_Q4_K_M_BYTES = 281_472  # issue 13: llama.cpp's Q4_K_M of stories260K, KL 0.0172


def _row(model, label, quantizer, out, t0, **metrics):
    lm = compress.load(out)
    size = size_report(lm.model)
    disk = sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file() and f.suffix == ".safetensors")
    row = {"model": model, "plan": label, "quantizer": quantizer, "bytes": size.total_bytes,
           "ratio_vs_fp16": round(size.ratio_vs_fp16, 3), "table_bits": _table_bits(lm.model),
           "safetensors_bytes": disk, "seconds": round(time.time() - t0, 1), **metrics}
    print(row, flush=True)
    return row, lm


def _table_bits(model) -> str:
    from compress.qlinear import QuantEmbedding

    tables = [m for m in model.modules() if isinstance(m, (QuantEmbedding, torch.nn.Embedding))]
    return "/".join(str(m.bits) if isinstance(m, QuantEmbedding) else "16" for m in tables)


def stories(work: Path) -> list[dict]:
    from compress.llama2c import stories260k_dir

    path = stories260k_dir()
    ref = load_model(path)
    eval_ids = sample_sequences(ref.model, 64, 256, seed=0)
    calib_ids = sample_sequences(ref.model, 128, 256, seed=1)
    calib = work / "stories-calib.txt"
    calib.write_text("<|endoftext|>".join(ref.tokenizer.decode(r, skip_special_tokens=True) for r in calib_ids))
    rows, base_bytes = [], None
    for quantizer in ("rtn", "gptq"):
        t0 = time.time()
        out = compress.apply(path, compress.plan(path, bits=4, group_size=32, target="any", loaded=ref),
                             work / f"s-u-{quantizer}", quantizer=quantizer, **calibration(quantizer, calib, 256),
                             progress=False)
        row, lm = _row("stories260K", "uniform int4 g32", quantizer, out, t0)
        row["mean_kl"] = lm_metrics(lm.model, eval_ids, ref.model)["mean_kl"]
        rows.append(row)
        base_bytes = row["bytes"]
    for label, cap in (("planned at the uniform int4 g32 bytes", base_bytes),
                       ("planned at llama.cpp Q4_K_M's file size", LLAMACPP_Q4_K_M_BYTES)):
        p = compress.plan(path, method="fisher", granularity="module", max_bytes=cap, target="any", data=calib,
                          samples=64, loaded=ref, progress=False)
        for quantizer in ("rtn", "gptq"):
            t0 = time.time()
            out = compress.apply(path, p, work / f"s-{cap}-{quantizer}", quantizer=quantizer,
                                 **calibration(quantizer, calib, 256), progress=False)
            row, lm = _row("stories260K", f"{label} ({cap:,} B)", quantizer, out, t0)
            row["mean_kl"] = lm_metrics(lm.model, eval_ids, ref.model)["mean_kl"]
            rows.append(row)
    return rows


def minilm(work: Path, data: Path) -> list[dict]:
    lines = [t for t in load_texts(data / "text" / "wikitext2-test.txt") if not t.startswith("=")]
    eval_texts = lines[:512]
    calib = work / "minilm-calib.txt"
    calib.write_text("\n".join(lines[1000:1128]))
    ref = load_model("minilm")
    ref_emb = pooled_embeddings(ref.model, ref.tokenizer, eval_texts)
    p = compress.plan("minilm", method="fisher", granularity="module", ratio=3.0, data=calib, samples=32,
                      loaded=ref, progress=False)
    rows = []
    for quantizer in ("rtn", "gptq"):
        t0 = time.time()
        out = compress.apply("minilm", p, work / f"m-{quantizer}", quantizer=quantizer,
                             **calibration(quantizer, calib, 128), progress=False)
        row, lm = _row("MiniLM", "planned, --ratio 3", quantizer, out, t0)
        fid = embedding_fidelity(ref_emb, pooled_embeddings(lm.model, lm.tokenizer, eval_texts))
        row["one_minus_cosine"] = fid["one_minus_cosine"]
        rows.append(row)
    return rows


COLS = ["model", "plan", "quantizer", "bytes", "ratio_vs_fp16", "table_bits", "mean_kl", "one_minus_cosine",
        "safetensors_bytes", "seconds"]


def main() -> int:
    data = shared_data_dir()
    if data is None:
        print("needs ../shared/data (or COMPRESS_DATA)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        rows = stories(Path(tmp)) + minilm(Path(tmp), data)
    header = (f"Planned at equal bytes, embeddings included, {date.today()}, CPU: {cpu_name()}, "
              f"torch {torch.__version__}, command: python bench/bytes.py")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bytes-cpu.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n")
    (RESULTS / "bytes-cpu.md").write_text(markdown_table(rows, COLS, header))
    print(markdown_table(rows, COLS, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
