"""ONNX export at opset 23: torch.onnx writes a float32 Llama's attention as ONNX Attention, RotaryEmbedding
and RMSNormalization (onnxruntime's fast decode path, bench/gguf_bench.py); the graph must also run at
batch > 1, which needs position ids with the batch axis (validation runs batches of 2 and more)."""
import collections

import pytest
import torch

from compress.api import apply, plan

onnx = pytest.importorskip("onnx", reason="needs onnx: pip install '.[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime: pip install '.[onnx]'")


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split(".")[:2])


@pytest.mark.skipif(_version(ort.__version__) < (1, 23), reason="opset 23 kernels need onnxruntime >= 1.23")
def test_opset23_llama_runs_fused_attention_at_any_batch(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from compress.export import export_onnx

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).eval().save_pretrained(tmp_path / "src")
    uniform = plan(tmp_path / "src", bits=4, group_size=32, target="any", progress=False)
    comp = apply(tmp_path / "src", uniform, tmp_path / "comp", dtype="float32", progress=False)
    # Validation feeds batches of several rows (prompt, then a decode step with the cache): a graph
    # whose cos / sin caches lack the batch axis fails there inside onnxruntime's RotaryEmbedding.
    rep = export_onnx(comp, tmp_path / "m.onnx", past_key_values=True, opset=23)
    ops = collections.Counter(n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node)
    assert rep.validated and rep.kl < rep.kl_tolerance
    assert ops["Attention"] == 1 and ops["RotaryEmbedding"] == 2 and ops["RMSNormalization"] == 3
