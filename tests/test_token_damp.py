"""GPTQ's damping grows where a layer's Hessian comes from few tokens for its width
(compress.gptq.layer_damp): the rule and its wiring through the quantizer, apply, pricing and the
CLI. What it buys end to end is measured in bench/peers.py (bench/results/peers-cpu-tokendamp-*)."""
from __future__ import annotations

import pytest
import torch

import compress.gptq as gptq
from compress import api
from compress.errors import CompressError
from compress.gptq import HessianAccumulator, layer_damp
from compress.models import load_model, quantizable_linears
from compress.planner import uniform_plan
from compress.quant import QuantSpec
from compress.quantizers import quantizer_config


def test_layer_damp_rule():
    assert layer_damp(0.01, 1.0, 384, 6734) == pytest.approx(384 / 6734)
    assert layer_damp(0.01, 0.5, 1536, 6734) == pytest.approx(0.5 * 1536 / 6734)
    assert layer_damp(0.01, 1.0, 64, 32768) == 0.01  # many tokens per input: the floor
    assert layer_damp(0.05, 1.0, 64, 32768) == 0.05
    assert layer_damp(0.01, 1.0, 4096, 100) == 1.0  # capped
    assert layer_damp(0.01, 0.0, 4096, 100) == 0.01  # off
    assert layer_damp(0.02, 1.0, 4096, None) == 0.02  # token count unknown


def test_config_validates_and_passes_the_rule_to_gptq(monkeypatch):
    assert quantizer_config("gptq").token_damp == 1.0
    with pytest.raises(CompressError, match=r"token_damp must be in \[0, 100\], got -1"):
        quantizer_config({"method": "gptq", "token_damp": -1})
    with pytest.raises(CompressError, match="rtn does not take"):
        quantizer_config({"method": "rtn", "token_damp": 1})
    seen = []
    real = gptq.gptq_quantize
    monkeypatch.setattr(gptq, "gptq_quantize", lambda *a, **kw: seen.append(kw["damp"]) or real(*a, **kw))
    torch.manual_seed(0)
    w, x = torch.randn(16, 64), torch.randn(100, 64)
    acc = HessianAccumulator(64)
    acc.add(x)
    cfg = quantizer_config({"method": "gptq", "fp_target": 0.0})
    cfg.quantize(w, QuantSpec(4, 32, False), "fc", acc.hessian, tokens=acc.n_samples)
    cfg.quantize(w, QuantSpec(4, 32, False), "fc", acc.hessian)
    quantizer_config({"method": "gptq", "token_damp": 0}).quantize(w, QuantSpec(8), "fc", acc.hessian, tokens=100)
    assert seen == [pytest.approx(0.64), 0.01, 0.01]


def _record_damps(monkeypatch) -> list[tuple[int, float]]:
    seen: list[tuple[int, float]] = []
    real = gptq.gptq_quantize

    def spy(weight, H, spec, **kw):
        seen.append((H.shape[0], kw["damp"]))
        return real(weight, H, spec, **kw)

    monkeypatch.setattr(gptq, "gptq_quantize", spy)
    return seen


def test_apply_and_pricing_damp_each_layer_by_its_token_count(tiny_llama_dir, tmp_path, monkeypatch):
    """Every layer sees the same calibration tokens n, so damp / K is one constant 1 / n, with n at
    most the samples x seq_len of the calibration (padding excluded); token_damp 0 gives damp alone."""
    seen = _record_damps(monkeypatch)
    lm = load_model(tiny_llama_dir)
    layers = quantizable_linears(lm.model)
    plan = uniform_plan(layers, 4, 32, False)
    plan.quantizer = {"method": "gptq", "samples": 8, "seq_len": 64, "fp_target": 0.0}
    api.apply(tiny_llama_dir, plan, tmp_path / "m", progress=False)
    assert len(seen) == len(layers)
    per_token = {round(d / k, 9) for k, d in seen}
    assert len(per_token) == 1 and 1 / (8 * 64) <= per_token.pop() < 1 / max(k for k, _ in seen)  # not capped
    seen.clear()
    api.apply(tiny_llama_dir, plan, tmp_path / "m0", progress=False, token_damp=0.0)
    assert {d for _, d in seen} == {0.01}
    # The planner's pricing runs the same quantizer on the same kind of H: the same rule.
    seen.clear()
    from compress.pricing import layer_errors

    batches = [{"input_ids": torch.randint(5, 500, (2, 8)), "use_cache": False}]
    layer_errors(lm, layers, [(4, 32, False)], "any", quantizer_config({"method": "gptq", "fp_target": 0.0}),
                 batches)
    assert {(k, round(d, 9)) for k, d in seen} == {(k, round(min(1.0, k / 16), 9)) for k, _ in seen}

