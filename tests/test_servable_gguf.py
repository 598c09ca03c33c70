"""--target gguf: the planner, the servability check and the GGUF writer ask one rule
(compress.servable.gguf_type) and so never disagree; a plan made for GGUF exports without F16 fallback."""
import pytest
import torch
from torch import nn

from compress.api import apply, plan
from compress.errors import CompressError
from compress.export import gguf_blocks as gb
from compress.export import gguf_compatible
from compress.plan import LayerPlan
from compress.quant import QuantSpec, quantize
from compress.servable import fit_spec, gguf_type, problems

SPECS = [QuantSpec(16), QuantSpec(8), QuantSpec(4, 32, True), QuantSpec(4, 32, False), QuantSpec(4, 64, True),
         QuantSpec(4, 128, False), QuantSpec(4, -1, True), QuantSpec(4, -1, False)]
KS = [32, 48, 64, 80, 96, 160, 172]


@pytest.mark.parametrize("k", KS)
def test_check_planner_and_writer_agree(k):
    model = nn.Sequential(*[nn.Linear(k, 8, bias=False) for _ in SPECS])
    found = problems({str(i): s for i, s in enumerate(SPECS)}, model, "gguf")
    for i, spec in enumerate(SPECS):
        kind = gguf_type(spec, k)
        assert (str(i) in found) is (kind is None) and gguf_compatible(spec, k) is (kind is not None)
        if kind is None:
            assert str(k) in found[str(i)] or str(spec.effective_group(k)) in found[str(i)]
            with pytest.raises(ValueError, match="no GGUF block type"):
                gb.encode_weight(quantize(torch.randn(8, k), spec), None, allow_f16=False)
        elif spec.bits != 16:  # what the check accepts, the writer writes as the type it names
            assert gb.encode_weight(quantize(torch.randn(8, k), spec), None, allow_f16=False)[0] == kind
    for bits in (4, 8):  # the planner's candidate storage: group 32 whatever was asked, or none
        for group in (32, 128, -1):
            fitted = fit_spec(bits, group, True, k, "gguf")
            assert (fitted is None) is (k % 32 != 0)
            if fitted:
                assert fitted[1] is False and gguf_type(fitted[0], k) == ("Q4_0" if bits == 4 else "Q8_0")
                assert fitted[0].bits == 8 or fitted[0].group_size == 32


def test_reasons_name_the_number():
    model = nn.Sequential(nn.Linear(80, 8), nn.Linear(64, 8))
    g16 = QuantSpec(4, 32, True)
    object.__setattr__(g16, "group_size", 16)  # no such group today: the rule must still refuse it
    found = problems({"0": QuantSpec(8), "1": g16}, model, "gguf")
    assert "in_features 80 is not a multiple of 32" in found["0"]
    assert "int4 group 16 has no GGUF type" in found["1"]


@pytest.fixture(scope="module")
def ragged_llama(tmp_path_factory, byte_vocab_llama):
    """A 1-layer random Llama whose down projection has K = 80 (no GGUF block type fits it), with a
    llama2.c-style vocabulary (specials, byte pieces, letters) as GGUF export needs."""
    return byte_vocab_llama(tmp_path_factory.mktemp("ragged-llama"), intermediate_size=80,
                                 num_hidden_layers=1, max_position_embeddings=64)


def test_gguf_plan_is_what_the_writer_maps(ragged_llama, tmp_path):
    pytest.importorskip("gguf", reason="needs gguf: pip install gguf")
    from compress.export import export_gguf

    with pytest.raises(CompressError, match="--target gguf stores int4 as Q4_0 / Q4_1, group 32; got group 128"):
        plan(ragged_llama, bits=4, group_size=128, target="gguf", progress=False)
    p = plan(ragged_llama, bits=4, group_size=32, symmetric=False, target="gguf", progress=False)
    assert p.layers["model.layers.0.mlp.down_proj"].bits == 16  # K = 80
    assert {(lp.bits, lp.group_size) for n, lp in p.layers.items() if "down_proj" not in n} == {(4, 32)}
    comp = apply(ragged_llama, p, tmp_path / "comp", progress=False)
    rep = export_gguf(comp, tmp_path / "m.gguf")  # no --allow-f16 needed: nothing falls back
    assert rep.f16_fallback == [] and rep.tensor_types.get("Q4_1", 0) == 6

    # A longer int4 group is servable in GGUF too (its scale repeats per block), as the writer says;
    # int8 on K = 80 is not.
    p.layers["model.layers.0.self_attn.q_proj"] = LayerPlan(4, 128, True)
    rep = export_gguf(apply(ragged_llama, p, tmp_path / "g128", progress=False), tmp_path / "g.gguf")
    assert rep.f16_fallback == [] and rep.tensor_types.get("Q4_0", 0) == 1
    p.layers["model.layers.0.mlp.down_proj"] = LayerPlan(8)
    with pytest.raises(CompressError, match=r"--target gguf: layer model.layers.0.mlp.down_proj: in_features 80 "):
        apply(ragged_llama, p, tmp_path / "bad", progress=False)
