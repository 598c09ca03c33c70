"""How well does each sensitivity analyzer predict the oracle, and how long does it take? CPU.

Ground truth: the oracle (each unit alone fake-quantized to int4 g32 asymmetric / int8, metric
measured) on the evaluation data. Every analyzer then runs on separate calibration data and is
scored by the Spearman rank correlation of its scores with the ground truth's int4 damage (and,
for the methods that predict damage per width, of its int8 damage with the oracle's).

  MiniLM       evaluation: the first 512 WikiText-2 test lines (headings dropped), 128 tokens;
               calibration: lines 1000+ (disjoint); metric 1 − cosine of mean-pooled embeddings.
  stories260K  evaluation: 64 sequences of 256 tokens sampled from the model (seed 0); ground truth
               with metric "kl"; calibration: 64 other sampled sequences (seed 1); each analyzer
               with causal_metric "nll" (the default) and "kl".

Sample counts per analyzer are chosen so each runs within 60 s on a 2-core CPU; the table states
them. Times: wall seconds and this process's CPU seconds (on a shared machine wall time includes
waiting for the CPU; with --threads 1 the CPU seconds are what an idle core would take).
"oracle@N" rows run the oracle itself on N calibration samples: the baseline any proxy must beat.

    python bench/analyzers.py [--models minilm,stories260k] [--granularity block,module]
                              [--threads 1] [--quick] [--reuse-truth]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path

import torch

from compress.analyze import Sensitivity, analyze
from compress.analyze.report import agreement
from compress.data import load_texts, shared_data_dir
from compress.evaluate import sample_sequences
from compress.models import load_model

sys.path.insert(0, str(Path(__file__).parent))
from quality import cpu_name  # noqa: E402

RESULTS = Path(__file__).parent / "results"
LIMIT_S = 60.0

# (label, method, options) per model and granularity; samples sized for the 60 s limit.
PLANS = {
    ("minilm", "block"): [
        ("oracle@32", "oracle", {"samples": 32}),
        ("cmpq@128", "cmpq", {"samples": 128}),
        ("cmpq@512", "cmpq", {"samples": 512}),
        ("pmpq@128", "pmpq", {"samples": 128}),
        ("tdmpq@64x3", "tdmpq", {"samples": 64, "probes": 3}),
        ("taylor@128x2", "taylor", {"samples": 128, "probes": 2}),
        ("fisher@128x2", "fisher", {"samples": 128, "probes": 2}),
    ],
    ("minilm", "module"): [
        ("oracle@16", "oracle", {"samples": 16}),
        ("cmpq@128", "cmpq", {"samples": 128}),
        ("cmpq@512", "cmpq", {"samples": 512}),
        ("pmpq@24", "pmpq", {"samples": 24}),
        ("tdmpq@16x2", "tdmpq", {"samples": 16, "probes": 2}),
        ("taylor@128x2", "taylor", {"samples": 128, "probes": 2}),
        ("fisher@128x2", "fisher", {"samples": 128, "probes": 2}),
    ],
    ("stories260k", "block"): [
        ("oracle@16", "oracle", {"samples": 16, "causal_metric": "kl"}),
        ("cmpq@64", "cmpq", {"samples": 64}),
        *[(f"{m}@64 {cm}", m, {"samples": 64, "causal_metric": cm}) for m in ("pmpq", "tdmpq") for cm in ("nll", "kl")],
        *[(f"{m}@64x4 {cm}", m, {"samples": 64, "probes": 4, "causal_metric": cm})
          for m in ("taylor", "fisher") for cm in ("nll", "kl")],
    ],
    ("stories260k", "module"): [
        ("oracle@16", "oracle", {"samples": 16, "causal_metric": "kl"}),
        ("cmpq@64", "cmpq", {"samples": 64}),
        *[(f"{m}@32 {cm}", m, {"samples": 32, "causal_metric": cm}) for m in ("pmpq", "tdmpq") for cm in ("nll", "kl")],
        *[(f"{m}@64x4 {cm}", m, {"samples": 64, "probes": 4, "causal_metric": cm})
          for m in ("taylor", "fisher") for cm in ("nll", "kl")],
    ],
}


def load_data(name: str, quick: bool):
    """(loaded model, evaluation data, calibration data, common options) for one benchmark model."""
    data = shared_data_dir()
    if data is None:
        raise SystemExit("needs ../shared/data (set COMPRESS_DATA)")
    if name == "minilm":
        lm = load_model("minilm")
        lines = [t for t in load_texts(data / "text" / "wikitext2-test.txt") if not t.startswith("=")]
        return lm, lines[: 64 if quick else 512], lines[1000:1512], {"seq_len": 128, "batch_size": 16}
    from compress.llama2c import stories260k_dir

    lm = load_model(stories260k_dir())
    eval_ids = sample_sequences(lm.model, 16 if quick else 64, 256, seed=0)
    calib_ids = sample_sequences(lm.model, 64, 256, seed=1)
    return lm, eval_ids, calib_ids, {"batch_size": 16}


def previous_truth(path: Path, name: str, granularity: str, n_eval: int) -> dict | None:
    """The ground-truth record of an earlier run of this bench with the same model, granularity
    and evaluation size (the oracle is deterministic given its data), or None."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    for res in saved["results"]:
        if (res["model"], res["granularity"], res["truth"]["samples"]) == (name, granularity, n_eval):
            return {"measured": saved["meta"]["date"], **res["truth"]}
    return None


def run(name: str, granularity: str, quick: bool, reuse: Path | None) -> dict:
    lm, eval_data, calib_data, common = load_data(name, quick)
    n_eval = len(eval_data)
    truth_opts = {**common, "samples": n_eval, "granularity": granularity, "progress": False}
    if name == "stories260k":
        truth_opts["causal_metric"] = "kl"
    old = previous_truth(reuse, name, granularity, n_eval) if reuse else None
    if old is not None:
        truth = Sensitivity.from_dict(old["sensitivity"])
        print(f"[{name} {granularity}] ground truth reused from {reuse} (measured {old['measured']})")
    else:
        print(f"[{name} {granularity}] ground truth: oracle on {n_eval} evaluation samples ...", flush=True)
        truth = analyze(lm, "oracle", eval_data, **truth_opts)
        print(f"  {truth.provenance['seconds']:.0f} s", flush=True)
    rows = []
    for label, method, opts in PLANS[(name, granularity)]:
        if quick:
            opts = {**opts, "samples": min(opts["samples"], 8)}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sens = analyze(lm, method, calib_data, granularity=granularity, progress=False, **{**common, **opts})
        both8 = sens.damage is not None and 8 in sens.damage[next(iter(sens.damage))]
        row = {"label": label, "method": method, "samples": sens.provenance["samples"],
               "metric": sens.provenance["metric"], "spearman": agreement(sens, truth),
               "spearman_8bit": agreement(sens, truth, 8) if both8 else None,
               "seconds": sens.provenance["seconds"], "cpu_seconds": sens.provenance["cpu_seconds"],
               "warnings": [str(w.message) for w in caught], "sensitivity": sens.to_dict()}
        rows.append(row)
        sp8 = "" if row["spearman_8bit"] is None else f"  sp8 {row['spearman_8bit']:+.3f}"
        print(f"  {label:<16} spearman {row['spearman']:+.3f}{sp8}  {row['seconds']:6.1f} s wall "
              f"{row['cpu_seconds']:6.1f} s cpu", flush=True)
    return {"model": name, "granularity": granularity, "units": len(truth.units),
            "truth": {"samples": n_eval, "metric": truth.provenance["metric"], "seconds": truth.provenance["seconds"],
                      "cpu_seconds": truth.provenance["cpu_seconds"], "sensitivity": truth.to_dict(),
                      "measured": old["measured"] if old else datetime.now().isoformat(timespec="seconds")},
            "rows": rows}


def markdown(meta: dict, results: list[dict]) -> str:
    lines = [f"# Sensitivity analyzers vs the oracle ({meta['date']})", "",
             f"CPU: {meta['cpu']} ({meta['cores']} cores), torch {meta['torch']}, {meta['threads']} thread(s); "
             f"load average at start {meta['load_start']}, at end {meta['load_end']} (other processes shared the CPU). "
             f"Command: `{meta['command']}`.", "",
             "Spearman: rank correlation of the analyzer's scores with the oracle's int4 damage on the evaluation "
             "data (sp@8: int8 damage vs the oracle's). Time limit per analyzer on MiniLM: 60 s.", ""]
    for res in results:
        t = res["truth"]
        lines += [f"## {res['model']}, {res['granularity']} granularity ({res['units']} units)", "",
                  f"Ground truth: oracle on {t['samples']} evaluation samples, metric {t['metric']}, "
                  f"{t['seconds']:.0f} s wall / {t['cpu_seconds']:.0f} s CPU (measured {t['measured']}).", "",
                  "| analyzer | metric | samples | spearman | sp@8 | wall s | CPU s | < 60 s |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            sp8 = "" if r["spearman_8bit"] is None else f"{r['spearman_8bit']:+.3f}"
            ok = "yes" if r["seconds"] < LIMIT_S else "no"
            metric = "-" if r["method"] == "cmpq" else r["metric"]  # cmpq measures no metric
            lines.append(f"| {r['label']} | {metric} | {r['samples']} | {r['spearman']:+.3f} | {sp8} | "
                         f"{r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {ok} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="minilm,stories260k")
    ap.add_argument("--granularity", default="block,module")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--quick", action="store_true", help="8 calibration samples, small ground truth (smoke test)")
    ap.add_argument("--out", default="analyzers", help="results file stem under bench/results/")
    ap.add_argument("--reuse-truth", action="store_true",
                    help="take the ground truth from the existing results file when it matches (saves the "
                         "oracle's long run when only analyzer settings changed)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    meta = {"date": datetime.now().isoformat(timespec="seconds"), "cpu": cpu_name(), "cores": os.cpu_count(),
            "threads": args.threads, "torch": torch.__version__, "load_start": [round(x, 1) for x in os.getloadavg()],
            "command": "python bench/analyzers.py " + " ".join(sys.argv[1:])}
    reuse = RESULTS / f"{args.out}.json" if args.reuse_truth else None
    results = []
    start = time.time()
    for name in args.models.split(","):
        for granularity in args.granularity.split(","):
            results.append(run(name, granularity, args.quick, reuse))
    meta["load_end"] = [round(x, 1) for x in os.getloadavg()]
    meta["total_seconds"] = time.time() - start
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    md = markdown(meta, results)
    (RESULTS / f"{args.out}.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
