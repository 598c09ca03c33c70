import pytest
import torch

import compress
from compress.data import calibration_batches, default_corpus
from compress.errors import CompressError
from compress.models import load_model
from compress.walker import CheckpointReader, empty_model, find_blocks, walk_blocks


def test_find_blocks(tiny_bert_dir, tiny_llama_dir):
    assert find_blocks(load_model(tiny_bert_dir).model)[0] == "encoder.layer"
    name, blocks = find_blocks(load_model(tiny_llama_dir).model)
    assert name == "model.layers" and len(blocks) == 2
    with pytest.raises(CompressError, match="no stack of blocks"):
        find_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_walk_reproduces_forward(tiny_bert_dir, tiny_llama_dir, which):
    """With a no-op quantizer, the walker's last block outputs equal the in-memory model's."""
    path = tiny_bert_dir if which == "bert" else tiny_llama_dir
    lm = load_model(path)
    batches = calibration_batches(lm.tokenizer, lm.kind, default_corpus(), 4, 32, batch_size=2)
    name, blocks = find_blocks(lm.model)
    expected = []
    blocks[-1].register_forward_hook(lambda m, a, out: expected.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        for b in batches:
            lm.model(**b)
    # The same walk over a model streamed from disk, block by block.
    model = empty_model(path, lm.kind)
    seen = []
    model.get_submodule(name)[-1].register_forward_hook(
        lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    walk_blocks(model, batches, lambda *a: None, reader=CheckpointReader(path), progress=False)
    assert len(seen) == len(expected) == len(batches)
    for got, ref in zip(seen, expected):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_streamed_rtn_equals_in_memory(tiny_bert_dir, tiny_llama_dir, tmp_path, which):
    path = tiny_bert_dir if which == "bert" else tiny_llama_dir
    plan = compress.plan(path, bits=4, group_size=32)
    a = compress.load(compress.apply(path, plan, tmp_path / "a", progress=False)).model.state_dict()
    stats = {}
    b = compress.load(compress.apply(path, plan, tmp_path / "b", progress=False, low_memory=True,
                                     stats=stats)).model.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert stats["peak_rss_bytes"] > 0


def test_gptq_apply_beats_rtn_on_calibration_domain(tiny_llama_dir, tmp_path):
    from compress.data import token_stream_batches
    from compress.evaluate import lm_metrics

    plan = compress.plan(tiny_llama_dir, bits=4, group_size=32)
    rtn = compress.load(compress.apply(tiny_llama_dir, plan, tmp_path / "rtn", progress=False))
    gptq_dir = compress.apply(tiny_llama_dir, plan, tmp_path / "gptq", progress=False, quantizer="gptq",
                              samples=16, seq_len=64)
    gptq = compress.load(gptq_dir)
    assert compress.inspect(gptq_dir)["plan"]["quantizer"]["method"] == "gptq"
    ref = load_model(tiny_llama_dir)
    held_out = token_stream_batches(ref.tokenizer, default_corpus()[300:], 64, 8)
    kl_rtn = lm_metrics(rtn.model, held_out, ref.model)["mean_kl"]
    kl_gptq = lm_metrics(gptq.model, held_out, ref.model)["mean_kl"]
    assert kl_gptq < kl_rtn


def test_renamed_checkpoint_keys_refused(minilm_dir, tmp_path):
    """MiniLM stores BERT keys under the model's own names; a checkpoint without them is refused."""
    from safetensors.torch import save_file

    d = tmp_path / "renamed"
    d.mkdir()
    (d / "config.json").write_text((minilm_dir / "config.json").read_text())
    save_file({"bert.embeddings.word_embeddings.weight": torch.zeros(2, 2)}, d / "model.safetensors")
    model = empty_model(d, "encoder")
    with pytest.raises(CompressError, match="checkpoint lacks"):
        walk_blocks(model, [], lambda *a: None, reader=CheckpointReader(d), progress=False)
