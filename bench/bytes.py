"""Every byte counts: planned models at equal bytes against uniform int4, embeddings included.

stories260K (tied 512 x 64 table): uniform int4 g32 (RTN, GPTQ) gives a size in bytes; the planner
(fisher, module units, the table and its tied head one unit, target any) is then given exactly that
size as --max-bytes, and llama.cpp's Q4_K_M file size of the model (281,472 B); KL(fp32 || model)
on 64 sequences of 256 tokens sampled from the fp32 model (bench/quality.py's protocol).
MiniLM: fisher, module, --ratio 3 (vs the fp16 model): 1 - mean cosine of mean-pooled embeddings on
512 WikiText-2 lines (bench/quality.py's protocol), RTN and GPTQ; each then exported to ONNX
(compress.export.export_onnx, default accuracy levels: tables as GatherBlockQuantized): the file's
bytes (external data included), its validation against the torch compressed model (max relative
error) and the same 1 - cosine with onnxruntime computing the embeddings.
Sizes are the bytes compress.load holds (packed codes, scales, zero points, everything else in
fp16: the default), the same accounting the budget uses; the directory also keeps a dense 16-bit
copy of quantized tables for transformers, reported beside it.

    python bench/bytes.py       # writes bench/results/bytes-cpu.{json,md}; needs ../shared/data
    python bench/bytes.py --models minilm --quantizers rtn   # one part: bytes-minilm-rtn-cpu.{json,md}
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from compress import api
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
    lm = api.load(out)
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


def stories(work: Path, quantizers: tuple[str, ...]) -> list[dict]:
    from compress.llama2c import stories260k_dir

    path = stories260k_dir()
    ref = load_model(path)
    eval_ids = sample_sequences(ref.model, 64, 256, seed=0)
    calib_ids = sample_sequences(ref.model, 128, 256, seed=1)
    calib = work / "stories-calib.txt"
    calib.write_text("<|endoftext|>".join(ref.tokenizer.decode(r, skip_special_tokens=True) for r in calib_ids))
    rows, base_bytes = [], None
    for quantizer in quantizers:
        t0 = time.time()
        out = api.apply(path, api.plan(path, bits=4, group_size=32, target="any", loaded=ref),
                             work / f"s-u-{quantizer}", quantizer=quantizer, **calibration(quantizer, calib, 256),
                             progress=False)
        row, lm = _row("stories260K", "uniform int4 g32", quantizer, out, t0)
        row["mean_kl"] = lm_metrics(lm.model, eval_ids, ref.model)["mean_kl"]
        rows.append(row)
        base_bytes = row["bytes"]  # the same for both quantizers
    for label, cap in (("planned at the uniform int4 g32 bytes", base_bytes),
                       ("planned at llama.cpp Q4_K_M's file size", LLAMACPP_Q4_K_M_BYTES)):
        p = api.plan(path, method="fisher", granularity="module", max_bytes=cap, target="any", data=calib,
                          samples=64, loaded=ref, progress=False)
        for quantizer in quantizers:
            t0 = time.time()
            out = api.apply(path, p, work / f"s-{cap}-{quantizer}", quantizer=quantizer,
                                 **calibration(quantizer, calib, 256), progress=False)
            row, lm = _row("stories260K", f"{label} ({cap:,} B)", quantizer, out, t0)
            row["mean_kl"] = lm_metrics(lm.model, eval_ids, ref.model)["mean_kl"]
            rows.append(row)
    return rows


class _OrtEncoder:
    """An exported encoder called like the torch model by pooled_embeddings: input_ids and
    attention_mask int64 (B, T) -> .last_hidden_state float32 (B, T, C) from onnxruntime (the
    graph has no token_type_ids: single-text batches have them all zero)."""

    def __init__(self, path: Path) -> None:
        from compress.export import ort_session

        self.session = ort_session(path)

    def __call__(self, input_ids, attention_mask, **_):
        from types import SimpleNamespace

        feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
        return SimpleNamespace(last_hidden_state=torch.from_numpy(self.session.run(None, feeds)[0]).float())


def _onnx(out: Path, lm, ref_emb, eval_texts) -> dict:
    """Export ``out`` to ONNX (validated in onnxruntime) and measure the file and its embeddings."""
    from compress.export import export_onnx

    t0 = time.time()
    rep = export_onnx(out, out.with_suffix(".onnx"))
    emb = pooled_embeddings(_OrtEncoder(Path(rep.path)), lm.tokenizer, eval_texts)
    return {"onnx_bytes": rep.onnx_bytes, "onnx_rel_err": rep.rel_err,
            "onnx_one_minus_cosine": embedding_fidelity(ref_emb, emb)["one_minus_cosine"],
            "onnx_tables": "; ".join(f"{k}: {v}" for k, v in rep.tables.items()),
            "onnx_seconds": round(time.time() - t0, 1)}


def minilm(work: Path, data: Path, quantizers: tuple[str, ...]) -> list[dict]:
    lines = [t for t in load_texts(data / "text" / "wikitext2-test.txt") if not t.startswith("=")]
    eval_texts = lines[:512]
    calib = work / "minilm-calib.txt"
    calib.write_text("\n".join(lines[1000:1128]))
    ref = load_model("minilm")
    ref_emb = pooled_embeddings(ref.model, ref.tokenizer, eval_texts)
    p = api.plan("minilm", method="fisher", granularity="module", ratio=3.0, data=calib, samples=32,
                      loaded=ref, progress=False)
    rows = []
    for quantizer in quantizers:
        t0 = time.time()
        out = api.apply("minilm", p, work / f"m-{quantizer}", quantizer=quantizer,
                             **calibration(quantizer, calib, 128), progress=False)
        row, lm = _row("MiniLM", "planned, --ratio 3", quantizer, out, t0)
        fid = embedding_fidelity(ref_emb, pooled_embeddings(lm.model, lm.tokenizer, eval_texts))
        row["one_minus_cosine"] = fid["one_minus_cosine"]
        row.update(_onnx(out, lm, ref_emb, eval_texts))
        print(row, flush=True)
        rows.append(row)
    return rows


COLS = ["model", "plan", "quantizer", "bytes", "ratio_vs_fp16", "table_bits", "mean_kl", "one_minus_cosine",
        "safetensors_bytes", "onnx_bytes", "onnx_rel_err", "onnx_one_minus_cosine", "seconds"]
PARTS = ("stories", "minilm")
QUANTIZERS = ("rtn", "gptq")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--quantizers", nargs="+", choices=QUANTIZERS, default=list(QUANTIZERS))
    args = ap.parse_args(argv)
    data = shared_data_dir()
    if data is None:
        print("needs ../shared/data (or COMPRESS_DATA)", file=sys.stderr)
        return 2
    quantizers = tuple(q for q in QUANTIZERS if q in args.quantizers)
    with tempfile.TemporaryDirectory() as tmp:
        rows = ((stories(Path(tmp), quantizers) if "stories" in args.models else [])
                + (minilm(Path(tmp), data, quantizers) if "minilm" in args.models else []))
    # A part of the bench gets a file of its own: it never overwrites the whole run's figures.
    whole = set(args.models) == set(PARTS) and quantizers == QUANTIZERS
    command = "python bench/bytes.py" + ("" if whole else f" --models {' '.join(args.models)} "
                                                         f"--quantizers {' '.join(quantizers)}")
    name = "bytes-cpu" if whole else f"bytes-{'-'.join(args.models)}-{'-'.join(quantizers)}-cpu"
    header = (f"Planned at equal bytes, embeddings included, {date.today()}, CPU: {cpu_name()}, "
              f"torch {torch.__version__}, command: {command}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown_table(rows, COLS, header))
    print(markdown_table(rows, COLS, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
