import re
"""Sensitivity -> plan: budgets in every form, feasibility errors, k-means mode, the CLI."""
import json

import pytest

import compress
from compress.analyze import Sensitivity
from compress.errors import CompressError
from compress.models import load_model, quantizable_linears
from compress.planner import parse_bytes, plan_from_sensitivity, unit_bytes
from compress.plan import Plan


@pytest.fixture(scope="module")
def bert(tiny_bert_dir):
    lm = load_model(tiny_bert_dir)
    return lm, quantizable_linears(lm.model)


def _module_sens(layers, damage=True, scores=None):
    units = {n: [n] for n in layers}
    scores = scores or {n: float(i + 1) for i, n in enumerate(layers)}
    dmg = {n: {4: scores[n], 8: scores[n] / 100} for n in layers} if damage else None
    return Sensitivity("synthetic", "module", units, {n: layers[n].weight.numel() for n in layers}, scores, dmg)


def _avg_bits(plan, layers):
    total = sum(unit_bytes([layers[n]], lp.bits, lp.group_size if lp.bits == 4 else -1, lp.symmetric)
                for n, lp in plan.layers.items())
    return 8 * total / sum(m.weight.numel() for m in layers.values())


@pytest.mark.parametrize("damage", [True, False])
def test_avg_bits_budget_met_and_monotone(bert, damage):
    lm, layers = bert
    sens = _module_sens(layers, damage)
    prev = None
    for budget in (4.9, 5.5, 6.5, 8.0, 12.0):
        plan, chosen = plan_from_sensitivity(lm.model, layers, sens, {"avg_bits": budget})
        assert _avg_bits(plan, layers) <= budget + 1e-9
        predicted = sum(sens.scores[u] * {4: 1.0, 8: 0.01, 16: 0.0}[b] for u, b in chosen.items()) if damage else None
        if damage and prev is not None:
            assert predicted <= prev + 1e-12
        prev = predicted
    # The most sensitive layer is never below the least sensitive one.
    most = max(sens.scores, key=sens.scores.get)
    least = min(sens.scores, key=sens.scores.get)
    assert chosen[most] >= chosen[least]


def test_infeasible_budgets_name_range(bert):
    lm, layers = bert
    sens = _module_sens(layers)
    with pytest.raises(CompressError, match=r"avg_bits from 4\.\d+ \(all 4-bit\) to 16\.000 \(all 16-bit\)"):
        plan_from_sensitivity(lm.model, layers, sens, {"avg_bits": 3.0})
    with pytest.raises(CompressError, match="infeasible.*max_bytes from"):
        plan_from_sensitivity(lm.model, layers, sens, {"max_bytes": 1000})
    with pytest.raises(CompressError, match="infeasible.*ratio from"):
        plan_from_sensitivity(lm.model, layers, sens, {"ratio": 100})


def test_max_bytes_and_ratio(bert):
    lm, layers = bert
    sens = _module_sens(layers)
    plan, _ = plan_from_sensitivity(lm.model, layers, sens, {"ratio": 1.01})  # embeddings dominate: 1.0-1.019
    assert any(lp.bits > 4 for lp in plan.layers.values())
    plan, _ = plan_from_sensitivity(lm.model, layers, sens, {"max_bytes": "4.0MB"})  # range 3.97-4.04 MB
    assert max(lp.bits for lp in plan.layers.values()) > 4


def test_kmeans_mode_orders_clusters(bert):
    lm, layers = bert
    names = list(layers)
    scores = {n: (100.0 if i < 2 else 10.0 if i < 6 else 1.0) for i, n in enumerate(names)}
    plan, chosen = plan_from_sensitivity(lm.model, layers, _module_sens(layers, scores=scores), None)
    assert [chosen[n] for n in names[:2]] == [16, 16]
    assert {chosen[n] for n in names[2:6]} == {8} and {chosen[n] for n in names[6:]} == {4}


def test_units_must_cover_layers(bert):
    lm, layers = bert
    sens = _module_sens(dict(list(layers.items())[:3]))
    with pytest.raises(CompressError, match="cover 3 layers"):
        plan_from_sensitivity(lm.model, layers, sens, {"avg_bits": 6})


def test_parse_bytes():
    assert parse_bytes("12MB") == 12_000_000 and parse_bytes("1.5GiB") == int(1.5 * 2**30)
    assert parse_bytes("300000") == 300000
    with pytest.raises(CompressError, match="cannot read"):
        parse_bytes("twelve")


def test_cli_plan_with_method_writes_plan_table_png(tiny_llama_dir, tmp_path, capsys):
    from compress.cli import main

    out = tmp_path / "p.json"
    code = main(["plan", str(tiny_llama_dir), "--method", "oracle", "--granularity", "module", "--budget", "6",
                 "--samples", "4", "-o", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and (tmp_path / "p.png").exists()
    # the unit table: one row per scored unit with its chosen bits
    assert re.search(r"^\s+unit\s+weights\s+score\s+bits$", printed, re.M)
    assert "layers at 4 / 8 / 16 bits" in printed
    plan = Plan.load(out)
    assert plan.sensitivity["method"] == "oracle" and plan.budget == {"avg_bits": 6.0}
    assert max(lp.bits for lp in plan.layers.values()) > 4
    # The plan applies to its model.
    compress.apply(tiny_llama_dir, plan, tmp_path / "c", progress=False)
    d = json.loads(out.read_text())
    # vLLM is the default target for causal LMs: q/k/v and gate/up are one unit each, one scheme.
    assert d["target"] == "vllm" and all(u["bits"] in (4, 8, 16) for u in d["units"].values())
    assert len(d["units"]) == 2 * 4  # per block: qkv, o, gate+up, down
    for blk in range(2):
        pre = f"model.layers.{blk}."
        assert len({plan.layers[pre + f"self_attn.{x}_proj"] for x in "qkv"}) == 1
        assert plan.layers[pre + "mlp.gate_proj"] == plan.layers[pre + "mlp.up_proj"]


def test_cli_plan_errors(tiny_llama_dir, tmp_path, capsys):
    from compress.cli import main

    code = main(["plan", str(tiny_llama_dir), "--method", "nope", "--budget", "5", "-o", str(tmp_path / "p.json")])
    assert code == 2 and "unknown" in capsys.readouterr().err
    code = main(["plan", str(tiny_llama_dir), "--method", "taylor", "--budget", "2", "--samples", "2",
                 "-o", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert code == 2 and "avg_bits from" in err and "(all 4-bit)" in err
    assert not (tmp_path / "p.json").exists()
