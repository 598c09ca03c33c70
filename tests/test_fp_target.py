"""GPTQ aimed at the full-precision model's outputs (compress.gptq.fp_target_weight): the drift term,
the walker's full-precision stream, the closed form against an independent least squares, and the
option end to end."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import compress
from compress import api
from compress.errors import CompressError
from compress.gptq import HessianAccumulator, collect_hessians, fp_target_weight
from compress.models import load_model, quantizable_linears
from compress.planner import uniform_plan
from compress.quant import QuantSpec, dequantize, quantize
from compress.quantizers import quantizer_config
from compress.walker import find_blocks, walk_blocks


def test_drift_term_is_the_masked_drift_times_inputs():
    torch.manual_seed(0)
    x, ref = torch.randn(3, 7, 16), torch.randn(3, 7, 16)
    mask = torch.rand(3, 7) > 0.3
    acc = HessianAccumulator(16, name="fc", drift=True)
    acc.add(x, mask, ref)
    acc.add(x[:1].half(), None, ref[:1].half())  # a second batch, half precision, unmasked
    xs = torch.cat((x[mask], x[0].half().float()))
    rs = torch.cat((ref[mask], ref[0].half().float()))
    n = xs.shape[0]
    torch.testing.assert_close(acc.hessian, 2 * xs.T @ xs / n, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acc.drift, 2 * (rs - xs).T @ xs / n, rtol=1e-5, atol=1e-5)
    # the input as its own reference adds zero drift but still counts in the running mean
    acc.add(x[1:2], None, x[1:2])
    torch.testing.assert_close(acc.drift, 2 * (rs - xs).T @ xs / (n + 7), rtol=1e-5, atol=1e-5)


def test_drift_term_errors_name_the_layer():
    with pytest.raises(CompressError, match="layer fc: reference inputs are needed"):
        HessianAccumulator(4, name="fc", drift=True).add(torch.zeros(2, 4))
    with pytest.raises(CompressError, match="layer fc: reference inputs are needed"):
        HessianAccumulator(4, name="fc").add(torch.zeros(2, 4), None, torch.zeros(2, 4))
    with pytest.raises(CompressError, match=r"layer fc: reference inputs of shape \(3, 4\) do not match"):
        HessianAccumulator(4, name="fc", drift=True).add(torch.zeros(2, 4), None, torch.zeros(3, 4))
    with pytest.raises(CompressError, match="layer fc: no calibration samples"):
        HessianAccumulator(4, name="fc", drift=True).drift
    assert HessianAccumulator(4).drift is None


@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0])
def test_fp_target_weight_equals_an_independent_ridge_least_squares(alpha):
    """W* minimises (2/n)‖X Ŵᵀ − X_ref Wᵀ‖² + λ‖Ŵ − W‖² (float64 lstsq on the stacked system)."""
    torch.manual_seed(1)
    n, k, m = 200, 24, 10
    x = torch.randn(n, k) @ torch.randn(k, k)  # correlated inputs
    x_ref = x + 0.3 * torch.randn(n, k)
    w = torch.randn(m, k)
    acc = HessianAccumulator(k, drift=True)
    acc.add(x, None, x_ref)
    damp = 0.01
    got = fp_target_weight(w, acc.hessian, acc.drift, alpha, damp)
    H = acc.hessian.double()
    lam = damp * H.diagonal().mean()
    a = torch.cat((x.double() * (2 / n) ** 0.5, lam.sqrt() * torch.eye(k, dtype=torch.float64)))
    b = torch.cat((x_ref.double() @ w.double().T * (2 / n) ** 0.5, lam.sqrt() * w.double().T))
    full = torch.linalg.lstsq(a, b).solution.T  # (m, k)
    expected = w.double() + alpha * (full - w.double())
    torch.testing.assert_close(got.double(), expected, rtol=1e-3, atol=1e-3)
    if alpha == 0:
        assert torch.equal(got, w)
    if alpha == 1:  # it fits the reference outputs better than W itself
        err = lambda v: float(((x @ v.T - x_ref @ w.T) ** 2).sum())  # noqa: E731
        assert err(got) < 0.95 * err(w)


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 12)
        self.b = torch.nn.Linear(12, 8)

    def forward(self, h):
        return h + self.b(torch.relu(self.a(h)))


def test_collect_hessians_pairs_each_layer_with_its_reference_inputs():
    torch.manual_seed(2)
    block = _Block()
    xs = [torch.randn(2, 5, 8) for _ in range(3)]
    refs = [x + 0.1 * torch.randn_like(x) for x in xs]
    masks = [torch.rand(2, 5) > 0.2 for _ in xs]
    inputs = [((x,), {}) for x in xs]
    reference = [((r,), {}) for r in refs]
    accs = collect_hessians(block, {"a": block.a, "b": block.b}, inputs, masks, "blk.", reference=reference)
    with torch.no_grad():
        xq = torch.cat([x[m] for x, m in zip(xs, masks)])
        xr = torch.cat([r[m] for r, m in zip(refs, masks)])
        hq, hr = torch.relu(block.a(xq)), torch.relu(block.a(xr))
    n = xq.shape[0]
    torch.testing.assert_close(accs["a"].drift, 2 * (xr - xq).T @ xq / n, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(accs["b"].drift, 2 * (hr - hq).T @ hq / n, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(accs["b"].hessian, 2 * hq.T @ hq / n, rtol=1e-4, atol=1e-5)
    # one stream (the same objects): zero drift, and the block runs once per batch
    same = collect_hessians(block, {"a": block.a}, inputs, masks, reference=inputs)
    assert torch.count_nonzero(same["a"].drift) == 0
    with pytest.raises(CompressError, match="2 reference batches for 3 input batches"):
        collect_hessians(block, {"a": block.a}, inputs, masks, reference=reference[:2])


def _block_inputs(model, batches):
    """Every block's hidden-state input per batch, from plain forwards of ``model``."""
    name, blocks = find_blocks(model)
    seen = {i: [] for i in range(len(blocks))}
    hooks = [b.register_forward_pre_hook(lambda m, a, k, i=i: seen[i].append(a[0] if a else k["hidden_states"]),
                                         with_kwargs=True) for i, b in enumerate(blocks)]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    return seen


def test_walker_reference_stream_is_the_unquantized_model(tiny_llama_dir):
    lm = load_model(tiny_llama_dir)
    fp = copy.deepcopy(lm.model)
    torch.manual_seed(3)
    # no "use_cache": False here: the walker must keep a KV cache out of its repeated block passes
    batches = [{"input_ids": torch.randint(5, 500, (2, 9))} for _ in range(2)]
    expected_fp = _block_inputs(fp, batches)
    got_q, got_ref, same = {}, {}, {}

    def step(index, prefix, block, inputs, reference):
        got_q[index] = [a[0] if a else k["hidden_states"] for a, k in inputs]
        got_ref[index] = [a[0] if a else k["hidden_states"] for a, k in reference]
        same[index] = reference is inputs
        if index == 0:  # block 1 stays full precision, block 0 is rounded to 4 bits
            for m in block.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.data = dequantize(quantize(m.weight.data, QuantSpec(4, 32, False)))

    walk_blocks(lm.model, batches, step, progress=False, reference=True)
    expected_q = _block_inputs(lm.model, batches)  # the walker left block 0 rounded in lm.model
    assert same == {0: True, 1: False}
    for i in (0, 1):
        for got, want in zip(got_ref[i], expected_fp[i]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for got, want in zip(got_q[i], expected_q[i]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got_q[1][0], got_ref[1][0], atol=1e-4)  # the streams did part


def test_fp_target_option_is_validated():
    assert quantizer_config("gptq").fp_target == 0.25 and quantizer_config("gptq").needs_reference
    assert not quantizer_config({"method": "gptq", "fp_target": 0}).needs_reference
    with pytest.raises(CompressError, match=r"fp_target must be in \[0, 1\], got 1.5"):
        quantizer_config({"method": "gptq", "fp_target": 1.5})
    with pytest.raises(CompressError, match="rtn does not take"):
        quantizer_config({"method": "rtn", "fp_target": 0.5})


def test_apply_with_fp_target_moves_later_blocks_only(tiny_llama_dir, tmp_path):
    """Block 0 sees the model's own inputs (no drift): identical codes with and without; block 1's
    layers aim at the full-precision outputs, and the result still loads and runs."""
    lm = load_model(tiny_llama_dir)
    layers = quantizable_linears(lm.model)
    plan = uniform_plan(layers, 4, 32, False)
    plan.quantizer = {"method": "gptq", "samples": 8, "seq_len": 32}
    dirs = {a: api.apply(tiny_llama_dir, plan, tmp_path / f"m{a}", progress=False, fp_target=a) for a in (0.0, 1.0)}
    assert json.loads((dirs[1.0] / "compress.json").read_text())["plan"]["quantizer"]["fp_target"] == 1.0
    off, on = compress.load(dirs[0.0]), compress.load(dirs[1.0])
    for n in layers:
        a, b = off.model.get_submodule(n), on.model.get_submodule(n)
        same = torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales)
        assert same == (".layers.0." in n), n
    ids = torch.randint(5, 500, (1, 12))
    assert torch.isfinite(on.model(input_ids=ids).logits).all()
