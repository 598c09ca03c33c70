"""Which damage measure should the analyzers use for causal LMs: mean NLL change or KL? (issue 15.3)

Ground truth: the oracle with the KL metric (each unit alone fake-quantized to int4 g32 / int8,
KL(p_unmodified ‖ p) measured) on held-out windows. Each analyzer (oracle on fewer samples, pmpq,
tdmpq, taylor, fisher) then runs on separate calibration windows twice, with causal_metric "nll"
and "kl", for several calibration seeds; the table gives the mean and spread over seeds of the
Spearman correlation of its scores with the truth's int4 damage, and for the methods that
predict damage per width of its int8 damage with the truth's (what the planner's knapsack uses).

  stories260k  held out: 64 sequences of 256 tokens sampled from the model (seed 0); calibration:
               sampled sequences, seeds 1, 2, 3 (as bench/analyzers.py; no TinyStories text of
               useful size is in the shared data)
  tiny-random  a random Llama (hidden 128, 4 layers, ffn 344) with stories260K's 512-token
               vocabulary on tinyshakespeare: held out from the second half of the text,
               calibration windows from the first half at offsets chosen by the seed

    python bench/metric.py [--models stories260k,tiny-random] [--granularity module,block]
                           [--seeds 3] [--threads 1] [--out metric-cpu]  # bench/results/OUT.{json,md}
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path

import torch

from compress.analyze import analyze
from compress.analyze.report import agreement
from compress.data import shared_data_dir
from compress.evaluate import sample_sequences
from compress.models import LoadedModel, load_model

sys.path.insert(0, str(Path(__file__).parent))
from _common import cpu_name  # noqa: E402

RESULTS = Path(__file__).parent / "results"
# (label, method, options) per granularity, sized as bench/analyzers.py sizes them for stories260K
PLANS = {
    "module": [("oracle@16", "oracle", {"samples": 16}), ("pmpq@32", "pmpq", {"samples": 32}),
               ("tdmpq@32", "tdmpq", {"samples": 32}), ("taylor@64x4", "taylor", {"samples": 64, "probes": 4}),
               ("fisher@64x4", "fisher", {"samples": 64, "probes": 4})],
    "block": [("oracle@16", "oracle", {"samples": 16}), ("pmpq@64", "pmpq", {"samples": 64}),
              ("tdmpq@64", "tdmpq", {"samples": 64}), ("taylor@64x4", "taylor", {"samples": 64, "probes": 4}),
              ("fisher@64x4", "fisher", {"samples": 64, "probes": 4})],
}


def stories(seeds: int):
    from compress.llama2c import stories260k_dir

    lm = load_model(stories260k_dir())
    held_out = sample_sequences(lm.model, 64, 256, seed=0)
    return lm, held_out, [sample_sequences(lm.model, 64, 256, seed=s) for s in range(1, seeds + 1)]


def tiny_random(seeds: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from compress.llama2c import stories260k_dir
    from compress.models import load_tokenizer

    tok = load_tokenizer(stories260k_dir())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval()
    text = (shared_data_dir() / "text" / "tinyshakespeare.txt").read_text()
    ids = torch.tensor(tok(text)["input_ids"], dtype=torch.long)
    half = len(ids) // 2
    windows = ids[half: half + 64 * 256].reshape(64, 256)
    calib = []
    for s in range(1, seeds + 1):
        g = torch.Generator().manual_seed(s)
        starts = torch.randint(0, half - 256, (64,), generator=g)
        calib.append(torch.stack([ids[i: i + 256] for i in starts.tolist()]))
    return LoadedModel(model, tok, "causal-lm", Path("tiny-random")), windows, calib


def run(name: str, granularity: str, seeds: int) -> dict:
    lm, held_out, calibs = {"stories260k": stories, "tiny-random": tiny_random}[name](seeds)
    common = {"batch_size": 16, "granularity": granularity, "progress": False}
    t = time.time()
    truth = analyze(lm, "oracle", held_out, samples=len(held_out), causal_metric="kl", **common)
    print(f"[{name} {granularity}] truth: KL oracle on {len(held_out)} held-out windows, {time.time() - t:.0f} s",
          flush=True)
    # The same oracle measuring mean NLL on the same held-out windows: a check that kl's lead is not
    # only kl agreeing with a kl truth (if nll were the better measure, nll analyzers would win here).
    truth_nll = analyze(lm, "oracle", held_out, samples=len(held_out), causal_metric="nll", **common)
    print(f"  nll truth vs kl truth: spearman {agreement(truth_nll, truth):+.3f}", flush=True)
    rows = []
    for label, method, opts in PLANS[granularity]:
        for metric in ("nll", "kl"):
            sp, sp8, spn, secs = [], [], [], []
            for calib in calibs:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    sens = analyze(lm, method, calib, causal_metric=metric, **common, **opts)
                sp.append(agreement(sens, truth))
                spn.append(agreement(sens, truth_nll))
                if sens.damage is not None:
                    sp8.append(agreement(sens, truth, 8))
                secs.append(sens.provenance["seconds"])
            row = {"label": label, "method": method, "metric": metric, "spearman": sp, "spearman_8bit": sp8,
                   "spearman_vs_nll_truth": spn, "seconds": secs}
            rows.append(row)
            print(f"  {label:<12} {metric:<4} spearman {statistics.mean(sp):+.3f} ± {_sd(sp):.3f}"
                  + (f"  sp@8 {statistics.mean(sp8):+.3f} ± {_sd(sp8):.3f}" if sp8 else "")
                  + f"  vs nll truth {statistics.mean(spn):+.3f}  {statistics.mean(secs):.1f} s", flush=True)
    return {"model": name, "granularity": granularity, "units": len(truth.units), "seeds": len(calibs),
            "truth_samples": len(held_out), "truths_spearman": agreement(truth_nll, truth), "rows": rows}


def _sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _ms(xs: list[float]) -> str:
    return f"{statistics.mean(xs):+.3f} ± {_sd(xs):.3f}" if xs else ""


def markdown(meta: dict, results: list[dict]) -> str:
    lines = [f"# Damage measure for causal LMs: nll vs kl against a KL oracle on held-out windows ({meta['date']})",
             "", f"CPU: {meta['cpu']}, torch {meta['torch']}, {meta['threads']} thread(s); load average at start "
             f"{meta['load_start']}, at end {meta['load_end']} (other processes shared the 2 cores); command: "
             f"`{meta['command']}`; {meta['seconds']:.0f} s in all.", "",
             "Truth: the oracle (each unit alone at int4 g32 / int8) measuring KL(p_unmodified ‖ p) on held-out "
             "windows. Each analyzer runs on other (calibration) windows with causal_metric nll and kl; cells are "
             "the mean ± standard deviation over calibration seeds of the Spearman correlation of its scores with "
             "the truth's int4 damage (sp@8: its int8 damage vs the truth's, for analyzers that predict damage); "
             "'kl − nll' is the difference of the means. 'vs nll truth': the same Spearman against the oracle "
             "measuring mean NLL on the same held-out windows (a check that kl's lead is not kl agreeing with "
             "itself).", ""]
    wins = {"kl": 0, "nll": 0, "tie": 0}
    for res in results:
        lines += [f"## {res['model']}, {res['granularity']} granularity ({res['units']} units, {res['seeds']} seeds, "
                  f"truth on {res['truth_samples']} windows; nll truth vs kl truth: spearman "
                  f"{res['truths_spearman']:+.3f})", "",
                  "| analyzer | spearman nll | spearman kl | kl − nll | sp@8 nll | sp@8 kl | vs nll truth: nll "
                  "| vs nll truth: kl | s nll | s kl |", "|---|---|---|---|---|---|---|---|---|---|"]
        by = {(r["label"], r["metric"]): r for r in res["rows"]}
        for label in dict.fromkeys(r["label"] for r in res["rows"]):
            n, k = by[(label, "nll")], by[(label, "kl")]
            mn, mk = statistics.mean(n["spearman"]), statistics.mean(k["spearman"])
            wins["kl" if mk > mn + 1e-9 else "nll" if mn > mk + 1e-9 else "tie"] += 1
            lines.append(f"| {label} | {_ms(n['spearman'])} | {_ms(k['spearman'])} | {mk - mn:+.3f} | "
                         f"{_ms(n['spearman_8bit'])} | {_ms(k['spearman_8bit'])} | "
                         f"{_ms(n['spearman_vs_nll_truth'])} | {_ms(k['spearman_vs_nll_truth'])} | "
                         f"{statistics.mean(n['seconds']):.1f} | {statistics.mean(k['seconds']):.1f} |")
        lines.append("")
    lines.append(f"Analyzer x model x granularity cells where kl's mean Spearman is higher: {wins['kl']}, nll's: "
                 f"{wins['nll']}, equal: {wins['tie']}.")
    lines += ["", "## Per analyzer, over every model x granularity cell", "",
              "| analyzer | mean spearman nll | mean spearman kl | kl − nll: mean, min, max | cells kl > / < / = nll |",
              "|---|---|---|---|---|"]
    for method in dict.fromkeys(r["method"] for res in results for r in res["rows"]):
        cells = []
        for res in results:
            by = {r["metric"]: statistics.mean(r["spearman"]) for r in res["rows"] if r["method"] == method}
            if len(by) == 2:
                cells.append((by["nll"], by["kl"]))
        d = [k - n for n, k in cells]
        lines.append(f"| {method} | {statistics.mean(n for n, _ in cells):+.3f} | "
                     f"{statistics.mean(k for _, k in cells):+.3f} | {statistics.mean(d):+.3f}, {min(d):+.3f}, "
                     f"{max(d):+.3f} | {sum(x > 1e-9 for x in d)} / {sum(x < -1e-9 for x in d)} / "
                     f"{sum(abs(x) <= 1e-9 for x in d)} |")
    return "\n".join(lines) + "\n"


# ---- memory of the kl reference with a large vocabulary ---------------------------------------------
MEM = {"vocab": 128256, "hidden": 64, "layers": 2, "samples": 16, "seq_len": 128, "batch_size": 8}


def memory_child(metric: str) -> None:
    """One oracle (block granularity) with ``metric`` on a random 2-layer Llama with Llama 3's
    128,256-token vocabulary; prints JSON: peak RSS before and after, seconds, the reference's bytes."""
    import resource

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=MEM["vocab"], hidden_size=MEM["hidden"], intermediate_size=4 * MEM["hidden"],
                      num_hidden_layers=MEM["layers"], num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=MEM["seq_len"])
    lm = LoadedModel(LlamaForCausalLM(cfg).eval(), None, "causal-lm", Path("random-llama-128k-vocab"))
    windows = torch.randint(0, MEM["vocab"], (MEM["samples"], MEM["seq_len"]), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # one forward first, so that the "before" peak includes the logits of a batch
        lm.model(windows[: MEM["batch_size"]], use_cache=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.time()
    analyze(lm, "oracle", windows, granularity="block", samples=MEM["samples"], batch_size=MEM["batch_size"],
            causal_metric=metric, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"metric": metric, "peak_before": before, "peak": peak, "seconds": time.time() - t,
                      "reference_bytes": MEM["samples"] * MEM["seq_len"] * MEM["vocab"] * 4 if metric == "kl" else 0,
                      "batch_logits_bytes": MEM["batch_size"] * MEM["seq_len"] * MEM["vocab"] * 4}))


def memory(meta: dict, out: str) -> None:
    """memory_child for nll and kl, each in a fresh process (ru_maxrss is per process)."""
    import subprocess

    rows = []
    for metric in ("nll", "kl"):
        res = subprocess.run([sys.executable, __file__, "--memory-child", metric, "--threads", str(meta["threads"])],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    gib = 2 ** 30
    md = [f"# Memory of the analyzers' damage measure with a 128,256-token vocabulary ({meta['date']})", "",
          f"CPU: {meta['cpu']}, torch {meta['torch']}; command: `{meta['command']}`.", "",
          f"Oracle at block granularity on a random Llama (hidden {MEM['hidden']}, {MEM['layers']} layers, vocabulary "
          f"{MEM['vocab']:,}), {MEM['samples']} windows x {MEM['seq_len']} tokens, batch {MEM['batch_size']}. "
          "Peak RSS of the process after one forward (before) and after the analysis; kl keeps the reference logits, "
          "samples x seq_len x vocab float32.", "",
          "| metric | peak before GiB | peak after GiB | added GiB | reference GiB | one batch's logits GiB | s |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['metric']} | {r['peak_before'] / gib:.2f} | {r['peak'] / gib:.2f} | "
                  f"{(r['peak'] - r['peak_before']) / gib:.2f} | {r['reference_bytes'] / gib:.2f} | "
                  f"{r['batch_logits_bytes'] / gib:.2f} | {r['seconds']:.1f} |")
    (RESULTS / f"{out}.json").write_text(json.dumps({"meta": meta, "config": MEM, "rows": rows}, indent=1) + "\n")
    (RESULTS / f"{out}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="stories260k,tiny-random")
    ap.add_argument("--granularity", default="module,block")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="metric-cpu", help="results name under bench/results (.json and .md)")
    ap.add_argument("--memory", action="store_true",
                    help="instead: peak memory of nll vs kl with a 128k vocabulary (bench/results/OUT-memory.*)")
    ap.add_argument("--memory-child", choices=("nll", "kl"), help=argparse.SUPPRESS)
    ap.add_argument("--render", action="store_true", help="rewrite OUT.md from OUT.json (no measuring)")
    args = ap.parse_args()
    if args.memory_child:
        torch.set_num_threads(args.threads)
        return memory_child(args.memory_child)
    if args.render:
        saved = json.loads((RESULTS / f"{args.out}.json").read_text())
        md = markdown(saved["meta"], saved["results"])
        (RESULTS / f"{args.out}.md").write_text(md)
        return print(md)
    if shared_data_dir() is None:
        raise SystemExit("needs ../shared/data (set COMPRESS_DATA)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    meta = {"date": datetime.now().isoformat(timespec="seconds"), "cpu": cpu_name(), "threads": args.threads,
            "torch": torch.__version__, "command": "python bench/metric.py " + " ".join(sys.argv[1:]),
            "load_start": [round(x, 1) for x in os.getloadavg()]}
    start, results = time.time(), []
    RESULTS.mkdir(exist_ok=True)
    if args.memory:
        return memory(meta, f"{args.out}-memory")
    for g in args.granularity.split(","):  # granularity outermost: module (the informative one) first
        for m in args.models.split(","):
            results.append(run(m, g, args.seeds))
            # Written after every model x granularity, so an interrupted sweep keeps what it measured.
            meta["seconds"] = time.time() - start
            meta["load_end"] = [round(x, 1) for x in os.getloadavg()]
            (RESULTS / f"{args.out}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
            md = markdown(meta, results)
            (RESULTS / f"{args.out}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
