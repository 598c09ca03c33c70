"""Compressed directories are compressed-tensors checkpoints: transformers loads them as they are,
compressed-tensors' own decompression equals compress's dequantized weights bit for bit, and peers'
checkpoints load in compress."""
import json
import subprocess
import sys

import pytest
import torch

import compress
from compress.checkpoint import META, PACKED, WEIGHTS, load_compressed
from compress.ct_format import from_ct, to_ct, weights_args
from compress.errors import CompressError
from compress.plan import LayerPlan, Plan
from compress.qlinear import QuantLinear
from compress.quant import QuantSpec, dequantize, quantize
from compress.safetensors_io import CheckpointReader, write_safetensors

ct = pytest.importorskip("compressed_tensors", reason="needs the serve extra (compressed-tensors)")


def _ct_decompress(tensors: dict, spec: QuantSpec) -> torch.Tensor:
    """compressed-tensors' own reader: its pack-quantized compressor's decompress."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = {k: v for k, v in weights_args(spec).items() if v is not None}
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**args))
    return PackedQuantizationCompressor.decompress(dict(tensors), scheme)["weight"]


@pytest.mark.parametrize("spec,shape", [
    (QuantSpec(4, 32, False), (172, 64)), (QuantSpec(4, 64, True), (33, 128)), (QuantSpec(4, 128, False), (9, 256)),
    (QuantSpec(4, -1, False), (17, 172)), (QuantSpec(4, -1, True), (8, 63)), (QuantSpec(8), (19, 172)),
], ids=str)
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32], ids=str)
def test_ct_tensors_decompress_bit_exact_and_round_trip(spec, shape, scale_dtype):
    torch.manual_seed(shape[0])
    qw = quantize(torch.randn(*shape) * 0.05, spec)
    t = to_ct(qw, scale_dtype)
    assert t["weight_packed"].dtype == torch.int32 and t["weight_shape"].tolist() == list(shape)
    if not spec.symmetric and spec.bits == 4:
        assert tuple(t["weight_zero_point"].shape) == (-(-shape[0] // 8), qw.scales.shape[1])
    got = _ct_decompress(t, spec)
    assert torch.equal(got, dequantize(qw, got.dtype))
    back = from_ct(t, spec, "x")
    assert torch.equal(back.qweight, qw.qweight) and torch.equal(back.scales, qw.scales)
    assert (back.zeros is None) == (qw.zeros is None) and (qw.zeros is None or torch.equal(back.zeros, qw.zeros))


def test_mis_shaped_tensors_are_named():
    qw = quantize(torch.randn(16, 64), QuantSpec(4, 32, False))
    t = to_ct(qw, torch.float16)
    bad = dict(t, weight_packed=t["weight_packed"][:, :-1])
    with pytest.raises(CompressError, match=r"layer L: weight_packed has shape \(16, 7\) torch.int32, expected \(16, 8\)"):
        from_ct(bad, qw.spec, "L")
    bad = dict(t, weight_zero_point=t["weight_zero_point"][:1, :1])
    with pytest.raises(CompressError, match=r"layer L: weight_zero_point is \(1, 1\) torch.int32, expected \(2, 2\)"):
        from_ct(bad, qw.spec, "L")


PLANS = {"int8": dict(bits=8), "int4-g32": dict(bits=4, group_size=32), "int4-g64-sym": dict(bits=4, group_size=64,
                                                                                             symmetric=True)}


def _ids():
    return torch.tensor([[2, 45, 99, 1000, 7, 3, 12, 600], [2, 8, 17, 300, 44, 3, 9, 9]])


@pytest.mark.parametrize("name", list(PLANS))
def test_transformers_loads_causal_lm_equal_to_compress(tiny_llama_dir, tmp_path, name):
    from transformers import AutoModelForCausalLM

    out = compress.apply(tiny_llama_dir, compress.plan(tiny_llama_dir, **PLANS[name]), tmp_path / "o", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    ours = load_compressed(out).model(_ids()).logits
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()(_ids()).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    # and every layer as compressed-tensors decompresses it equals compress's dequantized weight
    reader = CheckpointReader(out)
    model = load_compressed(out).model
    for lname, m in model.named_modules():
        if isinstance(m, QuantLinear):
            tensors = {k: reader.get(f"{lname}.{k}") for k in ("weight_packed", "weight_scale", "weight_zero_point",
                                                                "weight_shape") if f"{lname}.{k}" in reader.entries}
            assert torch.equal(_ct_decompress(tensors, m.spec), m.dequantized_weight(tensors["weight_scale"].dtype))


def test_transformers_loads_encoder_and_padded_layers_dense(tiny_bert_dir, tmp_path):
    from transformers import AutoModel

    # intermediate 80 at g32 pads: no compressed-tensors form, so dense in model.safetensors + exact codes aside
    plan = compress.plan(tiny_bert_dir, bits=4, group_size=32)
    out = compress.apply(tiny_bert_dir, plan, tmp_path / "o", progress=False)
    meta = json.loads((out / META).read_text())
    padded = [n for n, m in meta["layers"].items() if m["stored"] == "dense + packed"]
    assert padded and all("does not divide in_features 80" in meta["servable"]["vllm"][n] for n in padded)
    assert (out / PACKED).is_file()
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert set(padded) <= set(qc["ignore"])
    batch = {"input_ids": _ids(), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    lm = load_compressed(out)
    ours = lm.model(**batch).last_hidden_state
    theirs = AutoModel.from_pretrained(out).eval()(**batch).last_hidden_state
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert isinstance(lm.model.get_submodule(padded[0]), QuantLinear)


def test_mixed_plan_loads_in_transformers(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    p = compress.plan(tiny_llama_dir, bits=4, group_size=32, symmetric=True)
    for blk in ("0",):
        for x in "qkv":
            p.layers[f"model.layers.{blk}.self_attn.{x}_proj"] = LayerPlan(8)
        p.layers[f"model.layers.{blk}.mlp.down_proj"] = LayerPlan(16)
    out = compress.apply(tiny_llama_dir, p, tmp_path / "o", progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert len(qc["config_groups"]) == 2 and "model.layers.0.mlp.down_proj" in qc["ignore"]
    ours = load_compressed(out).model(_ids()).logits
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()(_ids()).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def _transformers_reads_mixed_asymmetric() -> bool:
    """transformers <= 5.17 (with compressed-tensors 0.19) loads packed asymmetric zero points; 5.24
    with compressed-tensors 0.20 lays the module out with unpacked ones and refuses them."""
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) < Version("5.18")


def test_mixed_asymmetric_loads_exactly_or_is_refused_never_random(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    p = compress.plan(tiny_llama_dir, bits=4, group_size=32)  # asymmetric
    for x in "qkv":
        p.layers[f"model.layers.0.self_attn.{x}_proj"] = LayerPlan(8)
    out = compress.apply(tiny_llama_dir, p, tmp_path / "o", progress=False)
    ours = load_compressed(out).model(_ids()).logits
    if _transformers_reads_mixed_asymmetric():
        theirs = AutoModelForCausalLM.from_pretrained(out).eval()(_ids()).logits
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    else:
        with pytest.raises((RuntimeError, AssertionError)):
            AutoModelForCausalLM.from_pretrained(out)


def test_transformers_without_compressed_tensors_refuses_loudly(tiny_llama_dir, tmp_path):
    out = compress.apply(tiny_llama_dir, compress.plan(tiny_llama_dir, bits=8), tmp_path / "o", progress=False)
    code = ("import sys; sys.modules['compressed_tensors'] = None\n"
            "import transformers.utils.import_utils as iu\n"
            "iu.is_compressed_tensors_available = lambda: False\n"
            "import transformers.quantizers.quantizer_compressed_tensors as q\n"
            "q.is_compressed_tensors_available = lambda: False\n"
            "from transformers import AutoModelForCausalLM\n"
            f"AutoModelForCausalLM.from_pretrained({str(out)!r})\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "compressed" in proc.stderr.lower()


def test_target_vllm_refuses_a_split_fused_group(tiny_llama_dir, tmp_path):
    p = compress.plan(tiny_llama_dir, bits=4, group_size=32)
    assert p.target == "vllm"
    p.layers["model.layers.1.self_attn.k_proj"] = LayerPlan(8)
    with pytest.raises(CompressError, match=r"not servable for --target vllm: layer model.layers.1.self_attn.q_proj: "
                                            r"vLLM fuses q_proj/k_proj/v_proj .*k_proj=int8"):
        compress.apply(tiny_llama_dir, p, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
    p.target = "any"
    out = compress.apply(tiny_llama_dir, p, tmp_path / "o", progress=False)
    meta = json.loads((out / META).read_text())
    assert "fuses" in meta["servable"]["vllm"]["model.layers.1.self_attn.k_proj"]


def _peer_checkpoint(src, out, spec_by_layer):
    """A compressed-tensors checkpoint the way another tool writes one (no compress.json)."""
    from transformers import AutoModelForCausalLM

    from compress.ct_format import quantization_config

    model = AutoModelForCausalLM.from_pretrained(src).eval()
    state = dict(model.state_dict())
    groups = {}
    for name, spec in spec_by_layer.items():
        w = state.pop(f"{name}.weight")
        for k, t in to_ct(quantize(w, spec), torch.float32).items():
            state[f"{name}.{k}"] = t
        groups.setdefault(spec, []).append(name)
    state.pop("lm_head.weight", None)  # tied
    out.mkdir()
    write_safetensors(out / WEIGHTS, state, {"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config(groups, ["lm_head"])
    (out / "config.json").write_text(json.dumps(config))
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            (out / f.name).write_bytes(f.read_bytes())
    return out


def test_peer_checkpoint_loads_and_evaluates(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    names = [f"model.layers.{b}.{m}" for b in range(2) for m in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj")]
    specs = {n: QuantSpec(4, 32, True) if "mlp" in n else QuantSpec(8) for n in names}
    peer = _peer_checkpoint(tiny_llama_dir, tmp_path / "peer", specs)
    lm = compress.load(peer)
    assert sum(isinstance(m, QuantLinear) for m in lm.model.modules()) == len(names)
    hf = AutoModelForCausalLM.from_pretrained(peer).eval()
    torch.testing.assert_close(lm.model(_ids()).logits, hf(_ids()).logits, rtol=0, atol=1e-5)
    res = compress.evaluate(peer, reference=tiny_llama_dir, samples=2, seq_len=16, progress=False)
    assert res["quality"]["mean_kl"] >= 0 and res["reference"] == str(tiny_llama_dir)
    info = compress.inspect(peer)
    assert len(info["layers"]) == len(names)


@pytest.mark.parametrize("args,msg", [
    ({"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True}, r"float 8-bit weights \(e.g. fp8\)"),
    ({"num_bits": 4, "type": "int", "strategy": "group", "group_size": 256, "symmetric": True},
     r"int4 group weights \(group 256"),
])
def test_peer_scheme_compress_cannot_run_is_one_line(tiny_llama_dir, tmp_path, args, msg):
    peer = _peer_checkpoint(tiny_llama_dir, tmp_path / "peer", {"model.layers.0.mlp.up_proj": QuantSpec(8)})
    config = json.loads((peer / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"] = args
    (peer / "config.json").write_text(json.dumps(config))
    with pytest.raises(CompressError, match=msg):
        compress.load(peer)


def test_w8a8_and_sparsity_refused(tiny_llama_dir, tmp_path):
    peer = _peer_checkpoint(tiny_llama_dir, tmp_path / "peer", {"model.layers.0.mlp.up_proj": QuantSpec(8)})
    config = json.loads((peer / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8, "type": "int"}
    (peer / "config.json").write_text(json.dumps(config))
    with pytest.raises(CompressError, match=r"quantizes activations \(e.g. W8A8\)"):
        compress.load(peer)
    config["quantization_config"]["config_groups"]["group_0"]["input_activations"] = None
    config["quantization_config"]["sparsity_config"] = {"format": "sparse-24-bitmask"}
    (peer / "config.json").write_text(json.dumps(config))
    with pytest.raises(CompressError, match=r"sparsity \(sparse-24-bitmask\)"):
        compress.load(peer)


def test_version_1_directories_still_load(tiny_llama_dir, tmp_path):
    """compress's first format: QuantLinear buffers in model.safetensors, compress.json version 1."""
    from compress.models import load_model

    lm = load_model(tiny_llama_dir)
    p = compress.plan(tiny_llama_dir, bits=4, group_size=32)
    from compress.apply import apply_plan

    apply_plan(lm.model, p, progress=False)
    ref = lm.model(_ids()).logits
    out = tmp_path / "v1"
    out.mkdir()
    state = {k: v for k, v in lm.model.state_dict().items() if k != "lm_head.weight"}
    write_safetensors(out / WEIGHTS, state, {"format": "pt"})
    lm.model.config.save_pretrained(out)
    lm.tokenizer.save_pretrained(out)
    layers = {n: {"bits": m.bits, "group_size": m.group_size, "symmetric": m.symmetric, "in_features": m.in_features,
                  "out_features": m.out_features, "bias": m.bias is not None}
              for n, m in lm.model.named_modules() if isinstance(m, QuantLinear)}
    (out / META).write_text(json.dumps({"format": "compress.model", "version": 1, "kind": "causal-lm",
                                        "plan": p.to_dict(), "layers": layers,
                                        "tied": {"lm_head.weight": "model.embed_tokens.weight"}}))
    torch.testing.assert_close(compress.load(out).model(_ids()).logits, ref, rtol=0, atol=0)


def test_plan_target_validated():
    with pytest.raises(CompressError, match="unknown target 'tgi'"):
        Plan.from_dict({"format": "compress.plan", "version": 1, "target": "tgi"})


def test_gpt2_conv1d_loads_in_transformers(tmp_path, bert_tokenizer):
    """Conv1D has no compressed-tensors form: dense (K, N) copy for transformers, codes for compress."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    src = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=bert_tokenizer.vocab_size, n_embd=64, n_layer=2, n_head=4,
                               n_positions=64)).save_pretrained(src)
    bert_tokenizer.save_pretrained(src)
    out = compress.apply(src, compress.plan(src, bits=4, group_size=32, symmetric=True), tmp_path / "o",
                         progress=False)
    meta = json.loads((out / META).read_text())
    assert all("Conv1D" in meta["servable"]["vllm"][n] for n in meta["layers"])
    ours = load_compressed(out).model(_ids()).logits
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()(_ids()).logits
    torch.testing.assert_close(theirs.float(), ours.float(), rtol=0, atol=2e-3)  # both fp16, other op order
