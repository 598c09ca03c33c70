import pytest
import torch
from torch import nn

from compress.qlinear import QuantLinear
from compress.quant import QuantSpec, dequantize, quantize

SPECS = [QuantSpec(8), QuantSpec(4, 32, False), QuantSpec(4, 64, True), QuantSpec(4, -1, False)]


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("m", [1, 3, 17])
def test_reference_forward_matches_dequantized_linear(spec, m):
    torch.manual_seed(m)
    lin = nn.Linear(192, 40)
    q = QuantLinear.from_linear(lin, spec)
    x = torch.randn(2, m, 192)
    w = dequantize(quantize(lin.weight.data, spec))
    ref = (x.double() @ w.double().T + lin.bias.double()).float()
    out = q(x)
    assert out.shape == (2, m, 40)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_ragged_in_features_and_no_bias():
    torch.manual_seed(0)
    lin = nn.Linear(172, 64, bias=False)
    q = QuantLinear.from_linear(lin, QuantSpec(4, 32, False))
    x = torch.randn(5, 172)
    out = q(x)
    assert q.bias is None and out.shape == (5, 64)
    rel = (out - lin(x)).norm() / lin(x).norm()
    assert rel < 0.1  # int4 g32 on Gaussian weights: about 5 % relative error


def test_dtypes_follow_input():
    lin = nn.Linear(64, 16)
    q = QuantLinear.from_linear(lin, QuantSpec(4, 32))
    for dt in (torch.bfloat16, torch.float16):
        assert q(torch.randn(3, 64, dtype=dt)).dtype == dt


def test_buffers_and_bytes():
    lin = nn.Linear(256, 48)
    q = QuantLinear.from_linear(lin, QuantSpec(4, 128, False))
    names = dict(q.named_buffers())
    assert set(names) == {"qweight", "scales", "zeros", "bias"}
    assert q.weight_bytes() == sum(names[k].numel() * names[k].element_size() for k in ("qweight", "scales", "zeros"))
    assert "bits=4" in repr(q)
