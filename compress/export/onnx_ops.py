"""ONNX operator pieces: QuantLinear -> com.microsoft MatMulNBits tensors, the export modules that
emit one ONNX node each, a one-node model of them, and onnxruntime sessions.

Layer mapping (N = out_features, K = in_features; see ``compress.quant`` for the stored format)
    int4, group g in {32, 64, 128}  ->  com.microsoft MatMulNBits(bits=4, block_size=g, K, N)
        B            uint8 (N, ceil(K/g), g/2)  the stored qweight (N, Kp/2) reshaped: a view, same
                                                bytes (Kp = ceil(K/g)·g is exactly the padding the
                                                operator expects for a K that g does not divide)
        scales       float (N·ceil(K/g),)       the stored float16 scales in the graph's dtype (exact)
        zero_points  uint8 (N, ceil(G/2))       as stored (asymmetric), or absent (symmetric: the
                                                operator's default zero point 8 is ours)
    int4, one group per row (g = -1)
        The row length is not a power of two in general, which block_size must be. The row is
        re-blocked into blocks of ``REBLOCK`` (or the next power of two >= K when K is smaller): every
        block gets the row's scale and zero point, the code bytes are kept and padded with the zero
        point. Exact, integer-only; it costs one scale per block instead of one per row.
    int8 (per row, symmetric)       ->  MatMulNBits(bits=8), re-blocked the same way
        B = q + 128 as uint8 with the default zero point 128, so (B - 128)·s = q·s exactly.
        Where the installed onnxruntime cannot run 8-bit MatMulNBits on the CPU (probed once):
        DequantizeLinear(q int8 (K, N), s (N,), axis=1) + MatMul.
    16-bit layers stay nn.Linear and become MatMul (+ Add) as torch.onnx exports them.

Each export module's forward emits its ONNX node itself through ``torch.onnx.ops.symbolic`` during
an export; outside one it computes the same product in torch from the ONNX-layout tensors, which
makes the layout conversion testable on its own.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CompressError
from ..qlinear import QuantLinear
from ..quant import pack_int4, unpack_int4

REBLOCK = 128
# The project is not on the package index under its own name: name the packages themselves.
INSTALL_HINT = "pip install onnx onnxruntime onnxscript (from a compress checkout: pip install '.[onnx]')"


def require_onnx() -> None:
    """Raise CompressError naming the missing packages when onnx / onnxscript / onnxruntime is absent
    (onnxruntime too: it validates the export and decides how int8 layers are written)."""
    import importlib.util

    missing = [n for n in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(n) is None]
    if missing:
        raise CompressError(f"ONNX export needs {', '.join(missing)}: {INSTALL_HINT}")


# ---------------------------------------------------------------------------------------------
# Layout conversion: QuantLinear buffers -> MatMulNBits tensors (integer ops only)


@dataclass
class NBitsTensors:
    """Inputs and attributes of one MatMulNBits node.

    b: uint8 (N, n_blocks, block_size·bits/8); scales: float (N·n_blocks,) in the graph's dtype;
    zero_points: uint8 (N, ceil(n_blocks·bits/8)) or None for the default 2^(bits-1).
    """

    bits: int
    block_size: int
    in_features: int
    out_features: int
    b: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None

    @property
    def n_blocks(self) -> int:
        return self.b.shape[1]


def row_block_size(in_features: int) -> int:
    """Block size for a layer quantized with one group per row: REBLOCK, or less for short rows."""
    return min(REBLOCK, max(16, 1 << (in_features - 1).bit_length()))


def nbits_tensors(layer: QuantLinear, dtype: torch.dtype = torch.float32) -> NBitsTensors:
    """The MatMulNBits tensors of a QuantLinear (see the module docstring for the mapping)."""
    n, k = layer.out_features, layer.in_features
    scales = layer.scales.to(dtype)  # float16 -> float32/bfloat16 is exact
    if layer.bits == 4 and layer.group_size != -1:
        g = layer.group_size
        b = layer.qweight.reshape(n, -1, g // 2)
        zeros = layer.zeros if not layer.symmetric else None
        return NBitsTensors(4, g, k, n, b, scales.reshape(-1), zeros)
    block = row_block_size(k)
    n_blocks = -(-k // block)
    width = n_blocks * block  # codes per row after padding
    if layer.bits == 8:
        codes = (layer.qweight.to(torch.int16) + 128).to(torch.uint8)  # (N, K)
        b = F.pad(codes, (0, width - k), value=128).reshape(n, n_blocks, block)
        return NBitsTensors(8, block, k, n, b, scales.expand(n, n_blocks).reshape(-1), None)
    # int4 with one group per row: one zero point per row, codes (N, Kp) with Kp = K rounded up to even.
    if layer.symmetric:
        zero, zeros = torch.full((n, 1), 8, dtype=torch.uint8), None
    else:
        zero = unpack_int4(layer.zeros)[:, :1]  # (N, 1)
        z = zero.expand(n, n_blocks + n_blocks % 2)
        zeros = pack_int4(z)
    fill = (zero | (zero << 4)).expand(n, width // 2 - layer.qweight.shape[1])
    b = torch.cat((layer.qweight, fill), dim=1).reshape(n, n_blocks, block // 2)
    return NBitsTensors(4, block, k, n, b, scales.expand(n, n_blocks).reshape(-1), zeros)


def nbits_dequantize(t: NBitsTensors) -> torch.Tensor:
    """W (N, K) float32 from MatMulNBits tensors, as the operator defines it: (code - zero)·scale."""
    n, nb = t.out_features, t.n_blocks
    codes = unpack_int4(t.b) if t.bits == 4 else t.b  # (N, nb, block)
    if t.zero_points is None:
        zeros = torch.full((n, nb), float(1 << (t.bits - 1)), device=t.b.device)
    else:
        zeros = unpack_int4(t.zero_points)[:, :nb].float()
    w = (codes.float() - zeros[..., None]) * t.scales.float().reshape(n, nb, 1)
    return w.reshape(n, -1)[:, : t.in_features]


# ---------------------------------------------------------------------------------------------
# Export modules: one ONNX node each during export, the same product in torch otherwise


class MatMulNBitsLinear(nn.Module):
    """A QuantLinear as com.microsoft MatMulNBits. forward: x (..., K) -> (..., N), x's dtype."""

    def __init__(self, t: NBitsTensors, bias: torch.Tensor | None, accuracy_level: int) -> None:
        super().__init__()
        self.bits, self.block_size = t.bits, t.block_size
        self.in_features, self.out_features = t.in_features, t.out_features
        self.accuracy_level = accuracy_level
        self.register_buffer("b", t.b)
        self.register_buffer("scales", t.scales)
        self.register_buffer("zero_points", t.zero_points)
        self.register_buffer("bias", bias)

    @classmethod
    def from_quant_linear(cls, layer: QuantLinear, dtype: torch.dtype, accuracy_level: int) -> MatMulNBitsLinear:
        bias = layer.bias.to(dtype) if layer.bias is not None else None
        return cls(nbits_tensors(layer, dtype), bias, accuracy_level)

    def tensors(self) -> NBitsTensors:
        return NBitsTensors(self.bits, self.block_size, self.in_features, self.out_features,
                            self.b, self.scales, self.zero_points)

    def attributes(self) -> dict[str, int]:
        return {"K": self.in_features, "N": self.out_features, "bits": self.bits,
                "block_size": self.block_size, "accuracy_level": self.accuracy_level}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            # Inputs in the operator's order: A, B, scales, zero_points, g_idx (unused), bias.
            return torch.onnx.ops.symbolic(
                "com.microsoft::MatMulNBits", (x, self.b, self.scales, self.zero_points, None, self.bias),
                self.attributes(), dtype=x.dtype, shape=(*x.shape[:-1], self.out_features), version=1)
        w = nbits_dequantize(self.tensors()).to(x.dtype)
        return F.linear(x, w, self.bias)


class DequantizeMatMulLinear(nn.Module):
    """An int8 QuantLinear as DequantizeLinear(axis=1) + MatMul, for runtimes without 8-bit MatMulNBits.

    Buffers: qweight_t int8 (K, N) (the stored codes transposed), scales (N,), bias (N,) or None.
    """

    def __init__(self, layer: QuantLinear, dtype: torch.dtype, opset: int) -> None:
        super().__init__()
        self.in_features, self.out_features, self.opset = layer.in_features, layer.out_features, opset
        self.register_buffer("qweight_t", layer.qweight.t().contiguous())
        self.register_buffer("scales", layer.scales.to(dtype).reshape(-1))
        self.register_buffer("bias", layer.bias.to(dtype) if layer.bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            w = torch.onnx.ops.symbolic("::DequantizeLinear", (self.qweight_t, self.scales), {"axis": 1},
                                        dtype=x.dtype, shape=self.qweight_t.shape, version=self.opset)
        else:
            w = (self.qweight_t.float() * self.scales.float()).to(x.dtype)
        y = x @ w
        return y + self.bias if self.bias is not None else y


def matmul_nbits_model(layer: MatMulNBitsLinear, opset: int = 21):
    """A one-node ONNX model ``Y = MatMulNBits(A)`` of an export module; A float32 (M, K) -> Y (M, N).

    For tests and the per-layer benchmark: the node and initializers are those export_onnx writes.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    t = layer.tensors()
    inits = {"B": t.b, "scales": t.scales.float(), "zero_points": t.zero_points, "bias": layer.bias}
    names = [name if tensor is not None else "" for name, tensor in inits.items()]
    names.insert(3, "")  # g_idx
    while names[-1] == "":
        names.pop()
    node = helper.make_node("MatMulNBits", ["A"] + names, ["Y"], domain="com.microsoft", **layer.attributes())
    graph = helper.make_graph(
        [node], "matmul_nbits",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", t.in_features])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", t.out_features])],
        [numpy_helper.from_array(v.float().numpy() if v.is_floating_point() else v.numpy(), k)
         for k, v in inits.items() if v is not None])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid("com.microsoft", 1)])
    onnx.checker.check_model(model)
    return model


def ort_session(model, threads: int | None = None, spinning: bool = True):
    """A CPU onnxruntime session for a ModelProto or a path; ``threads`` sets intra-op threads;
    ``spinning=False`` makes idle worker threads sleep instead of spin (fairer on a shared CPU)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


@functools.cache
def ort_supports_nbits(bits: int) -> bool:
    """Whether the installed onnxruntime runs MatMulNBits with ``bits`` on the CPU, and exactly.

    Probed with a one-node model (K = 32, N = 2, block 16) at accuracy_level 0.
    """
    import numpy as np
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidGraph, NotImplemented

    k, n, block = 32, 2, 16
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 1 << bits, (n, k // block, block), generator=gen, dtype=torch.uint8)
    b = pack_int4(codes) if bits == 4 else codes
    t = NBitsTensors(bits, block, k, n, b, torch.rand(n * k // block, generator=gen) + 0.5, None)
    layer = MatMulNBitsLinear(t, None, accuracy_level=0)
    x = torch.randn(3, k, generator=gen)
    try:
        y = ort_session(matmul_nbits_model(layer)).run(None, {"A": x.numpy()})[0]
    except (Fail, InvalidGraph, NotImplemented):
        return False
    return bool(np.allclose(y, layer(x).numpy(), rtol=1e-4, atol=1e-4))
