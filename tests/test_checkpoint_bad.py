"""Checkpoints written by compressed-tensors' own compressor (not by compress) load exactly, and bad
peer checkpoints and plans are refused in one line (issue 12): a scheme compress cannot run, a
truncated or mis-shaped weight_packed / weight_zero_point / weight_shape, a truncated file, a
scale float16 cannot hold, and a hand-edited plan that splits a fused group under --target vllm."""
import json
import os
import re
import warnings

import pytest
import torch

import compress
from compress.cli import main
from compress.errors import CompressError
from compress.qlinear import QuantLinear
from compress.safetensors_io import write_safetensors

ct = pytest.importorskip("compressed_tensors", reason="needs the serve extra (compressed-tensors)")

ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# A mix of every weight-only scheme compress runs, asymmetric zero points included.
MIX = {
    **{a: {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32, "symmetric": False} for a in ATTN},
    "mlp.gate_proj": {"num_bits": 4, "type": "int", "strategy": "channel", "symmetric": False},
    "mlp.up_proj": {"num_bits": 4, "type": "int", "strategy": "channel", "symmetric": False},
    "mlp.down_proj": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True},
}


def _ids():
    return torch.tensor([[2, 45, 99, 1000, 7, 3, 12, 600], [2, 8, 17, 300, 44, 3, 9, 9]])


def _scheme(args: dict, targets: list[str]):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return QuantizationScheme(targets=targets, weights=QuantizationArgs(**args))


def _ct_checkpoint(src, out, mix=MIX, fp16_scales=True):
    """A pack-quantized checkpoint written by compressed-tensors' own qparams and compressor.

    Min-max scales and zero points per group / channel (calculate_qparams), packed by
    PackedQuantizationCompressor.compress, config by QuantizationConfig. fp16_scales: scales
    rounded to float16 values (stored float32), as a float16 model's would be.
    Returns (checkpoint dir, {layer: the checkpoint's dequantized weight float32 (N, K)}).
    """
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src).eval()
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    targets: dict[str, list[str]] = {}
    dense = {}
    for block in range(model.config.num_hidden_layers):
        for suffix, args in mix.items():
            name = f"model.layers.{block}.{suffix}"
            scheme = _scheme(args, [name])
            w = state.pop(f"{name}.weight").float()
            rows = w.reshape(w.shape[0], -1, args["group_size"]) if args["strategy"] == "group" else w[:, None, :]
            lo, hi = rows.amin(-1).clamp(max=0), rows.amax(-1).clamp(min=0)
            scale, zp = calculate_qparams(lo, hi, scheme.weights)  # (N, G)
            if fp16_scales:
                scale = scale.half().float()
            packed = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale,
                                                            "weight_zero_point": zp}, scheme)
            for key, t in packed.items():
                state[f"{name}.{key}"] = t.contiguous()
            dense[name] = PackedQuantizationCompressor.decompress(dict(packed), scheme)["weight"].float()
            targets.setdefault(json.dumps(args, sort_keys=True), []).append(name)
    groups = {f"group_{i}": _scheme(json.loads(a), names) for i, (a, names) in enumerate(targets.items())}
    qconfig = QuantizationConfig(config_groups=groups, ignore=["lm_head"], format="pack-quantized",
                                 quantization_status="compressed").to_dict()
    out.mkdir()
    write_safetensors(out / "model.safetensors", state, {"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = qconfig
    (out / "config.json").write_text(json.dumps(config))
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            (out / f.name).write_bytes(f.read_bytes())
    return out, dense


def _reference_logits(src, dense):
    """fp32 logits of the source model with the checkpoint's dequantized weights put in place."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src).eval()
    for name, w in dense.items():
        model.get_submodule(name).weight.data.copy_(w)
    with torch.no_grad():
        return model(_ids()).logits


def test_checkpoint_written_by_compressed_tensors_loads_bit_exact(tiny_llama_dir, tmp_path):
    peer, dense = _ct_checkpoint(tiny_llama_dir, tmp_path / "ct")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float16-exact scales: nothing is rounded, nothing to say
        lm = compress.load(peer)
    quantized = {n: m for n, m in lm.model.named_modules() if isinstance(m, QuantLinear)}
    assert set(quantized) == set(dense)
    assert {(m.bits, m.group_size, m.symmetric) for m in quantized.values()} == {(4, 32, False), (4, -1, False),
                                                                                 (8, -1, True)}
    for name, m in quantized.items():  # compressed-tensors' decompression, bit for bit
        assert torch.equal(m.dequantized_weight(torch.float32), dense[name]), name
    with torch.no_grad():
        torch.testing.assert_close(lm.model(_ids()).logits, _reference_logits(tiny_llama_dir, dense),
                                   rtol=0, atol=1e-6)


def test_float32_scales_are_kept_exact(tiny_llama_dir, tmp_path):
    """A peer's float32 scales that float16 cannot hold are kept float32 (with a warning naming what
    that costs): compress's weights equal compressed-tensors' own decompression bit for bit."""
    peer, dense = _ct_checkpoint(tiny_llama_dir, tmp_path / "ct", fp16_scales=False)
    with pytest.warns(UserWarning, match=r"weight_scale of 14 layers is float32 that float16 cannot hold exactly"):
        lm = compress.load(peer)
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    from compress.safetensors_io import CheckpointReader

    reader = CheckpointReader(peer)
    for name, m in lm.model.named_modules():
        if isinstance(m, QuantLinear):
            parts = {k: reader.get(f"{name}.{k}") for k in ("weight_packed", "weight_scale", "weight_zero_point",
                                                            "weight_shape") if f"{name}.{k}" in reader.entries}
            assert not torch.equal(parts["weight_scale"].half().float(), parts["weight_scale"])
            assert m.scales.dtype == torch.float32
            scheme = _scheme(MIX[name.split(".", 3)[3]], [name])
            want = PackedQuantizationCompressor.decompress(parts, scheme)["weight"].float()
            assert torch.equal(m.dequantized_weight(torch.float32), want), name


# ---- bad input: one line, exit 2 ---------------------------------------------------------------

def _one_line_error(capsys, argv, *needles):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [ln.rsplit("\r", 1)[-1] for ln in err.splitlines()]
    lines = [ln for ln in lines if ln.strip() and not re.search(r"\d+%\|.*\| *\d+/\d+ \[", ln)]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("compress: error:"), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _edit_tensors(peer, edit):
    """Rewrite the checkpoint's model.safetensors with ``edit(state)`` applied."""
    from compress.safetensors_io import CheckpointReader

    state = CheckpointReader(peer).read_all("cpu")
    edit(state)
    write_safetensors(peer / "model.safetensors", state, {"format": "pt"})


@pytest.fixture
def peer(tiny_llama_dir, tmp_path):
    return _ct_checkpoint(tiny_llama_dir, tmp_path / "ct")[0]


@pytest.mark.parametrize("command", ["inspect", "eval"])
@pytest.mark.parametrize("weights,needle", [
    ({"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True}, "float 8-bit weights (e.g. fp8)"),
    ({"num_bits": 8, "type": "int", "strategy": "group", "group_size": 32, "symmetric": True}, "int8 group weights"),
    ({"num_bits": 2, "type": "int", "strategy": "channel", "symmetric": True}, "int2 channel weights"),
], ids=["fp8", "int8-group", "int2"])
def test_scheme_compress_cannot_run_is_one_line(peer, tiny_llama_dir, capsys, command, weights, needle):
    config = json.loads((peer / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"] = weights
    (peer / "config.json").write_text(json.dumps(config))
    extra = ["--reference", tiny_llama_dir, "--samples", 1, "--seq-len", 8] if command == "eval" else []
    _one_line_error(capsys, [command, peer, *extra], "config group group_0", needle)


def test_w8a8_is_one_line(peer, capsys):
    config = json.loads((peer / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_2"]["input_activations"] = {"num_bits": 8, "type": "int"}
    (peer / "config.json").write_text(json.dumps(config))
    _one_line_error(capsys, ["inspect", peer], "config group group_2 quantizes activations (e.g. W8A8)")


Q = "model.layers.1.self_attn.q_proj"  # (64, 64), int4 g32 asymmetric: packed (64, 8), zero points (8, 2)
DOWN = "model.layers.0.mlp.down_proj"  # (64, 96), int8 channel: packed (64, 24)


@pytest.mark.parametrize("edit,needles", [
    (lambda s: s.update({f"{Q}.weight_packed": s[f"{Q}.weight_packed"][:, :-1].contiguous()}),
     [f"layer {Q}: weight_packed has shape (64, 7) torch.int32, expected (64, 8) torch.int32"]),
    (lambda s: s.update({f"{Q}.weight_packed": s[f"{Q}.weight_packed"][:-3].contiguous()}),
     [f"layer {Q}: weight_packed has shape (61, 8) torch.int32, expected (64, 8)"]),
    (lambda s: s.update({f"{DOWN}.weight_packed": s[f"{DOWN}.weight_packed"].to(torch.int64)}),
     [f"layer {DOWN}: weight_packed has shape (64, 24) torch.int64, expected (64, 24) torch.int32"]),
    # zero points unpacked, one row per output (the layout transformers 5.24 builds the module with)
    (lambda s: s.update({f"{Q}.weight_zero_point": torch.zeros(64, 2, dtype=torch.int32)}),
     [f"layer {Q}: weight_zero_point is (64, 2) torch.int32, expected (8, 2) torch.int32"]),
    (lambda s: s.pop(f"{Q}.weight_zero_point"), [f"layer {Q}: weight_zero_point is missing, expected (8, 2)"]),
    (lambda s: s.update({f"{Q}.weight_scale": s[f"{Q}.weight_scale"][:, :1].contiguous()}),
     [f"layer {Q}: weight_scale has shape (64, 1) torch.float32, expected (64, 2) floating"]),
    # a weight_shape that agrees with its tensors but not with the model
    (lambda s: s.update({f"{DOWN}.weight_shape": torch.tensor([64, 92]),
                         f"{DOWN}.weight_packed": s[f"{DOWN}.weight_packed"][:, :23].contiguous()}),
     [f"layer {DOWN} stores in_features 92, the model has 96"]),
    (lambda s: s.update({f"{Q}.weight_scale": s[f"{Q}.weight_scale"] * float("inf")}),
     [f"layer {Q}: weight_scale holds non-finite values"]),
], ids=["packed-truncated-K", "packed-truncated-N", "packed-int64", "zero-point-unpacked", "zero-point-missing",
        "scale-shape", "shape-vs-model", "scale-overflow"])
def test_mis_shaped_tensors_name_the_tensor_and_shapes(peer, tiny_llama_dir, capsys, edit, needles):
    _edit_tensors(peer, edit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the overflowing scale also rounds
        with pytest.raises(CompressError) as exc:
            compress.load(peer)
    assert "\n" not in str(exc.value) and all(n in str(exc.value) for n in needles), exc.value
    _one_line_error(capsys, ["eval", peer, "--reference", tiny_llama_dir, "--samples", 1, "--seq-len", 8], *needles)


def test_truncated_file_is_one_line(peer, tiny_llama_dir, capsys):
    weights = peer / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 100)
    _one_line_error(capsys, ["inspect", peer], "model.safetensors is truncated")
    _one_line_error(capsys, ["eval", peer, "--reference", tiny_llama_dir, "--samples", 1, "--seq-len", 8],
                    "model.safetensors")


@pytest.mark.parametrize("edits,needles", [
    ({"model.layers.1.self_attn.k_proj": {"bits": 8}},
     ["not servable for --target vllm", "model.layers.1.self_attn", "q_proj/k_proj/v_proj", "k_proj=int8"]),
    ({"model.layers.0.mlp.up_proj": {"bits": 4, "group_size": 32, "symmetric": True}},
     ["not servable for --target vllm", "model.layers.0.mlp", "gate_proj/up_proj"]),
], ids=["qkv", "gate-up"])
def test_hand_edited_plan_splitting_a_fused_group(tiny_llama_dir, tmp_path, capsys, edits, needles):
    plan = tmp_path / "plan.json"
    assert main(["plan", str(tiny_llama_dir), "--bits", "4", "--group-size", "32", "-o", str(plan)]) == 0
    d = json.loads(plan.read_text())
    assert d.get("target") == "vllm"
    d["layers"].update(edits)
    plan.write_text(json.dumps(d))
    capsys.readouterr()
    out = tmp_path / "out"
    _one_line_error(capsys, ["apply", tiny_llama_dir, "--plan", plan, "-o", out], *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]  # nothing written, nothing hidden
    d["target"] = "any"  # allowed when asked for, and recorded as unservable
    plan.write_text(json.dumps(d))
    assert main(["apply", str(tiny_llama_dir), "--plan", str(plan), "-o", str(out)]) == 0
    meta = json.loads((out / "compress.json").read_text())
    assert any("fuses" in why for why in meta["servable"]["vllm"].values())
