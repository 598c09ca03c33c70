"""ONNX export: the MatMulNBits layout against the operator's definition, one-node runs in
onnxruntime against QuantLinear.reference_forward, whole models exported and validated, bad input."""
import importlib.util
import os

import numpy as np
import pytest
import torch
from torch import nn

import compress
from compress import export as ex
from compress.export import onnx_export, onnx_ops
from compress.errors import CompressError
from compress.models import load_model, quantizable_linears
from compress.plan import LayerPlan
from compress.qlinear import QuantLinear
from compress.quant import QuantSpec

pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install 'compress[onnx]'")
pytest.importorskip("onnxscript", reason="needs the onnx extra: pip install 'compress[onnx]'")
import onnx  # noqa: E402

# (bits, group, symmetric, in_features): groups that pad K (80, 77, 200 at g32/g64), a row length that
# is odd (13) or not a power of two (300, 100, 384) for the per-row re-blocking.
LAYOUT_CASES = [(4, 32, False, 80), (4, 32, True, 77), (4, 64, False, 200), (4, 128, True, 96),
                (4, -1, True, 13), (4, -1, False, 300), (8, -1, True, 100), (8, -1, True, 384)]


def _quant_linear(bits, group, sym, k, n=24, seed=0, bias=True):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.linspace(0.2, 3.0, n)[:, None])  # rows of different ranges
    return QuantLinear.from_linear(lin, QuantSpec(bits, group, sym))


@pytest.mark.parametrize("bits,group,sym,k", LAYOUT_CASES)
def test_nbits_tensors_follow_the_spec_and_dequantize_exactly(bits, group, sym, k):
    q = _quant_linear(bits, group, sym, k)
    t = ex.nbits_tensors(q)
    bs, n = t.block_size, q.out_features
    assert bs >= 16 and bs & (bs - 1) == 0
    n_blocks = -(-k // bs)
    # ContribOperators.md: B (N, k_blocks, blob_size), scales (N * k_blocks), packed zero points
    # (N, ceil(k_blocks * bits / 8)); no zero points means 2^(bits-1).
    assert t.b.shape == (n, n_blocks, bs * bits // 8) and t.b.dtype == torch.uint8
    assert t.scales.shape == (n * n_blocks,) and t.scales.dtype == torch.float32
    if sym:
        assert t.zero_points is None
    else:
        assert t.zero_points.shape == (n, -(-n_blocks * bits // 8)) and t.zero_points.dtype == torch.uint8
    assert torch.equal(ex.nbits_dequantize(t), q.dequantized_weight())
    if bits == 4 and group != -1:  # grouped int4 is the stored bytes, not a copy
        assert t.b.data_ptr() == q.qweight.data_ptr()


@pytest.mark.parametrize("bits,group,sym,k", LAYOUT_CASES)
def test_one_matmul_nbits_node_matches_reference_forward(bits, group, sym, k):
    q = _quant_linear(bits, group, sym, k, seed=k)
    exact = ex.MatMulNBitsLinear.from_quant_linear(q, torch.float32, accuracy_level=0)
    fast = ex.MatMulNBitsLinear.from_quant_linear(q, torch.float32, accuracy_level=4)
    sessions = {0: ex.ort_session(ex.matmul_nbits_model(exact)), 4: ex.ort_session(ex.matmul_nbits_model(fast))}
    for m in (1, 3, 17):
        x = torch.randn(m, k)
        ref = q.reference_forward(x)
        torch.testing.assert_close(exact(x), ref, rtol=1e-5, atol=1e-5)  # the torch side of the module
        for level, bound in ((0, 1e-5), (4, 3e-2)):
            y = torch.from_numpy(sessions[level].run(None, {"A": x.numpy()})[0])
            rel = float((y - ref).abs().max() / ref.abs().max())
            assert rel < bound, (level, m, rel)


def test_installed_onnxruntime_runs_4_and_8_bit_matmul_nbits():
    assert ex.ort_supports_nbits(4)
    from onnxruntime import __version__

    if tuple(int(p) for p in __version__.split(".")[:2]) >= (1, 32):
        assert ex.ort_supports_nbits(8)


def test_dequantize_matmul_module_matches_reference():
    q = _quant_linear(8, -1, True, 100)
    layer = ex.DequantizeMatMulLinear(q, torch.float32, opset=21)
    assert layer.qweight_t.shape == (100, 24) and layer.qweight_t.dtype == torch.int8
    x = torch.randn(5, 100)
    torch.testing.assert_close(layer(x), q.reference_forward(x), rtol=1e-5, atol=1e-5)


# ---- whole models -------------------------------------------------------------------------------

# The mixed plan cycles through every storage the exporter maps (16-bit stays nn.Linear).
MIXED = [(4, 64, True), (4, -1, True), (8, -1, True), (16, -1, True), (4, -1, False), (4, 32, False)]


def _plan(model_dir, which):
    lm = load_model(model_dir)
    if which == "int8":
        return compress.plan(model_dir, bits=8, loaded=lm)
    p = compress.plan(model_dir, bits=4, group_size=32, symmetric=False, loaded=lm)
    if which == "mixed":
        linears = quantizable_linears(lm.model)
        for i, name in enumerate(p.layers):
            bits, group, sym = MIXED[i % len(MIXED)]
            pad = bits == 4 and group != -1 and linears[name].in_features % group != 0
            p.layers[name] = LayerPlan(bits, group, sym, pad)
        p.target = "any"  # mixed shards of one fused vLLM layer on purpose
    return p


def _expected_layers(plan, int8_nbits=True):
    counts = {}
    for lp in plan.layers.values():
        if lp.bits == 16:
            continue
        key = (f"MatMulNBits (bits={lp.bits})" if lp.bits == 4 or int8_nbits
               else "DequantizeLinear+MatMul (8-bit)")
        counts[key] = counts.get(key, 0) + 1
    return counts


def _graph_counts(path):
    m = onnx.load(str(path), load_external_data=False)
    bits = [next(a.i for a in n.attribute if a.name == "bits") for n in m.graph.node if n.op_type == "MatMulNBits"]
    return {"nbits4": bits.count(4), "nbits8": bits.count(8),
            "dq": sum(n.op_type == "DequantizeLinear" for n in m.graph.node)}, m


def _stored_per_row(comp):
    """Layers the directory stores with one group per row (the planner may turn a group as wide as
    the row into -1), which the exporter must re-block."""
    return {n for n, m in compress.load(comp).model.named_modules()
            if isinstance(m, QuantLinear) and m.group_size == -1}


def _check_report(rep, plan, out, comp, int8_nbits=True):
    layers = {k: v for k, v in rep.layers.items() if not k.startswith("MatMul (16")}
    assert layers == _expected_layers(plan, int8_nbits)
    n16 = sum(lp.bits == 16 for lp in plan.layers.values())
    assert rep.layers.get("MatMul (16-bit)", 0) >= n16  # plus unplanned heads (pooler, lm_head)
    assert rep.validated and rep.rel_err <= rep.tolerance
    assert rep.validation_shapes == [[1, 1], [3, 19]] + ([[3, 1]] if rep.past_key_values else [])
    counts, m = _graph_counts(out)
    if isinstance(rep.accuracy_level, str):  # the default: int8 activations for 4-bit layers only
        assert rep.accuracy_level.startswith("auto")
        for node in (n for n in m.graph.node if n.op_type == "MatMulNBits"):
            attrs = {a.name: a.i for a in node.attribute}
            assert attrs["accuracy_level"] == {4: 4, 8: 0}[attrs["bits"]], node.name
    assert counts["nbits4"] == layers.get("MatMulNBits (bits=4)", 0)
    assert counts["nbits8"] == layers.get("MatMulNBits (bits=8)", 0)
    assert counts["dq"] == layers.get("DequantizeLinear+MatMul (8-bit)", 0)
    bits = {n: lp.bits for n, lp in plan.layers.items()}
    per_row = {n for n in _stored_per_row(comp) if bits[n] == 4 or int8_nbits}
    assert set(rep.reblocked) == per_row
    # The ONNX file is the compressed weights plus float32 scales and the graph, not the fp32 model.
    assert rep.onnx_bytes < 1.05 * rep.compressed_bytes + 150_000
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp left behind


@pytest.fixture(scope="module")
def tiny_bert_int4(tiny_bert_dir, tmp_path_factory):
    return compress.apply(tiny_bert_dir, _plan(tiny_bert_dir, "int4"), tmp_path_factory.mktemp("tb") / "int4",
                          progress=False)


def test_tiny_bert_mixed_exports_exactly_at_accuracy_level_0(tiny_bert_dir, tmp_path):
    plan = _plan(tiny_bert_dir, "mixed")
    padded = [n for n, lp in plan.layers.items() if lp.pad_to_group]
    assert padded  # intermediate 80 at g32 / g64
    # float32 for everything left unquantized: the graph then computes in float32 and any layout
    # slip shows against float rounding (16-bit graphs are tested below).
    comp = compress.apply(tiny_bert_dir, plan, tmp_path / "comp", progress=False, dtype="float32")
    out = tmp_path / "onnx" / "model.onnx"
    rep = ex.export_onnx(comp, out, accuracy_level=0)
    _check_report(rep, plan, out, comp)
    assert rep.rel_err < 1e-5  # float compute: any layout slip would show as O(1)
    _, m = _graph_counts(out)
    node = next(n for n in m.graph.node if n.op_type == "MatMulNBits" and
                {a.name: a.i for a in n.attribute}["K"] == 80)
    attrs = {a.name: a.i for a in node.attribute}
    assert attrs["N"] == 64 and attrs["accuracy_level"] == 0 and attrs["block_size"] in (32, 64, 128)
    assert [i.name for i in m.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in m.graph.output] == ["last_hidden_state"]
    assert [d.dim_param for d in m.graph.input[0].type.tensor_type.shape.dim] == ["batch", "sequence"]


def test_tiny_llama_mixed_with_past_dequantize_fallback_and_external_data(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_ops, "ort_supports_nbits", lambda bits: bits == 4)  # an onnxruntime without 8-bit
    plan = _plan(tiny_llama_dir, "mixed")
    comp = compress.apply(tiny_llama_dir, plan, tmp_path / "comp", progress=False)
    out = tmp_path / "onnx" / "model.onnx"
    out.parent.mkdir()
    out.write_text("old")
    rep = ex.export_onnx(comp, out, overwrite=True, external_data=True, past_key_values=True)
    _check_report(rep, plan, out, comp, int8_nbits=False)
    assert rep.external_data and os.path.getsize(rep.external_data) > 0.9 * rep.compressed_bytes
    assert os.path.getsize(out) < 200_000  # the graph alone
    _, m = _graph_counts(out)
    assert [i.name for i in m.graph.input][:4] == ["input_ids", "attention_mask", "past_key_values.0.key",
                                                   "past_key_values.0.value"]
    assert [o.name for o in m.graph.output] == ["logits", "present.0.key", "present.0.value",
                                                "present.1.key", "present.1.value"]
    # Prompt then two single-token steps through the cache reproduce PyTorch's logits of the whole
    # sequence (no cache involved on the PyTorch side), in a fresh session on new tokens.
    lm = compress.load(comp)
    ids = torch.randint(0, lm.model.config.vocab_size, (2, 9))
    ref = lm.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.detach().float().numpy()
    sess = ex.ort_session(out)
    names = [i.name for i in m.graph.input]
    layers, heads, size = ex.kv_shape(lm.model.config)
    # The cache is in the model's dtype (16-bit by default), as the graph's inputs are.
    np_dtype = {torch.float32: np.float32, torch.float16: np.float16}[ex.graph_dtype(lm.model)]
    past = [np.zeros((2, heads, 0, size), np_dtype)] * (2 * layers)
    logits = []
    for lo, hi in ((0, 7), (7, 8), (8, 9)):
        feeds = {"input_ids": ids[:, lo:hi].numpy(), "attention_mask": np.ones((2, hi), np.int64)}
        res = sess.run(None, {**feeds, **dict(zip(names[2:], past))})
        logits.append(res[0])
        past = res[1:]
        assert past[0].shape == (2, heads, hi, size)
    y = np.concatenate(logits, axis=1).astype(np.float32)
    assert np.abs(y - ref).max() / np.abs(ref).max() < ex.TOLERANCE[4]


@pytest.fixture(scope="module")
def tiny_llama_16bit(tiny_llama_dir, tmp_path_factory):
    plan = _plan(tiny_llama_dir, "int4")
    return {dt: compress.apply(tiny_llama_dir, plan, tmp_path_factory.mktemp(dt) / "comp", progress=False, dtype=dt)
            for dt in ("float16", "bfloat16")}


@pytest.mark.parametrize("past", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_models_export_with_and_without_the_cache(tiny_llama_16bit, tmp_path, dtype, past):
    """float16: the graph, its inputs and its cache in float16 (a float32 sample cache made torch's
    attention fail: query float16, key/value float32). bfloat16: computed in float32, said so."""
    comp = tiny_llama_16bit[dtype]
    assert ex.graph_dtype(compress.load(comp).model) == getattr(torch, dtype)
    out = tmp_path / "m.onnx"
    rep = ex.export_onnx(comp, out, past_key_values=past, accuracy_level=0)
    graph_dtype = "float16" if dtype == "float16" else "float32"
    assert (rep.dtype, rep.source_dtype) == (graph_dtype, dtype)
    assert rep.validated and rep.kl <= rep.kl_tolerance and rep.top1 == 1.0
    m = onnx.load(str(out), load_external_data=False)
    elem = {"float16": onnx.TensorProto.FLOAT16, "float32": onnx.TensorProto.FLOAT}[graph_dtype]
    floats = [v for v in list(m.graph.input) + list(m.graph.output) if v.type.tensor_type.elem_type not in
              (onnx.TensorProto.INT64,)]
    assert floats and {v.type.tensor_type.elem_type for v in floats} == {elem}
    assert len(floats) == (1 + 8 if past else 1)  # logits (+ 2 layers x key, value in and out)
    if dtype == "bfloat16":
        assert any("upcast" in str(v) for _, v in rep.rows())
        assert rep.rel_err < 1e-4  # against the same weights in float32: float rounding only


def test_validation_failure_writes_nothing(tiny_bert_int4, tmp_path):
    out = tmp_path / "model.onnx"
    with pytest.raises(CompressError, match=r"differs from PyTorch by rel error .* > tolerance 1e-12 at "
                                            r"accuracy_level auto \(4-bit: 4, 8-bit: 0\); nothing was written"):
        ex.export_onnx(tiny_bert_int4, out, tolerance=1e-12)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def real_models(minilm_dir, shared_data):
    from compress.models import resolve_model_path

    return {"minilm": minilm_dir, "stories260k": resolve_model_path("stories260k")}


@pytest.mark.slow
@pytest.mark.parametrize("which", ["int4", "int8", "mixed"])
@pytest.mark.parametrize("name", ["minilm", "stories260k"])
def test_real_models_export_and_validate(real_models, name, which, tmp_path):
    plan = _plan(real_models[name], which)
    comp = compress.apply(real_models[name], plan, tmp_path / "comp", progress=False)
    out = tmp_path / "onnx" / f"{name}-{which}.onnx"
    rep = ex.export_onnx(comp, out)
    _check_report(rep, plan, out, comp)
    if which == "int4":
        assert rep.onnx_bytes < 0.65 * rep.fp32_bytes


# ---- bad input ----------------------------------------------------------------------------------


def test_existing_output_is_refused(tiny_bert_int4, tmp_path):
    out = tmp_path / "model.onnx"
    out.write_text("keep me")
    with pytest.raises(CompressError, match=r"output .*model.onnx exists; pass --overwrite to replace it"):
        ex.export_onnx(tiny_bert_int4, out)
    assert out.read_text() == "keep me"
    with pytest.raises(CompressError, match=r"is a directory; give a file name such as"):
        ex.export_onnx(tiny_bert_int4, tmp_path)


@pytest.mark.parametrize("kwargs,message", [
    ({"accuracy_level": 5}, r"accuracy_level must be one of \[0, 1, 2, 3, 4\], got 5"),
    ({"opset": 17}, r"opset must be between 18 and 23, got 17"),
])
def test_bad_options(tiny_bert_int4, tmp_path, kwargs, message):
    with pytest.raises(CompressError, match=message):
        ex.export_onnx(tiny_bert_int4, tmp_path / "m.onnx", **kwargs)


def test_past_key_values_need_a_causal_lm(tiny_bert_int4, tmp_path):
    with pytest.raises(CompressError, match=r"past key/values need a causal LM, this is an encoder model"):
        ex.export_onnx(tiny_bert_int4, tmp_path / "m.onnx", past_key_values=True)


def test_not_a_compressed_directory(tiny_bert_dir, tmp_path):
    with pytest.raises(CompressError, match=r"is not a compressed model directory: it has no compress.json"):
        ex.export_onnx(tiny_bert_dir, tmp_path / "m.onnx")


class Foreign(nn.Module):
    def forward(self, x):
        return x


def test_unmappable_layer_types_are_named(tiny_bert_int4, tmp_path, monkeypatch):
    real = onnx_export.load_compressed

    def with_foreign(path):
        lm = real(path)
        lm.model.pooler.dense = Foreign()
        return lm

    monkeypatch.setattr(onnx_export, "load_compressed", with_foreign)
    with pytest.raises(CompressError, match=r"no ONNX mapping for layer types \S*Foreign \(1: pooler.dense\)"):
        ex.export_onnx(tiny_bert_int4, tmp_path / "m.onnx")


@pytest.mark.parametrize("missing", ["onnxruntime", "onnxscript"])
def test_missing_packages_name_the_extra(tiny_bert_int4, tmp_path, monkeypatch, missing):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == missing else real(n, *a))
    with pytest.raises(CompressError, match=rf"ONNX export needs {missing}: pip install onnx onnxruntime onnxscript"):
        ex.export_onnx(tiny_bert_int4, tmp_path / "m.onnx")
