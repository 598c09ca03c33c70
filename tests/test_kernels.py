"""The Triton kernels (compress.kernels) against the torch reference, under TRITON_INTERPRET=1 on CPU.

triton.jit decides at decoration time whether a kernel is interpreted, so the kernel modules are
imported here with TRITON_INTERPRET=1 set, and the environment and sys.modules are put back right
after: nothing leaks into other test modules. Shapes are small because the interpreter runs every
program in Python (a 64x256x256 W4A16 call takes about 0.8 s).
"""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

import compress  # noqa: E402
from compress.errors import CompressError  # noqa: E402
from compress.qlinear import QuantLinear  # noqa: E402
from compress.quant import QuantSpec, dequantize, quantize_int4, quantize_int8  # noqa: E402


_ENV_BEFORE = os.environ.get("TRITON_INTERPRET")


def _import_interpreted():
    prefix = "compress.kernels"
    saved = {n: sys.modules.pop(n) for n in list(sys.modules) if n == prefix or n.startswith(prefix + ".")}
    saved_attr = compress.__dict__.pop("kernels", None)
    prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        mods = tuple(importlib.import_module(f"{prefix}.{m}") for m in ("w4a16", "w8a16", "linear", "_common"))
    finally:
        if prev is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = prev
        for n in [n for n in sys.modules if n == prefix or n.startswith(prefix + ".")]:
            del sys.modules[n]
        sys.modules.update(saved)
        compress.__dict__.pop("kernels", None)
        if saved_attr is not None:
            compress.kernels = saved_attr
    return mods


w4a16, w8a16, linear, common = _import_interpreted()
assert common.INTERPRET, "kernel modules must have been imported under TRITON_INTERPRET=1"

NAN = float("nan")
# fp16 output rounding alone gives ~3e-4; a wrong code, zero point, scale or group gives > 1e-2.
REL_TOL = 2e-3


def _poisoned(m: int, n: int, dtype=torch.float16) -> torch.Tensor:
    return torch.full((m, n), NAN, dtype=dtype)


def _check(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.isfinite(out).all(), "kernel left unwritten (NaN) or non-finite outputs"
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    assert rel < REL_TOL, f"relative error {rel:.2e}"


def _ref_w4(x, qw, bias):
    """float64 x @ dequant(W)ᵀ + bias from the fp32 dequantized weights."""
    w = dequantize(qw, torch.float32).double()
    out = x.double() @ w.T
    return out + bias.double() if bias is not None else out


def _ref_w8(x, qw, bias):
    out = x.double() @ (qw.qweight.double() * qw.scales.double()).T
    return out + bias.double() if bias is not None else out


# (K, N) per group size: K a non-power-of-two multiple of the group, N not a power of two.
W4_SHAPES = {32: (160, 48), 64: (192, 80), 128: (384, 48), -1: (200, 72)}


@pytest.mark.parametrize("m", [1, 3, 17, 64])
@pytest.mark.parametrize("group", [32, 64, 128, -1])
def test_w4a16_matches_reference(m, group):
    torch.manual_seed(1000 * m + group)
    k, n = W4_SHAPES[group]
    symmetric = (m + group) % 2 == 0
    qw = quantize_int4(torch.randn(n, k), group, symmetric)
    bias = torch.randn(n, dtype=torch.float16) if m % 2 else None
    x = torch.randn(m, k, dtype=torch.float16)
    out = _poisoned(m, n)
    got = w4a16.w4a16_matmul(x, qw.qweight, qw.scales, qw.zeros, k, group, bias, out=out)
    assert got is out
    _check(out, _ref_w4(x, qw, bias))


@pytest.mark.parametrize("k,group", [(172, 32), (171, -1), (200, 128)])
@pytest.mark.parametrize("m", [3, 20])
def test_w4a16_ragged_in_features(k, group, m):
    """in_features not a multiple of the group: storage padded to Kp, x has only K columns."""
    torch.manual_seed(k + m)
    n = 40
    qw = quantize_int4(torch.randn(n, k), group, symmetric=False)
    assert qw.qweight.shape[1] * 2 > k
    x = torch.randn(m, k, dtype=torch.float16)
    out = w4a16.w4a16_matmul(x, qw.qweight, qw.scales, qw.zeros, k, group, out=_poisoned(m, n))
    _check(out, _ref_w4(x, qw, None))


@pytest.mark.parametrize("m,path", [(3, "gemm"), (17, "decode")])
def test_both_launch_shapes_at_any_m(m, path):
    torch.manual_seed(m)
    k, n = 192, 80
    x = torch.randn(m, k, dtype=torch.float16)
    qw = quantize_int4(torch.randn(n, k), 64, symmetric=False)
    out = w4a16.w4a16_matmul(x, qw.qweight, qw.scales, qw.zeros, k, 64, path=path, out=_poisoned(m, n))
    _check(out, _ref_w4(x, qw, None))
    q8 = quantize_int8(torch.randn(n, k))
    out = w8a16.w8a16_matmul(x, q8.qweight, q8.scales, path=path, out=_poisoned(m, n))
    _check(out, _ref_w8(x, q8, None))


def _config(bm, bn, bk, split, after):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "GROUP_M": 1,
            "SCALE_AFTER_DOT": after, "num_warps": 4, "num_stages": 1}


@pytest.mark.parametrize("cfg", [
    _config(16, 32, 64, 3, True),     # uneven split: 5 K steps over 3 slices, one group per step
    _config(16, 16, 128, 2, True),    # two groups per K step (scaled before the dot)
    _config(16, 64, 64, 1, False),    # decode tile, no split, scale before the dot
    _config(32, 16, 64, 4, False),    # gemm tile with split-K (the gemm shape does this at small N)
])
def test_split_k_epilogue_and_tile_variants(cfg):
    """Every K slice's partial is summed once, and the tile counters are left at zero for the next
    launch (checked by launching twice)."""
    torch.manual_seed(cfg["SPLIT_K"])
    m, k, n, group = 5, 320, 48, 64
    qw = quantize_int4(torch.randn(n, k), group, symmetric=False)
    bias = torch.randn(n, dtype=torch.float32)
    for _ in range(2):
        x = torch.randn(m, k, dtype=torch.float16)
        out = w4a16.w4a16_matmul(x, qw.qweight, qw.scales, qw.zeros, k, group, bias,
                                 config=cfg, out=_poisoned(m, n))
        _check(out, _ref_w4(x, qw, bias))
    locks = common.split_k_locks(torch.device("cpu"), 1)
    assert int(locks.abs().sum()) == 0


@pytest.mark.parametrize("m", [1, 3, 17, 64])
def test_w8a16_matches_reference(m):
    torch.manual_seed(m)
    k, n = 200, 72  # K not a multiple of BLOCK_K: masked last step
    q8 = quantize_int8(torch.randn(n, k))
    bias = torch.randn(n, dtype=torch.float16) if m % 2 else None
    x = torch.randn(m, k, dtype=torch.float16)
    out = w8a16.w8a16_matmul(x, q8.qweight, q8.scales, bias, out=_poisoned(m, n))
    _check(out, _ref_w8(x, q8, bias))


@pytest.mark.skip(reason="under TRITON_INTERPRET=1, tl.dot on bfloat16 multiplies raw bit patterns "
                         "(triton-lang/triton#11584, closed as unsupported); bf16 is checked on the GPU "
                         "by bench/gpu_check.sh")
def test_bfloat16_activations():
    k, n = 192, 80
    qw = quantize_int4(torch.randn(n, k), 64, symmetric=False)
    x = torch.randn(3, k, dtype=torch.bfloat16)
    out = w4a16.w4a16_matmul(x, qw.qweight, qw.scales, qw.zeros, k, 64)
    _check(out, _ref_w4(x, qw, None))


@pytest.mark.parametrize("spec", [QuantSpec(4, 64, False), QuantSpec(4, 32, True), QuantSpec(8)], ids=str)
def test_kernel_linear_matches_quantlinear_reference(spec):
    """The dispatch target of QuantLinear.forward on CUDA, run on CPU tensors under the interpreter."""
    torch.manual_seed(spec.bits + spec.group_size)
    lin = nn.Linear(192, 40).half()
    layer = QuantLinear.from_linear(lin, spec)
    x = torch.randn(2, 5, 192, dtype=torch.float16)
    out = linear.kernel_linear(x, layer)
    assert out.shape == (2, 5, 40) and out.dtype == torch.float16
    ref = layer.reference_forward(x.float()).double()
    _check(out.reshape(10, 40), ref.reshape(10, 40))
    # float32 has no kernel: kernel_linear refuses it (QuantLinear.forward alone picks the reference).
    with pytest.raises(CompressError, match="kernel_linear takes float16 or bfloat16 activations, got torch.float32"):
        linear.kernel_linear(torch.randn(3, 192), layer)


def test_kernel_linear_empty_batch_like_nn_linear():
    layer = QuantLinear.from_linear(nn.Linear(64, 24), QuantSpec(4, 32, False))
    out = linear.kernel_linear(torch.empty(2, 0, 64, dtype=torch.float16), layer)
    assert out.shape == (2, 0, 24) and out.dtype == torch.float16


def test_kernel_linear_revalidates_replaced_buffers():
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(128, 48, bias=False), QuantSpec(4, 64, False))
    x = torch.randn(3, 128, dtype=torch.float16)
    linear.kernel_linear(x, layer)
    fresh = quantize_int4(torch.randn(48, 128), 64, symmetric=False)
    layer.qweight, layer.scales, layer.zeros = fresh.qweight, fresh.scales, fresh.zeros
    _check(linear.kernel_linear(x, layer), _ref_w4(x, fresh, None))
    layer.scales = fresh.scales.float()
    with pytest.raises(CompressError, match=r"QuantLinear\(128->48, bits=4\): w4a16: scales dtype torch.float32"):
        linear.kernel_linear(x, layer)


def _w4_args(m=2, k=160, n=48, group=32):
    qw = quantize_int4(torch.randn(n, k), group, symmetric=False)
    return dict(x=torch.randn(m, k, dtype=torch.float16), qweight=qw.qweight, scales=qw.scales,
                zeros=qw.zeros, in_features=k, group_size=group)


def _call_w4(**overrides):
    torch.manual_seed(0)
    args = _w4_args()
    extra = {key: overrides.pop(key) for key in ("bias", "out", "path", "config") if key in overrides}
    args.update(overrides)
    return w4a16.w4a16_matmul(**args, **extra)


BAD_W4 = [
    (dict(x=torch.randn(2, 160)), r"w4a16: x dtype torch.float32 not supported"),
    (dict(x=torch.randn(2, 100, dtype=torch.float16)), r"problem \(m=2, k=100\) not compatible with in_features=160"),
    (dict(x=torch.randn(160, dtype=torch.float16)), r"x must be 2-D \(M, K\), got shape \(160,\)"),
    (dict(x=torch.randn(160, 2, dtype=torch.float16).T), r"x must be contiguous along K \(stride 1\), got strides \(1, 2\)"),
    (dict(x=torch.randn(0, 160, dtype=torch.float16)), r"x has no rows \(m=0\)"),
    (dict(qweight=torch.zeros(48, 96, dtype=torch.uint8)), r"qweight has 96 bytes per row, expected Kp/2=80"),
    (dict(qweight=torch.zeros(48, 80, dtype=torch.int8)), r"qweight dtype torch.int8, expected torch.uint8"),
    (dict(scales=torch.ones(48, 5)), r"scales dtype torch.float32, expected torch.float16"),
    (dict(scales=torch.ones(48, 4, dtype=torch.float16)), r"scales has shape \(48, 4\), expected \(48, 5\)"),
    (dict(zeros=torch.zeros(48, 2, dtype=torch.uint8)), r"zeros has shape \(48, 2\), expected \(48, 3\)"),
    (dict(group_size=16), r"group_size must be one of \(32, 64, 128, -1\), got 16"),
    (dict(bias=torch.zeros(47)), r"bias has shape \(47,\), expected \(48,\)"),
    (dict(out=torch.empty(2, 48)), r"out must be \(2, 48\) torch.float16"),
    (dict(path="fast"), r"path must be 'decode', 'gemm' or None, got 'fast'"),
    (dict(config={"BLOCK_M": 16}), r"config is missing \['BLOCK_K', 'BLOCK_N', 'GROUP_M', 'SPLIT_K', 'num_stages', 'num_warps'\]"),
    (dict(config=_config(16, 32, 48, 1, True)), r"BLOCK_K=48 must be a power of two >= 16"),
    (dict(config=_config(16, 32, 64, 17, True)), r"SPLIT_K=17 outside \[1, 16\]"),
]


@pytest.mark.parametrize("overrides,message", BAD_W4, ids=[m for _, m in BAD_W4])
def test_w4a16_rejects_bad_input(overrides, message):
    with pytest.raises(CompressError, match=message):
        _call_w4(**overrides)


def test_w8a16_rejects_bad_input():
    q8 = quantize_int8(torch.randn(48, 64))
    x = torch.randn(2, 64, dtype=torch.float16)
    with pytest.raises(CompressError, match=r"w8a16: qweight dtype torch.uint8, expected torch.int8"):
        w8a16.w8a16_matmul(x, q8.qweight.view(torch.uint8), q8.scales)
    with pytest.raises(CompressError, match=r"w8a16: scales has shape \(48,\), expected \(48, 1\)"):
        w8a16.w8a16_matmul(x, q8.qweight, q8.scales.reshape(48))
    with pytest.raises(CompressError, match=r"w8a16: problem \(m=2, k=64\) not compatible with in_features=65"):
        w8a16.w8a16_matmul(x, torch.zeros(48, 65, dtype=torch.int8), q8.scales)


def test_interpreted_kernels_do_not_leak_into_other_modules():
    assert os.environ.get("TRITON_INTERPRET") == _ENV_BEFORE
    assert sys.modules.get("compress.kernels.w4a16") is not w4a16
