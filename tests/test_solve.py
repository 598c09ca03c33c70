import itertools
import random

import pytest

from compress.errors import CompressError
from compress.solve import Choice, kmeans_1d, kmeans_bits, solve_budget


def _random_options(rng, n_units):
    opts = {}
    for u in range(n_units):
        params = rng.randint(10, 1000)
        sens = rng.random() * 10
        opts[f"u{u}"] = [Choice(b, params * b // 8 + rng.randint(0, 5), sens * {4: 1.0, 8: 0.05, 16: 0.0}[b]
                                * rng.uniform(0.5, 1.5)) for b in (4, 8, 16)]
    return opts


def _brute(opts, budget):
    best = None
    units = list(opts)
    for combo in itertools.product(*(opts[u] for u in units)):
        if sum(c.nbytes for c in combo) <= budget:
            d = sum(c.damage for c in combo)
            if best is None or d < best - 1e-12:
                best = d
    return best


@pytest.mark.parametrize("seed", range(8))
def test_exact_against_brute_force(seed):
    rng = random.Random(seed)
    opts = _random_options(rng, 7)
    lo = sum(min(c.nbytes for c in o) for o in opts.values())
    hi = sum(max(c.nbytes for c in o) for o in opts.values())
    for frac in (0.0, 0.2, 0.5, 0.8, 1.0):
        budget = int(lo + frac * (hi - lo))
        sol = solve_budget(opts, budget)
        assert sum(c.nbytes for c in sol.values()) <= budget
        assert sum(c.damage for c in sol.values()) == pytest.approx(_brute(opts, budget))


def test_more_budget_never_worse():
    rng = random.Random(42)
    opts = _random_options(rng, 40)
    lo = sum(min(c.nbytes for c in o) for o in opts.values())
    hi = sum(max(c.nbytes for c in o) for o in opts.values())
    prev = float("inf")
    for budget in list(range(lo, hi, max(1, (hi - lo) // 50))) + [hi]:
        d = sum(c.damage for c in solve_budget(opts, budget).values())
        assert d <= prev + 1e-12
        prev = d
    assert prev == pytest.approx(0.0)  # everything at 16 bits at the top of the range


def test_infeasible_is_a_caller_error():
    # The user-facing range message belongs to planner.check_feasible (tests/test_planner.py).
    opts = {"a": [Choice(4, 50, 1.0), Choice(8, 100, 0.1)], "b": [Choice(4, 20, 1.0)]}
    with pytest.raises(ValueError, match=r"69 bytes is below the smallest plan \(70 bytes\)"):
        solve_budget(opts, 69)


def _byte_dp(opts, budget):
    """Classic knapsack over every byte count 0..budget: an independent exact optimum."""
    import numpy as np

    best = np.zeros(budget + 1)
    for cands in opts.values():
        nxt = np.full(budget + 1, np.inf)
        for c in cands:
            if c.nbytes <= budget:
                nxt[c.nbytes:] = np.minimum(nxt[c.nbytes:], best[: budget + 1 - c.nbytes] + c.damage)
        best = nxt
    return float(best[budget])


def test_large_problem_is_exact():
    # 300 units: far past brute force; the Pareto solver must equal an exact byte-indexed DP.
    rng = random.Random(0)
    opts = _random_options(rng, 300)
    lo = sum(min(c.nbytes for c in o) for o in opts.values())
    for budget in (lo, lo * 3 // 2, lo * 2):
        sol = solve_budget(opts, budget)
        assert sum(c.nbytes for c in sol.values()) <= budget
        assert sum(c.damage for c in sol.values()) == pytest.approx(_byte_dp(opts, budget), rel=1e-9, abs=1e-12)


def test_kmeans_sorted_labels():
    vals = [0.1, 5.0, 0.2, 9.0, 5.2, 0.15, 9.3]
    assert kmeans_1d(vals) == [0, 1, 0, 2, 1, 0, 2]
    bits = kmeans_bits({f"u{i}": v for i, v in enumerate(vals)})
    assert bits == {"u0": 4, "u1": 8, "u2": 4, "u3": 16, "u4": 8, "u5": 4, "u6": 16}
    with pytest.raises(CompressError, match="at least 3"):
        kmeans_1d([1.0, 2.0])
