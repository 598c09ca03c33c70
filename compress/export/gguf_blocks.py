"""compress storage -> GGUF block types, re-packed without re-quantizing.

GGUF (ggml) block types used here, each over blocks of 32 consecutive weights along a row (K):

    Q4_0  18 bytes: fp16 d, 16 bytes of codes;  w = d * (q - 8),  q in 0..15
    Q4_1  20 bytes: fp16 d, fp16 m, 16 bytes;   w = d * q + m
    Q8_0  34 bytes: fp16 d, 32 int8 codes;      w = d * q
    F16 / BF16 / F32: plain values
    In a Q4 block byte j holds element j in its low nibble and element j + 16 in its high nibble
    (compress packs elements 2j and 2j + 1 into byte j: see compress.quant), so codes are re-packed.

The mapping from compress's storage (compress.quant's docstring), decided by compress.servable.gguf_type:

    int4, symmetric, group g with g % 32 == 0 (or one group per row with K % 32 == 0) -> Q4_0
        d = the group's scale, q = the stored code (zero point 8): bit-exact. A group longer than
        32 gives each of its blocks the same scale (more bytes than compress stores, same weights).
    int4, asymmetric, same groups -> Q4_1
        d = scale, m = -d * z rounded to fp16 once: exact up to that rounding (|error| <= d*z*2^-11).
    int8 (per row) with K % 32 == 0 -> Q8_0, every block of a row given the row's scale: bit-exact.
    16 bits -> F16 (BF16 for a bfloat16 model, or where a value overflows fp16).
A row length K that is not a multiple of 32 fits no block type; such a layer is stored as F16 of
its dequantized weight only when the caller allows it (``compress export --allow-f16``).
"""
from __future__ import annotations

import numpy as np
import torch

from ..quant import QuantizedWeight, QuantSpec, int4_codes_and_zeros
# The rule (which spec on which row length is which GGUF type) is compress.servable's: the planner's
# --target gguf and this writer must never disagree on it.
from ..servable import GGUF_BLOCK, gguf_type

FP16_MAX = 65504.0


def gguf_compatible(spec: QuantSpec, in_features: int) -> bool:
    """Whether a layer of this spec and row length is stored by a GGUF block type without loss
    (Q4_0 / Q8_0 exactly, Q4_1 up to its fp16 offset): the planner's ``--target gguf`` constraint.
    Its bytes in the file are compress.servable.layer_bytes(..., "gguf"), which differ from
    compress's own storage (Q8_0 keeps a scale per 32 weights; longer groups repeat their scale)."""
    return gguf_type(spec, in_features) is not None


def _fp16_bytes(t: torch.Tensor) -> np.ndarray:
    """float16 tensor (...,) -> uint8 array (..., 2), little-endian."""
    return t.detach().to(torch.float16).contiguous().cpu().numpy().view(np.uint8).reshape(*t.shape, 2)


def _block_group(qw: QuantizedWeight) -> torch.Tensor:
    """For each 32-block of a row, the index of the group it lies in: int64 (K // 32,)."""
    g = qw.scales.shape[1]
    kp = qw.qweight.shape[1] * 2
    group = kp // g
    return torch.arange(qw.in_features // GGUF_BLOCK) * GGUF_BLOCK // group


def q4_blocks(qw: QuantizedWeight) -> tuple[str, np.ndarray]:
    """("Q4_0" | "Q4_1", uint8 (N, K // 32 * bytes per block)) from an int4 weight (see docstring)."""
    n, k = qw.out_features, qw.in_features
    codes, zeros = int4_codes_and_zeros(qw)  # uint8 (N, Kp), float32 (N, G)
    blocks = codes[:, :k].reshape(n, k // GGUF_BLOCK, GGUF_BLOCK)  # padding past K dropped
    qs = blocks[..., :16] | (blocks[..., 16:] << 4)  # (N, nb, 16): byte j = elements j, j + 16
    idx = _block_group(qw)
    d = qw.scales[:, idx]  # float16 (N, nb)
    parts = [_fp16_bytes(d)]
    if qw.zeros is None:
        kind = "Q4_0"
    else:
        kind = "Q4_1"
        # d*z is exact in float32 (11-bit scale times a 4-bit integer): one rounding, to fp16.
        parts.append(_fp16_bytes(-(d.float() * zeros[:, idx])))
    parts.append(qs.contiguous().cpu().numpy())
    return kind, np.concatenate(parts, axis=-1).reshape(n, -1)


def q8_blocks(qw: QuantizedWeight) -> np.ndarray:
    """uint8 (N, K // 32 * 34): Q8_0 blocks of an int8 weight, each with its row's scale."""
    n, k = qw.out_features, qw.in_features
    nb = k // GGUF_BLOCK
    d = _fp16_bytes(qw.scales.expand(n, nb))  # (N, nb, 2)
    qs = qw.qweight.contiguous().cpu().numpy().view(np.uint8).reshape(n, nb, GGUF_BLOCK)
    return np.concatenate((d, qs), axis=-1).reshape(n, -1)


def plain_tensor(t: torch.Tensor, prefer: str = "F16") -> tuple[str, np.ndarray]:
    """(type, array) for a 16-bit tensor: F16 as float16, or BF16 as its uint8 bytes (..., 2K).

    prefer: "F16" or "BF16" (the model's dtype decides), or "F32" (exact; e.g. the input of
    llama.cpp's own quantizer); F16 becomes BF16 where a finite value exceeds fp16's range, rather
    than turning it into infinity.
    """
    if prefer == "F32":
        return "F32", t.detach().float().contiguous().cpu().numpy()
    if prefer == "F16" and t.numel() and float(t.detach().abs().max()) > FP16_MAX:
        prefer = "BF16"
    if prefer == "BF16":
        raw = t.detach().to(torch.bfloat16).contiguous().cpu().view(torch.int16).numpy().view(np.uint8)
        return "BF16", raw.reshape(*t.shape[:-1], t.shape[-1] * 2)
    return "F16", t.detach().to(torch.float16).contiguous().cpu().numpy()


def encode_weight(qw: QuantizedWeight | None, weight: torch.Tensor | None, allow_f16: bool,
                  prefer: str = "F16") -> tuple[str, np.ndarray, bool]:
    """(type, array, fell_back) for one weight of shape (N, K).

    qw: the packed weight of a quantized layer, or None for a 16-bit one (then ``weight``). A
    quantized layer no block type holds is stored as F16 of its dequantized weight when
    ``allow_f16`` (fell_back True); otherwise ValueError, for the caller to name the layer.
    """
    if qw is None:
        kind, arr = plain_tensor(weight, prefer)
        return kind, arr, False
    kind = gguf_type(qw.spec, qw.in_features)
    if kind is None:
        if not allow_f16:
            raise ValueError("no GGUF block type")
        from ..quant import dequantize

        kind, arr = plain_tensor(dequantize(qw), prefer)
        return kind, arr, True
    if kind == "Q8_0":
        return kind, q8_blocks(qw), False
    kind, arr = q4_blocks(qw)
    return kind, arr, False


def permute_rows(qw: QuantizedWeight, perm: torch.Tensor) -> QuantizedWeight:
    """The same weight with its rows reordered (row i of the result is row perm[i]): codes,
    scales and zero points move together, so the weight stays bit for bit what it was."""
    zeros = qw.zeros[perm] if qw.zeros is not None else None
    return QuantizedWeight(qw.spec, qw.in_features, qw.qweight[perm], qw.scales[perm], zeros)


def rope_interleave_perm(rows: int, heads: int) -> torch.Tensor:
    """Row order that turns a Hugging Face q/k projection (rotate-half RoPE: within each head,
    dimension i pairs with i + D/2) into llama.cpp's (adjacent pairs 2i, 2i + 1): int64 (rows,).

    Row h·D + 2i + t of the result is row h·D + t·D/2 + i of the Hugging Face weight (t in {0, 1}).
    """
    d = rows // heads
    h = torch.arange(heads)[:, None, None]
    i = torch.arange(d // 2)[None, :, None]
    t = torch.arange(2)[None, None, :]
    return (h * d + t * (d // 2) + i).reshape(-1)
