"""Embedding tables and tied heads as plan units: quantized once, still tied after save and load,
scored by the analyzers that predict damage, planned under whole-model budgets."""
import json

import pytest
import torch

import compress
from compress.checkpoint import load_compressed
from compress.errors import CompressError
from compress.evaluate import size_report, stored_checkpoint_bytes
from compress.plan import LayerPlan
from compress.qlinear import QuantEmbedding, QuantLinear
from compress.quant import QuantSpec, dequantize, quantize


def test_quant_embedding_looks_up_dequantized_rows():
    torch.manual_seed(0)
    table = torch.randn(50, 64)
    for spec in (QuantSpec(8), QuantSpec(4, 32, False), QuantSpec(4, -1, True)):
        qw = quantize(table, spec)
        emb = QuantEmbedding.from_quantized(qw, dtype=torch.float16)
        ids = torch.tensor([[0, 7, 49], [3, 3, 1]])
        assert torch.equal(emb(ids), dequantize(qw, torch.float16)[ids])
        head = emb.tied_head()
        x = torch.randn(2, 64, dtype=torch.float16)
        assert head.qweight is emb.qweight
        assert torch.equal(head(x), torch.nn.functional.linear(x, dequantize(qw, torch.float16)))


def _ids():
    return torch.tensor([[2, 45, 99, 1000, 7, 3], [2, 8, 17, 300, 44, 3]])


def test_tied_table_quantized_once_and_still_tied(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    p = compress.plan(tiny_llama_dir, bits=8, target="any")
    p.layers["model.embed_tokens"] = LayerPlan(4, 32, False)
    out = compress.apply(tiny_llama_dir, p, tmp_path / "o", progress=False)
    lm = load_compressed(out)
    emb, head = lm.model.model.embed_tokens, lm.model.lm_head
    assert isinstance(emb, QuantEmbedding) and isinstance(head, QuantLinear) and head.qweight is emb.qweight
    meta = json.loads((out / "compress.json").read_text())
    assert meta["layers"]["lm_head"]["tied_to"] == "model.embed_tokens"
    # never larger than the original checkpoint, even with the dense copy transformers reads
    assert stored_checkpoint_bytes(out) < stored_checkpoint_bytes(tiny_llama_dir)
    rep = size_report(lm.model)
    assert rep.by_kind["heads"] == 0 and rep.by_kind["embeddings"] == emb.weight_bytes()
    # transformers loads the dense 16-bit copy of the table: the same logits
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()(_ids()).logits
    torch.testing.assert_close(theirs, lm.model(_ids()).logits, rtol=0, atol=0)


def test_tied_pair_stored_differently_is_refused(tiny_llama_dir, tmp_path):
    p = compress.plan(tiny_llama_dir, bits=8, target="any")
    p.layers["model.embed_tokens"] = LayerPlan(8)
    p.layers["lm_head"] = LayerPlan(4, 32, False)
    with pytest.raises(CompressError, match=r"plan stores lm_head as .*tied to model.embed_tokens, stored as "
                                            r"\{'bits': 8.*a tied pair is one table"):
        compress.apply(tiny_llama_dir, p, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_embedding_group_must_divide_its_rows(tiny_llama_dir, tmp_path):
    p = compress.plan(tiny_llama_dir, bits=8, target="any")
    p.layers["model.embed_tokens"] = LayerPlan(4, 128, False)  # rows of 64: one group per row
    out = compress.apply(tiny_llama_dir, p, tmp_path / "o", progress=False)
    assert load_compressed(out).model.model.embed_tokens.spec == QuantSpec(4, -1, False)


@pytest.mark.parametrize("method", ["fisher", "taylor", "oracle"])
def test_whole_model_budget_plans_tables(tiny_llama_dir, method):
    from compress.planner import check_feasible, plan_units_modules
    from compress.models import load_model

    lm = load_model(tiny_llama_dir)
    p = compress.plan(tiny_llama_dir, method=method, granularity="module", max_bytes=1_300_000, target="any",
                      samples=2, progress=False, loaded=lm)
    assert "model.embed_tokens" in p.sensitivity["units"]
    assert p.sensitivity["units"]["model.embed_tokens"] == ["model.embed_tokens", "lm_head"]
    assert set(p.sensitivity["damage"]["model.embed_tokens"]) == {"4", "8", "16"}
    assert p.layers["model.embed_tokens"] == p.layers["lm_head"]
    # the knapsack spent the budget on the whole model: the table (62 % of it) is quantized
    assert p.layers["model.embed_tokens"].bits < 16
    units = plan_units_modules(lm.model, (), False)
    cap = check_feasible(lm.model, units, {"max_bytes": 1_300_000}, 32, False, "any")
    from compress.planner import unit_bytes

    used = sum(unit_bytes([m], p.layers[n].bits, 32, False, "any") for n, m in units.items() if n != "lm_head")
    assert used <= cap


def test_vllm_target_and_linear_budgets_keep_tables_16bit(tiny_llama_dir):
    from compress.models import load_model

    lm = load_model(tiny_llama_dir)
    p = compress.plan(tiny_llama_dir, method="fisher", granularity="module", max_bytes=4_000_000, samples=2,
                      progress=False, loaded=lm)  # default target vllm for a causal LM
    assert "model.embed_tokens" not in p.layers
    p = compress.plan(tiny_llama_dir, method="fisher", granularity="module", budget=6, target="any", samples=2,
                      progress=False, loaded=lm)  # avg bits over the linears
    assert "model.embed_tokens" not in p.layers
    p = compress.plan(tiny_llama_dir, method="fisher", granularity="module", budget=6, budget_scope="model",
                      target="any", samples=2, progress=False, loaded=lm)
    assert p.budget == {"avg_bits": 6.0, "scope": "model"} and "model.embed_tokens" in p.layers


def test_budget_scope_needs_average_bits():
    from compress.planner import make_budget

    with pytest.raises(CompressError, match="--budget-scope applies to --budget"):
        make_budget(None, "1MB", None, "model")
