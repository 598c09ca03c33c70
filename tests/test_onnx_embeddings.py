"""ONNX export of quantized embedding tables (com.microsoft GatherBlockQuantized) and of a quantized
head tied to one (MatMulNBits over the same initializers): one-node layouts against compress's
dequantized table, whole tiny models validated in onnxruntime, the dense fallback, and a bfloat16
model with quantized heads through plan, apply, load, eval and export."""
import json

import numpy as np
import pytest
import torch

from compress import api
from compress import export as ex
from compress.checkpoint import load_compressed
from compress.export import onnx_embed
from compress.plan import LayerPlan
from compress.qlinear import QuantEmbedding
from compress.quant import QuantSpec, dequantize, quantize

pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install 'compress[onnx]'")
pytest.importorskip("onnxscript", reason="needs the onnx extra: pip install 'compress[onnx]'")
import onnx  # noqa: E402

VOCAB = 4096  # rows of the tables; the tokenizer knows fewer words (the rest are never produced)


def _word_tokenizer():
    """A word-level tokenizer over the 200 commonest words of the default corpus (+ unk, eos)."""
    from collections import Counter

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from compress.data import default_corpus

    counts = Counter(w for t in default_corpus() for w in t.lower().split())
    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, (w, _) in enumerate(counts.most_common(200))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """One-block random models: a BERT (hidden 64), a tied Llama (hidden 64), a tied bfloat16
    Llama (hidden 48: its int8 rows pad to a block of 64)."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("onnx-embeddings")
    tok = _word_tokenizer()
    out = {}
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                intermediate_size=96, max_position_embeddings=64))
    specs = {"llama": (64, True, torch.float32), "bf16": (48, True, torch.bfloat16)}
    built = {"bert": bert}
    for name, (hidden, tied, dtype) in specs.items():
        torch.manual_seed(1)
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=96, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          tie_word_embeddings=tied)
        built[name] = LlamaForCausalLM(cfg).to(dtype)
    for name, model in built.items():
        model.eval().save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


# ---- one node -----------------------------------------------------------------------------------

# (spec, row length): an odd block count with zero points (96 at g32), rows padded to a whole block
# (48 and 33 per row re-blocked to 64, int8 rows of 100 to 128), symmetric int4 (default zero point 8).
ONE_NODE = [(QuantSpec(4, 32, False), 96), (QuantSpec(4, 32, True), 64), (QuantSpec(4, -1, False), 48),
            (QuantSpec(4, -1, True), 33), (QuantSpec(8), 100), (QuantSpec(8), 64)]


@pytest.mark.parametrize("spec,d", ONE_NODE)
def test_one_gather_node_equals_the_dequantized_table(spec, d):
    torch.manual_seed(d)
    table = torch.randn(40, d) * torch.linspace(0.1, 4.0, 40)[:, None]  # rows of different ranges
    qw = quantize(table, spec)
    emb = QuantEmbedding.from_quantized(qw)
    layer = onnx_embed.GatherBlockQuantizedEmbedding.from_quant_embedding(emb, torch.float32)
    bs = layer.block_size
    assert bs >= 16 and bs & (bs - 1) == 0 and layer.data.dtype == torch.uint8
    width = layer.n_blocks * bs
    assert layer.data.shape == (40, width * spec.bits // 8) and layer.scales.shape == (40, layer.n_blocks)
    assert (layer.zero_points is None) == (spec.bits == 8 or spec.symmetric)
    ids = torch.tensor([[0, 39, 7, 7], [3, 1, 20, 38]])
    want = dequantize(qw)[ids]  # (2, 4, d) float32
    assert torch.equal(layer(ids), want)  # the torch side of the module
    got = ex.ort_session(onnx_embed.gather_block_quantized_model(layer)).run(None, {"ids": ids.numpy()})[0]
    assert got.shape == (2, 4, width)
    assert np.array_equal(got[..., :d], want.numpy())  # exact, not close
    if spec.bits == 4 and spec.group_size != -1:  # grouped int4 is the stored bytes, not a copy
        assert layer.data.data_ptr() == emb.qweight.data_ptr()


def test_installed_onnxruntime_runs_4_and_8_bit_tables():
    assert onnx_embed.ort_supports_gather(4, False) and onnx_embed.ort_supports_gather(4, True)
    assert onnx_embed.ort_supports_gather(8, False)


# ---- whole models -------------------------------------------------------------------------------


def _graph(path):
    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name: i for i in m.graph.initializer}
    return m, inits


def _attrs(node):
    return {a.name: a.i for a in node.attribute}


def _nbytes(init):
    return onnx.numpy_helper.to_array(init).nbytes


def _plan(model_dir, tables, bits=4):
    p = (api.plan(model_dir, bits=4, group_size=32, symmetric=False, target="any") if bits == 4
         else api.plan(model_dir, bits=8, target="any"))
    for name, lp in tables.items():
        p.layers[name] = lp
    return p


def test_bert_int4_word_and_int8_position_tables_exactly(models, tmp_path):
    plan = _plan(models["bert"], {"embeddings.word_embeddings": LayerPlan(4, 32, False),
                                  "embeddings.position_embeddings": LayerPlan(8)})
    comp = api.apply(models["bert"], plan, tmp_path / "comp", progress=False, dtype="float32")
    out = tmp_path / "bert.onnx"
    rep = ex.export_onnx(comp, out, accuracy_level=0)
    assert rep.layers["GatherBlockQuantized (bits=4)"] == 1 and rep.layers["GatherBlockQuantized (bits=8)"] == 1
    assert rep.rel_err < 1e-5  # float compute: a layout slip in a table would show as O(1)
    m, inits = _graph(out)
    gathers = [n for n in m.graph.node if n.op_type == "GatherBlockQuantized"]
    by_bits = {_attrs(n)["bits"]: n for n in gathers}
    word, pos = by_bits[4], by_bits[8]
    assert inits[word.input[0]].dims == [VOCAB, 32] and _attrs(word)["block_size"] == 32
    assert inits[pos.input[0]].dims == [64, 64] and len(pos.input) == 3  # int8: default zero point 128
    # the dense table is gone: no float initializer holds VOCAB x 64 values
    assert not [i for i in inits.values() if np.prod(i.dims) == VOCAB * 64 and i.data_type == onnx.TensorProto.FLOAT]
    table_bytes = sum(_nbytes(inits[x]) for x in word.input if x in inits)
    assert table_bytes == VOCAB * (32 + 2 * 4 + 1)  # codes, two fp32 scales and a zero-point byte a row
    # the whole file is smaller than the word table alone would be in float16
    assert rep.onnx_bytes < 2 * VOCAB * 64


def assert_table_stored_once(rep, out, bits):
    """The tied head is a MatMulNBits over the GatherBlockQuantized node's own initializers, and no
    initializer holds the table's codes a second time."""
    assert "stored once" in rep.tables["lm_head"] and any("stored once" in n for n in rep.notes)
    m, inits = _graph(out)
    gather = next(n for n in m.graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in m.graph.node if n.op_type == "MatMulNBits" and _attrs(n)["N"] == VOCAB)
    assert _attrs(gather)["bits"] == _attrs(head)["bits"] == bits
    # B and scales through a Reshape of the table's initializers, zero points the same one
    producers = {o: n for n in m.graph.node for o in n.output}
    for i, j in ((1, 0), (2, 2), (3, 3)):
        if j >= len(gather.input):
            assert i >= len(head.input) or head.input[i] == ""
            continue
        src = head.input[i]
        if src in producers:
            assert producers[src].op_type == "Reshape" and producers[src].input[0] == gather.input[j]
        else:
            assert src == gather.input[j]
    codes = onnx.numpy_helper.to_array(inits[gather.input[0]])
    assert [n for n, i in inits.items() if i.data_type == onnx.TensorProto.UINT8
            and onnx.numpy_helper.to_array(i).size == codes.size] == [gather.input[0]]


def test_tied_int4_fp16_llama_with_cache_stores_the_codes_once(models, tmp_path):
    plan = _plan(models["llama"], {"model.embed_tokens": LayerPlan(4, 32, False)}, bits=8)
    comp = api.apply(models["llama"], plan, tmp_path / "comp", progress=False, dtype="float16")
    lm = load_compressed(comp)
    assert lm.model.lm_head.qweight is lm.model.model.embed_tokens.qweight  # tied in compress
    out = tmp_path / "m.onnx"
    rep = ex.export_onnx(comp, out, past_key_values=True, accuracy_level=0)
    assert rep.validated and rep.kl <= rep.kl_tolerance and rep.top1 == 1.0 and rep.dtype == "float16"
    assert rep.layers["GatherBlockQuantized (bits=4)"] == 1
    assert_table_stored_once(rep, out, bits=4)
    table = VOCAB * (32 + 2 * 2 + 1)  # codes, two fp16 scales and a zero-point byte a row
    assert rep.onnx_bytes < table + 120_000  # one block of int8 linears and the graph besides: the table once


def test_dense_fallback_is_exact_and_said(models, monkeypatch):
    """An onnxruntime without GatherBlockQuantized for the table's form: a dense table in the graph's
    dtype (equal to compress's rows) and a head with codes of its own, both said with their bytes."""
    qw = quantize(torch.randn(VOCAB, 64), QuantSpec(4, 32, False))
    model = torch.nn.Module()
    model.embed = QuantEmbedding.from_quantized(qw, dtype=torch.float16)
    model.head = model.embed.tied_head()
    monkeypatch.setattr(onnx_embed, "ort_supports_gather", lambda bits, zero_points, odd_blocks=True: False)
    counts, forms, sharing = onnx_embed.swap_tables_for_export(model, torch.float16, 0, int8_nbits=True)
    assert counts == {"Gather (dense float16, fallback)": 1} and isinstance(model.embed, torch.nn.Embedding)
    assert "runs no GatherBlockQuantized on uint8 4-bit data with zero points" in forms["embed"]
    ids = torch.tensor([[5, 4000, 3]])
    assert torch.equal(model.embed(ids), dequantize(qw, torch.float16)[ids])
    ex.swap_for_export(model, torch.float16, 0, 21, True)
    onnx_embed.count_own_heads(model, forms, sharing)
    assert sharing == {"head": None}
    assert forms["head"].startswith("MatMulNBits (bits=4) with codes of its own") and "B stored again" in forms["head"]


def test_odd_block_counts_with_zero_points_are_halved_where_onnxruntime_misreads_them(monkeypatch):
    """onnxruntime 1.23-1.26 misread 4-bit zero points of a row with an odd number of blocks: such a
    table is re-blocked into 2·n_blocks halves (exact), and its tied head reads the same tensors."""
    qw = quantize(torch.randn(50, 96), QuantSpec(4, 32, False))  # 3 blocks a row
    model = torch.nn.Module()
    model.embed = QuantEmbedding.from_quantized(qw)
    model.head = model.embed.tied_head()
    monkeypatch.setattr(onnx_embed, "ort_supports_gather", lambda bits, zero_points, odd_blocks=True:
                        not (zero_points and odd_blocks))
    counts, forms, sharing = onnx_embed.swap_tables_for_export(model, torch.float32, None, int8_nbits=True)
    assert counts == {"GatherBlockQuantized (bits=4)": 1, "MatMulNBits (bits=4)": 1}
    assert "blocks halved from 32" in forms["embed"] and "stored once" in forms["head"]
    emb, head = model.embed, model.head
    assert (emb.block_size, emb.n_blocks, head.block_size, head.accuracy_level) == (16, 6, 16, 4)
    assert emb.data.data_ptr() == head.b.data_ptr() and head.zero_points is emb.zero_points
    assert sharing == {"head": sum(t.numel() * t.element_size() for t in (emb.data, emb.scales, emb.zero_points))}
    ids = torch.tensor([[0, 49, 7]])
    got = ex.ort_session(onnx_embed.gather_block_quantized_model(emb)).run(None, {"ids": ids.numpy()})[0]
    assert np.array_equal(got, dequantize(qw)[ids].numpy())
    assert torch.equal(ex.nbits_dequantize(head.tensors()), dequantize(qw))


def test_bf16_model_with_quantized_heads_end_to_end(models, tmp_path):
    """plan --include-heads (the tied pair set to int8 by hand in the plan), apply, load, eval and
    export: the bfloat16 graph computes in float32, the table and its head still quantized and stored once."""
    from compress.cli import main

    src = models["bf16"]
    plan_path = tmp_path / "plan.json"
    assert main(["plan", str(src), "--bits", "4", "--group-size", "32", "--include-heads", "--target", "any",
                 "-o", str(plan_path)]) == 0
    plan = json.loads(plan_path.read_text())
    assert "lm_head" in plan["layers"]
    for name in ("lm_head", "model.embed_tokens"):
        plan["layers"][name] = {"bits": 8, "group_size": -1, "symmetric": True}
    plan_path.write_text(json.dumps(plan))
    comp = tmp_path / "comp"
    assert main(["apply", str(src), "--plan", str(plan_path), "-o", str(comp)]) == 0
    lm = api.load(comp)
    assert lm.model.lm_head.bits == 8 and lm.model.lm_head.qweight is lm.model.model.embed_tokens.qweight
    ids = torch.tensor([[2, 5, 9, 4000]])
    assert lm.model(input_ids=ids).logits.dtype == torch.bfloat16
    assert main(["eval", str(comp), "--samples", "2", "--seq-len", "16", "--json", str(tmp_path / "e.json")]) == 0
    quality = json.loads((tmp_path / "e.json").read_text())["quality"]
    assert quality and all(v is None or np.isfinite(v) for v in quality.values() if isinstance(v, float))
    out = tmp_path / "m.onnx"
    assert main(["export", str(comp), "-o", str(out), "--json", str(tmp_path / "x.json")]) == 0
    rep = json.loads((tmp_path / "x.json").read_text())
    assert (rep["dtype"], rep["source_dtype"]) == ("float32", "bfloat16") and rep["kl"] <= rep["kl_tolerance"]
    assert rep["layers"]["GatherBlockQuantized (bits=8)"] == 1
    assert_table_stored_once(ex.ExportReport(**rep), out, bits=8)
    m, inits = _graph(out)
    gather = next(n for n in m.graph.node if n.op_type == "GatherBlockQuantized")
    assert inits[gather.input[0]].dims == [VOCAB, 64] and _attrs(gather)["block_size"] == 64  # rows of 48 padded
