"""W8A16: out = x @ dequant(W)ᵀ + bias with W stored as int8 per output channel (``compress.quant``).

Weight layout: the storage layout as is, qweight int8 (N, K) row-major and scales fp16 (N, 1); a
(BLOCK_N, BLOCK_K) tile is BLOCK_N rows of BLOCK_K contiguous bytes (16-byte loads along K).
Dequantization: q is converted exactly to the activation dtype (float16: ``int8_to_f16_biased``,
3 integer instructions per 4 values, then minus 1152; bfloat16: Triton's own int8 -> bf16
conversion, since bf16 has too few mantissa bits for 256 consecutive integers above a power of two),
the tensor cores accumulate x·qᵀ in fp32, and the per-row scale multiplies the accumulator once at the
end. Launch shapes (decode split-K for M <= 16, tiled gemm above) are those of ``w4a16``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from compress.errors import CompressError
from compress.quant import QuantSpec

from ._common import (
    DECODE_MAX_M,
    INTERPRET,
    check_activation,
    check_bias,
    check_config,
    check_int32_indexing,
    check_packed,
    finish_tile,
    gemm_configs,
    grid,
    int8_to_f16_biased,
    launch_config,
    output_for,
    prune_configs,
    tile_ids,
    tune_bench,
    workspace,
)

OP = "w8a16"


@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit(do_not_specialize=["M", "M_KEY", "SPLIT_K"])
def _w8a16_kernel(
    x_ptr, qw_ptr, s_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr,
    M, N, K, stride_xm, stride_om, M_KEY,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K, GROUP_M: tl.constexpr, SCALE_AFTER_DOT: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """x (M, K) fp16/bf16; qweight (N, K) int8; scales (N, 1) fp16; out (M, N) x's dtype.

    Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K), as in ``_w4a16_kernel``.
    SCALE_AFTER_DOT is unused (the scale is per row) but keeps the config space of w4a16.
    """
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    pid_m, pid_n = tile_ids(pid, num_pid_m, num_pid_n, GROUP_M)

    k_steps = (K + BLOCK_K - 1) // BLOCK_K
    per_split = (k_steps + SPLIT_K - 1) // SPLIT_K
    t_start = pid_k * per_split
    t_end = tl.minimum(t_start + per_split, k_steps)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_m % M
    rn = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rm[:, None] * stride_xm + (t_start * BLOCK_K + offs_k)[None, :]
    w_ptrs = qw_ptr + rn[:, None] * K + (t_start * BLOCK_K + offs_k)[None, :]

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for t in range(t_start, t_end):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_ok = (t * BLOCK_K + offs_k < K)[None, :]
            a = tl.load(x_ptrs, mask=k_ok, other=0.0)
            b = tl.load(w_ptrs, mask=k_ok, other=0)
        if DTYPE == tl.float16:
            w = int8_to_f16_biased(b) - 1152.0
        else:
            w = b.to(DTYPE)
        acc = tl.dot(a, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    acc = acc * tl.load(s_ptr + rn).to(tl.float32)[None, :]
    finish_tile(acc, offs_m, offs_n, M, N, bias_ptr, out_ptr, stride_om, ws_ptr, lock_ptr,
                pid_m, pid_n, pid_k, num_pid_n, SPLIT_K, HAS_BIAS)


if INTERPRET:
    DECODE_CONFIGS = [launch_config(16, 32, 32, 4, 1, group_m=1, split=2)]
else:
    # (BLOCK_N, BLOCK_K): 4-16 KB of weights per pipeline stage per program.
    DECODE_CONFIGS = [launch_config(16, bn, bk, w, st, group_m=1) for bn, bk, w, st in
                      [(64, 128, 4, 4), (128, 64, 4, 4), (128, 128, 4, 4), (64, 256, 4, 3),
                       (256, 64, 8, 4), (128, 128, 8, 3)]]

GEMM_CONFIGS = gemm_configs(interpret_block_k=32)

_KEY = ["M_KEY", "N", "K"]
_TUNE = {"key": _KEY, "prune_configs_by": {"early_config_prune": prune_configs}, "do_bench": tune_bench}
_w8a16_decode = triton.autotune(DECODE_CONFIGS, **_TUNE)(_w8a16_kernel)
_w8a16_gemm = triton.autotune(GEMM_CONFIGS, **_TUNE)(_w8a16_kernel)


def check_weights(qweight, scales, in_features: int, device) -> int:
    """Validate int8 storage tensors; returns N."""
    if qweight.dim() != 2:
        raise CompressError(f"{OP}: qweight must be 2-D (N, K), got shape {tuple(qweight.shape)}")
    n = qweight.shape[0]
    check_packed({"qweight": qweight, "scales": scales}, QuantSpec(8), n, in_features, device, OP)
    return n


def w8a16_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    path: str | None = None,
    config: dict | None = None,
    checked: bool = False,
) -> torch.Tensor:
    """out (M, N) = x (M, K) @ (qweight * scales)ᵀ + bias, in x's dtype.

    x: float16/bfloat16 (M, K), unit stride along K; qweight int8 (N, K); scales float16 (N, 1);
    bias (N,) any float dtype or None; out, path, config, checked: as in ``w4a16_matmul``.
    """
    k_in = qweight.shape[1] if qweight.dim() == 2 else -1
    m, k = check_activation(x, k_in, OP)
    dev = x.device
    if checked:
        n = qweight.shape[0]
    else:
        n = check_weights(qweight, scales, k, dev)
        check_bias(bias, n, dev, OP)
    check_int32_indexing(OP, x=m * x.stride(0), weight=n * k, out=m * n)
    out = output_for(x, n, out, OP)
    if path not in (None, "decode", "gemm"):
        raise CompressError(f"{OP}: path must be 'decode', 'gemm' or None, got {path!r}")
    decode = m <= DECODE_MAX_M if path is None else path == "decode"
    if config is not None:
        check_config(config, OP)
    m_key, ws, locks = workspace(m, n, decode, dev, config["SPLIT_K"] if config else None)
    args = (x, qweight, scales, out if bias is None else bias, out,
            ws, locks,
            m, n, k, x.stride(0), out.stride(0), m_key)
    flags = {"HAS_BIAS": bias is not None}
    if config is not None:
        _w8a16_kernel[grid(m, n)](*args, **flags, **{"SCALE_AFTER_DOT": False, **config})
    elif decode:
        _w8a16_decode[grid(m, n)](*args, **flags)
    else:
        _w8a16_gemm[grid(m, n)](*args, **flags)
    return out


def w8a16_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """The torch reference of w8a16_matmul: dequantize (fp32) to x's dtype, then F.linear."""
    w = (qweight.float() * scales.float()).to(x.dtype)
    return F.linear(x, w, bias.to(x.dtype) if bias is not None else None)
