"""Anytime heads on a compressed encoder: plan section, apply, load with active units, CLI."""
import json

import pytest
import torch

import compress
from compress.errors import CompressError
from compress.plan import Plan

TOPICS = {"sport": ["the team won the match", "a goal in the final minute", "the runner broke the record",
                    "fans cheered the players", "the coach picked the squad"],
          "food": ["the soup was too salty", "fresh bread from the oven", "a recipe for apple pie",
                   "the chef chopped onions", "we ate pasta for dinner"]}


@pytest.fixture()
def labels(tmp_path):
    f = tmp_path / "train.jsonl"
    rows = [{"text": t, "label": k} for k, ts in TOPICS.items() for t in ts] * 2
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return f


def test_plan_section_fitted_by_apply_and_loaded(minilm_dir, tmp_path, labels):
    plan = compress.plan(minilm_dir, bits=8)
    plan.anytime = {"labels": str(labels), "units": 20, "units_per_step": 5, "active_units": 10}
    out = compress.apply(minilm_dir, Plan.from_dict(plan.to_dict()), tmp_path / "c", progress=False)
    assert (out / "anytime.safetensors").exists()
    lm = compress.load(out)
    assert lm.head.active_units == 10 and lm.head.n_units == 20
    assert compress.load(out, active_units=5).head.active_units == 5
    preds = compress.predict(out, ["the striker scored twice", "a bowl of hot noodles"])
    assert preds == ["sport", "food"]
    with pytest.raises(CompressError, match="1..20|1 to 20|range"):
        compress.load(out, active_units=21)


def test_cli_head_and_predict(minilm_dir, tmp_path, labels, capsys):
    from compress.cli import main

    plan = tmp_path / "p.json"
    assert main(["plan", str(minilm_dir), "--bits", "8", "-o", str(plan)]) == 0
    assert main(["apply", str(minilm_dir), "--plan", str(plan), "-o", str(tmp_path / "c")]) == 0
    assert main(["head", str(tmp_path / "c"), "--labels", str(labels), "--units", "10",
                 "--units-per-step", "5"]) == 0
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "c"), "the match ended in a draw", "--units", "5"]) == 0
    assert capsys.readouterr().out.startswith("sport\t")
    assert compress.inspect(tmp_path / "c")["plan"]["anytime"]["units"] == 10


def test_bad_sections(tmp_path):
    base = {"format": "compress.plan", "version": 1}
    with pytest.raises(CompressError, match="needs \"labels\""):
        Plan.from_dict({**base, "anytime": {"units": 10}})
    with pytest.raises(CompressError, match=r"unknown keys \['depth'\]"):
        Plan.from_dict({**base, "anytime": {"labels": "x.jsonl", "depth": 3}})
    with pytest.raises(CompressError, match="not a multiple"):
        Plan.from_dict({**base, "anytime": {"labels": "x.jsonl", "units": 12, "units_per_step": 5}})


def test_predict_without_head(tiny_bert_dir, tmp_path):
    out = compress.apply(tiny_bert_dir, compress.plan(tiny_bert_dir, bits=8), tmp_path / "c", progress=False)
    with pytest.raises(CompressError, match="no anytime head"):
        compress.predict(out, ["x"])
