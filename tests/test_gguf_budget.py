"""--target gguf budgets are spent in GGUF bytes: the planner counts each layer as the file holds it
(compress.servable.layer_bytes: Q4_0 18 / Q4_1 20 / Q8_0 34 bytes per 32 weights, F16 2 a weight, norms
F32), so a --max-bytes plan, applied and exported, gives a .gguf whose tensors take exactly the bytes
the planner counted, within the budget."""
import pytest
import torch

from compress.api import apply, plan
from compress.planner import plan_summary
from compress.quant import QuantSpec, stored_bytes
from compress.servable import GGUF_BLOCK, GGUF_BLOCK_BYTES, GGUF_PLAIN_BYTES, layer_bytes

gguf = pytest.importorskip("gguf", reason="needs gguf: pip install gguf")


def test_byte_tables_are_ggmls():
    """compress's per-type bytes are gguf's own GGML_QUANT_SIZES (block length, bytes per block)."""
    for kind, nbytes in GGUF_BLOCK_BYTES.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]] == (GGUF_BLOCK, nbytes)
    for kind, nbytes in GGUF_PLAIN_BYTES.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]] == (1, nbytes)
    # GGUF's bytes are not compress's own storage: Q4_1 keeps an fp16 offset per block (compress a
    # 4-bit zero point), Q8_0 a scale per 32 weights (compress one per row).
    n, k = 8, 64
    assert layer_bytes(QuantSpec(4, 32, False), n, k, "gguf") == 20 * n * 2 > stored_bytes(QuantSpec(4, 32, False), n, k)
    assert layer_bytes(QuantSpec(8), n, k, "gguf") == 34 * n * 2 > stored_bytes(QuantSpec(8), n, k)
    assert layer_bytes(QuantSpec(4, 32, True), n, k, "gguf") == 18 * n * 2 == stored_bytes(QuantSpec(4, 32, True), n, k)
    assert layer_bytes(QuantSpec(4, 128, True), n, 128, "gguf") == 18 * n * 4  # the scale repeats per block
    assert layer_bytes(QuantSpec(16), n, 80, "gguf") == 2 * n * 80


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, byte_vocab_llama):
    """A 2-layer random Llama (every K a multiple of 32, tied embeddings) with a llama2.c-style vocabulary."""
    return byte_vocab_llama(tmp_path_factory.mktemp("tiny-llama"), " abcdefghijklm", intermediate_size=128,
                                 num_hidden_layers=2, max_position_embeddings=128)


def _file_bytes(path) -> tuple[int, int, dict[str, int]]:
    """(bytes of every tensor, bytes of the 2-D ones, tensors per type) of a .gguf, each tensor's
    bytes recomputed from gguf's GGML_QUANT_SIZES and checked against what the reader holds."""
    reader = gguf.GGUFReader(path)
    total = two_d = 0
    kinds: dict[str, int] = {}
    for t in reader.tensors:
        block, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        nbytes = int(t.n_elements) // block * size
        assert nbytes == int(t.n_bytes) == t.data.nbytes, t.name
        total += nbytes
        if len(t.shape) == 2:
            two_d += nbytes
        kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
    return total, two_d, kinds


def _counted(p) -> int:
    return next(v for label, v in plan_summary(p) if label.startswith("bytes, whole model"))


def test_max_bytes_plan_is_spent_in_gguf_bytes(tiny_llama, tmp_path):
    from compress.export import export_gguf

    # Under gguf every planned weight (the linears and the tied table, once) costs 18/32 (Q4_0) to
    # 2 (F16) bytes and the norms 4 a value (F32): a budget a fifth of the way up buys a mix.
    planned, norms = _weights(tiny_llama)
    budget = 4 * norms + int(planned * (18 / 32 + 0.2 * (2 - 18 / 32)))
    p = plan(tiny_llama, method="fisher", granularity="module", max_bytes=budget, samples=2, target="gguf",
             progress=False)
    counted = p.counted_bytes
    assert counted["target"] == "gguf" and counted["model"] <= budget and _counted(p) == counted["model"]
    comp = apply(tiny_llama, p, tmp_path / "comp", progress=False)
    rep = export_gguf(comp, tmp_path / "m.gguf")
    total, two_d, kinds = _file_bytes(tmp_path / "m.gguf")
    # The table is a planner unit under a whole-model budget: every 2-D tensor is a planned layer.
    assert two_d == counted["layers"] and total == counted["model"] <= budget
    assert rep.f16_fallback == [] and len(set(kinds) - {"F32"}) >= 2  # the budget bought a mix of types
    assert "token_embd.weight" in {t.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}


def test_uniform_plan_counts_what_the_file_holds(tiny_llama, tmp_path):
    """Q8_0 everywhere (the table stays F16, norms F32): the summary's bytes are the file's tensor bytes."""
    from compress.export import export_gguf

    p = plan(tiny_llama, bits=8, target="gguf", progress=False)
    export_gguf(apply(tiny_llama, p, tmp_path / "comp", progress=False), tmp_path / "m.gguf")
    total, _, kinds = _file_bytes(tmp_path / "m.gguf")
    assert total == p.counted_bytes["model"] == _counted(p)
    assert kinds == {"Q8_0": 14, "F16": 1, "F32": 5}


def _weights(path) -> tuple[int, int]:
    """(weights of the planner's units under a whole-model budget: the linears and the tied table
    once; values of the 1-D tensors, the norms)."""
    from compress.models import load_model

    model = load_model(path).model
    planned = sum(m.weight.numel() for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and n != "lm_head") + model.get_input_embeddings().weight.numel()
    return planned, sum(p.numel() for p in model.parameters() if p.dim() == 1)
