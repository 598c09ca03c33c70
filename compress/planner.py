"""Every way to build a plan: uniform, from a profile, from a Sensitivity under a budget.

Accounting (the same for every budget form): a layer costs the bytes its target stores
(compress.servable.layer_bytes: compress's codes, scales and zero points, or under --target gguf
the GGUF file's blocks, Q4_0 18 / Q4_1 20 / Q8_0 34 bytes per 32 weights); a layer left at 16
bits and every tensor outside the quantizable layers (embeddings, norms, biases, heads) cost 2
bytes a value, i.e. the model as it would be stored in fp16 (under gguf norms and biases 4: the
file keeps them F32; compress.servable.unquantized_bytes). The plan records the total it counted
(``Plan.counted_bytes``, shown by ``compress plan``).

    avg_bits   8 · bytes of the quantizable layers / their weights       (<= the budget)
    max_bytes  bytes of the whole model                                  (<= the budget)
    ratio      fp16 bytes of the whole model / bytes of the whole model  (>= the budget)

Candidates of a budgeted plan, per unit: int4 at groups 128 / 64 / 32, symmetric and asymmetric
(only the group / symmetry given when --group-size / --symmetric / --asymmetric fix one), int8
per channel, 16 bits; the exact knapsack picks one per unit, so budgets between 4.1 and 8 bits are
spent finely. Predicted damage of a unit at a candidate (scheme_damage): the analyzer's own
per-width damage when it measures one (oracle, taylor, fisher), measured at int4 group 32
asymmetric and int8, scaled to the candidate by the layers' error ratio, priced for the quantizer
that will run (GPTQ's Hessian-weighted error when the plan's quantizer is gptq:
compress.pricing); otherwise (cmpq, pmpq, tdmpq only rank units) its score times the unit's
relative quantization noise ‖W − Q(W)‖² / ‖W‖² at that candidate.

Defaults (documented once, here): a uniform plan is int4 group 128 asymmetric; a sensitivity
plan scores with ``fisher`` at module granularity when a budget is given without a method; the
analyzers measure int4 at group 32 asymmetric; the k-means plan (no budget) uses that int4.
"""
from __future__ import annotations

import re
import tomllib
from importlib import resources
from pathlib import Path

from torch import nn

from .checks import expect, expect_keys
from .errors import CompressError
from .models import linear_shape
from .plan import LayerPlan, Plan, check_budget_section
from .quant import DEFAULT_GROUP
from .servable import (check_target, default_target, fit_spec, fused_groups, group_problem, layer_bytes,
                       unquantized_bytes)
from .solve import Choice, kmeans_bits, solve_budget

Scheme = tuple[int, int, bool]  # (bits, group_size, symmetric), as compress.pricing

CANDIDATE_BITS = (4, 8, 16)
UNIFORM_GROUP = DEFAULT_GROUP[4]  # 128
PLANNED_GROUP = 32  # the int4 scheme the analyzers measure damage at (with int8)
GROUP_CANDIDATES = (128, 64, 32)  # int4 groups a budgeted plan chooses among, unless --group-size fixes one
PRICING_SAMPLES, PRICING_SEQ_LEN = 32, 128  # calibration of the GPTQ-priced errors (the analyzers' defaults)
DEFAULT_METHOD = "fisher"
DEFAULT_GRANULARITY = "module"
DAMAGE_METHODS = ("fisher", "taylor", "oracle")  # analyzers that predict damage per width
PROFILE_KEYS = {"bits", "group_size", "symmetric", "exclude", "include_heads", "description", "method",
                "budget", "max_bytes", "ratio", "granularity", "samples", "quantizer"}


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


def layer_spec(bits: int, group_size: int, symmetric: bool, in_features: int, target: str = "any") -> LayerPlan:
    """The LayerPlan of a candidate width for one layer under ``target`` (compress.servable.fit_spec
    decides groups and padding); a width the target cannot store falls back to 16 bits."""
    fitted = fit_spec(bits, group_size, symmetric, in_features, target)
    if fitted is None:
        return LayerPlan(16)
    spec, pad = fitted
    return LayerPlan(spec.bits, spec.group_size, spec.symmetric, pad_to_group=pad)


def candidate_schemes(group_size: int | None, symmetric: bool | None) -> list[Scheme]:
    """The storages a budgeted plan chooses among per unit, as (bits, group_size, symmetric): int4 at
    every group of GROUP_CANDIDATES (only ``group_size`` when given) and both symmetries (only
    ``symmetric`` when given), int8 per channel, 16 bits. Sorted from fewest bytes per weight."""
    groups = GROUP_CANDIDATES if group_size is None else (group_size,)
    syms = (True, False) if symmetric is None else (bool(symmetric),)
    return [(4, g, sy) for g in groups for sy in syms] + [(8, -1, True), (16, -1, True)]


def _fixed_schemes(group_size: int, symmetric: bool) -> list[Scheme]:
    return [(4, group_size, symmetric), (8, -1, True), (16, -1, True)]


def unit_options(layers: list[nn.Module], schemes: list[Scheme], target: str) -> list[tuple[Scheme, int]]:
    """(scheme, bytes) of every scheme all of a unit's layers can be
    stored in under ``target`` (a scheme that fits no differently from an earlier one, e.g. group 128
    and 64 on K = 64, is listed once). Tied layers (one weight) count once."""
    unique = list({id(m.weight): m for m in layers}.values())
    out, seen = [], set()
    for sc in schemes:
        lps = {id(m): layer_spec(sc[0], sc[1], sc[2], linear_shape(m)[1], target) for m in unique}
        if any(lp.bits != sc[0] for lp in lps.values()):
            continue
        key = tuple((lp.bits, lp.group_size, lp.symmetric, lp.pad_to_group) for lp in lps.values())
        if key in seen:
            continue
        seen.add(key)
        nbytes = sum(layer_bytes(lps[id(m)].spec(), *linear_shape(m), target) for m in unique)
        out.append((sc, nbytes))
    return out


def unit_bytes(layers: list[nn.Module], bits: int, group_size: int, symmetric: bool, target: str = "any") -> int:
    """Bytes of a unit's weights at a candidate width under ``target`` (layer_bytes; 16 bits: 2
    bytes a weight); a head tied to a table in the unit shares its tensor and costs nothing more."""
    total = 0
    for m in {id(m.weight): m for m in layers}.values():
        n, k = linear_shape(m)
        total += layer_bytes(layer_spec(bits, group_size, symmetric, k, target).spec(), n, k, target)
    return total


def fixed_bytes(model: nn.Module, quantizable: dict[str, nn.Module], target: str = "any") -> int:
    """Bytes of everything except the quantizable layers' weights, as ``target`` keeps it
    (compress.servable.unquantized_bytes; tied tensors once)."""
    skip = {id(m.weight) for m in quantizable.values()}
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in skip or id(p) in seen:
            continue
        seen.add(id(p))
        total += unquantized_bytes(p.numel(), p.dim(), target)
    return total


def counted_bytes(model: nn.Module, quantizable: dict[str, nn.Module], p: Plan, target: str) -> dict[str, int]:
    """The bytes the planner counts for plan ``p``: {"layers": the quantizable layers at their
    planned storage, "model": those plus fixed_bytes}, both under ``target`` (tied tensors once).
    What a budget is checked against, and under gguf the tensor bytes of the exported file."""
    layers, seen = 0, set()
    for name, m in quantizable.items():
        if id(m.weight) in seen:
            continue
        seen.add(id(m.weight))
        layers += layer_bytes(p.layers.get(name, p.default).spec(), *linear_shape(m), target)
    return {"layers": layers, "model": layers + fixed_bytes(model, quantizable, target)}


def budget_bytes(budget: dict, fixed: int, params: int, total_params: int) -> int:
    """The byte cap on the quantizable layers that a budget means (see the module docstring)."""
    scope = budget.get("scope", "linears")
    (kind, value), = ((k, v) for k, v in budget.items() if k != "scope")
    if kind == "avg_bits" and scope == "model":  # every weight of the model, fixed parts included
        return int(float(value) * total_params / 8) - fixed
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
    (kind, _), = ((k, v) for k, v in budget.items() if k != "scope")
    if kind == "avg_bits" and budget.get("scope") == "model":
        return (f"avg_bits over every weight from {8 * (least + fixed) / total_params:.3f} to "
                f"{8 * (most + fixed) / total_params:.3f}")
    if kind == "avg_bits":
        return f"avg_bits from {8 * least / params:.3f} (all 4-bit) to {8 * most / params:.3f} (all 16-bit)"
    if kind == "max_bytes":
        return f"max_bytes from {least + fixed:,} to {most + fixed:,}"
    return f"ratio from {2 * total_params / (most + fixed):.3f} to {2 * total_params / (least + fixed):.3f}"


def plan_from_sensitivity(model: nn.Module, quantizable: dict[str, nn.Module], sens,
                          budget: dict | None = None, group_size: int = 32,
                          symmetric: bool = False, target: str = "any",
                          errors: dict | None = None,
                          schemes: list[Scheme] | None = None) -> tuple[Plan, dict[str, int]]:
    """Bits per unit from a Sensitivity; with ``budget`` the exact knapsack, else k-means.

    group_size, symmetric: the int4 scheme the analyzer measured damage at (and the k-means
    plan's int4). schemes: the knapsack's candidates per unit (candidate_schemes; default that int4,
    int8 and 16). errors: layer -> compress.pricing.LayerErrors of every candidate, measured
    beforehand (with the quantizer's Hessian-weighted errors when it needs them; required when the
    layers' weights are not in memory, e.g. a streamed plan); default: plain RTN errors measured
    here. Damage per candidate: see scheme_damage.

    Under ``target`` "vllm" the shards vLLM fuses (q/k/v, gate/up) are planned as one unit (their
    damages and bytes summed), so they always share a scheme. Returns the plan (every quantizable
    layer listed, plus the choice per unit) and the chosen bits per unit.
    """
    units = _target_units(sens.units, target)
    unknown = [n for names in units.values() for n in names if n not in quantizable]
    if unknown:
        raise CompressError(f"sensitivity scores layers the model does not quantize: {unknown[:3]}")
    members = {u: [quantizable[n] for n in names] for u, names in units.items()}
    if sum(len(ls) for ls in members.values()) != len(quantizable):
        raise CompressError(f"the scored units cover {sum(len(ls) for ls in members.values())} layers, the model "
                            f"quantizes {len(quantizable)}; re-run the analyzer with the same exclusions")
    parts = _unit_parts(sens.units, units)
    if budget is None:
        scores = {u: max(sens.scores[p] for p in parts[u]) for u in units}
        chosen = kmeans_bits(scores, CANDIDATE_BITS)
        picked = {u: _fixed_schemes(group_size, symmetric)[CANDIDATE_BITS.index(b)] for u, b in chosen.items()}
    else:
        schemes = schemes or _fixed_schemes(group_size, symmetric)
        analyzer = (group_size, symmetric)
        measure = _with_analyzer_schemes(schemes, analyzer)
        if errors is None:
            from .pricing import plain_errors

            errors = {n: plain_errors(m, measure, target) for n, m in quantizable.items()}
        distinct = {p: _distinct(names, quantizable) for p, names in sens.units.items()}
        options = {}
        for u, layers in members.items():
            options[u] = [Choice(sc[0], nbytes, sum(scheme_damage(sens, p, sc, distinct[p], errors, analyzer)
                                                    for p in parts[u]), sc)
                          for sc, nbytes in unit_options(layers, schemes, target)]
        cap = check_feasible(model, quantizable, budget, group_size, symmetric, target, schemes)
        picked = {u: c.scheme for u, c in solve_budget(options, cap).items()}
        chosen = {u: sc[0] for u, sc in picked.items()}
    layers = {}
    for u, names in units.items():
        b, g, sy = picked[u]
        for n in names:
            layers[n] = layer_spec(b, g, sy, linear_shape(quantizable[n])[1], target)
    unit_plans = {u: LayerPlan(4, sc[1], sc[2]) if sc[0] == 4 else LayerPlan(sc[0]) for u, sc in picked.items()}
    return Plan(layers=layers, budget=budget, units=unit_plans, target=target), chosen


def _with_analyzer_schemes(schemes: list[Scheme], analyzer: tuple[int, bool]) -> list[Scheme]:
    """The quantized schemes to measure errors at: the candidates plus the analyzer's own."""
    # The analyzer's schemes first: compress.pricing runs the quantizer at each width's first one.
    return list(dict.fromkeys([(4, *analyzer), (8, -1, True)] + [sc for sc in schemes if sc[0] != 16]))


def _distinct(names: list[str], modules: dict[str, nn.Module]) -> list[str]:
    """names with tied layers (one weight) listed once."""
    return list({id(modules[n].weight): n for n in reversed(names)}.values())[::-1]


def scheme_damage(sens, unit: str, scheme: Scheme, names: list[str], errors: dict, analyzer: tuple[int, bool]) -> float:
    """Predicted damage of one scored unit (layers ``names``) stored as ``scheme``.

    Damage methods (fisher, taylor, oracle) measured D at the analyzer's scheme A of the same width
    (int4 at ``analyzer`` = (group, symmetric), or int8); another scheme S scales it by each layer's
    error ratio, weighted by the layers' shares of the plain error at A:

        D(S) = D(A) · Σ_l w_l r_l / Σ_l w_l,   w_l = ‖ΔW_l(A)‖²,
        r_l  = tr(ΔW_q(S) H ΔW_q(S)ᵀ) / tr(ΔW_rtn(A) H ΔW_rtn(A)ᵀ)   with the quantizer's H
             = ‖ΔW_l(S)‖² / ‖ΔW_l(A)‖²                          without one

    so GPTQ's repair is priced in (the knapsack does not buy bits where GPTQ already recovers them)
    and r = 1 for RTN at A itself. Rank-only methods (cmpq, pmpq, tdmpq): score · Σ ‖ΔW_l(S)‖² g_l /
    Σ ‖W_l‖², g_l = the quantizer's H-weighted error over RTN's at S (1 without H). 16 bits: 0.
    """
    bits = scheme[0]
    if bits == 16:
        return 0.0
    a = (4, *analyzer) if bits == 4 else (8, -1, True)
    num = den = 0.0
    for n in names:
        e = errors[n]
        if sens.damage:
            w = e.plain.get(a, 0.0)
            if e.quant_h and e.rtn_h.get(a):
                r = e.quant_h[scheme] / e.rtn_h[a]
            else:
                r = e.plain[scheme] / w if w else 1.0
            num, den = num + w * r, den + w
        else:
            g = e.quant_h[scheme] / e.rtn_h[scheme] if e.quant_h and e.rtn_h.get(scheme) else 1.0
            num, den = num + e.plain[scheme] * g, den + e.energy
    if sens.damage:
        return sens.damage[unit].get(bits, 0.0) * (num / den if den else 1.0)
    return max(sens.scores[unit], 0.0) * (num / den if den else 0.0)


def _target_units(units: dict[str, list[str]], target: str) -> dict[str, list[str]]:
    """The planner's units: the scored ones, with vLLM's fused shards merged under "vllm"."""
    if target != "vllm":
        return units
    owner = {n: u for u, names in units.items() for n in names}
    merged: dict[str, list[str]] = {u: list(names) for u, names in units.items()}
    for group in fused_groups(list(owner)):
        keep = owner[group[0]]
        for n in group[1:]:
            other = owner[n]
            if other != keep and other in merged:
                merged[keep].extend(merged.pop(other))
                for m in merged[keep]:
                    owner[m] = keep
    return merged


def _unit_parts(scored: dict[str, list[str]], units: dict[str, list[str]]) -> dict[str, list[str]]:
    """For each planner unit, the scored units it is made of."""
    owner = {n: u for u, names in scored.items() for n in names}
    return {u: sorted({owner[n] for n in names}, key=list(scored).index) for u, names in units.items()}


def _numel(m: nn.Module) -> int:
    n, k = linear_shape(m)
    return n * k


def check_feasible(model: nn.Module, quantizable: dict[str, nn.Module], budget: dict, group_size: int,
                   symmetric: bool, target: str = "any", schemes: list[Scheme] | None = None) -> int:
    """The byte cap of ``budget`` on the quantizable layers, or CompressError naming the feasible
    range (every layer at its smallest candidate scheme, ``schemes`` or the fixed int4 / int8 / 16,
    to every layer at 16 bits). Depends on shapes alone, so it runs before any analysis."""
    layers = list({id(m.weight): m for m in quantizable.values()}.values())  # tied tensors once
    params = sum(_numel(m) for m in layers)
    fixed = fixed_bytes(model, quantizable, target)
    total_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    cap = budget_bytes(budget, fixed, params, total_params)
    schemes = schemes or _fixed_schemes(group_size, symmetric)
    per_layer = [[nbytes for _sc, nbytes in unit_options([m], schemes, target)] for m in layers]
    least, most = sum(min(c) for c in per_layer), sum(max(c) for c in per_layer)
    if not least <= cap <= most:
        raise CompressError(f"budget {budget} is infeasible for this model: "
                            + describe_range(budget, least, most, fixed, params, total_params))
    return cap


def uniform_plan(quantizable: dict[str, nn.Module], bits: int, group_size: int = UNIFORM_GROUP,
                 symmetric: bool | None = None, target: str = "any") -> Plan:
    """Every quantizable layer at the same storage, listed explicitly so a person sees each one.

    Layers whose in_features the group size does not divide get ``pad_to_group`` (recorded in the
    plan, reported by ``compress plan``); layers no wider than one group get one group per row.
    """
    if bits not in (4, 8):
        raise CompressError(f"a uniform plan needs bits 4 or 8, got {bits}")
    sym = (bits != 4) if symmetric is None else symmetric
    if bits == 8 and not sym:
        raise CompressError("int8 is symmetric per output channel; --asymmetric applies to int4 only")
    why = group_problem(bits, group_size, target)  # the target's rule, from compress.servable
    if why:
        raise CompressError(why)
    return Plan(layers={name: layer_spec(bits, group_size, sym, linear_shape(m)[1], target)
                        for name, m in quantizable.items()}, target=target)


def load_profile(name_or_path: str) -> dict:
    """A named preset from profiles/ (shipped with the package) or a .toml file path, key-checked."""
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.is_file():
        text = path.read_text()
    else:
        pkg = resources.files("compress.profiles")
        entry = pkg / f"{name_or_path}.toml"
        if not entry.is_file():
            known = sorted(p.name[:-5] for p in pkg.iterdir() if p.name.endswith(".toml"))
            raise CompressError(f"unknown profile {name_or_path!r} (known: {', '.join(known)})")
        text = entry.read_text()
    try:
        preset = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CompressError(f"profile {name_or_path}: invalid TOML ({exc})") from None
    expect_keys(preset, PROFILE_KEYS, f"profile {name_or_path}")
    return preset


def make_budget(avg_bits: float | dict | None = None, max_bytes: str | int | None = None,
                ratio: float | None = None, scope: str | None = None) -> dict | None:
    """The plan's budget section from at most one form: average bits (or a whole section
    {"avg_bits" | "max_bytes" | "ratio": value}), ``max_bytes`` (may say '12MB'), or ``ratio``."""
    section = dict(avg_bits) if isinstance(avg_bits, dict) else (
        {"avg_bits": avg_bits} if avg_bits is not None else {})
    for key, value in (("max_bytes", max_bytes), ("ratio", ratio)):
        if value is not None:
            section[key] = value
    if not section:
        return None
    if len(set(section) - {"scope"}) > 1:
        raise CompressError(f"give one budget, not {len(section)}: {sorted(section)}")
    if isinstance(section.get("max_bytes"), str):
        section["max_bytes"] = parse_bytes(section["max_bytes"])
    if scope is not None:
        if "avg_bits" not in section:
            raise CompressError("--budget-scope applies to --budget (average bits); --max-bytes and --ratio "
                                "are whole-model budgets already")
        section["scope"] = scope
    return check_budget_section(section)


def build_plan(lm, *, model_name: str | None = None, bits: int | None = None, group_size: int | None = None,
               symmetric: bool | None = None, profile: str | None = None, exclude: tuple[str, ...] = (),
               include_heads: bool = False, method: str | None = None, budget: dict | None = None,
               granularity: str | None = None, data=None, samples: int | None = None, seed: int = 0,
               progress: bool = True, target: str | None = None, metric: str | None = None,
               low_memory: bool = False, quantizer: str | dict | None = None) -> Plan:
    """A plan for a model (a LoadedModel, or a function that loads it once the options are
    checked): uniform (``bits``) or sensitivity-driven (``method`` / ``budget``).

    Arguments left as None come from ``profile`` (profiles/NAME.toml), then from the defaults in
    the module docstring. A budget without a method plans with DEFAULT_METHOD at
    DEFAULT_GRANULARITY. The budget's feasibility is checked before any analysis. The plan records
    the model as the user named it (``model_name``) and its fingerprint. metric: the analyzer's
    causal-LM metric ("kl" or "nll"; compress.analyze.base.AnalyzerConfig.causal_metric).
    low_memory: ``lm`` is a compress.analyze.streamed.StreamedModel (blocks read from disk).
    quantizer: the quantizer apply will run (a name or a plan "quantizer" section; default the
    profile's, else rtn), recorded in the plan; a budgeted plan prices each candidate with its
    error (GPTQ's Hessian-weighted error for gptq). A budget chooses among candidate_schemes: every
    int4 group of GROUP_CANDIDATES and both symmetries unless ``group_size`` / ``symmetric`` fix them.
    """
    from .models import fingerprint, quantizable_linears

    from .quantizers import quantizer_config

    preset = load_profile(profile) if profile else {}  # before the model loads: fail fast
    method = method or preset.get("method")
    if quantizer is not None:
        qconfig = quantizer_config(quantizer, "plan quantizer")
    elif "quantizer" in preset:
        qconfig = quantizer_config(preset["quantizer"], f"profile {profile} quantizer")
    else:
        qconfig = quantizer_config(None)
    fixed_group = group_size if group_size is not None else preset.get("group_size")
    fixed_sym = symmetric if symmetric is not None else preset.get("symmetric")
    if budget is None:
        budget = make_budget(preset.get("budget"), preset.get("max_bytes"), preset.get("ratio"))
    if method and bits is not None:
        raise CompressError("give either --bits (a uniform plan) or --method (a sensitivity plan), not both")
    if budget is not None and bits is not None:
        raise CompressError("a budget chooses bits per layer; give --bits (uniform) or a budget, not both")
    if budget is not None and method is None:
        method = DEFAULT_METHOD
        granularity = granularity or DEFAULT_GRANULARITY
    bits = bits if bits is not None else preset.get("bits", 4)
    group_size = group_size if group_size is not None else preset.get("group_size",
                                                                      PLANNED_GROUP if method else UNIFORM_GROUP)
    expect(group_size, int, "plan options", "group_size")
    symmetric = symmetric if symmetric is not None else preset.get("symmetric")
    exclude = tuple(exclude) + tuple(preset.get("exclude", ()))
    include_heads = include_heads or preset.get("include_heads", False)
    if target is not None:
        check_target(target)
    lm = lm() if callable(lm) else lm
    target = target or default_target(lm.kind)
    layers = quantizable_linears(lm.model, exclude, include_heads)
    if not layers:
        raise CompressError(f"{lm.path}: no quantizable linear layers (after exclusions {list(exclude)})")
    include_embeddings = plans_embeddings(method, budget, target)
    if include_embeddings:
        layers = plan_units_modules(lm.model, exclude, include_heads)
    if method:
        sym = bool(symmetric)
        schemes = candidate_schemes(fixed_group, fixed_sym) if budget is not None else None
        if budget is not None:
            check_feasible(lm.model, layers, budget, group_size, sym, target, schemes)  # before the slow part
        p = _sensitivity_plan(lm, layers, method, budget, group_size, sym, exclude, include_heads,
                              granularity or preset.get("granularity", "block"), data,
                              samples or preset.get("samples"), seed, progress, target, include_embeddings,
                              metric, low_memory, schemes, qconfig)
    else:
        p = uniform_plan(layers, bits, group_size, symmetric, target)
    p.counted_bytes = {"target": target, **counted_bytes(lm.model, layers, p, target)}
    p.quantizer = qconfig.to_dict()
    p.model_path = str(model_name if model_name is not None else lm.path)
    p.fingerprint = fingerprint(lm.model)
    return p


def plans_embeddings(method: str | None, budget: dict | None, target: str) -> bool:
    """Whether embedding tables (and heads tied to them) are planner units: under a whole-model
    budget (max_bytes, ratio, avg_bits with scope "model"), with an analyzer that predicts damage
    per width (fisher, taylor, oracle), for a target that loads quantized tables (not vLLM)."""
    whole = budget is not None and ("max_bytes" in budget or "ratio" in budget or budget.get("scope") == "model")
    return whole and method in DAMAGE_METHODS and target != "vllm"


def plan_units_modules(model: nn.Module, exclude: tuple[str, ...], include_heads: bool) -> dict[str, nn.Module]:
    """The quantizable linears plus every quantizable embedding table and the head tied to it."""
    from .models import quantizable_embeddings, quantizable_linears, tied_heads

    out = dict(quantizable_linears(model, exclude, include_heads))
    modules = dict(model.named_modules())
    tables = quantizable_embeddings(model, exclude)
    out.update(tables)
    for head, table in tied_heads(model).items():
        if table in tables:
            out[head] = modules[head]
    return out


def _sensitivity_plan(lm, layers, method, budget, group_size, symmetric, exclude, include_heads,
                      granularity, data, samples, seed, progress, target, include_embeddings=False,
                      metric=None, low_memory=False, schemes=None, quantizer=None) -> Plan:
    """Analyze, measure each candidate's errors (priced for ``quantizer``, a QuantizerConfig or
    None for RTN), solve. group_size / symmetric: the int4 scheme the analyzer measures."""
    from .analyze import analyze
    from .data import calibration_batches, load_texts
    from .pricing import layer_errors

    options = {"granularity": granularity, "group_size": group_size, "symmetric": symmetric,
               "exclude": exclude, "include_heads": include_heads, "seed": seed, "progress": progress}
    if include_embeddings:
        options["include_embeddings"] = True
    if samples:
        options["samples"] = samples
    if metric:
        options["causal_metric"] = metric
    texts = load_texts(data)
    sens = analyze(lm, method, texts, **options)
    errors = None
    if budget is not None:
        schemes = schemes or _fixed_schemes(group_size, symmetric)
        batches = None
        if quantizer is not None and quantizer.needs_hessian:  # the analyzer's calibration text and count
            batches = calibration_batches(lm.tokenizer, lm.kind, texts, samples or PRICING_SAMPLES, PRICING_SEQ_LEN,
                                          batch_size=8, config=lm.model.config)
        errors = layer_errors(lm, layers, _with_analyzer_schemes(schemes, (group_size, symmetric)), target,
                              quantizer, batches, progress)
    p, _ = plan_from_sensitivity(lm.model, layers, sens, budget, group_size, symmetric, target, errors, schemes)
    p.sensitivity = sens.to_dict()
    return p


def plan_summary(p: Plan) -> list[tuple[str, object]]:
    """Rows for the table ``compress plan`` prints: layers per width, padding, budget asked."""
    padded = [n for n, lp in p.layers.items() if lp.pad_to_group]
    bits = [lp.bits for lp in p.layers.values()]
    rows = [("layers", len(p.layers)), ("fingerprint", p.fingerprint),
            ("layers at 4 / 8 / 16 bits", f"{bits.count(4)} / {bits.count(8)} / {bits.count(16)}")]
    int4 = {}
    for lp in p.layers.values():
        if lp.bits == 4:
            key = f"g{lp.group_size if lp.group_size != -1 else 'row'} {'sym' if lp.symmetric else 'asym'}"
            int4[key] = int4.get(key, 0) + 1
    if len(int4) > 1 or (int4 and p.sensitivity):
        rows.append(("int4 schemes", ", ".join(f"{k}: {v}" for k, v in sorted(int4.items()))))
    if p.quantizer.get("method") not in (None, "rtn"):
        rows.append(("quantizer", p.quantizer["method"]))
    if p.sensitivity:
        rows.append(("method", f"{p.sensitivity.get('method')} ({p.sensitivity.get('granularity')})"))
    if p.budget:
        rows.append(("budget", p.budget))
    if p.counted_bytes:
        where = {"gguf": "as the GGUF file holds them", "vllm": "compress's storage", "any": "compress's storage"}
        counted, target = p.counted_bytes, p.counted_bytes["target"]
        rows += [(f"bytes, planned layers ({where.get(target, target)})", counted["layers"]),
                 ("bytes, whole model" + (" (GGUF tensors)" if target == "gguf" else ""), counted["model"])]
    if padded:
        rows.append(("padded to whole groups", f"{len(padded)} layers, e.g. {padded[0]}"))
    return rows


def scored_unit_bits(p: Plan, sens) -> dict[str, int]:
    """The bits the plan gives each scored unit (the width of its first layer)."""
    return {u: p.layers[names[0]].bits for u, names in sens.units.items()}


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
