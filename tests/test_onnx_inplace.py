"""export_onnx(inplace_cache=True): GroupQueryAttention over one cache buffer bound as past and present
(compress.export.onnx_inplace). Greedy decoding through InplaceDecoder must give the PyTorch
compressed model's logits step after step (a wrong RoPE position, cache slot or mask shows at once),
including key/value heads fewer than query heads."""
import collections

import numpy as np
import pytest
import torch

from compress.api import apply, plan
from compress.errors import CompressError

onnx = pytest.importorskip("onnx", reason="needs onnx: pip install '.[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime: pip install '.[onnx]'")

pytestmark = pytest.mark.skipif(tuple(int(p) for p in ort.__version__.split(".")[:2]) < (1, 23),
                                reason="opset 23 kernels need onnxruntime >= 1.23")


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("inplace")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      rope_theta=100.0)  # a short period: positions off by one change the logits
    LlamaForCausalLM(cfg).eval().save_pretrained(tmp / "src")
    uniform = plan(tmp / "src", bits=4, group_size=32, target="any", progress=False)
    return tmp, apply(tmp / "src", uniform, tmp / "comp", dtype="float32", progress=False)


def test_inplace_decode_matches_torch(compressed):
    from compress import api
    from compress.export import export_onnx
    from compress.export.onnx_inplace import InplaceDecoder

    tmp, comp = compressed
    # accuracy_level 0: float activations, so onnxruntime agrees with torch to float rounding.
    rep = export_onnx(comp, tmp / "m.onnx", inplace_cache=True, opset=23, accuracy_level=0, max_length=40)
    assert rep.validated and rep.inplace_cache and rep.past_key_values and rep.max_length == 40
    graph = onnx.load(tmp / "m.onnx").graph
    ops = collections.Counter(n.op_type for n in graph.node)
    assert ops["GroupQueryAttention"] == 2 and not ops["Attention"] and not ops["Concat"]
    assert ops["MatMulNBits"] == 2 * 5  # q, k, v packed into one product per layer: qkv, o, gate, up, down
    assert [i.name for i in graph.input[:3]] == ["input_ids", "seqlens_k", "total_sequence_length"]

    model = api.load(comp).model.eval()
    prompt = torch.tensor([[5, 17, 99, 3, 64, 8, 1, 120, 33]])
    dec = InplaceDecoder(ort.InferenceSession(str(tmp / "m.onnx"), providers=["CPUExecutionProvider"]))
    assert dec.max_length == 40
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        got = dec.step(prompt.numpy()).copy()
        ref = out.logits
        for _ in range(7):
            scale = float(ref.abs().max())
            assert np.abs(got - ref.numpy()).max() / scale < 1e-4
            nxt = ref[:, -1:].argmax(-1)
            out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
            ref, got = out.logits, dec.step(nxt.numpy()).copy()
        assert np.abs(got - ref.numpy()).max() / float(ref.abs().max()) < 1e-4
    assert dec.length == prompt.shape[1] + 7
    with pytest.raises(CompressError, match="max_length 40"):
        dec.step(np.zeros((1, 30), np.int64))
    dec.reset()
    again = dec.step(prompt.numpy())  # a fresh sequence over the same buffers
    first = model(input_ids=prompt).logits.detach().numpy()
    assert np.abs(again - first).max() / np.abs(first).max() < 1e-4


def test_inplace_bad_input(compressed, tmp_path):
    from compress.export import export_onnx
    from compress.export.onnx_inplace import InplaceDecoder

    _, comp = compressed
    with pytest.raises(CompressError, match="opset 23.*got opset 21"):
        export_onnx(comp, tmp_path / "a.onnx", inplace_cache=True, opset=21)
    with pytest.raises(CompressError, match="max_length must be 1..64.*got 65"):
        export_onnx(comp, tmp_path / "b.onnx", inplace_cache=True, opset=23, max_length=65)
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "b.onnx").exists()
    rep = export_onnx(comp, tmp_path / "c.onnx", past_key_values=True, opset=23, validate=False)
    assert not rep.inplace_cache
    with pytest.raises(CompressError, match="not exported with inplace_cache"):
        InplaceDecoder(ort.InferenceSession(str(tmp_path / "c.onnx"), providers=["CPUExecutionProvider"]))


def test_inplace_float16_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from compress.export import export_onnx

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    LlamaForCausalLM(cfg).eval().save_pretrained(tmp_path / "src")
    uniform = plan(tmp_path / "src", bits=4, group_size=32, target="any", progress=False)
    comp = apply(tmp_path / "src", uniform, tmp_path / "comp", dtype="float16", progress=False)
    with pytest.raises(CompressError, match="needs a float32 graph"):
        export_onnx(comp, tmp_path / "m.onnx", inplace_cache=True, opset=23)
