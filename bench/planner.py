"""Does sensitivity planning beat simple plans at equal bytes? MiniLM and stories260K, on the CPU.

For each budget (average bits per quantizable weight, scales and zero points included) the
planned model's metric is compared with: uniform int4 g32, the median and best of 20 random plans
of the same size, the paper's heuristic (the first and last 30 % of blocks at int8), the first and
last block at int8, and the best pair of blocks at int8 found by trying every pair. Plans are
evaluated with fake quantization (QuantLinear's exact numerics, weights quantized in place).

Metrics: MiniLM 1 − mean cosine of mean-pooled embeddings vs fp32 on WikiText-2 lines (128
tokens); stories260K mean KL(fp32 ‖ quantized) on sequences sampled from the fp32 model.
Calibration for the analyzers uses different texts (other WikiText-2 lines; other samples).

    python bench/planner.py [--quick] [--methods oracle,taylor,...]
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

from compress.analyze import analyze
from compress.data import load_texts, shared_data_dir
from compress.errors import CompressError
from compress.evaluate import embedding_fidelity, lm_metrics, pooled_embeddings, sample_sequences
from compress.models import load_model, quantizable_linears
from compress.planner import budget_bytes, layer_spec, plan_from_sensitivity, unit_bytes
from compress.quant import fake_quantize
from compress.models import block_stack

from _common import cpu_name, markdown_table  # noqa: E402  (bench/ is the script's directory)

RESULTS = Path(__file__).parent / "results"
GROUP = 32


class Bench:
    """One model: its quantizable layers, originals to restore, and the metric of a bit assignment."""

    def __init__(self, name: str, quick: bool):
        data = shared_data_dir()
        self.name = name
        if name == "MiniLM":
            self.lm = load_model("minilm")
            lines = [t for t in load_texts(data / "text" / "wikitext2-test.txt") if not t.startswith("=")]  # no headings
            self.eval_texts = lines[: 128 if quick else 512]
            self.calib = lines[1000:1128]
            self.ref = pooled_embeddings(self.lm.model, self.lm.tokenizer, self.eval_texts)
        else:
            from compress.llama2c import stories260k_dir

            self.lm = load_model(stories260k_dir())
            torch.manual_seed(0)
            self.eval_ids = sample_sequences(self.lm.model, 16 if quick else 64, 256, seed=0)
            self.calib = sample_sequences(self.lm.model, 64, 256, seed=1)
            self.ref_model = load_model(stories260k_dir()).model
        self.layers = quantizable_linears(self.lm.model)
        self.orig = {n: m.weight.data.clone() for n, m in self.layers.items()}
        stack = block_stack(self.lm.model)
        blocks_name, blocks = stack.name, stack.modules
        self.blocks = [[n for n in self.layers if n.startswith(f"{blocks_name}.{i}.")] for i in range(len(blocks))]
        self.params = sum(m.weight.numel() for m in self.layers.values())

    def metric(self, bits: dict[str, int]) -> float:
        """Metric of the model with each layer at bits[name] (4 = int4 g32 asym, 8, 16)."""
        for n, m in self.layers.items():
            spec = layer_spec(bits[n], GROUP, False, m.in_features).spec()
            m.weight.data.copy_(fake_quantize(self.orig[n], spec))
        try:
            with torch.no_grad():
                if self.name == "MiniLM":
                    emb = pooled_embeddings(self.lm.model, self.lm.tokenizer, self.eval_texts)
                    return embedding_fidelity(self.ref, emb)["one_minus_cosine"]
                return lm_metrics(self.lm.model, self.eval_ids, self.ref_model)["mean_kl"]
        finally:
            for n, m in self.layers.items():
                m.weight.data.copy_(self.orig[n])

    def avg_bits(self, bits: dict[str, int]) -> float:
        return 8 * sum(unit_bytes([self.layers[n]], bits[n], GROUP, False) for n in self.layers) / self.params

    def cap(self, avg_bits: float) -> int:
        return budget_bytes({"avg_bits": avg_bits}, 0, self.params, self.params)

    def blocks_at_8(self, chosen: list[int]) -> dict[str, int]:
        bits = {n: 4 for n in self.layers}
        for i in chosen:
            bits.update({n: 8 for n in self.blocks[i]})
        return bits

    def random_plan(self, avg_bits: float, rng: random.Random) -> dict[str, int]:
        """Random per-layer widths filling the budget: random layers upgraded while they fit."""
        bits = {n: 4 for n in self.layers}
        cap = self.cap(avg_bits)
        used = sum(unit_bytes([m], 4, GROUP, False) for m in self.layers.values())
        for n in rng.sample(list(self.layers), len(self.layers)):
            b = rng.choice((8, 16))
            extra = unit_bytes([self.layers[n]], b, GROUP, False) - unit_bytes([self.layers[n]], 4, GROUP, False)
            if used + extra <= cap:
                bits[n], used = b, used + extra
        return bits


def run_model(name: str, methods: list[str], budgets: list[float], quick: bool) -> list[dict]:
    b = Bench(name, quick)
    rows = []

    def add(label, bits, **extra):
        t = time.time()
        rows.append({"model": name, "plan": label, "avg_bits": round(b.avg_bits(bits), 3),
                     "metric": b.metric(bits), **extra})
        print(rows[-1], f"({time.time() - t:.0f}s)", flush=True)
        return rows[-1]["metric"]

    add("uniform int4 g32", {n: 4 for n in b.layers})
    add("uniform int8", {n: 8 for n in b.layers})
    nb = len(b.blocks)
    add("first+last block int8", b.blocks_at_8([0, nb - 1]))
    k = max(1, round(0.3 * nb))
    add(f"first+last 30% blocks int8 ({k}+{k})", b.blocks_at_8(list(range(k)) + list(range(nb - k, nb))))
    pairs = {pair: b.metric(b.blocks_at_8(list(pair))) for pair in itertools.combinations(range(nb), 2)}
    best_pair = min(pairs, key=pairs.get)
    add(f"best pair of blocks int8 {best_pair}", b.blocks_at_8(list(best_pair)))
    for budget in budgets:
        rng = random.Random(0)
        rand = [b.metric(b.random_plan(budget, rng)) for _ in range(6 if quick else 20)]
        rows.append({"model": name, "plan": f"random plans @ {budget} bits", "avg_bits": budget,
                     "metric": statistics.median(rand), "best_random": min(rand), "n_random": len(rand)})
        print(rows[-1], flush=True)
    for method in methods:
        for gran in ("module", "block"):
            t = time.time()
            sens = analyze(b.lm, method, b.calib, granularity=gran,
                           group_size=GROUP, samples=min(64, len(b.calib)), progress=False)
            secs = time.time() - t
            for budget in budgets:
                try:
                    plan, chosen = plan_from_sensitivity(b.lm.model, b.layers, sens, {"avg_bits": budget}, GROUP, False)
                except CompressError as exc:  # an infeasible budget at this granularity: report, go on
                    print(f"{method}/{gran} @ {budget}: {exc}")
                    continue
                bits = {n: lp.bits for n, lp in plan.layers.items()}
                add(f"{method} ({gran}) @ {budget}", bits, analyzer_seconds=round(secs, 1))
    return rows


PLANNER_COLS = ["model", "plan", "avg_bits", "metric", "best_random", "analyzer_seconds"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default="MiniLM,stories260K")
    ap.add_argument("--methods", default="oracle,taylor,fisher,pmpq,tdmpq,cmpq")
    ap.add_argument("--budgets", default="5.0,6.0")
    args = ap.parse_args()
    if shared_data_dir() is None:
        print("needs ../shared/data (or COMPRESS_DATA)", file=sys.stderr)
        return 2
    budgets = [float(x) for x in args.budgets.split(",")]
    rows = []
    for name in args.models.split(","):
        rows += run_model(name, args.methods.split(","), budgets, args.quick)
    header = (f"Planner at equal bytes, {date.today()}, CPU: {cpu_name()}, torch {torch.__version__}; "
              f"metric: MiniLM 1-cos, stories260K KL; command: python bench/planner.py "
              f"{' '.join(sys.argv[1:])}")
    RESULTS.mkdir(exist_ok=True)
    stem = "planner-cpu-" + "-".join(m.lower() for m in args.models.split(",")) + ("-quick" if args.quick else "")
    if args.budgets != "5.0,6.0":  # never overwrite the default run's results
        stem += "-" + args.budgets.replace(",", "-").replace(".", "")
    (RESULTS / f"{stem}.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown_table(rows, PLANNER_COLS, header))
    print(markdown_table(rows, PLANNER_COLS, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
