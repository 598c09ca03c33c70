import pytest
import torch

from compress.errors import CompressError
from compress.quant import (
    QuantSpec,
    bits_per_weight,
    dequantize,
    fake_quantize,
    int4_codes_and_zeros,
    pack_int4,
    quantize,
    quantize_int4,
    quantize_int8,
    stored_bytes,
    unpack_int4,
)


def test_pack_unpack_roundtrip_exact():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (7, 38), generator=g, dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (7, 19) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)
    # Layout: low nibble holds the even position.
    assert int(packed[0, 0]) == int(q[0, 0]) | (int(q[0, 1]) << 4)


def test_pack_rejects_odd_length():
    with pytest.raises(CompressError, match="even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))


def test_int8_roundtrip_codes_are_exact():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(33, 70, generator=g)
    qw = quantize_int8(w)
    assert qw.qweight.dtype == torch.int8 and qw.scales.shape == (33, 1)
    # Quantizing the dequantized weight again gives the same codes and scales.
    again = quantize_int8(dequantize(qw))
    assert torch.equal(again.qweight, qw.qweight)
    assert torch.equal(again.scales, qw.scales)
    err = (dequantize(qw) - w).abs()
    assert (err <= qw.scales.float() / 2 + 1e-6).all()


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_roundtrip(group_size, symmetric):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(17, 256, generator=g) * 0.05
    qw = quantize_int4(w, group_size, symmetric)
    deq = dequantize(qw)
    assert deq.shape == w.shape
    # Exact: the stored codes are recovered from the dequantized weight and the stored qparams.
    q, zeros = int4_codes_and_zeros(qw)
    gs = 256 if group_size == -1 else group_size
    s = qw.scales.float().repeat_interleave(gs, dim=1)
    z = zeros.repeat_interleave(gs, dim=1)
    assert torch.equal(torch.round(deq / s + z).to(torch.uint8), q)
    if symmetric:  # a symmetric grid maps onto itself, so quantization is idempotent
        assert torch.equal(quantize_int4(deq, group_size, symmetric).qweight, qw.qweight)
    step = qw.scales.float().repeat_interleave(gs, dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()


def test_int4_error_against_independent_formula():
    # Asymmetric g32 by hand, per group, without the packing machinery.
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 64, generator=g)
    deq = dequantize(quantize_int4(w, 32, symmetric=False))
    for r in range(4):
        for c in range(2):
            x = w[r, c * 32:(c + 1) * 32]
            lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
            s = torch.tensor((hi - lo) / 15).half().float()
            z = torch.clamp(torch.round(-lo / s), 0, 15)
            ref = (torch.clamp(torch.round(x / s) + z, 0, 15) - z) * s
            assert torch.allclose(deq[r, c * 32:(c + 1) * 32], ref, atol=1e-6)


def test_int4_padding_for_ragged_in_features():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(5, 172, generator=g)
    qw = quantize_int4(w, 32, symmetric=False)
    assert qw.qweight.shape == (5, 96)  # Kp = 192
    assert qw.scales.shape == (5, 6)
    assert qw.zeros.shape == (5, 3)
    deq = dequantize(qw)
    assert deq.shape == (5, 172)
    # The ragged last group must be as accurate as the rest: 12 real values, scale from them.
    assert (deq - w).abs().max() < 0.5 * qw.scales.float().max()


def test_odd_in_features_per_channel_int4():
    w = torch.randn(3, 9)
    qw = quantize_int4(w, -1, symmetric=True)
    assert qw.qweight.shape == (3, 5)
    assert dequantize(qw).shape == (3, 9)


def test_zero_group_dequantizes_to_zero():
    w = torch.zeros(2, 64)
    w[1, 32:] = torch.linspace(-1, 1, 32)
    for qw in (quantize_int4(w, 32), quantize_int4(w, 32, True), quantize_int8(w)):
        deq = dequantize(qw)
        assert torch.equal(deq[0], torch.zeros(64))
        assert torch.isfinite(deq).all()


def test_nan_weight_names_layer():
    w = torch.randn(4, 32)
    w[2, 3] = float("nan")
    with pytest.raises(CompressError, match="model.layers.0.q_proj.*1 non-finite"):
        quantize(w, QuantSpec(4, 32), name="model.layers.0.q_proj")


@pytest.mark.parametrize("bits,group,sym", [(3, -1, True), (8, 32, True), (4, 48, False), (8, -1, False)])
def test_bad_spec(bits, group, sym):
    with pytest.raises(CompressError):
        QuantSpec(bits, group, sym)


def test_bits_per_weight_accounting_matches_tensors():
    for spec in (QuantSpec(4, 32, False), QuantSpec(4, 128, True), QuantSpec(8), QuantSpec(4, 32, False)):
        for k in (256, 172):
            w = torch.randn(40, k)
            qw = quantize(w, spec)
            assert qw.nbytes() == stored_bytes(spec, 40, k)
    assert bits_per_weight(QuantSpec(4, 32, False), 64, 4096) == pytest.approx(4.625)
    assert bits_per_weight(QuantSpec(4, 128, True), 64, 4096) == pytest.approx(4.125)
    assert bits_per_weight(QuantSpec(8), 64, 4096) == pytest.approx(8 + 16 / 4096)


def test_fake_quantize_keeps_dtype_and_identity_at_16():
    w = torch.randn(8, 64, dtype=torch.bfloat16)
    assert fake_quantize(w, QuantSpec(16)) is w
    fq = fake_quantize(w, QuantSpec(4, 32))
    assert fq.dtype == torch.bfloat16 and fq.shape == w.shape
