"""Pieces shared by the W4A16 and W8A16 kernels: tile mapping, code conversion, the split-K epilogue,
and the launcher-side checks and buffers.

Both kernels compute out (M, N) = x (M, K) @ Wᵀ + bias with W (N, K) dequantized inside the kernel.
Two launch shapes share one kernel body:
  decode  M <= DECODE_MAX_M: BLOCK_M = 16 (the smallest tensor-core tile), split-K over a 2-D grid
          (N tiles, SPLIT_K) so that even N = 4096 gives every SM several programs with loads in flight;
          the last program of a tile to arrive sums the fp32 partials in a fixed order (deterministic)
          and writes the output, so a call is one launch.
  gemm    larger M: classic tiled GEMM, grouped tile order for L2 reuse, SPLIT_K = 1.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from compress.errors import CompressError

# Under TRITON_INTERPRET=1 the kernels run on CPU tensors (tests); read once, like triton.jit does
# when it decorates the kernels of the modules that import this one.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Largest M that takes the decode (split-K, BLOCK_M = 16) launch shape.
DECODE_MAX_M = 16

# Split-K partial sums live in a (SPLIT_K, M, N) float32 workspace; this bounds its size.
MAX_SPLIT_K = 16

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Device-side helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def tile_ids(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Program id -> (pid_m, pid_n), GROUP_M row tiles at a time so that the weight tiles of one
    column stay in L2 while GROUP_M row tiles use them (the Triton matmul tutorial's ordering)."""
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def small_ints_to(q, DTYPE: tl.constexpr):
    """Unsigned integers q in [0, 128) (any int type) -> DTYPE (float16 or bfloat16), exactly.

    Returns MAGIC + q where MAGIC is 1024 (float16) or 128 (bfloat16): OR-ing q into the mantissa of
    MAGIC is one integer op, where an int->float conversion runs at a quarter of the ALU rate on
    Hopper. Callers subtract MAGIC (folded into the zero point) afterwards.
    """
    if DTYPE == tl.float16:
        return (q.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)
    else:
        return (q.to(tl.uint16) | 0x4300).to(tl.bfloat16, bitcast=True)


# The interpreter cannot run PTX: it takes the pure-Triton twin of unpack_nibbles (same values).
USE_PTX = tl.constexpr(not INTERPRET)

# Per 32-bit register of 4 packed bytes e0..e3: t = low nibbles (and, or shift+and for the high
# ones); prmt puts t's byte i under a MAGIC high byte, giving two MAGIC + q halves per register.
# 0x64 is the high byte of fp16 1024, 0x43 that of bf16 128. Outputs $0,$1 (low nibbles of e0e1,
# e2e3) and $2,$3 (high nibbles), input $4: Triton's [result][packed element] order, low bits first.
_UNPACK_PTX = """{
.reg .b32 t;
and.b32 t, $4, 0x0f0f0f0f;
prmt.b32 $0, t, MAGIC, 0x5140;
prmt.b32 $1, t, MAGIC, 0x5342;
shr.b32 t, $4, 4;
and.b32 t, t, 0x0f0f0f0f;
prmt.b32 $2, t, MAGIC, 0x5140;
prmt.b32 $3, t, MAGIC, 0x5342;
}"""
UNPACK_F16_PTX = tl.constexpr(_UNPACK_PTX.replace("MAGIC", "0x64646464"))
UNPACK_BF16_PTX = tl.constexpr(_UNPACK_PTX.replace("MAGIC", "0x43434343"))


# int8 -> fp16: flip the sign bit (q + 128 as unsigned) and put each byte under 0x64: 1024 + 128 + q.
INT8_F16_PTX = tl.constexpr("""{
.reg .b32 t;
xor.b32 t, $2, 0x80808080;
prmt.b32 $0, t, 0x64646464, 0x5140;
prmt.b32 $1, t, 0x64646464, 0x5342;
}""")


@triton.jit
def int8_to_f16_biased(q):
    """int8 q (any shape) -> float16 1152 + q exactly (3 instructions per 4 values on the GPU)."""
    if USE_PTX:
        return tl.inline_asm_elementwise(INT8_F16_PTX, "=r,=r,r", [q], dtype=tl.float16, is_pure=True, pack=4)
    else:
        return small_ints_to(q.to(tl.uint8, bitcast=True) ^ 0x80, tl.float16)


@triton.jit
def unpack_nibbles(b, DTYPE: tl.constexpr):
    """Bytes b (uint8, any shape) -> (MAGIC + (b & 15), MAGIC + (b >> 4)) in DTYPE, exactly.

    7 integer instructions per 4 bytes on the GPU, where Triton's own lowering of the two nibble
    extractions and conversions spends about 14 (a byte extract and a re-pack per code).
    """
    if USE_PTX:
        if DTYPE == tl.float16:
            lo, hi = tl.inline_asm_elementwise(UNPACK_F16_PTX, "=r,=r,=r,=r,r", [b],
                                               dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
        else:
            lo, hi = tl.inline_asm_elementwise(UNPACK_BF16_PTX, "=r,=r,=r,=r,r", [b],
                                               dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    else:
        lo = small_ints_to(b & 0xF, DTYPE)
        hi = small_ints_to(b >> 4, DTYPE)
    return lo, hi


@triton.jit
def finish_tile(acc, offs_m, offs_n, M, N, bias_ptr, out_ptr, stride_om, ws_ptr, lock_ptr,
                pid_m, pid_n, pid_k, num_pid_n, SPLIT_K, HAS_BIAS: tl.constexpr):
    """Add the bias and store the (BLOCK_M, BLOCK_N) fp32 tile ``acc``; with SPLIT_K > 1, first
    gather the partial sums of all K slices.

    Split-K protocol (CUTLASS's serial split-K semaphore, made deterministic): every program writes
    its partial to ws[pid_k] (ws: float32 (SPLIT_K, M, N)), a CTA barrier orders those stores
    before one acq_rel atomic increment of this tile's counter, and the program that sees
    SPLIT_K - 1 sums ws[0..SPLIT_K) in index order (so the result does not depend on arrival order)
    and resets the counter to 0 for the next launch. Partials are read with .cg (L2, not the
    incoherent L1).
    """
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if SPLIT_K > 1:
        ws_tile = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(ws_tile + pid_k * M * N, acc, mask=mask)
        tl.debug_barrier()
        lock = lock_ptr + pid_m * num_pid_n + pid_n
        arrived = tl.atomic_add(lock, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.full(acc.shape, 0.0, tl.float32)
            for s in range(SPLIT_K):
                total += tl.load(ws_tile + s * M * N, mask=mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
            out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
            tl.store(out, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(lock, 0)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launch configs (host side)
# ----------------------------------------------------------------------------------------------

# Split-K workspace budget of the gemm launch shape, in fp32 elements (the decode shape always gets
# MAX_SPLIT_K * M * N, at most 16 * 16 * N). Past it the gemm grid has tiles enough without splitting.
GEMM_WS_BUDGET = 1 << 23


def launch_config(bm: int, bn: int, bk: int, warps: int, stages: int, group_m: int = 8, after: bool = False,
           split: int = 0) -> triton.Config:
    """A launch config; split 0 = SPLIT_K chosen per problem by prune_configs."""
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "GROUP_M": group_m,
         "SCALE_AFTER_DOT": after},
        num_warps=warps, num_stages=stages,
    )


# GEMM tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), the same for both kernels: 4-16 KB of
# weights per pipeline stage per program. Under the interpreter one small config keeps tests fast.
GEMM_TILES = [(128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (64, 128, 64, 4, 4),
              (128, 64, 64, 4, 4), (64, 64, 64, 4, 4), (128, 128, 128, 8, 3), (32, 128, 64, 4, 4)]


def gemm_configs(interpret_block_k: int) -> list:
    """The autotuner's GEMM configs (one small one under TRITON_INTERPRET=1)."""
    if INTERPRET:
        return [launch_config(32, 32, interpret_block_k, 4, 1, group_m=2, split=1)]
    return [launch_config(bm, bn, bk, w, st) for bm, bn, bk, w, st in GEMM_TILES]


def tune_bench(fn, quantiles):
    """The autotuner's timer: shorter than Triton's default (25 + 100 ms per config) so that a
    first call on a new shape costs seconds, not tens of seconds."""
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


def prune_configs(configs, named_args, **kwargs):
    """Autotuner hook: adapt the base configs to one problem (M, N, K).

    Drops configs whose BLOCK_M is far above M, then gives each a SPLIT_K: 1 when the tile grid
    already has a program per SM, else the smallest power of two that reaches one program per SM
    (and twice that, as a second candidate), keeping >= 2 K steps per split and the workspace
    within what the launcher allocated (ws_ptr).
    """
    m, n, k = named_args["M"], named_args["N"], named_args["K"]
    ws_elems = named_args["ws_ptr"].numel()
    sms = sm_count(named_args["x_ptr"].device)
    m_cap = max(16, triton.next_power_of_2(m))
    out = []
    for c in configs:
        kw = c.kwargs
        if kw["BLOCK_M"] > m_cap:
            continue
        if kw["SPLIT_K"]:
            out.append(c)
            continue
        tiles = triton.cdiv(m, kw["BLOCK_M"]) * triton.cdiv(n, kw["BLOCK_N"])
        steps = triton.cdiv(k, kw["BLOCK_K"])
        split = 1
        while tiles * split < sms and split * 2 * 2 <= steps and split * 2 <= MAX_SPLIT_K \
                and split * 2 * m * n <= ws_elems:
            split *= 2
        splits = [split]
        if split > 1 and split * 2 * 2 <= steps and split * 2 <= MAX_SPLIT_K and split * 2 * m * n <= ws_elems:
            splits.append(split * 2)
        for sk in splits:
            out.append(triton.Config({**kw, "SPLIT_K": sk}, num_warps=c.num_warps, num_stages=c.num_stages))
    if not out:
        raise CompressError(f"no kernel config fits m={m}, n={n}, k={k}")
    return out


def grid(m: int, n: int):
    """Launch grid for meta-parameters: (row tiles x column tiles, SPLIT_K)."""
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])


def workspace(m: int, n: int, decode: bool, device: torch.device, split: int | None = None):
    """(M_KEY, ws, locks) for a launch. M_KEY keys the autotuner (M itself for decode, else its
    power-of-two bucket); ws (float32), sized from M_KEY >= M so that any config cached for the key
    fits it, holds the split-K partials; locks (int32) are the tile counters. Without split-K both
    are one-element placeholders, which prune_configs reads as "no split"."""
    m_key = m if decode else max(32, triton.next_power_of_2(m))
    if split is None:
        split = MAX_SPLIT_K if decode else (4 if 4 * m_key * n <= GEMM_WS_BUDGET else 1)
    if split == 1:
        if device not in _PLACEHOLDERS:
            # Typed stand-ins (never touched when SPLIT_K is 1) keep one kernel binary per config.
            _PLACEHOLDERS[device] = (torch.zeros(1, dtype=torch.float32, device=device),
                                     torch.zeros(1, dtype=torch.int32, device=device))
        return (m_key, *_PLACEHOLDERS[device])
    ws = torch.empty((split * m_key * n,), dtype=torch.float32, device=device)
    return m_key, ws, split_k_locks(device, triton.cdiv(m, 16) * triton.cdiv(n, 16))


# ----------------------------------------------------------------------------------------------
# Host-side helpers (launchers)
# ----------------------------------------------------------------------------------------------

_SM_COUNT: dict[int, int] = {}
_PLACEHOLDERS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
_LOCKS: dict[tuple, torch.Tensor] = {}
# Lock buffers replaced by larger ones stay alive: a captured CUDA graph may still point at them.
_RETIRED_LOCKS: list[torch.Tensor] = []


def sm_count(device: torch.device) -> int:
    """Number of multiprocessors of ``device`` (a fixed stand-in of 132 under the interpreter)."""
    if device.type != "cuda":
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def split_k_locks(device: torch.device, slots: int) -> torch.Tensor:
    """Zeroed int32 tile counters for the split-K epilogue, one buffer per (device, stream).

    The kernel leaves every counter at 0 when it finishes, so the buffer is allocated once and
    reused by every launch on that stream (CUDA-graph replays included). One buffer per stream
    because two launches running at the same time must not share counters.
    """
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    locks = _LOCKS.get(key)
    if locks is None or locks.numel() < slots:
        if locks is not None:
            _RETIRED_LOCKS.append(locks)
        locks = torch.zeros(max(slots, 4096), dtype=torch.int32, device=device)
        _LOCKS[key] = locks
    return locks


def check_activation(x: torch.Tensor, in_features: int, op: str) -> tuple[int, int]:
    """Validate the activation of a launcher: x (M, K) float16/bfloat16, unit stride along K, on a
    device the kernels run on. Returns (M, K)."""
    if x.dim() != 2:
        raise CompressError(f"{op}: x must be 2-D (M, K), got shape {tuple(x.shape)}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise CompressError(f"{op}: x dtype {x.dtype} not supported; the kernels take float16 or bfloat16")
    m, k = x.shape
    if k != in_features:
        raise CompressError(f"{op}: problem (m={m}, k={k}) not compatible with in_features={in_features}")
    if m == 0:
        raise CompressError(f"{op}: x has no rows (m=0)")
    if x.stride(1) != 1:
        raise CompressError(f"{op}: x must be contiguous along K (stride 1), got strides {x.stride()}")
    if x.device.type != "cuda" and not INTERPRET:
        raise CompressError(
            f"{op}: x is on {x.device}; the Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1)"
        )
    return m, k


def check_tensor(t: torch.Tensor, name: str, shape: tuple, dtype: torch.dtype, device: torch.device,
                 op: str) -> None:
    """One-line errors for a weight-side tensor of the wrong shape, dtype, device or layout."""
    if tuple(t.shape) != shape:
        raise CompressError(f"{op}: {name} has shape {tuple(t.shape)}, expected {shape}")
    if t.dtype != dtype:
        raise CompressError(f"{op}: {name} dtype {t.dtype}, expected {dtype}")
    if t.device != device:
        raise CompressError(f"{op}: {name} is on {t.device} but x is on {device}")
    if not t.is_contiguous():
        raise CompressError(f"{op}: {name} must be contiguous, got strides {t.stride()}")


def check_packed(tensors: dict[str, torch.Tensor | None], spec, n: int, in_features: int,
                 device: torch.device, op: str) -> None:
    """Check each packed tensor against ``spec.tensor_shapes(n, in_features)`` (compress.quant
    owns the layout): shape, dtype, device and contiguity, one line naming the tensor."""
    for name, (shape, dtype) in spec.tensor_shapes(n, in_features).items():
        t = tensors.get(name)
        if t is None:
            raise CompressError(f"{op}: {name} is missing for {spec}")
        check_tensor(t, name, shape, dtype, device, op)


def check_bias(bias: torch.Tensor | None, n: int, device: torch.device, op: str) -> None:
    if bias is None:
        return
    if tuple(bias.shape) != (n,):
        raise CompressError(f"{op}: bias has shape {tuple(bias.shape)}, expected ({n},)")
    if not bias.is_floating_point():
        raise CompressError(f"{op}: bias dtype {bias.dtype} is not floating point")
    if bias.device != device:
        raise CompressError(f"{op}: bias is on {bias.device} but x is on {device}")
    if not bias.is_contiguous():
        raise CompressError(f"{op}: bias must be contiguous, got strides {bias.stride()}")


def check_int32_indexing(op: str, **extents: int) -> None:
    """The kernels index with int32; refuse problems whose flat offsets could overflow it."""
    for name, value in extents.items():
        if value >= 2**31:
            raise CompressError(f"{op}: {name}={value} elements exceeds the kernels' 32-bit indexing")


def output_for(x: torch.Tensor, n: int, out: torch.Tensor | None, op: str) -> torch.Tensor:
    """Allocate the (M, N) output in x's dtype, or check a caller-provided one."""
    m = x.shape[0]
    if out is None:
        return torch.empty((m, n), dtype=x.dtype, device=x.device)
    if tuple(out.shape) != (m, n) or out.dtype != x.dtype or out.device != x.device:
        raise CompressError(
            f"{op}: out must be ({m}, {n}) {x.dtype} on {x.device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    if out.stride(1) != 1:
        raise CompressError(f"{op}: out must be contiguous along N, got strides {out.stride()}")
    return out


def check_config(config: dict, op: str) -> None:
    """Validate a hand-picked launch config (tests, benchmark sweeps)."""
    required = {"BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "GROUP_M", "num_warps", "num_stages"}
    missing = required - config.keys()
    if missing:
        raise CompressError(f"{op}: config is missing {sorted(missing)}")
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        if config[key] < 16 or config[key] & (config[key] - 1):
            raise CompressError(f"{op}: {key}={config[key]} must be a power of two >= 16")
    if not 1 <= config["SPLIT_K"] <= MAX_SPLIT_K:
        raise CompressError(f"{op}: SPLIT_K={config['SPLIT_K']} outside [1, {MAX_SPLIT_K}]")
