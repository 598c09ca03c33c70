"""Anytime heads on a compressed encoder: plan section, apply, load with active units, CLI."""
import json
import math
import re

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
    with pytest.raises(CompressError, match="^" + re.escape("units to keep must be in 1..20 (T·J = 4·5), got 21") + "$"):
        compress.load(out, active_units=21)


def test_cli_head_and_predict(minilm_dir, tmp_path, labels, capsys):
    from compress.cli import main

    plan = tmp_path / "p.json"
    assert main(["plan", str(minilm_dir), "--bits", "8", "-o", str(plan)]) == 0
    assert main(["apply", str(minilm_dir), "--plan", str(plan), "-o", str(tmp_path / "c")]) == 0
    capsys.readouterr()
    assert main(["head", str(tmp_path / "c"), "--labels", str(labels), "--units", "10",
                 "--units-per-step", "5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "classification head, 10 units, fitted on 16 of 20 labelled rows (4 held out, holdout 0.2)"
    assert re.fullmatch(r"  train accuracy \(10 units\)\s+(0|1|0\.\d+)", out[1])
    assert re.fullmatch(r"  held-out accuracy \(10 units\)\s+(0|1|0\.\d+)", out[2])
    assert out[3] == (f"wrote {tmp_path / 'c' / 'anytime.safetensors'} and {tmp_path / 'c' / 'anytime.json'} "
                      f"(into {tmp_path / 'c'}, beside the weights; its compress.json records the anytime section)")
    assert main(["predict", str(tmp_path / "c"), "the match ended in a draw", "--units", "5"]) == 0
    assert capsys.readouterr().out.startswith("sport\t")
    assert main(["predict", str(tmp_path / "c"), "the match ended in a draw", "hot soup", "--proba"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header == "label\tfood\tsport\ttext" and len(rows) == 2
    for row, text in zip(rows, ["the match ended in a draw", "hot soup"]):
        label, p_food, p_sport, shown = row.split("\t")
        assert shown == text and abs(float(p_food) + float(p_sport) - 1) <= 1e-4
        assert label == ("food" if float(p_food) > float(p_sport) else "sport")
    plan = compress.inspect(tmp_path / "c")["plan"]["anytime"]
    assert plan["units"] == 10 and plan["holdout"] == 0.2


def _held_out_texts(labels_file, task, holdout):
    """The texts and labels holdout_split keeps out, recomputed from the file."""
    from compress.anytime.text import holdout_split
    from compress.data import read_labelled_file

    texts, values = read_labelled_file(labels_file, task)
    if task == "classification":
        classes = sorted(set(values), key=str)
        y = torch.tensor([classes.index(v) for v in values])
    else:
        y = torch.tensor(values)
    _, held = holdout_split(y, task, holdout)
    return [texts[i] for i in held.tolist()], [values[i] for i in held.tolist()]


def test_fit_head_reports_held_out_scores(minilm_dir, tmp_path, labels):
    out = compress.apply(minilm_dir, compress.plan(minilm_dir, bits=8), tmp_path / "c", progress=False)
    report = compress.fit_head(out, labels, units=10, units_per_step=5, active_units=5)
    assert (report["rows"], report["train_rows"], report["heldout_rows"]) == (20, 16, 4)
    assert [s["units"] for s in report["scores"]] == [5, 10]
    assert report["files"] == [str(out / "anytime.safetensors"), str(out / "anytime.json")]
    # The held-out accuracy is the saved head's on rows it never saw (recomputed independently).
    texts, truth = _held_out_texts(labels, "classification", 0.2)
    for s in report["scores"]:
        preds = compress.predict(out, texts, active_units=s["units"])
        assert s["heldout"]["accuracy"] == pytest.approx(sum(p == t for p, t in zip(preds, truth)) / 4)
        probs = compress.predict(out, texts, active_units=s["units"], proba=True)
        assert [max(p, key=p.get) for p in probs] == preds and list(probs[0]) == ["food", "sport"]
    saved = json.loads((out / "anytime.json").read_text())
    assert saved["fit_report"] == {k: report[k] for k in saved["fit_report"]}

    # Regression: R^2 and RMSE of the held-out rows; --proba has nothing to give.
    reg = tmp_path / "reg.jsonl"
    rows = [{"text": t, "label": float(len(t.split())) + (k == "sport")} for k, ts in TOPICS.items() for t in ts]
    reg.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    report = compress.fit_head(out, reg, task="regression", units=10, units_per_step=5, holdout=0.3)
    assert (report["train_rows"], report["heldout_rows"]) == (7, 3) and set(report["scores"][0]["heldout"]) == {"r2", "rmse"}
    texts, truth = _held_out_texts(reg, "regression", 0.3)
    preds = compress.predict(out, texts)
    rmse = math.sqrt(sum((p - t) ** 2 for p, t in zip(preds, truth)) / 3)
    assert report["scores"][0]["heldout"]["rmse"] == pytest.approx(rmse, rel=1e-4)
    with pytest.raises(CompressError, match="class probabilities need a classification head; this head's task is 'regression'"):
        compress.predict(out, texts, proba=True)
    # holdout 0: every row is fitted and nothing is reported as held out.
    report = compress.fit_head(out, labels, units=5, units_per_step=5, holdout=0)
    assert (report["train_rows"], report["heldout_rows"]) == (20, 0) and report["scores"][0]["heldout"] is None


def test_bad_sections(tmp_path):
    base = {"format": "compress.plan", "version": 1}
    with pytest.raises(CompressError, match="needs \"labels\""):
        Plan.from_dict({**base, "anytime": {"units": 10}})
    with pytest.raises(CompressError, match=r"unknown keys \['depth'\]"):
        Plan.from_dict({**base, "anytime": {"labels": "x.jsonl", "depth": 3}})
    with pytest.raises(CompressError, match="not a multiple"):
        Plan.from_dict({**base, "anytime": {"labels": "x.jsonl", "units": 12, "units_per_step": 5}})
    with pytest.raises(CompressError, match=r"^plan anytime: units must be an integer, got '10'$"):
        Plan.from_dict({**base, "anytime": {"labels": "x.jsonl", "units": "10"}})
    with pytest.raises(CompressError, match=r"^plan anytime: holdout must be a number, got True$"):
        Plan.from_dict({**base, "anytime": {"labels": "x.jsonl", "holdout": True}})
    with pytest.raises(CompressError, match=r"holdout is the share of rows kept out of the fit, in \[0, 1\); got 1\.5"):
        Plan.from_dict({**base, "anytime": {"labels": "x.jsonl", "holdout": 1.5}})


def test_predict_without_head(tiny_bert_dir, tmp_path):
    out = compress.apply(tiny_bert_dir, compress.plan(tiny_bert_dir, bits=8), tmp_path / "c", progress=False)
    with pytest.raises(CompressError, match="no anytime head"):
        compress.predict(out, ["x"])
