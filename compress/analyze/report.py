"""How well each analyzer predicts the oracle: Spearman rank correlation and run time."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import CompressError
from ..models import LoadedModel
from .api import analyze
from .base import REGISTRY, Sensitivity


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation of paired values (Pearson correlation of their ranks); NaN if
    either side is constant."""
    if len(a) != len(b):
        raise CompressError(f"spearman needs paired values, got {len(a)} and {len(b)}")
    ra, rb = ranks(a), ranks(b)
    n = len(ra)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else float("nan")


def agreement(sens: Sensitivity, truth: Sensitivity, bits: int | None = None) -> float:
    """Spearman of ``sens`` against ``truth`` over their units: scores, or damage at ``bits``."""
    if set(sens.scores) != set(truth.scores):
        raise CompressError(f"{sens.method} and {truth.method} scored different units")
    units = list(truth.scores)
    if bits is None:
        return spearman([sens.scores[u] for u in units], [truth.scores[u] for u in units])
    return spearman([sens.damage[u][bits] for u in units], [truth.damage[u][bits] for u in units])


def analyzer_report(loaded: LoadedModel, texts: list[str] | torch.Tensor, methods: Sequence[str] | None = None,
                    granularity: str = "block", oracle_texts: list[str] | torch.Tensor | None = None,
                    options: dict[str, dict] | None = None, **common) -> list[dict]:
    """Run the oracle and each method; one row per method, oracle first.

    methods: registered names (default: every one but the oracle). oracle_texts: the oracle's data
    (default ``texts``). options: per-method config overrides ({"tdmpq": {"probes": 5}}, {"oracle":
    {"samples": 128}}); common: overrides for every method (samples, seq_len, seed, ...).
    Row keys: method, granularity, spearman (scores vs the oracle's damage at the narrowest width),
    spearman_8bit (damage at 8 bits vs the oracle's, for methods that predict damage, else None),
    seconds, samples, units, sensitivity (the Sensitivity itself).
    """
    options = options or {}
    methods = [m for m in REGISTRY if m != "oracle"] if methods is None else list(methods)
    unknown = sorted(set(methods) - set(REGISTRY))
    if unknown:
        raise CompressError(f"unknown sensitivity method(s) {unknown} (known: {', '.join(sorted(REGISTRY))})")
    truth = analyze(loaded, "oracle", texts if oracle_texts is None else oracle_texts,
                    granularity=granularity, **{**common, **options.get("oracle", {})})
    rows = []
    for method in ["oracle"] + [m for m in methods if m != "oracle"]:
        sens = truth if method == "oracle" else analyze(loaded, method, texts, granularity=granularity,
                                                         **{**common, **options.get(method, {})})
        both8 = sens.damage is not None and 8 in sens.provenance["config"]["bits"] \
            and 8 in truth.provenance["config"]["bits"]
        rows.append({"method": method, "granularity": granularity, "spearman": agreement(sens, truth),
                     "spearman_8bit": agreement(sens, truth, 8) if both8 else None,
                     "seconds": sens.provenance["seconds"], "samples": sens.provenance["samples"],
                     "units": len(sens.units), "sensitivity": sens})
    return rows


def format_report(rows: list[dict]) -> str:
    """A terminal table of analyzer_report rows."""
    head = f"{'method':<8} {'gran':<6} {'units':>5} {'samples':>7} {'spearman':>9} {'sp@8bit':>8} {'seconds':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        sp8 = "" if r["spearman_8bit"] is None else f"{r['spearman_8bit']:.3f}"
        lines.append(f"{r['method']:<8} {r['granularity']:<6} {r['units']:>5} {r['samples']:>7} "
                     f"{r['spearman']:>9.3f} {sp8:>8} {r['seconds']:>8.1f}")
    return "\n".join(lines)
