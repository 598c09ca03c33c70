"""From a Sensitivity to a Plan: candidate storages per unit, their bytes and predicted damage.

Accounting (the same for every budget form): a quantized layer costs its stored bytes (codes,
scales and zero points: compress.quant.stored_bytes); a layer left at 16 bits and every tensor
outside the quantizable layers (embeddings, norms, biases, heads) cost 2 bytes a value, i.e. the
model as it would be stored in fp16.

    avg_bits   8 · bytes of the quantizable layers / their weights       (<= the budget)
    max_bytes  bytes of the whole model                                  (<= the budget)
    ratio      fp16 bytes of the whole model / bytes of the whole model  (>= the budget)

Predicted damage of a unit at a width: the analyzer's own per-width damage when it measures one
(oracle, taylor, fisher); otherwise its score times the unit's relative quantization noise at that
width, ‖W − Q(W)‖² / ‖W‖² summed over its layers (cmpq, pmpq, tdmpq only rank units).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from .errors import CompressError
from .plan import LayerPlan, Plan, fit_group
from .quant import fake_quantize, stored_bytes
from .solve import Choice, kmeans_bits, solve_budget

CANDIDATE_BITS = (4, 8, 16)


def parse_bytes(text: str | int | float) -> int:
    """'12MB', '1.5GiB', '300000' -> bytes (decimal units for kB/MB/GB, binary for KiB/MiB/GiB)."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKMGT]i?B|B)?\s*", text)
    if not m:
        raise CompressError(f"cannot read {text!r} as a size (examples: 12MB, 1.5GiB, 300000)")
    scale = {None: 1, "B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
             "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
    if m.group(2) not in scale:
        raise CompressError(f"unknown size unit in {text!r}")
    return int(float(m.group(1)) * scale[m.group(2)])


def layer_spec(bits: int, group_size: int, symmetric: bool, in_features: int) -> LayerPlan:
    """The LayerPlan of a candidate width for one layer (int4 pads ragged in_features)."""
    if bits == 4:
        group = fit_group(group_size, in_features)
        return LayerPlan(4, group, symmetric, pad_to_group=group != -1 and in_features % group != 0)
    return LayerPlan(bits)


def unit_bytes(layers: list[nn.Linear], bits: int, group_size: int, symmetric: bool) -> int:
    """Bytes of a unit's weights at a candidate width (16 bits: 2 bytes a weight)."""
    return sum(stored_bytes(layer_spec(bits, group_size, symmetric, m.in_features).spec(), m.out_features,
                            m.in_features) for m in layers)


@torch.no_grad()
def relative_noise(layers: list[nn.Linear], bits: int, group_size: int, symmetric: bool) -> float:
    """‖W − Q(W)‖² / ‖W‖² over a unit's layers at a candidate width (0 at 16 bits)."""
    if bits == 16:
        return 0.0
    err = norm = 0.0
    for m in layers:
        spec = layer_spec(bits, group_size, symmetric, m.in_features).spec()
        w = m.weight.float()
        err += (w - fake_quantize(w, spec)).pow(2).sum().item()
        norm += w.pow(2).sum().item()
    return err / max(norm, 1e-30)


def fixed_bytes(model: nn.Module, quantizable: dict[str, nn.Linear]) -> int:
    """fp16 bytes of everything except the quantizable layers' weights (tied tensors once)."""
    skip = {id(m.weight) for m in quantizable.values()}
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in skip or id(p) in seen:
            continue
        seen.add(id(p))
        total += 2 * p.numel()
    return total


def budget_bytes(budget: dict, fixed: int, params: int, total_params: int) -> int:
    """The byte cap on the quantizable layers that a budget means (see the module docstring)."""
    (kind, value), = budget.items()
    if kind == "avg_bits":
        return int(float(value) * params / 8)
    if kind == "max_bytes":
        return parse_bytes(value) - fixed
    if kind == "ratio":
        if float(value) <= 0:
            raise CompressError(f"ratio must be positive, got {value}")
        return int(2 * total_params / float(value)) - fixed
    raise CompressError(f"unknown budget {kind!r} (use avg_bits, max_bytes or ratio)")


def describe_range(budget: dict, least: int, most: int, fixed: int, params: int, total_params: int) -> str:
    """The feasible range of a budget, in the budget's own unit."""
    (kind, _), = budget.items()
    if kind == "avg_bits":
        return f"avg_bits from {8 * least / params:.3f} (all 4-bit) to {8 * most / params:.3f} (all 16-bit)"
    if kind == "max_bytes":
        return f"max_bytes from {least + fixed:,} to {most + fixed:,}"
    return f"ratio from {2 * total_params / (most + fixed):.3f} to {2 * total_params / (least + fixed):.3f}"


def plan_from_sensitivity(model: nn.Module, quantizable: dict[str, nn.Linear], sens,
                          budget: dict | None = None, group_size: int = 32,
                          symmetric: bool = False) -> tuple[Plan, dict[str, int]]:
    """Bits per unit from a Sensitivity; with ``budget`` the exact knapsack, else k-means.

    Returns the plan (every quantizable layer listed) and the chosen bits per unit.
    """
    units = sens.units
    unknown = [n for names in units.values() for n in names if n not in quantizable]
    if unknown:
        raise CompressError(f"sensitivity scores layers the model does not quantize: {unknown[:3]}")
    members = {u: [quantizable[n] for n in names] for u, names in units.items()}
    if sum(len(ls) for ls in members.values()) != len(quantizable):
        raise CompressError(f"the scored units cover {sum(len(ls) for ls in members.values())} layers, the model "
                            f"quantizes {len(quantizable)}; re-run the analyzer with the same exclusions")
    params = sum(m.in_features * m.out_features for m in quantizable.values())
    if budget is None:
        chosen = kmeans_bits(sens.scores, CANDIDATE_BITS)
    else:
        damage = sens.damage
        options = {}
        for u, layers in members.items():
            score = max(sens.scores[u], 0.0)
            options[u] = [
                Choice(b, unit_bytes(layers, b, group_size, symmetric),
                       (damage[u].get(b, damage[u].get(str(b), 0.0)) if damage else
                        score * relative_noise(layers, b, group_size, symmetric)) if b != 16 else 0.0)
                for b in CANDIDATE_BITS
            ]
        fixed = fixed_bytes(model, quantizable)
        total_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        cap = budget_bytes(budget, fixed, params, total_params)
        least = sum(min(c.nbytes for c in o) for o in options.values())
        most = sum(max(c.nbytes for c in o) for o in options.values())
        if not least <= cap <= most:
            raise CompressError(f"budget {budget} is infeasible for this model: "
                                + describe_range(budget, least, most, fixed, params, total_params))
        chosen = {u: c.bits for u, c in solve_budget(options, cap).items()}
    layers = {}
    for u, names in units.items():
        for n in names:
            layers[n] = layer_spec(chosen[u], group_size, symmetric, quantizable[n].in_features)
    return Plan(layers=layers, budget=budget), chosen


def plan_table(sens, chosen: dict[str, int]) -> str:
    """unit | weights | score | bits, one row per unit in model order."""
    width = max(len(u) for u in sens.units)
    rows = [f"  {'unit':<{width}}  {'weights':>10}  {'score':>10}  bits"]
    for u in sens.units:
        rows.append(f"  {u:<{width}}  {sens.params[u]:>10,d}  {sens.scores[u]:>10.4g}  {chosen[u]:>4}")
    return "\n".join(rows)


def plot_plan(sens, chosen: dict[str, int], path: str | Path) -> Path | None:
    """A PNG of score (bars) and chosen bits (steps) per unit; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    units = list(sens.units)
    x = range(len(units))
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(units)), 4))
    ax.bar(x, [sens.scores[u] for u in units], color="#7aa6c2", label=f"{sens.method} score")
    ax.set_ylabel("sensitivity score")
    ax.set_xticks(list(x), units, rotation=90, fontsize=7)
    ax2 = ax.twinx()
    ax2.step(list(x), [chosen[u] for u in units], where="mid", color="#c0392b", label="bits")
    ax2.set_ylabel("bits")
    ax2.set_yticks(CANDIDATE_BITS)
    ax2.set_ylim(0, 17)
    ax.set_title(f"{sens.method} ({sens.granularity}): score and chosen bits per unit")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
