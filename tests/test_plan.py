import json

import pytest
from torch import nn

from compress.errors import CompressError
from compress.plan import LayerPlan, Plan
from compress.planner import load_profile, uniform_plan


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 32)
        self.b = nn.Linear(172, 64)
        self.emb = nn.Embedding(10, 64)


def test_roundtrip_json(tmp_path):
    toy = Toy()
    p = uniform_plan({"a": toy.a, "b": toy.b}, 4, 32)
    p.fingerprint = "abc"
    p.save(tmp_path / "p.json")
    q = Plan.load(tmp_path / "p.json")
    assert q.to_dict() == p.to_dict()
    assert q.layers["b"].pad_to_group and not q.layers["a"].pad_to_group


def test_resolve_default_and_explicit():
    toy = Toy()
    p = Plan(layers={"a": LayerPlan(8)}, default=LayerPlan(4, 64, False, pad_to_group=True))
    r = p.resolve(toy, {"a": toy.a, "b": toy.b})
    assert r["a"].bits == 8 and r["b"].bits == 4


@pytest.mark.parametrize("entry,msg", [
    ({"bits": 5}, "layer a: bits 5 is not one of 4, 8, 16"),
    ({"bits": 4, "group_size": 48}, "layer a: int4 group_size must be one of"),
    ({"bits": 4, "colour": 1}, r"layer a: unknown keys \['colour'\]"),
    ({"group_size": 32}, "layer a: missing \"bits\""),
    ({"bits": 8, "group_size": 32}, "int8 is per output channel"),
])
def test_bad_entries(entry, msg):
    d = {"format": "compress.plan", "version": 1, "layers": {"a": entry}}
    with pytest.raises(CompressError, match=msg):
        Plan.from_dict(d)


def test_bad_top_level():
    with pytest.raises(CompressError, match="not a plan"):
        Plan.from_dict({"layers": {}})
    with pytest.raises(CompressError, match="version 2"):
        Plan.from_dict({"format": "compress.plan", "version": 2})
    with pytest.raises(CompressError, match=r"unknown keys \['extra'\]"):
        Plan.from_dict({"format": "compress.plan", "version": 1, "extra": 1})
    with pytest.raises(CompressError, match="exactly one of"):
        Plan.from_dict({"format": "compress.plan", "version": 1, "budget": {"avg_bits": 4, "ratio": 2}})


def test_missing_layer_and_non_linear():
    toy = Toy()
    p = Plan(layers={"c": LayerPlan(8)})
    with pytest.raises(CompressError, match="plan names layer c, which the model does not have"):
        p.resolve(toy, {"a": toy.a})
    # an embedding table is a plan unit (int8 per row); a LayerNorm is not
    assert Plan(layers={"emb": LayerPlan(8)}).resolve(toy, {"a": toy.a})["emb"] == LayerPlan(8)
    toy.norm = nn.LayerNorm(64)
    with pytest.raises(CompressError, match="norm, a LayerNorm, not a linear layer or an embedding table"):
        Plan(layers={"norm": LayerPlan(8)}).resolve(toy, {"a": toy.a})


def test_group_must_divide_unless_padded():
    toy = Toy()
    p = Plan(layers={"b": LayerPlan(4, 32, False)})
    with pytest.raises(CompressError, match=r"layer b: group_size 32 does not divide in_features 172; "
                                            r"group sizes that do: \[-1\].*pad in_features to 192"):
        p.resolve(toy, {})


def test_fingerprint_mismatch():
    toy = Toy()
    p = Plan(layers={}, fingerprint="1111")
    with pytest.raises(CompressError, match="another model"):
        p.resolve(toy, {}, fingerprint="2222")


def test_load_errors(tmp_path):
    with pytest.raises(CompressError, match="does not exist"):
        Plan.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CompressError, match="not valid JSON"):
        Plan.load(bad)


def test_profiles_ship_and_parse():
    prof = load_profile("int4-g128")
    assert prof["bits"] == 4 and prof["group_size"] == 128
    with pytest.raises(CompressError, match="unknown profile 'nope'.*int4-g128"):
        load_profile("nope")


def test_uniform_plan_uses_one_group_per_row_for_narrow_layers():
    toy = Toy()  # a: in 64, b: in 172
    p = uniform_plan({"a": toy.a, "b": toy.b}, 4, 128)
    assert p.layers["a"].group_size == -1 and not p.layers["a"].pad_to_group
    assert p.layers["b"].group_size == 128 and p.layers["b"].pad_to_group


BASE = {"format": "compress.plan", "version": 1}


@pytest.mark.parametrize("extra,msg", [
    ({"layers": {"a": {"bits": 4, "symmetric": "false"}}},
     r"plan layer a: symmetric must be a boolean \(true/false\), got 'false'"),
    ({"layers": {"a": {"bits": 4, "group_size": 32, "pad_to_group": "no"}}},
     r"plan layer a: pad_to_group must be a boolean \(true/false\), got 'no'"),
    ({"layers": {"a": {"bits": 4, "group_size": 32.7}}}, r"plan layer a: group_size must be an integer, got 32.7"),
    ({"layers": {"a": {"bits": 4, "group_size": "x"}}}, r"plan layer a: group_size must be an integer, got 'x'"),
    ({"layers": {"a": {"bits": True}}}, r"plan layer a: bits must be an integer, got True"),
    ({"layers": {"a": {"bits": 8.0}}}, r"plan layer a: bits must be an integer, got 8.0"),
    ({"layers": ["a"]}, r"plan \"layers\" must be an object"),
    ({"layers": {"a": 4}}, r"plan layer a must be an object"),
    ({"default": "int4"}, r"plan default must be an object"),
    ({"quantizer": "gptq"}, r"plan \"quantizer\" must be an object"),
    ({"quantizer": {"method": "awq"}}, r"plan \"quantizer\": unknown method 'awq' \(known: gptq, rtn\)"),
    ({"quantizer": {"method": "gptq", "damp": "0.01"}}, r"quantizer gptq: damp must be a number, got '0.01'"),
    ({"quantizer": {"method": "gptq", "act_order": 1}},
     r"quantizer gptq: act_order must be a boolean \(true/false\), got 1"),
    ({"quantizer": {"method": "gptq", "dampening": 0.1}}, r"gptq does not take \['dampening'\] \(it takes: "),
    ({"quantizer": {"method": "rtn", "damp": 0.1}},
     r"plan \"quantizer\" \(rtn\): rtn does not take \['damp'\] \(it takes: mse\)"),
    ({"model": "x"}, r"plan \"model\" must be an object"),
    ({"model": {"path": 3}}, r"plan \"model\": path must be a string or null, got 3"),
    ({"budget": {"avg_bits": "5"}}, r"plan \"budget\": avg_bits must be a number, got '5'"),
    ({"budget": {"max_bytes": 1.5e6}}, r"plan \"budget\": max_bytes must be an integer, got 1500000.0"),
    ({"budget": {"ratio": True}}, r"plan \"budget\": ratio must be a number, got True"),
    ({"budget": {"ratio": -2}}, r"plan \"budget\": ratio must be positive, got -2"),
    ({"units": {"u": {"bits": 3}}}, r"plan unit u: bits 3 is not one of 4, 8, 16"),
])
def test_bad_types_are_rejected_not_coerced(extra, msg):
    with pytest.raises(CompressError, match=msg):
        Plan.from_dict({**BASE, **extra})


def test_cli_bad_plan_types_exit_2_one_line_nothing_written(tiny_bert_dir, tmp_path, capsys):
    from compress.cli import main

    bad = tmp_path / "bad.json"
    for section, value, expected in [
        ("layers", {"encoder.layer.0.attention.self.query": {"bits": 4, "symmetric": "false"}},
         "symmetric must be a boolean"),
        ("quantizer", {"method": "gptq"} | {"damp": "x"}, "damp must be a number"),
        ("model", "x", "must be an object"),
    ]:
        bad.write_text(json.dumps({**BASE, section: value}))
        code = main(["apply", str(tiny_bert_dir), "--plan", str(bad), "-o", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists()
        assert [p.name for p in tmp_path.iterdir()] == ["bad.json"]


def test_strict_values_still_load():
    p = Plan.from_dict({**BASE, "layers": {"a": {"bits": 4, "group_size": 32, "symmetric": True,
                                                 "pad_to_group": False}},
                        "quantizer": {"method": "gptq", "damp": 0.02, "act_order": True},
                        "budget": {"avg_bits": 5}})
    assert p.layers["a"] == LayerPlan(4, 32, True)
    assert p.quantizer["damp"] == 0.02 and p.quantizer["act_order"] is True
    assert p.budget == {"avg_bits": 5.0}
