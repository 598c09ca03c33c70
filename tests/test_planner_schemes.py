"""The planner chooses the int4 group and symmetry too, and prices candidates for the quantizer.

Knapsack vs brute force on a toy model; the damage of a scheme scaled from the analyzer's; GPTQ's
Hessian-weighted errors never above RTN's; streamed pricing equal to in memory; the CLI path.
"""
import itertools
import json

import pytest
import torch
from torch import nn

import compress
from compress import api
from compress.cli import main as cli_main
from compress.analyze import Sensitivity
from compress.errors import CompressError
from compress.data import calibration_batches, load_texts
from compress.models import load_model, quantizable_linears
from compress.planner import (candidate_schemes, check_feasible, plan_from_sensitivity, scheme_damage,
                              uniform_plan, unit_options)
from compress.pricing import layer_errors, plain_errors
from compress.quant import QuantSpec, stored_bytes
from compress.quantizers import quantizer_config


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(128, 64, bias=False)
        self.b = nn.Linear(256, 32, bias=False)
        self.c = nn.Linear(64, 96, bias=False)  # K = 64: groups 64 and 128 both fit as one group per row
        self.d = nn.Linear(96, 48, bias=False)  # K = 96: group 64 / 128 pad


def _sens(layers, damage=True):
    units = {n: [n] for n in layers}
    scores = {n: float(i + 1) for i, n in enumerate(layers)}
    dmg = {n: {4: scores[n], 8: scores[n] / 50} for n in layers} if damage else None
    return Sensitivity("synthetic", "module", units, {n: m.weight.numel() for n, m in layers.items()}, scores, dmg)


def _plan_bytes(plan, layers) -> int:
    return sum(stored_bytes(lp.spec(), *layers[n].weight.shape) for n, lp in plan.layers.items())


@pytest.mark.parametrize("damage", [True, False])
@pytest.mark.parametrize("avg_bits", [4.3, 4.8, 5.6, 7.0, 9.5])
def test_knapsack_over_schemes_equals_brute_force(damage, avg_bits):
    toy = Toy()
    layers = {n: getattr(toy, n) for n in "abcd"}
    sens = _sens(layers, damage)
    schemes = candidate_schemes(None, None)
    errors = {n: plain_errors(m, [s for s in schemes if s[0] != 16] + [(4, 32, False)], "any")
              for n, m in layers.items()}
    budget = {"avg_bits": avg_bits}
    plan, chosen = plan_from_sensitivity(toy, layers, sens, budget, 32, False, "any", errors, schemes)
    cap = check_feasible(toy, layers, budget, 32, False, "any", schemes)
    assert _plan_bytes(plan, layers) <= cap
    # every combination of every layer's distinct options
    options = {n: [(sc, nb, scheme_damage(sens, n, sc, [n], errors, (32, False)))
                   for sc, nb in unit_options([m], schemes, "any")] for n, m in layers.items()}
    assert len(options["c"]) < len(options["a"])  # group 64 and 128 on K = 64 are one option
    best = min(sum(o[2] for o in combo) for combo in itertools.product(*options.values())
               if sum(o[1] for o in combo) <= cap)
    def picked(n):
        u = plan.units[n]
        return (4, u.group_size, u.symmetric) if u.bits == 4 else (u.bits, -1, True)

    got = sum(next(o[2] for o in options[n] if o[0] == picked(n)) for n in layers)
    assert got == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert chosen == {n: plan.units[n].bits for n in layers}


def test_budgets_between_the_old_widths_are_spent():
    """With one int4 scheme, avg 4.5 bits is all-int4 g32 (4.625 with asymmetric zero points is
    infeasible: the floor); with groups to choose, plans at 4.3 and 4.6 both exist and differ."""
    toy = Toy()
    layers = {n: getattr(toy, n) for n in "abcd"}
    sens = _sens(layers)
    schemes = candidate_schemes(None, None)
    used = []
    for b in (4.3, 4.45, 4.6):
        plan, _ = plan_from_sensitivity(toy, layers, sens, {"avg_bits": b}, 32, False, "any", None, schemes)
        used.append(8 * _plan_bytes(plan, layers) / sum(m.weight.numel() for m in layers.values()))
        assert used[-1] <= b
    assert used[0] < used[1] < used[2]
    with pytest.raises(CompressError, match="infeasible"):
        plan_from_sensitivity(toy, layers, sens, {"avg_bits": 4.3}, 32, False, "any")  # fixed g32 asym


def test_scheme_damage_scales_the_analyzers_measurement():
    toy = Toy()
    layers = {"a": toy.a}
    sens = _sens(layers)
    errs = {"a": plain_errors(toy.a, [(4, 32, False), (4, 128, True), (8, -1, True)], "any")}
    assert scheme_damage(sens, "a", (4, 32, False), ["a"], errs, (32, False)) == sens.damage["a"][4]
    coarse = scheme_damage(sens, "a", (4, 128, True), ["a"], errs, (32, False))
    ratio = errs["a"].plain[(4, 128, True)] / errs["a"].plain[(4, 32, False)]
    assert coarse == pytest.approx(sens.damage["a"][4] * ratio) and ratio > 1.1
    assert scheme_damage(sens, "a", (16, -1, True), ["a"], errs, (32, False)) == 0.0


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    lm = load_model(tiny_llama_dir)
    batches = calibration_batches(lm.tokenizer, lm.kind, load_texts(None), 8, 64, 4, lm.model.config)
    return lm, quantizable_linears(lm.model), batches


def test_gptq_priced_errors_below_rtn(llama):
    lm, layers, batches = llama
    schemes = [s for s in candidate_schemes(None, None) if s[0] != 16]
    errs = layer_errors(lm, layers, schemes, "any", quantizer_config("gptq"), batches)
    for n, e in errs.items():
        assert set(e.quant_h) == set(e.rtn_h) == set(e.plain)
        for s in e.quant_h:
            assert e.quant_h[s] <= e.rtn_h[s] * (1 + 1e-6) + 1e-9, (n, s)
    # GPTQ runs once per width, at the width's first scheme; the width's others take its ratio to RTN
    first = schemes[0]
    for e in errs.values():
        for s in schemes[1:]:
            if s[0] == first[0]:
                assert e.quant_h[s] / e.rtn_h[s] == pytest.approx(e.quant_h[first] / e.rtn_h[first], rel=1e-9)
    ratios = [e.quant_h[(4, 32, False)] / e.rtn_h[(4, 32, False)] for e in errs.values()]
    assert max(ratios) < 0.95  # GPTQ repairs a real share of int4's error on every layer
    rtn = layer_errors(lm, layers, schemes, "any", quantizer_config("rtn"), batches)
    assert all(not e.quant_h for e in rtn.values())
    assert {n: e.plain for n, e in rtn.items()} == {n: e.plain for n, e in errs.items()}


def test_streamed_pricing_equals_in_memory(llama, tiny_llama_dir):
    from compress.analyze.streamed import load_streamed

    lm, layers, batches = llama
    schemes = [(4, 32, False), (4, 128, True), (8, -1, True)]
    q = quantizer_config("gptq")
    mem = layer_errors(lm, layers, schemes, "any", q, batches)
    slm = load_streamed(tiny_llama_dir)
    streamed = layer_errors(slm, quantizable_linears(slm.model), schemes, "any", q, batches)
    for n in layers:
        for s in schemes:
            assert streamed[n].quant_h[s] == pytest.approx(mem[n].quant_h[s], rel=1e-4)
            assert streamed[n].plain[s] == pytest.approx(mem[n].plain[s], rel=1e-6)
    assert all(p.device.type == "meta" for p in slm.model.model.layers.parameters())  # released again
    rtn_streamed = layer_errors(slm, quantizable_linears(slm.model), schemes, "any")
    for n in layers:
        assert rtn_streamed[n].plain == pytest.approx(mem[n].plain, rel=1e-6) and not rtn_streamed[n].quant_h


def test_cli_plan_records_gptq_and_chooses_groups(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "p.json"
    rc = cli_main([
        "plan", str(tiny_llama_dir), "--method", "fisher", "--granularity", "module", "--budget", "4.6",
        "--samples", "2", "--quantizer", "gptq", "--target", "any", "-o", str(out)])
    assert rc in (0, None)
    plan = json.loads(out.read_text())
    assert plan["quantizer"]["method"] == "gptq" and plan["quantizer"]["act_order"] is True
    schemes = {(lp["bits"], lp.get("group_size"), lp.get("symmetric")) for lp in plan["layers"].values()}
    assert len(schemes) > 1
    fixed = tmp_path / "fixed.json"
    cli_main(["plan", str(tiny_llama_dir), "--method", "fisher", "--granularity", "module",
                       "--budget", "5", "--samples", "2", "--group-size", "64", "--symmetric", "--target", "any",
                       "-o", str(fixed)])
    for lp in json.loads(fixed.read_text())["layers"].values():
        assert lp["bits"] != 4 or (lp["group_size"] in (64, -1) and lp["symmetric"] is True)  # K = 64: one group


def test_rtn_mse_keeps_the_format(tiny_llama_dir, tmp_path):
    """rtn with mse writes the same tensors as plain rtn (shapes, dtypes), loads, and lowers the
    weights' reconstruction error."""
    lm = load_model(tiny_llama_dir)
    layers = quantizable_linears(lm.model)
    plan = uniform_plan(layers, 4, 32, False)
    outs = {}
    for mse in (False, True):
        outs[mse] = api.apply(tiny_llama_dir, plan, tmp_path / f"m{mse}", progress=False, mse=mse)
    plain, searched = (compress.load(outs[m]) for m in (False, True))
    err = {}
    for tag, m in (("plain", plain), ("mse", searched)):
        total = 0.0
        for n, lin in layers.items():
            q = m.model.get_submodule(n)
            assert q.qweight.shape == plain.model.get_submodule(n).qweight.shape
            assert q.scales.dtype == torch.float16
            total += float((q.dequantized_weight().float() - lin.weight.float()).square().sum())
        err[tag] = total
    assert err["mse"] < err["plain"]
    assert json.loads((outs[True] / "compress.json").read_text())["plan"]["quantizer"] == {"method": "rtn", "mse": True}
