"""Turning per-unit sensitivity into bits: CPTQuant's k-means mode and an exact budget solver.

A *unit* is what an analyzer scores (a transformer block, or one linear layer). Each unit has a
few candidate storages (int4 at a few groups / int8 / 16-bit), each with a byte cost and a predicted damage.

Budget mode solves the multiple-choice knapsack exactly: pick one candidate per unit to minimise
the summed predicted damage with the summed bytes under the budget. With three candidates a unit,
the set of non-dominated (bytes, damage) partial solutions stays small, so a dynamic programme over
that Pareto frontier is exact without discretising bytes. Because the optimum under a larger budget
is searched over a superset of choices, more budget never gives a worse predicted plan.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import CompressError


@dataclass(frozen=True)
class Choice:
    """One candidate storage for one unit: its bits, bytes and predicted damage; scheme: the full
    storage (bits, group_size, symmetric) when a unit has several candidates of one width."""

    bits: int
    nbytes: int
    damage: float
    scheme: tuple | None = None


def solve_budget(options: dict[str, list[Choice]], max_bytes: int) -> dict[str, Choice]:
    """The minimum-damage choice per unit whose bytes sum to at most ``max_bytes``.

    options: unit -> its candidates (any order). The budget must be feasible (the smallest
    candidates fit): compress.planner.check_feasible says so to the user, in the budget's own
    unit, before any analysis; here an infeasible call is a programming error (ValueError).
    """
    units = list(options)
    if not units:
        raise CompressError("nothing to plan: no units were scored")
    least = sum(min(c.nbytes for c in options[u]) for u in units)
    if least > max_bytes:
        raise ValueError(f"solve_budget: {max_bytes:,} bytes is below the smallest plan ({least:,} bytes)")
    # One frontier per unit processed: arrays of bytes, damage, index into the previous frontier
    # and choice, sorted by bytes with strictly falling damage. Back-pointers keep memory linear.
    frontiers = [(np.zeros(1, np.int64), np.zeros(1), np.full(1, -1), np.full(1, -1))]
    rest_min = [sum(min(c.nbytes for c in options[v]) for v in units[i + 1:]) for i in range(len(units))]
    for i, u in enumerate(units):
        fb, fd = frontiers[-1][0], frontiers[-1][1]
        nb = np.concatenate([fb + c.nbytes for c in options[u]])
        dmg = np.concatenate([fd + c.damage for c in options[u]])
        parent = np.tile(np.arange(len(fb)), len(options[u]))
        choice = np.repeat(np.arange(len(options[u])), len(fb))
        ok = nb + rest_min[i] <= max_bytes  # can still be completed within the budget
        nb, dmg, parent, choice = nb[ok], dmg[ok], parent[ok], choice[ok]
        order = np.lexsort((dmg, nb))
        nb, dmg, parent, choice = nb[order], dmg[order], parent[order], choice[order]
        best_before = np.concatenate([[np.inf], np.minimum.accumulate(dmg)[:-1]])
        keep = dmg < best_before
        frontiers.append((nb[keep], dmg[keep], parent[keep], choice[keep]))
    idx = int(np.argmin(frontiers[-1][1]))
    picks: dict[str, Choice] = {}
    for i in range(len(units), 0, -1):
        picks[units[i - 1]] = options[units[i - 1]][int(frontiers[i][3][idx])]
        idx = int(frontiers[i][2][idx])
    return {u: picks[u] for u in units}


def kmeans_1d(values: list[float], k: int = 3, iters: int = 100) -> list[int]:
    """Cluster labels of 1-D values, relabelled so that label 0 has the smallest centroid.

    Lloyd's algorithm from quantile starts (deterministic). CPTQuant's released code leaves the
    labels unordered, which makes its bit assignment random with respect to sensitivity; here the
    order is part of the contract.
    """
    n = len(values)
    if n < k:
        raise CompressError(f"k-means with {k} clusters needs at least {k} scored units, got {n}")
    srt = sorted(values)
    centroids = [srt[min(n - 1, int((i + 0.5) * n / k))] for i in range(k)]
    labels = [0] * n
    for _ in range(iters):
        new = [min(range(k), key=lambda c: abs(v - centroids[c])) for v in values]
        for c in range(k):
            members = [v for v, lab in zip(values, new) if lab == c]
            if members:
                centroids[c] = sum(members) / len(members)
        if new == labels:
            break
        labels = new
    order = sorted(range(k), key=lambda c: centroids[c])
    rank = {c: r for r, c in enumerate(order)}
    return [rank[lab] for lab in labels]


def kmeans_bits(scores: dict[str, float], bits: tuple[int, ...] = (4, 8, 16)) -> dict[str, int]:
    """CPTQuant's mode: 3 clusters of scores; the most sensitive cluster gets the most bits."""
    units = list(scores)
    labels = kmeans_1d([scores[u] for u in units], k=len(bits))
    return {u: sorted(bits)[lab] for u, lab in zip(units, labels)}
