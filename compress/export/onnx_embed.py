"""ONNX operator pieces for quantized embedding tables: QuantEmbedding -> com.microsoft
GatherBlockQuantized, the dense fallback, and storing a tied head's MatMulNBits on the same bytes.

Layout (V rows of D values; the operator's spec is onnxruntime's docs/ContribOperators.md)
    GatherBlockQuantized(data, indices, scales[, zero_points]), gather_axis 0, quantize_axis 1,
    data uint8: the table's codes in MatMulNBits' layout (``onnx_ops.nbits_tensors``, the same
    integer-only conversion and re-blocking), flattened per row:
        data         uint8 (V, n_blocks·block·bits/8)  4-bit: two codes a byte, low nibble first
        scales       float (V, n_blocks)               the stored float16 scales in the graph's dtype
        zero_points  uint8 (V, ceil(n_blocks/2))       4-bit asymmetric only; absent = 2^(bits-1),
                                                       which is compress's 8 (int4 symmetric) and
                                                       128 (int8, codes stored as q + 128)
    output (..., n_blocks·block) = (code - zero)·scale, sliced to (..., D) when the row was padded
    to whole blocks. Every value equals compress's dequantized table exactly (float32), or its
    float16 rounding in a float16 graph (the same rounding QuantEmbedding.forward makes).

A tied head (lm_head sharing the table) is a MatMulNBits over the very same codes: its B is the
data reshaped to (V, n_blocks, blob), its scales the same values flattened, its zero points the
same tensor. torch.onnx writes each module's buffers as initializers of their own, so after the
export ``share_tied_initializers`` replaces every MatMulNBits input whose bytes equal a
GatherBlockQuantized input by a Reshape of that initializer (onnxruntime folds it back into a
constant at load time, so MatMulNBits still prepacks it): the file holds the table once.

onnxruntime versions (measured on the CPU with one-node models; uint8 data came with PRs #24239 and
#25214): 1.22 rejects the ``bits`` attribute; 1.23-1.26 run 4-bit tables without zero points and
8-bit tables exactly, but misread 4-bit zero points when a row has an odd number of blocks (their
rows are then re-blocked into blocks half as long, an even count, exactly: ``halve_blocks``);
1.27 and later (1.32 tested) run every form. What the installed onnxruntime runs is probed
(``ort_supports_gather``); a table whose form it cannot run is exported dense (nn.Embedding of
the dequantized table in the graph's dtype, still exact) and the export report says so.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import quantized_modules, set_module
from ..qlinear import QuantEmbedding, QuantLinear
from ..quant import pack_int4, pack_zeros, unpack_zeros
from .onnx_ops import MatMulNBitsLinear, NBitsTensors, nbits_dequantize, nbits_tensors, ort_session


def gather_tensors(table: QuantEmbedding, dtype: torch.dtype = torch.float32) -> NBitsTensors:
    """The table's codes, scales and zero points in MatMulNBits' layout (N = V rows, K = D):
    b uint8 (V, n_blocks, blob), scales (V·n_blocks,) in ``dtype``, zero points or None.
    GatherBlockQuantized reads the same tensors as (V, n_blocks·blob) and (V, n_blocks)."""
    return nbits_tensors(QuantLinear.from_quantized(table.quantized_weight(), None), dtype)


class GatherBlockQuantizedEmbedding(nn.Module):
    """A QuantEmbedding as com.microsoft GatherBlockQuantized.

    Buffers: data uint8 (V, n_blocks·blob), scales (V, n_blocks) in the graph's dtype, zero_points
    uint8 (V, ceil(n_blocks/2)) or None. forward: ids int64 (...) -> (..., D) in the scales' dtype.
    """

    def __init__(self, t: NBitsTensors) -> None:
        super().__init__()
        self.bits, self.block_size = t.bits, t.block_size
        self.num_embeddings, self.embedding_dim, self.n_blocks = t.out_features, t.in_features, t.n_blocks
        self.register_buffer("data", t.b.reshape(t.out_features, -1))
        self.register_buffer("scales", t.scales.reshape(t.out_features, t.n_blocks))
        self.register_buffer("zero_points", t.zero_points)

    @classmethod
    def from_quant_embedding(cls, table: QuantEmbedding, dtype: torch.dtype) -> GatherBlockQuantizedEmbedding:
        return cls(gather_tensors(table, dtype))

    def tensors(self) -> NBitsTensors:
        """The same tensors in MatMulNBits' shapes (views)."""
        v = self.num_embeddings
        return NBitsTensors(self.bits, self.block_size, self.embedding_dim, v,
                            self.data.reshape(v, self.n_blocks, -1), self.scales.reshape(-1), self.zero_points)

    def attributes(self) -> dict[str, int]:
        return {"bits": self.bits, "block_size": self.block_size, "gather_axis": 0, "quantize_axis": 1}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        width = self.n_blocks * self.block_size  # values per row, padding included
        if torch.onnx.is_in_onnx_export():
            rows = torch.onnx.ops.symbolic(
                "com.microsoft::GatherBlockQuantized", (self.data, ids, self.scales, self.zero_points),
                self.attributes(), dtype=self.scales.dtype, shape=(*ids.shape, width), version=1)
        else:
            table = nbits_dequantize(self.tensors())  # (V, D) float32, exact
            return F.embedding(ids, table).to(self.scales.dtype)
        return rows[..., : self.embedding_dim] if width != self.embedding_dim else rows


def dense_embedding(table: QuantEmbedding, dtype: torch.dtype) -> nn.Embedding:
    """The dequantized table as an nn.Embedding in ``dtype`` (the fallback; exact: float32
    dequantization rounded once to ``dtype``, as QuantEmbedding.forward does)."""
    emb = nn.Embedding(table.num_embeddings, table.embedding_dim, table.padding_idx, dtype=dtype, device="meta")
    emb.weight = nn.Parameter(table.dequantized_weight(torch.float32).to(dtype), requires_grad=False)
    return emb


def gather_block_quantized_model(layer: GatherBlockQuantizedEmbedding, opset: int = 21):
    """A one-node ONNX model ``Y = GatherBlockQuantized(ids)``: ids int64 (B, T) -> Y (B, T, width)
    float32 (width: D padded to whole blocks). For the probe and tests."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = {"data": layer.data, "scales": layer.scales.float(), "zero_points": layer.zero_points}
    names = [n for n, t in inits.items() if t is not None]
    inputs = [names[0], "ids", *names[1:]]
    node = helper.make_node("GatherBlockQuantized", inputs, ["Y"], domain="com.microsoft", **layer.attributes())
    graph = helper.make_graph(
        [node], "gather_block_quantized",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "T"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["B", "T", layer.n_blocks * layer.block_size])],
        [numpy_helper.from_array(t.numpy(), n) for n, t in inits.items() if t is not None])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid("com.microsoft", 1)])
    onnx.checker.check_model(model)
    return model


@functools.cache
def ort_supports_gather(bits: int, zero_points: bool, odd_blocks: bool = True) -> bool:
    """Whether the installed onnxruntime runs GatherBlockQuantized on uint8 data with ``bits``
    (and explicit zero points) on the CPU, exactly. Probed with a one-node model of 3 rows in
    blocks of 16, 3 blocks a row (``odd_blocks``) or 4: onnxruntime 1.23-1.26 misread packed zero
    points when a row has an odd number of blocks (measured; 1.27 reads them right)."""
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, InvalidGraph, NotImplemented

    v, block = 3, 16
    d = block * (3 if odd_blocks else 4)
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 1 << bits, (v, d), generator=gen, dtype=torch.uint8)
    b = (pack_int4(codes) if bits == 4 else codes).reshape(v, d // block, -1)
    zeros = pack_zeros(torch.randint(0, 16, (v, d // block), generator=gen)) if zero_points else None
    t = NBitsTensors(bits, block, d, v, b, torch.rand(v * d // block, generator=gen) + 0.5, zeros)
    layer = GatherBlockQuantizedEmbedding(t)
    ids = torch.tensor([[2, 0, 1, 2]])
    try:
        y = ort_session(gather_block_quantized_model(layer)).run(None, {"ids": ids.numpy()})[0]
    except (Fail, InvalidArgument, InvalidGraph, NotImplemented):
        return False
    return bool(np.array_equal(y, layer(ids).numpy()))


def halve_blocks(t: NBitsTensors) -> NBitsTensors:
    """The same weights in blocks half as long (2·n_blocks of block_size/2, block_size >= 32):
    B is the same bytes reshaped; every scale and zero point is repeated for both halves. Exact;
    an even block count for the onnxruntime versions that misread an odd one."""
    n, nb = t.out_features, t.n_blocks
    zeros = None
    if t.zero_points is not None:
        zeros = pack_zeros(unpack_zeros(t.zero_points, nb).repeat_interleave(2, dim=1))
    return NBitsTensors(t.bits, t.block_size // 2, t.in_features, n, t.b.reshape(n, 2 * nb, -1),
                        t.scales.reshape(n, nb).repeat_interleave(2, dim=1).reshape(-1), zeros)


def swap_tables_for_export(model: nn.Module, dtype: torch.dtype, accuracy_level: int | None, int8_nbits: bool
                           ) -> tuple[dict[str, int], dict[str, str], dict[str, int | None]]:
    """Replace every QuantEmbedding of ``model`` by GatherBlockQuantizedEmbedding, or by a dense
    nn.Embedding where the installed onnxruntime cannot run its form; in place, before the
    QuantLinears are swapped (``onnx_export.swap_for_export``). A head tied to a table becomes a
    MatMulNBitsLinear over the table's own export tensors (views), so both nodes read one layout.

    accuracy_level: the heads' MatMulNBits attribute (None: ``onnx_export.AUTO_LEVELS``).
    int8_nbits: whether 8-bit heads can be MatMulNBits; if not, swap_for_export makes them
    DequantizeLinear + MatMul, whose int8 (K, N) codes cannot share the table's bytes.
    Returns (counts by ONNX form, name -> what was written and its bytes for every table and tied
    head, head -> bytes ``share_tied_initializers`` is expected to store once, or None for a head
    that keeps codes of its own: ``count_own_heads`` adds their bytes once they are swapped).
    """
    import onnxruntime

    from .onnx_export import AUTO_LEVELS

    counts: dict[str, int] = {}
    forms: dict[str, str] = {}
    sharing: dict[str, int | None] = {}
    _, tied = quantized_modules(model)
    for name, table in list(model.named_modules()):
        if not isinstance(table, QuantEmbedding):
            continue
        t = gather_tensors(table, dtype)
        bits, zeros, odd = t.bits, t.zero_points is not None, t.n_blocks % 2 == 1
        note = ""
        if not ort_supports_gather(bits, zeros, odd) and odd and t.block_size >= 32 \
                and ort_supports_gather(bits, zeros, False):
            t, note = halve_blocks(t), (f" (blocks halved from {t.block_size}: onnxruntime "
                                        f"{onnxruntime.__version__} misreads zero points of an odd block count)")
        if ort_supports_gather(bits, zeros, t.n_blocks % 2 == 1):
            new = GatherBlockQuantizedEmbedding(t)
            key = f"GatherBlockQuantized (bits={bits})"
            forms[name] = f"{key}, block {new.block_size}, {_nbytes(new)} B{note}"
        else:
            new = dense_embedding(table, dtype)
            key = f"Gather (dense {str(dtype).removeprefix('torch.')}, fallback)"
            forms[name] = (f"{key}, {_nbytes(new)} B: onnxruntime {onnxruntime.__version__} runs no "
                           f"GatherBlockQuantized on uint8 {bits}-bit data{' with zero points' if zeros else ''}")
        counts[key] = counts.get(key, 0) + 1
        set_module(model, name, new)
        for head in (h for h, tab in tied.items() if tab == name):
            if isinstance(new, nn.Embedding):
                forms[head] = f"MatMulNBits (bits={bits}) with codes of its own (its table is dense)"
                sharing[head] = None
            elif bits == 8 and not int8_nbits:
                forms[head] = f"DequantizeLinear+MatMul with codes of its own (int8 (K, N) cannot share {name}'s bytes)"
                sharing[head] = None
            else:
                old = model.get_submodule(head)
                bias = old.bias.to(dtype) if old.bias is not None else None
                level = AUTO_LEVELS[bits] if accuracy_level is None else accuracy_level
                set_module(model, head, MatMulNBitsLinear(new.tensors(), bias, level))
                form = f"MatMulNBits (bits={bits})"
                counts[form] = counts.get(form, 0) + 1
                forms[head] = f"{form} on {name}'s initializers (stored once), 0 B"
                sharing[head] = _nbytes(new)
    return counts, forms, sharing


def count_own_heads(model: nn.Module, forms: dict[str, str], sharing: dict[str, int | None]) -> None:
    """Add to ``forms`` the bytes of each tied head that keeps codes of its own (after the swap)."""
    for head, shared in sharing.items():
        if shared is None:
            forms[head] += f", {_nbytes(model.get_submodule(head))} B stored again"


def _nbytes(m) -> int:
    """Bytes of the tensors of an export module, an nn.Module or NBitsTensors."""
    if isinstance(m, NBitsTensors):
        tensors = [m.b, m.scales, m.zero_points]
    else:
        tensors = [*m.parameters(), *m.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def share_tied_initializers(model) -> tuple[int, int]:
    """Store each tied table once: every MatMulNBits input (B, scales, zero_points) whose bytes
    equal an input of a GatherBlockQuantized node becomes that initializer (same shape) or a
    Reshape of it, and its own initializer is dropped.

    model: an onnx_ir Model, changed in place. Returns (MatMulNBits inputs that now read a table's
    initializer, their bytes), counting those torch.onnx already wrote once for both.
    """
    import onnx_ir as ir

    graph = model.graph
    tables = {}  # content key -> initializer Value
    for node in graph:
        if node.op_type == "GatherBlockQuantized" and node.domain == "com.microsoft":
            for value in (node.inputs[0], node.inputs[2], *node.inputs[3:]):
                if value is not None and value.const_value is not None:
                    tables[_content_key(value.const_value.numpy())] = value
    if not tables:
        return 0, 0
    shared = saved = 0
    first = next(iter(graph), None)
    for node in list(graph):
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
            continue
        for i in (1, 2, 3):
            value = node.inputs[i] if i < len(node.inputs) else None
            if value is None or value.const_value is None or value.name not in graph.initializers:
                continue
            array = value.const_value.numpy()
            source = tables.get(_content_key(array))
            if source is value:  # torch.onnx already wrote one initializer for both (same tensor)
                shared, saved = shared + 1, saved + array.nbytes
                continue
            if source is None or not np.array_equal(source.const_value.numpy().reshape(-1),
                                                                          array.reshape(-1)):
                continue
            if tuple(source.const_value.shape) == array.shape:
                replacement = source
            else:
                shape = ir.Value(name=f"{value.name}_shape", const_value=ir.tensor(np.array(array.shape, np.int64)))
                graph.register_initializer(shape)
                reshape = ir.node("Reshape", [source, shape], name=f"{value.name}_reshape")
                reshape.outputs[0].name = f"{value.name}_shared"
                if first is not None:
                    graph.insert_before(first, reshape)
                else:
                    graph.append(reshape)
                replacement = reshape.outputs[0]
            value.replace_all_uses_with(replacement)
            graph.initializers.pop(value.name)
            shared += 1
            saved += array.nbytes
    return shared, saved


def _content_key(array: np.ndarray) -> tuple[str, int, str]:
    """(dtype, size, digest of the bytes): equal for arrays holding the same values in any shape."""
    import hashlib

    digest = hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=16).hexdigest()
    return array.dtype.str, array.size, digest
