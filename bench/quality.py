"""Quality anchors on real models: RTN and GPTQ at int8 / int4, through the library's own paths.

MiniLM: 1 − mean cosine of mean-pooled embeddings vs fp32 over 512 WikiText-2 lines (128 tokens);
GPTQ calibrates on 128 other WikiText-2 lines. stories260K: mean KL(fp32 ‖ quantized) over 64
sequences of 256 tokens sampled from the fp32 model, and perplexity on those sequences; GPTQ
calibrates on 128 sequences sampled with another seed. Needs ../shared/data (COMPRESS_DATA).

    python bench/quality.py [--quick]      # writes bench/results/quality-cpu.{json,md}
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

import compress
from compress.data import load_texts, shared_data_dir
from compress.evaluate import embedding_fidelity, lm_metrics, pooled_embeddings, sample_sequences, size_report
from compress.models import load_model
from _common import cpu_name, markdown_table  # noqa: E402  (bench/ is the script's directory)

RESULTS = Path(__file__).parent / "results"


def calibration(quantizer: str, data, seq_len: int) -> dict:
    """GPTQ's calibration options (round to nearest takes none, and refuses them)."""
    return {"data": data, "samples": 128, "seq_len": seq_len} if quantizer == "gptq" else {}
CONFIGS = [("int8", 8, -1, "rtn"), ("int4 g32", 4, 32, "rtn"), ("int4 g32", 4, 32, "gptq"),
           ("int4 g128", 4, 128, "rtn"), ("int4 g128", 4, 128, "gptq"),
           # The planner's mixed plan: fisher scores per layer, exact knapsack at 5.5 bits per weight.
           ("mixed fisher 5.5", None, 32, "rtn"), ("mixed fisher 5.5", None, 32, "gptq")]


def make_plan(model, label: str, bits: int | None, group: int, loaded, calib):
    """A uniform plan, or (bits None) the planner's mixed plan from fisher scores on ``calib``."""
    if bits is not None:
        return compress.plan(model, bits=bits, group_size=group, loaded=loaded)
    return compress.plan(model, method="fisher", granularity="module", budget={"avg_bits": 5.5},
                         group_size=group, data=calib, samples=32, loaded=loaded, progress=False)




def minilm_rows(work: Path, data: Path, n_eval: int) -> list[dict]:
    lines = [t for t in load_texts(data / "text" / "wikitext2-test.txt") if not t.startswith("=")]  # no headings
    eval_texts, calib = lines[:n_eval], lines[1000:1128]
    calib_file = work / "minilm-calib.txt"
    calib_file.write_text("\n".join(calib))
    ref = load_model("minilm")
    ref_emb = pooled_embeddings(ref.model, ref.tokenizer, eval_texts)
    rows = []
    for label, bits, group, quantizer in CONFIGS:
        t = time.time()
        out = compress.apply("minilm", make_plan("minilm", label, bits, group, ref, calib_file),
                             work / f"minilm-{bits}-{group}-{quantizer}", quantizer=quantizer,
                             **calibration(quantizer, calib_file, 128), progress=False)
        secs = time.time() - t
        lm = compress.load(out)
        fid = embedding_fidelity(ref_emb, pooled_embeddings(lm.model, lm.tokenizer, eval_texts))
        size = size_report(lm.model)
        rows.append({"model": "MiniLM", "config": label, "quantizer": quantizer,
                     "bits_per_weight": round(size.avg_bits_quantized, 3),
                     "one_minus_cosine": fid["one_minus_cosine"],
                     "neighbour_overlap@10": fid["neighbour_overlap@10"], "apply_seconds": round(secs, 1)})
        print(rows[-1], flush=True)
    return rows


def stories_rows(work: Path, n_seq: int) -> list[dict]:
    from compress.llama2c import stories260k_dir

    path = stories260k_dir()
    ref = load_model(path)
    torch.manual_seed(0)
    eval_ids = sample_sequences(ref.model, n_seq, 256, seed=0)
    calib_ids = sample_sequences(ref.model, 128, 256, seed=1)
    calib_file = work / "stories-calib.txt"
    calib_file.write_text("<|endoftext|>".join(ref.tokenizer.decode(r, skip_special_tokens=True) for r in calib_ids))
    ref_ppl = lm_metrics(ref.model, eval_ids)["perplexity"]
    rows = [{"model": "stories260K", "config": "fp32", "quantizer": "-", "bits_per_weight": 32,
             "mean_kl": 0.0, "perplexity": ref_ppl}]
    for label, bits, group, quantizer in CONFIGS:
        t = time.time()
        out = compress.apply(path, make_plan(path, label, bits, group, ref, calib_file),
                             work / f"stories-{bits}-{group}-{quantizer}", quantizer=quantizer,
                             **calibration(quantizer, calib_file, 256), progress=False)
        secs = time.time() - t
        lm = compress.load(out)
        m = lm_metrics(lm.model, eval_ids, ref.model)
        size = size_report(lm.model)
        rows.append({"model": "stories260K", "config": label, "quantizer": quantizer,
                     "bits_per_weight": round(size.avg_bits_quantized, 3), "mean_kl": m["mean_kl"],
                     "perplexity": m["perplexity"], "apply_seconds": round(secs, 1)})
        print(rows[-1], flush=True)
    return rows


QUALITY_COLS = ["model", "config", "quantizer", "bits_per_weight", "one_minus_cosine", "neighbour_overlap@10",
                "mean_kl", "perplexity", "apply_seconds"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer evaluation samples (a smoke run)")
    args = ap.parse_args()
    data = shared_data_dir()
    if data is None:
        print("needs ../shared/data (or COMPRESS_DATA)", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = minilm_rows(work, data, 64 if args.quick else 512) + stories_rows(work, 8 if args.quick else 64)
    header = (f"Quality anchors, {date.today()}, CPU: {cpu_name()}, torch {torch.__version__}, "
              f"command: python bench/quality.py{' --quick' if args.quick else ''}")
    RESULTS.mkdir(exist_ok=True)
    stem = "quality-cpu" + ("-quick" if args.quick else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown_table(rows, QUALITY_COLS, header))
    print(markdown_table(rows, QUALITY_COLS, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
