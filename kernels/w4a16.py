"""W4A16: out = x @ dequant(W)ᵀ + bias with W stored as group-wise int4 (``compress.quant`` format).

Weight layout: the storage layout as is, no conversion and no second copy on the device:
  qweight uint8 (N, Kp/2)  row n, byte j: code k=2j in the low nibble, k=2j+1 in the high nibble
  scales  fp16  (N, G)     G = Kp / g groups per row (G = 1 for group_size -1)
  zeros   uint8 (N, ceil(G/2)) packed 4-bit zero points (asymmetric), or absent (symmetric: 8)
A (BLOCK_N, BLOCK_K/2)-byte tile is BLOCK_N rows of BLOCK_K/2 >= 32 contiguous bytes: 16-byte
cp.async loads that use every DRAM sector whole, pipelined through shared memory; Triton then reads
the bytes straight into the tensor-core operand layout and dequantizes there. A transposed or
interleaved copy would change neither, and would cost the memory the format saves.

Dequantization (per byte): ``unpack_nibbles`` turns 4 bytes into 8 halves MAGIC + q with 7 integer
instructions (inline PTX on the GPU); subtracting MAGIC + z leaves the exact integer q - z in the
activation dtype. The low nibbles (even k) and high nibbles (odd k) meet the even and odd columns of x
in two dots of depth BLOCK_K/2, so codes are never interleaved. Scales, by group layout:
  * group_size -1: acc = dot(x, (q - z)ᵀ, acc), times the row scale once at the end;
  * BLOCK_K <= group: one group per K step; decode shape: acc += dot(x, (q - z)ᵀ) * s (fp32 scale,
    exact for bf16 too); gemm shape: acc = dot(x, ((q - z) * s)ᵀ, acc) (keeps the accumulator
    chained across steps, as wgmma wants);
  * BLOCK_K > group: several groups per step, (q - z) * s per code seen as (BLOCK_N, groups, g/2).
The weight tile times s is rounded to the activation dtype (fp16: the reference's rounding exactly;
bf16: s is rounded to bf16 first).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from compress.errors import CompressError
from compress.quant import INT4_GROUP_SIZES, QuantizedWeight, QuantSpec, dequantize

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
    launch_config,
    output_for,
    prune_configs,
    small_ints_to,
    tile_ids,
    tune_bench,
    unpack_nibbles,
    workspace,
)

OP = "w4a16"


@triton.jit
def _zero_offsets(z_ptrs, g, mask, HAS_ZEROS: tl.constexpr, DTYPE: tl.constexpr):
    """MAGIC + z for groups g (any shape broadcastable with z_ptrs), in DTYPE: subtracting it from
    MAGIC + q (unpack_nibbles) leaves q - z exactly. Zero points are packed two per byte along the
    group axis; symmetric layers use z = 8."""
    if HAS_ZEROS:
        if mask is None:
            zb = tl.load(z_ptrs + g // 2)
        else:
            zb = tl.load(z_ptrs + g // 2, mask=mask, other=0)
        z = (zb >> ((g % 2) * 4)) & 0xF
    else:
        z = tl.full(z_ptrs.shape, 8, tl.uint8)
    return small_ints_to(z, DTYPE)


@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit(do_not_specialize=["M", "M_KEY", "SPLIT_K"])
def _w4a16_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr,
    M, N, K, KP2, NG, stride_xm, stride_om, M_KEY,
    GROUP: tl.constexpr,  # group length along K; 0 = one group per row (group_size -1)
    HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K, GROUP_M: tl.constexpr, SCALE_AFTER_DOT: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """x (M, K) fp16/bf16, row stride stride_xm; qweight (N, KP2) uint8; out (M, N) x's dtype.

    Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K). Program (pid, pid_k) computes one
    (BLOCK_M, BLOCK_N) output tile over its share of the K steps. M_KEY only keys the autotuner.
    """
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    pid_m, pid_n = tile_ids(pid, num_pid_m, num_pid_n, GROUP_M)

    # This program's K steps: [t_start, t_end) out of cdiv(K, BLOCK_K). Steps past K (padding up to
    # Kp) are skipped: padded weights dequantize to exactly 0.
    k_steps = (K + BLOCK_K - 1) // BLOCK_K
    per_split = (k_steps + SPLIT_K - 1) // SPLIT_K
    t_start = pid_k * per_split
    t_end = tl.minimum(t_start + per_split, k_steps)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past M and N wrap onto real rows, so the loads need no row mask; those rows are never stored.
    rm = offs_m % M
    rn = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    offs_b = tl.arange(0, BLOCK_K // 2)
    x_ptrs = x_ptr + rm[:, None] * stride_xm + (t_start * BLOCK_K + offs_k)[None, :]
    w_ptrs = qw_ptr + rn[:, None] * KP2 + (t_start * (BLOCK_K // 2) + offs_b)[None, :]
    s_row = s_ptr + rn * NG
    ZSTRIDE = (NG + 1) // 2
    z_row = z_ptr + rn * ZSTRIDE

    if GROUP == 0:
        zoff_row = _zero_offsets(z_row, 0, None, HAS_ZEROS, DTYPE)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for t in range(t_start, t_end):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            a = tl.load(x_ptrs, mask=(t * BLOCK_K + offs_k < K)[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=(t * (BLOCK_K // 2) + offs_b < KP2)[None, :], other=0)
        # Even and odd K columns of x pair with the low and high nibbles of each byte: two dots of
        # depth BLOCK_K/2 instead of interleaving the nibbles (a register shuffle per code).
        a_even, a_odd = tl.split(tl.reshape(a, (BLOCK_M, BLOCK_K // 2, 2)))
        w_lo, w_hi = unpack_nibbles(b, DTYPE)  # (BLOCK_N, BLOCK_K/2) each: MAGIC + code
        if GROUP == 0:
            acc = tl.dot(a_even, tl.trans(w_lo - zoff_row[:, None]), acc)
            acc = tl.dot(a_odd, tl.trans(w_hi - zoff_row[:, None]), acc)
        elif BLOCK_K <= GROUP:
            # One group per K step: one scale and zero point per row.
            g = (t * BLOCK_K) // GROUP
            zoff = _zero_offsets(z_row, g, None, HAS_ZEROS, DTYPE)[:, None]
            s = tl.load(s_row + g)
            if SCALE_AFTER_DOT:
                part = tl.dot(a_even, tl.trans(w_lo - zoff))
                part = tl.dot(a_odd, tl.trans(w_hi - zoff), part)
                acc += part * s.to(tl.float32)[None, :]
            else:
                s2 = s.to(DTYPE)[:, None]
                acc = tl.dot(a_even, tl.trans((w_lo - zoff) * s2), acc)
                acc = tl.dot(a_odd, tl.trans((w_hi - zoff) * s2), acc)
        else:
            # GPI groups per K step (small groups): scale each code before the dot, seen as
            # (BLOCK_N, GPI, GROUP/2) so that scales and zero points broadcast per group.
            GPI: tl.constexpr = BLOCK_K // GROUP
            g = (t * BLOCK_K) // GROUP + tl.arange(0, GPI)
            # The last step of a ragged K can reach past the last group: mask those loads.
            g_ok = (g < NG)[None, :]
            zoff = _zero_offsets(z_row[:, None], g[None, :], g_ok, HAS_ZEROS, DTYPE)[:, :, None]
            s = tl.load(s_row[:, None] + g[None, :], mask=g_ok, other=0.0).to(DTYPE)[:, :, None]
            w_lo = (tl.reshape(w_lo, (BLOCK_N, GPI, GROUP // 2)) - zoff) * s
            w_hi = (tl.reshape(w_hi, (BLOCK_N, GPI, GROUP // 2)) - zoff) * s
            acc = tl.dot(a_even, tl.trans(tl.reshape(w_lo, (BLOCK_N, BLOCK_K // 2))), acc)
            acc = tl.dot(a_odd, tl.trans(tl.reshape(w_hi, (BLOCK_N, BLOCK_K // 2))), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K // 2

    if GROUP == 0:
        acc = acc * tl.load(s_row).to(tl.float32)[None, :]
    finish_tile(acc, offs_m, offs_n, M, N, bias_ptr, out_ptr, stride_om, ws_ptr, lock_ptr,
                pid_m, pid_n, pid_k, num_pid_n, SPLIT_K, HAS_BIAS)


# ----------------------------------------------------------------------------------------------
# Autotune configs: base configs whose SPLIT_K prune_configs picks per problem. Under the
# interpreter one small config per launch shape keeps tests fast and still runs the split-K
# epilogue (decode), the grouped tile order (gemm) and the several-groups-per-step path.
# BLOCK_K >= 64 everywhere: each of the two half-depth dots is then >= 32 deep, which is what lets
# Triton dequantize in the tensor-core operand layout straight from shared memory (at depth 16 it
# round-trips the fp16 tile through shared memory instead: ~2x the instructions per byte).
# ----------------------------------------------------------------------------------------------

if INTERPRET:
    DECODE_CONFIGS = [launch_config(16, 32, 64, 4, 1, group_m=1, after=True, split=2)]
else:
    # (BLOCK_N, BLOCK_K): 4-16 KB of weights per pipeline stage per program.
    DECODE_CONFIGS = [launch_config(16, bn, bk, w, st, group_m=1, after=True) for bn, bk, w, st in
                      [(64, 128, 4, 4), (128, 128, 4, 4), (256, 128, 8, 3), (128, 64, 4, 5),
                       (256, 64, 8, 4), (64, 256, 4, 3)]]

GEMM_CONFIGS = gemm_configs(interpret_block_k=64)

_KEY = ["M_KEY", "N", "K", "GROUP", "HAS_ZEROS"]
_TUNE = {"key": _KEY, "prune_configs_by": {"early_config_prune": prune_configs}, "do_bench": tune_bench}
_w4a16_decode = triton.autotune(DECODE_CONFIGS, **_TUNE)(_w4a16_kernel)
_w4a16_gemm = triton.autotune(GEMM_CONFIGS, **_TUNE)(_w4a16_kernel)


def check_weights(qweight, scales, zeros, in_features: int, group_size: int, device) -> tuple[int, int, int]:
    """Validate the packed tensors against the storage format; returns (N, Kp/2, G)."""
    if group_size not in INT4_GROUP_SIZES:
        raise CompressError(f"{OP}: group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if qweight.dim() != 2:
        raise CompressError(f"{OP}: qweight must be 2-D (N, Kp/2), got shape {tuple(qweight.shape)}")
    spec = QuantSpec(4, group_size, zeros is None)
    n, kp2 = qweight.shape
    kp = spec.padded_in_features(in_features)
    if 2 * kp2 != kp:
        raise CompressError(
            f"{OP}: qweight has {kp2} bytes per row, expected Kp/2={kp // 2} for in_features="
            f"{in_features} padded to whole groups of {group_size}"
        )
    check_packed({"qweight": qweight, "scales": scales, "zeros": zeros}, spec, n, in_features, device, OP)
    return n, kp2, spec.n_groups(in_features)


def w4a16_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    in_features: int,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    path: str | None = None,
    config: dict | None = None,
    checked: bool = False,
) -> torch.Tensor:
    """out (M, N) = x (M, K) @ dequant(W)ᵀ + bias, in x's dtype.

    x: float16/bfloat16 (M, K = in_features), unit stride along K. qweight uint8 (N, Kp/2), scales
    float16 (N, G), zeros uint8 (N, ceil(G/2)) or None (symmetric): ``compress.quant``'s int4 format.
    bias: (N,) any float dtype, or None. out: optional preallocated (M, N) in x's dtype.
    path: "decode" (split-K, BLOCK_M 16), "gemm", or None = decode iff M <= DECODE_MAX_M.
    config: explicit meta-parameters (BLOCK_M/N/K, SPLIT_K, GROUP_M, SCALE_AFTER_DOT, num_warps,
    num_stages) instead of the autotuner, for tests and sweeps.
    checked: the weight tensors were already validated (kernel_linear caches that per layer).
    """
    m, k = check_activation(x, in_features, OP)
    dev = x.device
    if checked:
        n, kp2 = qweight.shape
        ng = scales.shape[1]
    else:
        n, kp2, ng = check_weights(qweight, scales, zeros, in_features, group_size, dev)
        check_bias(bias, n, dev, OP)
    check_int32_indexing(OP, x=m * x.stride(0), weight=n * kp2, out=m * n)
    out = output_for(x, n, out, OP)
    if path not in (None, "decode", "gemm"):
        raise CompressError(f"{OP}: path must be 'decode', 'gemm' or None, got {path!r}")
    decode = m <= DECODE_MAX_M if path is None else path == "decode"
    if config is not None:
        check_config(config, OP)
    m_key, ws, locks = workspace(m, n, decode, dev, config["SPLIT_K"] if config else None)
    args = (x, qweight, scales, scales if zeros is None else zeros, out if bias is None else bias, out,
            ws, locks,
            m, n, k, kp2, ng, x.stride(0), out.stride(0), m_key)
    flags = {"GROUP": 0 if group_size == -1 else group_size, "HAS_ZEROS": zeros is not None,
             "HAS_BIAS": bias is not None}
    if config is not None:
        meta = {"SCALE_AFTER_DOT": decode, **config}
        _w4a16_kernel[grid(m, n)](*args, **flags, **meta)
    elif decode:
        _w4a16_decode[grid(m, n)](*args, **flags)
    else:
        _w4a16_gemm[grid(m, n)](*args, **flags)
    return out


def w4a16_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    in_features: int,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The torch reference of w4a16_matmul: dequantize (fp32 arithmetic) to x's dtype, then F.linear."""
    spec = QuantSpec(4, group_size, zeros is None)
    w = dequantize(QuantizedWeight(spec, in_features, qweight, scales, zeros), x.dtype)
    return F.linear(x, w, bias.to(x.dtype) if bias is not None else None)
