"""QuantLinear: a drop-in nn.Linear that holds packed int4 / int8 weights.

The buffers are exactly the storage format of ``compress.quant`` (see its docstring), so a
compressed directory is these buffers saved with safetensors. ``forward`` has one dispatch point:
CUDA inputs go to the Triton kernels of ``compress.kernels`` when Triton is importable; everything
else takes the torch reference, which dequantizes per call and caches nothing (a cached float
weight would undo the memory saving).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quant import QuantizedWeight, QuantSpec, dequantize, quantize, stored_bytes


class QuantLinear(nn.Module):
    """y = x Wᵀ + b with W stored packed.

    Buffers (shapes with N = out_features, K = in_features, Kp = K padded to whole groups, G groups):
      int4: qweight uint8 (N, Kp/2), scales float16 (N, G), zeros uint8 (N, ceil(G/2)) if asymmetric
      int8: qweight int8 (N, K),     scales float16 (N, 1)
      bias: (N,) in the model's dtype, or absent
    forward: x (..., K) float16/bfloat16/float32 -> (..., N) same dtype.
    Works for GPT-2's Conv1D too (from_linear reads its (K, N) weight as (N, K)).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: QuantSpec,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if spec.bits not in (4, 8):
            raise ValueError(f"QuantLinear holds 4- or 8-bit weights, got {spec.bits}")
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        for name, (shape, dtype_) in spec.tensor_shapes(out_features, in_features).items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype_, device=device))
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        # True when the layer replaced a transformers Conv1D, whose weight is stored (K, N): the
        # checkpoint's dense copy of it must keep that orientation (compress.checkpoint).
        self.from_conv1d = False

    @property
    def bits(self) -> int:
        return self.spec.bits

    @property
    def group_size(self) -> int:
        return self.spec.group_size

    @property
    def symmetric(self) -> bool:
        return self.spec.symmetric

    @classmethod
    def from_linear(cls, linear: nn.Module, spec: QuantSpec, name: str = "linear") -> "QuantLinear":
        """Quantize an nn.Linear or Conv1D (round to nearest); ``name`` labels errors (NaN weights)."""
        from .models import linear_weight

        qw = quantize(linear_weight(linear).data, spec, name)
        return cls.from_quantized(qw, linear.bias.data if linear.bias is not None else None,
                                  dtype=linear.weight.dtype)

    @classmethod
    def from_quantized(
        cls, qw: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype = torch.float32
    ) -> "QuantLinear":
        """Wrap already-packed tensors (from RTN, GPTQ or a file) without copying them."""
        layer = cls(qw.in_features, qw.out_features, qw.spec, bias is not None, dtype, device="meta")
        layer.qweight = qw.qweight
        layer.scales = qw.scales
        if qw.zeros is not None:
            layer.zeros = qw.zeros
        if bias is not None:
            layer.bias = bias.detach().clone()
        return layer

    def quantized_weight(self) -> QuantizedWeight:
        """The packed tensors as a QuantizedWeight (views, no copy)."""
        zeros = getattr(self, "zeros", None) if not self.spec.symmetric else None
        return QuantizedWeight(self.spec, self.in_features, self.qweight, self.scales, zeros)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W as float (N, K) in ``dtype``."""
        return dequantize(self.quantized_weight(), dtype)

    def weight_bytes(self) -> int:
        """Bytes of the packed weight tensors (bias excluded)."""
        return stored_bytes(self.spec, self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The one kernel-or-reference decision: the Triton kernels take 16-bit activations on CUDA;
        # everything else (CPU, float32, no Triton) takes the reference.
        # float32 scales (kept from another tool's checkpoint, compress.ct_format.from_ct) stay exact there.
        if (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and self.scales.dtype == torch.float16
                and _triton_available()):
            from compress.kernels.linear import kernel_linear

            return kernel_linear(x, self)
        return self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The torch reference: dequantize to x's dtype, then F.linear. Correct on any device."""
        w = self.dequantized_weight(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, w, bias)

    def extra_repr(self) -> str:
        g = "" if self.spec.bits == 8 else f", group_size={self.group_size}, symmetric={self.symmetric}"
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{g}"


_TRITON: bool | None = None


def _triton_available() -> bool:
    """Whether the Triton kernels can run (checked once; the reference is used otherwise)."""
    global _TRITON
    if _TRITON is None:
        try:
            import triton  # noqa: F401

            _TRITON = True
        except ImportError:
            _TRITON = False
    return _TRITON


class QuantEmbedding(nn.Module):
    """An nn.Embedding whose table (V, D) is stored in compress.quant's format, rows as N and the
    embedding dimension as K: int8 per row, or int4 in groups along each row.

    forward: ids int64 (...) -> (..., D) in ``dtype``; only the looked-up rows are dequantized.
    A tied output head (lm_head sharing the table) is a QuantLinear over the same buffers
    (``tied_head``), so the table is stored and held once.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, spec: QuantSpec, padding_idx: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        if spec.bits not in (4, 8):
            raise ValueError(f"QuantEmbedding holds 4- or 8-bit tables, got {spec.bits}")
        self.num_embeddings, self.embedding_dim, self.spec = num_embeddings, embedding_dim, spec
        self.padding_idx = padding_idx
        self.dtype = dtype
        for name, (shape, dtype_) in spec.tensor_shapes(num_embeddings, embedding_dim).items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype_, device=device))

    @property
    def bits(self) -> int:
        return self.spec.bits

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, padding_idx: int | None = None,
                       dtype: torch.dtype = torch.float32) -> "QuantEmbedding":
        """Wrap packed tensors (N = vocabulary rows, K = embedding_dim) without copying them."""
        emb = cls(qw.out_features, qw.in_features, qw.spec, padding_idx, dtype, device="meta")
        for name, t in qw.tensors().items():
            setattr(emb, name, t)
        return emb

    def quantized_weight(self) -> QuantizedWeight:
        zeros = getattr(self, "zeros", None) if self.spec.bits == 4 and not self.spec.symmetric else None
        return QuantizedWeight(self.spec, self.embedding_dim, self.qweight, self.scales, zeros)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole table (V, D) in ``dtype`` (default: the module's)."""
        return dequantize(self.quantized_weight(), dtype or self.dtype)

    def weight_bytes(self) -> int:
        return stored_bytes(self.spec, self.num_embeddings, self.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        qw = self.quantized_weight()
        rows = QuantizedWeight(self.spec, self.embedding_dim, qw.qweight[flat], qw.scales[flat],
                               qw.zeros[flat] if qw.zeros is not None else None)
        return dequantize(rows, self.dtype).reshape(*ids.shape, self.embedding_dim)

    def tied_head(self, bias: torch.Tensor | None = None) -> QuantLinear:
        """A QuantLinear y = x Eᵀ sharing this table's buffers (a tied lm_head)."""
        return QuantLinear.from_quantized(self.quantized_weight(), bias, dtype=self.dtype)

    def extra_repr(self) -> str:
        g = "" if self.spec.bits == 8 else f", group_size={self.spec.group_size}, symmetric={self.spec.symmetric}"
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}{g}"
