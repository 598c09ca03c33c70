"""Least-squares scales for GPTQ's codes (compress.refit, GPTQ's ``refit`` rounds).

The refit equals an independent least-squares solve; it keeps codes, zero points and the storage
format; it never raises GPTQ's objective; more rounds never raise it either; plan and apply carry
the option and a refit model loads and runs.
"""
import json

import pytest
import torch

import compress
from compress import api
from compress.cli import main as cli_main
from compress.errors import CompressError
from compress.gptq import gptq_quantize, output_error
from compress.models import load_model, quantizable_linears
from compress.planner import uniform_plan
from compress.quant import QuantSpec, dequantize, quantize
from compress.quantizers import quantizer_config
from compress.refit import codes_minus_zero, refit_scales

SPECS = [(QuantSpec(4, 32, False), 172), (QuantSpec(4, 64, True), 200), (QuantSpec(4, 128, False), 256),
         (QuantSpec(8), 96)]


def _layer(k: int, n: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(4 * k, k, generator=g) * torch.rand(k, generator=g) * 3  # uneven input scales
    return w, x.T @ x / x.shape[0]


@pytest.mark.parametrize("spec,k", SPECS)
def test_refit_equals_an_independent_least_squares(spec, k):
    w, H = _layer(k)
    qw = quantize(w, spec)
    out = refit_scales(w, qw, H)
    assert out.scales.dtype == torch.float16 and out.scales.shape == qw.scales.shape
    assert torch.equal(out.qweight, qw.qweight)  # codes kept
    assert (out.zeros is None) == (qw.zeros is None) and (out.zeros is None or torch.equal(out.zeros, qw.zeros))
    # Reference: per row, min ‖Lᵀ(w − A s)‖ with H = L Lᵀ, by torch.linalg.lstsq in float64.
    full = codes_minus_zero(qw)  # (N, Kp)
    D = full[:, :k].double()
    L = torch.linalg.cholesky(H.double() + 1e-9 * torch.eye(k, dtype=torch.float64))
    n_groups = qw.scales.shape[1]
    g = full.shape[1] // n_groups
    for row in range(0, w.shape[0], 7):
        A = torch.zeros(k, n_groups, dtype=torch.float64)
        for j in range(n_groups):
            A[j * g : min(k, (j + 1) * g), j] = D[row, j * g : min(k, (j + 1) * g)]
        s = torch.linalg.lstsq(L.T @ A, L.T @ w[row].double()).solution
        torch.testing.assert_close(out.scales[row].double(), s.half().double(), rtol=2e-3, atol=1e-6)
    assert output_error(w, out, H) < output_error(w, qw, H)


@pytest.mark.parametrize("spec,k", SPECS)
def test_refit_rounds_never_raise_the_objective_and_keep_the_format(spec, k):
    w, H = _layer(k, seed=1)
    errs, outs = [], []
    for rounds in (0, 1, 3):
        qw = gptq_quantize(w, H, spec, act_order=True, refit=rounds)
        outs.append(qw)
        errs.append(output_error(w, qw, H))
    if spec.bits == 8:  # int8 is not refit inside GPTQ (refit_scales itself still takes it)
        assert errs[0] == errs[1] == errs[2]
    else:
        assert errs[1] < errs[0] and errs[2] <= errs[1]
    ref = quantize(w, spec)
    for qw in outs:
        for name, t in qw.tensors().items():
            assert t.shape == ref.tensors()[name].shape and t.dtype == ref.tensors()[name].dtype, name
        assert dequantize(qw).shape == w.shape
        assert not codes_minus_zero(qw)[:, k:].any()  # padding still dequantizes to exact zeros


def test_refit_keeps_the_old_scale_where_a_group_carries_nothing():
    """A group whose inputs are dead (H = 0 there) has no least-squares scale: its old one stays."""
    w, H = _layer(64, seed=2)
    H[:32, :] = 0
    H[:, :32] = 0
    qw = quantize(w, QuantSpec(4, 32, False))
    out = refit_scales(w, qw, H)
    assert torch.isfinite(out.scales.float()).all() and (out.scales.float() > 0).all()
    torch.testing.assert_close(out.scales[:, 0], qw.scales[:, 0], rtol=1e-3, atol=0)


def test_refit_option_is_validated():
    assert quantizer_config({"method": "gptq", "refit": 2}).refit == 2
    with pytest.raises(CompressError, match="refit must be 0"):
        quantizer_config({"method": "gptq", "refit": 11})
    with pytest.raises(CompressError, match="rtn does not take"):
        quantizer_config({"method": "rtn", "refit": 1})


def test_plan_records_refit_and_apply_loads(tiny_llama_dir, tmp_path):
    out = tmp_path / "p.json"
    rc = cli_main(["plan", str(tiny_llama_dir), "--bits", "4", "--group-size", "32", "--quantizer", "gptq",
                   "--refit", "2", "--mse", "--target", "any", "-o", str(out)])
    assert rc in (0, None)
    section = json.loads(out.read_text())["quantizer"]
    assert section["method"] == "gptq" and section["refit"] == 2 and section["mse"] is True
    # refit is GPTQ's: a plan for rtn refuses it, writing nothing
    rc = cli_main(["plan", str(tiny_llama_dir), "--bits", "4", "--refit", "1", "-o", str(tmp_path / "bad.json")])
    assert rc == 2 and not (tmp_path / "bad.json").exists()

    lm = load_model(tiny_llama_dir)
    layers = quantizable_linears(lm.model)
    plan = uniform_plan(layers, 4, 32, False)
    plan.quantizer = {"method": "gptq", "samples": 4, "seq_len": 32}
    dirs = {r: api.apply(tiny_llama_dir, plan, tmp_path / f"m{r}", progress=False, refit=r) for r in (0, 1)}
    stats = json.loads((dirs[1] / "compress.json").read_text())
    assert json.dumps(stats).count('"refit": 1') >= 1
    plain, refit = compress.load(dirs[0]), compress.load(dirs[1])
    changed = 0
    for n in layers:
        a, b = plain.model.get_submodule(n), refit.model.get_submodule(n)
        assert a.qweight.shape == b.qweight.shape and a.scales.dtype == b.scales.dtype
        changed += int(not torch.equal(a.scales, b.scales))
    assert changed > 0
    ids = torch.randint(0, refit.model.config.vocab_size, (1, 12))
    assert torch.isfinite(refit.model(input_ids=ids).logits).all()
