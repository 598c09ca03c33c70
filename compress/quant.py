"""Quantization primitives: pure torch functions, no modules, no state.

Storage formats (the one contract every other part of the toolkit reads: QuantLinear, the Triton
kernels, ONNX export, GPTQ). A linear weight W has shape (N, K) = (out_features, in_features).

int8, per output channel, symmetric
    qweight  int8    (N, K)       q = clamp(round(w / s), -128, 127)
    scales   float16 (N, 1)       s = max|w_row| / 127
    w ≈ q * s

int4, group-wise along K (group size g in {32, 64, 128}, or -1 = one group per row)
    K is zero-padded up to Kp, a multiple of g (and of 2), so a group never straddles the end of a
    row. Zero padding changes no scale or zero point because every group's range includes 0.
    qweight  uint8   (N, Kp // 2) two 4-bit codes per byte along K: byte j of row n holds
                                  q[n, 2j] in its low nibble and q[n, 2j + 1] in its high nibble
                                  (this is ONNX Runtime MatMulNBits' B layout, reshaped)
    scales   float16 (N, Kp // g)
    zeros    uint8   (N, ceil(Kp // g / 2)) asymmetric only: 4-bit zero points packed the same way
                                  along the group axis (MatMulNBits' zero_points layout);
                                  symmetric layers store none and use the fixed zero point 8
    asymmetric: s = (max(w,0) - min(w,0)) / 15, z = clamp(round(-min(w,0) / s), 0, 15)
    symmetric:  s = max|w| / 7,                 z = 8
    q = clamp(round(w / s) + z, 0, 15);   w ≈ (q - z) * s

Scales are rounded to float16 *before* the codes are computed, so the stored codes are the best
codes for the stored scales. A scale that is zero in float16 (an all-zero group, or |w| < 6e-8) is
stored as 1.0: the codes are then the zero point and the group dequantizes to exact zeros.
compress always writes float16 scales; a checkpoint made by another tool whose float32 scales
float16 cannot hold exactly keeps them float32 in memory (compress.ct_format.from_ct), so its
outputs equal the checkpoint's own (such a layer takes the torch reference path, not the kernels).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import CompressError

INT4_GROUP_SIZES = (32, 64, 128, -1)
INT8_GROUP_SIZES = (-1,)
SUPPORTED_BITS = (4, 8, 16)
# The defaults of a layer entry that names only its bits: int4 is group 128 asymmetric (the
# common serving scheme), int8 per channel symmetric (the only int8 format).
DEFAULT_GROUP = {4: 128, 8: -1, 16: -1}
DEFAULT_SYMMETRIC = {4: False, 8: True, 16: True}


@dataclass(frozen=True)
class QuantSpec:
    """How one linear layer is stored: bits (4/8/16), group size along K (-1: per row), symmetry."""

    bits: int
    group_size: int = -1
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise CompressError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.bits == 8 and (self.group_size != -1 or not self.symmetric):
            raise CompressError(
                f"int8 is per output channel and symmetric (group_size -1, symmetric true); "
                f"got group_size {self.group_size}, symmetric {self.symmetric}"
            )
        if self.bits == 4 and self.group_size not in INT4_GROUP_SIZES:
            raise CompressError(
                f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {self.group_size}"
            )

    def padded_in_features(self, in_features: int) -> int:
        """Kp: in_features rounded up to a whole number of groups (int4) or unchanged (int8/16)."""
        if self.bits != 4:
            return in_features
        g = self.effective_group(in_features)
        return -(-in_features // g) * g

    def effective_group(self, in_features: int) -> int:
        """The group length along K actually used: group_size, or the (even) row length for -1."""
        if self.group_size == -1:
            return in_features + (in_features % 2) if self.bits == 4 else in_features
        return self.group_size

    def n_groups(self, in_features: int) -> int:
        """G: scale columns per row (1 for int8 and for group -1)."""
        if self.bits != 4:
            return 1
        return self.padded_in_features(in_features) // self.effective_group(in_features)

    def tensor_shapes(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """name -> (shape, dtype) of every stored tensor of an (N, K) weight in this format.

        The one statement of the layout that QuantLinear, GPTQ, the kernels' checks and the
        exporters read (see the module docstring).
        """
        n, k = out_features, in_features
        if self.bits == 8:
            return {"qweight": ((n, k), torch.int8), "scales": ((n, 1), torch.float16)}
        if self.bits != 4:
            raise CompressError(f"{self.bits}-bit weights are stored unquantized")
        kp, g = self.padded_in_features(k), self.n_groups(k)
        out = {"qweight": ((n, kp // 2), torch.uint8), "scales": ((n, g), torch.float16)}
        if not self.symmetric:
            out["zeros"] = ((n, -(-g // 2)), torch.uint8)
        return out


@dataclass
class QuantizedWeight:
    """Packed tensors of one linear layer; see the module docstring for shapes and layout."""

    spec: QuantSpec
    in_features: int
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors to store, by name (qweight, scales and, for asymmetric int4, zeros)."""
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def check_finite(weight: torch.Tensor, name: str) -> None:
    """Raise CompressError naming the layer if ``weight`` holds NaN or Inf."""
    bad = ~torch.isfinite(weight)
    if bad.any():
        raise CompressError(
            f"layer {name}: weight has {int(bad.sum())} non-finite values (NaN/Inf); refusing to quantize"
        )


def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """Round a float32 scale to float16 and replace zeros by 1.0 (see module docstring)."""
    s = scale.to(torch.float16)
    return torch.where(s == 0, torch.ones_like(s), s)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes along the last axis, two per byte, low nibble first.

    q: uint8 (..., L) with values in [0, 15], L even  ->  uint8 (..., L // 2)
    """
    if q.shape[-1] % 2:
        raise CompressError(f"pack_int4 needs an even last dimension, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: uint8 (..., L // 2) -> uint8 (..., L) codes in [0, 15]."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def pack_zeros(zeros: torch.Tensor) -> torch.Tensor:
    """4-bit zero points (N, G), integers in [0, 15] (any dtype) -> uint8 (N, ceil(G / 2)).

    Packed two per byte along the group axis, low nibble first (MatMulNBits' zero_points layout);
    an odd G gets a zero nibble of padding.
    """
    z = zeros.to(torch.uint8)
    if z.shape[-1] % 2:
        z = torch.nn.functional.pad(z, (0, 1))
    return pack_int4(z)


def unpack_zeros(packed: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Inverse of pack_zeros: uint8 (N, ceil(G / 2)) -> uint8 (N, G)."""
    return unpack_int4(packed)[..., :n_groups]


def fit_group(group_size: int, in_features: int) -> tuple[int, bool]:
    """The one rule for storing an int4 group size on a layer: (group to store, needs padding).

    A group at least as wide as the row is stored as one group per row (-1): a group of 128 on a
    64-wide layer would pad every row to 128 and double its bytes for the same quantization. A
    group that does not divide in_features needs in_features zero-padded to whole groups.
    """
    if group_size != -1 and group_size >= in_features:
        return -1, False
    return group_size, group_size != -1 and in_features % group_size != 0


def quantize_int8(weight: torch.Tensor) -> QuantizedWeight:
    """Symmetric per-output-channel int8. weight: float (N, K) -> int8 (N, K) + fp16 scales (N, 1)."""
    w = weight.detach().float()
    scales = _fp16_scale(w.abs().amax(dim=1, keepdim=True) / 127.0)
    q = torch.clamp(torch.round(w / scales.float()), -128, 127).to(torch.int8)
    return QuantizedWeight(QuantSpec(8), w.shape[1], q, scales)


def int4_qparams(
    groups: torch.Tensor, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points of grouped weights.

    groups: float32 (N, G, g)  ->  scales float16 (N, G), zeros float32 (N, G) (integers in [0, 15])
    """
    if symmetric:
        scales = _fp16_scale(groups.abs().amax(dim=-1) / 7.0)
        zeros = torch.full_like(scales, 8, dtype=torch.float32)
    else:
        lo = groups.amin(dim=-1).clamp(max=0)
        hi = groups.amax(dim=-1).clamp(min=0)
        scales = _fp16_scale((hi - lo) / 15.0)
        zeros = torch.clamp(torch.round(-lo / scales.float()), 0, 15)
    return scales, zeros


def quantize_int4(weight: torch.Tensor, group_size: int = 128, symmetric: bool = False) -> QuantizedWeight:
    """Group-wise int4 along K. weight: float (N, K) -> packed uint8 (N, Kp // 2) + qparams.

    See the module docstring for Kp, the nibble order and the zero-point layout.
    """
    spec = QuantSpec(4, group_size, symmetric)
    n, k = weight.shape
    kp = spec.padded_in_features(k)
    g = spec.effective_group(k)
    w = torch.nn.functional.pad(weight.detach().float(), (0, kp - k))
    groups = w.reshape(n, kp // g, g)
    scales, zeros = int4_qparams(groups, symmetric)
    q = torch.clamp(torch.round(groups / scales.float()[..., None]) + zeros[..., None], 0, 15)
    qweight = pack_int4(q.reshape(n, kp).to(torch.uint8))
    return QuantizedWeight(spec, k, qweight, scales, None if symmetric else pack_zeros(zeros))


def quantize(weight: torch.Tensor, spec: QuantSpec, name: str = "weight") -> QuantizedWeight:
    """Quantize a float (N, K) weight to ``spec`` (4 or 8 bits), refusing NaN/Inf (naming ``name``)."""
    check_finite(weight, name)
    if spec.bits == 8:
        return quantize_int8(weight)
    if spec.bits == 4:
        return quantize_int4(weight, spec.group_size, spec.symmetric)
    raise CompressError(f"layer {name}: bits {spec.bits} is not a quantized format")


def int4_codes_and_zeros(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpacked codes uint8 (N, Kp) and zero points float32 (N, Kp // g) of an int4 weight."""
    q = unpack_int4(qw.qweight)
    n_groups = qw.scales.shape[1]
    if qw.zeros is None:
        zeros = torch.full((q.shape[0], n_groups), 8.0, device=q.device)
    else:
        zeros = unpack_zeros(qw.zeros, n_groups).float()
    return q, zeros


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Full-precision weight (N, K) in ``dtype`` from packed storage; arithmetic in float32."""
    if qw.spec.bits == 8:
        return (qw.qweight.float() * qw.scales.float()).to(dtype)
    q, zeros = int4_codes_and_zeros(qw)
    n, kp = q.shape
    g = kp // qw.scales.shape[1]
    w = (q.reshape(n, -1, g).float() - zeros[..., None]) * qw.scales.float()[..., None]
    return w.reshape(n, kp)[:, : qw.in_features].to(dtype)


def fake_quantize(weight: torch.Tensor, spec: QuantSpec, name: str = "weight") -> torch.Tensor:
    """dequantize(quantize(weight)): the weight a QuantLinear would use, same shape and dtype."""
    if spec.bits == 16:
        return weight
    return dequantize(quantize(weight, spec, name), weight.dtype)


def relative_noise(weight: torch.Tensor, spec: QuantSpec) -> float:
    """Relative quantization noise ‖W − Q(W)‖² / ‖W‖² of a weight (N, K) stored as ``spec``.

    Q is fake_quantize (QuantLinear's numerics); 0 for 16 bits and for W = 0. The one noise
    measure: analyzers and the planner turn rank-only scores into per-width damage with it.
    """
    w = weight.detach().float()
    denom = w.square().sum().item()
    if spec.bits == 16 or denom == 0:
        return 0.0
    return (fake_quantize(w, spec) - w).square().sum().item() / denom


def bits_per_weight(spec: QuantSpec, out_features: int, in_features: int) -> float:
    """Stored bits per original weight, scales and zero points included (padding included too)."""
    if spec.bits == 16:
        return 16.0
    return 8.0 * stored_bytes(spec, out_features, in_features) / (out_features * in_features)


def stored_bytes(spec: QuantSpec, out_features: int, in_features: int) -> int:
    """Bytes of the stored tensors of one layer (bias excluded): what safetensors will hold."""
    if spec.bits == 16:
        return 2 * out_features * in_features
    total = 0
    for shape, dtype in spec.tensor_shapes(out_features, in_features).values():
        numel = 1
        for d in shape:
            numel *= d
        total += numel * dtype.itemsize
    return total
