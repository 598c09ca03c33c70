import json
import shutil

import pytest
import torch

import compress
from compress.apply import apply_plan
from compress.checkpoint import WEIGHTS, load_compressed
from compress.errors import CompressError
from compress.evaluate import size_report, stored_checkpoint_bytes
from compress.models import fingerprint, load_model, quantizable_linears
from compress.plan import LayerPlan, Plan
from compress.qlinear import QuantLinear


def _bert_inputs(tok):
    return tok(["the cat sat on the mat", "quantization keeps the meaning"], padding=True, return_tensors="pt")


@pytest.mark.parametrize("bits,group", [(4, 32), (8, -1)])
def test_save_load_identical_bert(tiny_bert_dir, tmp_path, bits, group):
    p = compress.plan(tiny_bert_dir, bits=bits, group_size=group)
    assert any(lp.pad_to_group for lp in p.layers.values()) == (bits == 4)  # intermediate 80, g32
    out = compress.apply(tiny_bert_dir, p, tmp_path / "out", progress=False, dtype="float32")
    # In memory: the same plan applied to a freshly loaded model.
    lm = load_model(tiny_bert_dir)
    ref_out = lm.model(**_bert_inputs(lm.tokenizer)).last_hidden_state
    apply_plan(lm.model, p, progress=False)
    mem = lm.model(**_bert_inputs(lm.tokenizer)).last_hidden_state
    loaded = compress.load(out)
    disk = loaded.model(**_bert_inputs(loaded.tokenizer)).last_hidden_state
    assert torch.equal(mem, disk)
    assert not torch.equal(mem, ref_out)
    n_q = sum(isinstance(m, QuantLinear) for m in loaded.model.modules())
    assert n_q == len(p.layers) == 12
    # No parameter was left on the meta device.
    assert all(t.device.type == "cpu" for t in loaded.model.state_dict().values())


def test_save_load_identical_llama_tied(tiny_llama_dir, tmp_path):
    p = compress.plan(tiny_llama_dir, bits=4, group_size=32, symmetric=True)
    out = compress.apply(tiny_llama_dir, p, tmp_path / "out", progress=False, dtype="float32")
    meta = json.loads((out / "compress.json").read_text())
    assert meta["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    lm = load_model(tiny_llama_dir)
    apply_plan(lm.model, p, progress=False)
    ids = torch.randint(0, 1000, (2, 9))
    loaded = compress.load(out)
    assert loaded.model.lm_head.weight.data_ptr() == loaded.model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(lm.model(input_ids=ids).logits, loaded.model(input_ids=ids).logits)


def test_default_stores_unquantized_parts_in_float16(tiny_llama_dir, tmp_path):
    from compress.apply import cast_unquantized

    p = compress.plan(tiny_llama_dir, bits=4, group_size=32, symmetric=True)
    out = compress.apply(tiny_llama_dir, p, tmp_path / "out", progress=False)
    loaded = compress.load(out)
    assert loaded.model.model.embed_tokens.weight.dtype == torch.float16
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    lm = load_model(tiny_llama_dir)
    apply_plan(lm.model, p, progress=False)
    cast_unquantized(lm.model, torch.float16)
    ids = torch.randint(0, 1000, (2, 9))
    assert torch.equal(lm.model(input_ids=ids).logits, loaded.model(input_ids=ids).logits)
    # never larger than an fp16 copy of the model
    assert size_report(loaded.model).ratio_vs_fp16 > 1


def test_weight_bytes_match_accounting(tiny_llama_dir, tmp_path):
    # Symmetric per-row int4 on K = 64 / 96: the checkpoint holds exactly the packed bytes, plus
    # compressed-tensors' weight_shape (two int64) per layer.
    out = compress.apply(tiny_llama_dir, compress.plan(tiny_llama_dir, bits=4, group_size=-1, symmetric=True),
                         tmp_path / "o", progress=False)
    rep = size_report(compress.load(out).model)
    n_layers = rep.quantized_layers
    assert stored_checkpoint_bytes(out) == rep.total_bytes + 16 * n_layers
    assert rep.by_kind["linears"] == rep.quantized_bytes and rep.by_kind["heads"] == 0  # tied head: the table


def test_overflowing_float16_falls_back_or_is_named(tiny_llama_dir, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    src = tmp_path / "big"
    shutil.copytree(tiny_llama_dir, src)
    m = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        m.model.norm.weight[0] = 1e6
    m.save_pretrained(src)
    p = compress.plan(src, bits=8)
    stats: dict = {}
    out = compress.apply(src, p, tmp_path / "o", progress=False, stats=stats)
    assert stats["dtype"] == "bfloat16" and "model.norm.weight holds values up to 1e+06" in stats["dtype_reason"]
    assert compress.load(out).model.model.norm.weight.dtype == torch.bfloat16
    with pytest.raises(CompressError, match=r"tensor model.norm.weight holds values up to 1e\+06, beyond float16"):
        compress.apply(src, p, tmp_path / "o2", progress=False, dtype="float16")
    assert not (tmp_path / "o2").exists()


def test_mixed_plan_with_default(tiny_bert_dir, tmp_path):
    lm = load_model(tiny_bert_dir)
    names = list(quantizable_linears(lm.model))
    p = Plan(layers={names[0]: LayerPlan(8), names[1]: LayerPlan(16)},
             default=LayerPlan(4, 64, True, pad_to_group=True), fingerprint=fingerprint(lm.model))
    out = compress.apply(tiny_bert_dir, p, tmp_path / "mixed", progress=False)
    layers = json.loads((out / "compress.json").read_text())["layers"]
    assert layers[names[0]]["bits"] == 8 and names[1] not in layers
    assert {v["bits"] for k, v in layers.items() if k != names[0]} == {4}


def test_output_exists_refused_and_overwrite(tiny_bert_dir, tmp_path):
    p = compress.plan(tiny_bert_dir, bits=8)
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CompressError, match="exists; pass --overwrite"):
        compress.apply(tiny_bert_dir, p, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces only a directory compress wrote: the user's own directory is kept
    with pytest.raises(CompressError):
        compress.apply(tiny_bert_dir, p, out, overwrite=True, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    mine = tmp_path / "c"
    compress.apply(tiny_bert_dir, p, mine, progress=False)
    (mine / "stale.txt").write_text("old")
    compress.apply(tiny_bert_dir, p, mine, overwrite=True, progress=False)
    assert not (mine / "stale.txt").exists() and (mine / WEIGHTS).exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["c", "o"]  # no temporary leftovers


def test_nan_weights_named_and_nothing_written(tiny_bert_dir, tmp_path):
    from transformers import BertModel

    bad_dir = tmp_path / "nan-bert"
    shutil.copytree(tiny_bert_dir, bad_dir)
    m = BertModel.from_pretrained(bad_dir)
    m.encoder.layer[1].output.dense.weight.data[0, 0] = float("nan")
    m.save_pretrained(bad_dir)
    p = compress.plan(bad_dir, bits=4, group_size=-1)
    with pytest.raises(CompressError, match=r"layer encoder.layer.1.output.dense: weight has 1 non-finite"):
        compress.apply(bad_dir, p, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["nan-bert"]


def test_plan_for_another_model_refused(tiny_bert_dir, tiny_llama_dir, tmp_path):
    p = compress.plan(tiny_bert_dir, bits=8)
    with pytest.raises(CompressError, match="another model"):
        compress.apply(tiny_llama_dir, p, tmp_path / "o", progress=False)


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_corrupted_safetensors(tiny_bert_dir, tmp_path, damage):
    out = compress.apply(tiny_bert_dir, compress.plan(tiny_bert_dir, bits=8), tmp_path / "o", progress=False)
    f = out / WEIGHTS
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07" * 8 + data[8:])
    with pytest.raises(CompressError, match="truncated|corrupted"):
        load_compressed(out)


def test_not_a_compressed_dir(tiny_bert_dir):
    with pytest.raises(CompressError, match="no compress.json"):
        load_compressed(tiny_bert_dir)


def test_bad_model_paths(tmp_path):
    with pytest.raises(CompressError, match="does not exist"):
        compress.plan(tmp_path / "missing", bits=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CompressError, match="not a model directory: it has no config.json"):
        compress.plan(tmp_path / "empty", bits=8)


@pytest.mark.parametrize("low_memory", [False, True])
def test_dtype_for_unquantized_parts(tiny_llama_dir, tmp_path, low_memory):
    p = compress.plan(tiny_llama_dir, bits=4, group_size=32)
    out = compress.apply(tiny_llama_dir, p, tmp_path / "o", progress=False, dtype="bfloat16", low_memory=low_memory)
    lm = compress.load(out)
    assert lm.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert lm.model(input_ids=torch.randint(0, 100, (1, 5))).logits.dtype == torch.bfloat16
    fp32 = (tmp_path / "o32")
    compress.apply(tiny_llama_dir, p, fp32, progress=False, dtype="float32")
    assert (out / WEIGHTS).stat().st_size < (fp32 / WEIGHTS).stat().st_size
    with pytest.raises(CompressError, match="dtype 'float8'"):
        compress.apply(tiny_llama_dir, p, tmp_path / "x", progress=False, dtype="float8")
