"""ONNX export of compressed directories, validated in ONNX Runtime.

How the graph is made
    The compressed directory is loaded as usual (``compress.load``); the PyTorch outputs on sample
    inputs are recorded; then every QuantLinear is swapped for a small export module that holds its
    tensors in the ONNX operator's layout, and the model is exported with ``torch.onnx.export``
    (dynamo). Each export module's forward emits its ONNX node itself through
    ``torch.onnx.ops.symbolic``, so the exported graph holds the quantized operator with the packed
    tensors as initializers: no placeholder op, no rewriting of the graph afterwards, and the rest of
    the model (attention, norms, masks, 16-bit layers) is whatever torch.onnx makes of it. Outside an
    export the same modules compute the product in torch from the ONNX-layout tensors, which makes
    the layout conversion testable on its own.

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

accuracy_level (MatMulNBits attribute): 0 computes in float (matches PyTorch to float rounding);
4 quantizes the activations to int8 per block inside the kernel, which is onnxruntime's fast CPU
path (and its only fast one for 8-bit weights) at a small cost in accuracy. Validation tolerances
depend on it (``TOLERANCE``).

Models: causal LMs (input_ids, attention_mask -> logits; optionally with the key/value cache in
and out, for decoding) and encoders (input_ids, attention_mask -> last_hidden_state), batch,
sequence and past axes dynamic (see ``_Wrapper``). Models whose weights exceed 2 GB are written with
external data (``<output>.data`` beside the graph).
"""
from __future__ import annotations

import functools
import inspect
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .apply import WEIGHTS, load_compressed, set_module
from .errors import CompressError
from .qlinear import QuantLinear
from .quant import pack_int4, unpack_int4

REBLOCK = 128
# Largest rel_err (max |onnx - torch| / max |torch|) accepted by validation, per accuracy_level.
# Levels 0-3 compute in float on the CPU; level 4 quantizes activations to int8 per block.
TOLERANCE = {0: 1e-3, 1: 1e-3, 2: 1e-3, 3: 1e-3, 4: 5e-2}
INSTALL_HINT = "pip install 'compress[onnx]'"
_SUPPORTED_KINDS = ("causal-lm", "encoder")
_TORCH_NAMESPACES = ("torch.", "transformers.")
_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes")


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


# ---------------------------------------------------------------------------------------------
# Whole models


class _Wrapper(nn.Module):
    """The exported signature (P = past length, L layers, H_kv key/value heads of size D_h).

    encoder:        input_ids, attention_mask int64 (B, T) -> last_hidden_state (B, T, D)
    causal-lm:      input_ids, attention_mask int64 (B, T) -> logits (B, T, V)
    causal-lm past: input_ids (B, T), attention_mask (B, P + T), past = [key, value] * L, each
                    (B, H_kv, P, D_h) -> logits (B, T, V), [key, value] * L of (B, H_kv, P + T, D_h);
                    positions continue from P (right padding only), P = 0 for the prompt.
    Every output is returned in a tuple.
    """

    def __init__(self, model: nn.Module, kind: str, past: bool = False) -> None:
        super().__init__()
        self.model, self.kind, self.past = model, kind, past
        # transformers 5.2x renamed past_key_values to cache (argument and output).
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                past: list[torch.Tensor] = ()) -> tuple[torch.Tensor, ...]:
        if self.kind == "encoder":
            return (self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state,)
        if not self.past:
            return (self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits,)
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(0, len(past), 2):
            cache.update(past[i], past[i + 1], i // 2)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                         **{self.cache_kw: cache})
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        return (out.logits, *[t for layer in cache.layers for t in (layer.keys, layer.values)])


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, key/value heads, head size) of a decoder config."""
    heads = config.num_attention_heads
    return (config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads,
            getattr(config, "head_dim", None) or config.hidden_size // heads)


def io_names(kind: str, config, past: bool) -> tuple[list[str], list[str]]:
    """ONNX input and output names (onnxruntime-genai's past_key_values.i.key / present.i.key)."""
    inputs, outputs = ["input_ids", "attention_mask"], ["logits" if kind == "causal-lm" else "last_hidden_state"]
    if past:
        kv = [f"{i}.{t}" for i in range(kv_shape(config)[0]) for t in ("key", "value")]
        inputs += [f"past_key_values.{n}" for n in kv]
        outputs += [f"present.{n}" for n in kv]
    return inputs, outputs


def _empty_past(config, batch: int, length: int = 0, gen: torch.Generator | None = None) -> list[torch.Tensor]:
    layers, heads, size = kv_shape(config)
    return [torch.randn(batch, heads, length, size, generator=gen) for _ in range(2 * layers)]


def sample_batches(vocab_size: int, max_positions: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Validation inputs: (input_ids, attention_mask) int64 pairs of shapes (1, 1) and (3, 19), the
    second right-padded in two rows: sizes 1 (which tracing specialises) and >1 on both dynamic axes,
    and the mask."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for b, t in ((1, 1), (3, min(19, max_positions - 1))):
        ids = torch.randint(0, vocab_size, (b, t), generator=gen)
        mask = torch.ones_like(ids)
        if b > 1:
            mask[1, t * 2 // 3:] = 0
            mask[2, t - 2:] = 0
        batches.append((ids, mask))
    return batches


def reference_runs(wrapper: _Wrapper, config, seed: int = 0) -> list[tuple[tuple, tuple[torch.Tensor, ...]]]:
    """(inputs, PyTorch outputs) of each validation run: ``sample_batches`` as prompts (P = 0) and,
    with past key/values, one decode step on top of the last prompt with its PyTorch cache as past."""
    runs = []
    with torch.no_grad():
        for ids, mask in sample_batches(config.vocab_size, getattr(config, "max_position_embeddings", 512), seed):
            args = (ids, mask, _empty_past(config, ids.shape[0])) if wrapper.past else (ids, mask)
            runs.append((args, wrapper(*args)))
        if wrapper.past:
            (ids, mask, _), outputs = runs[-1]
            step = torch.randint(0, config.vocab_size, (ids.shape[0], 1), generator=torch.Generator().manual_seed(seed))
            args = (step, torch.cat((mask, torch.ones_like(step)), dim=1), list(outputs[1:]))
            runs.append((args, wrapper(*args)))
    return runs


def _feeds(names: list[str], args: tuple) -> dict:
    flat = [args[0], args[1], *(args[2] if len(args) > 2 else ())]
    return {n: t.numpy() for n, t in zip(names, flat)}


def compare(got: list[list], runs: list[tuple[tuple, tuple[torch.Tensor, ...]]]) -> tuple[float, float]:
    """max |onnx - torch| and that over max |torch| across every output of every run; the first
    output (logits / hidden states) only where the query positions are not padding."""
    diff, scale = 0.0, 0.0
    for outs, ((ids, mask, *_), expected) in zip(got, runs):
        keep = mask[:, -ids.shape[1]:].bool()
        for i, (o, r) in enumerate(zip(outs, expected)):
            o, r = torch.from_numpy(o).double(), r.double()
            if i == 0:
                o, r = o[keep], r[keep]
            diff = max(diff, float((o - r).abs().max()))
            scale = max(scale, float(r.abs().max()))
    return diff, diff / scale if scale else diff


@dataclass
class ExportReport:
    """What export_onnx wrote and how well it matched PyTorch. Sizes in bytes."""

    path: str
    external_data: str | None
    kind: str
    past_key_values: bool
    opset: int
    accuracy_level: int
    layers: dict[str, int]
    reblocked: list[str]
    onnx_bytes: int
    compressed_bytes: int
    fp32_bytes: int
    export_seconds: float
    validated: bool
    max_abs_err: float | None = None
    rel_err: float | None = None
    tolerance: float | None = None
    validation_shapes: list[list[int]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def rows(self) -> list[tuple[str, object]]:
        """(label, value) rows for a terminal table."""
        rows = [("output", self.path), ("inputs", "input_ids, attention_mask" +
                                         (", past_key_values.*" if self.past_key_values else ""))]
        if self.external_data:
            rows.append(("external data", self.external_data))
        rows += [(f"layers {op}", n) for op, n in self.layers.items()]
        if self.reblocked:
            rows.append(("re-blocked per-row layers", f"{len(self.reblocked)}, e.g. {self.reblocked[0]}"))
        rows += [("opset", self.opset), ("accuracy_level", self.accuracy_level),
                 ("onnx bytes", self.onnx_bytes), ("compressed weights bytes", self.compressed_bytes),
                 ("fp32 bytes", self.fp32_bytes), ("onnx / compressed", self.onnx_bytes / self.compressed_bytes),
                 ("export seconds", round(self.export_seconds, 1))]
        if self.validated:
            rows += [("max abs error vs torch", self.max_abs_err), ("rel error vs torch", self.rel_err),
                     ("tolerance (rel)", self.tolerance)]
        else:
            rows.append(("validated", "no (validate=False)"))
        return rows


def unmappable_layers(model: nn.Module) -> dict[str, list[str]]:
    """Modules the exporter has no mapping for, by type: anything not from torch or transformers
    other than QuantLinear (the anytime head, third-party quantized linears, ...)."""
    bad: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        cls = type(module)
        if isinstance(module, QuantLinear) or cls.__module__.startswith(_TORCH_NAMESPACES):
            continue
        bad.setdefault(f"{cls.__module__}.{cls.__qualname__}", []).append(name or "<root>")
    return bad


def swap_for_export(model: nn.Module, dtype: torch.dtype, accuracy_level: int, opset: int,
                    int8_nbits: bool) -> tuple[dict[str, int], list[str]]:
    """Replace every QuantLinear of ``model`` by its export module, in place.

    Returns the layer counts by ONNX form and the names of per-row layers that were re-blocked.
    """
    counts: Counter = Counter()
    reblocked = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            counts["MatMul (16-bit)"] += 1
        if not isinstance(module, QuantLinear):
            continue
        if module.bits == 8 and not int8_nbits:
            set_module(model, name, DequantizeMatMulLinear(module, dtype, opset))
            counts["DequantizeLinear+MatMul (8-bit)"] += 1
            continue
        new = MatMulNBitsLinear.from_quant_linear(module, dtype, accuracy_level)
        if module.group_size == -1:
            reblocked.append(name)
        set_module(model, name, new)
        counts[f"MatMulNBits (bits={module.bits})"] += 1
    return dict(sorted(counts.items())), reblocked


@contextmanager
def _quiet_exporter():
    """Silence torch.onnx's progress and warning chatter (it logs through `logging`)."""
    loggers = [logging.getLogger(n) for n in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _graph_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def export_onnx(model_dir: str | Path, output: str | Path, overwrite: bool = False, validate: bool = True,
                accuracy_level: int = 4, opset: int = 21, tolerance: float | None = None,
                external_data: bool | None = None, past_key_values: bool = False) -> ExportReport:
    """Export a compressed directory to an ONNX file and check it in onnxruntime.

    model_dir: a directory written by ``compress.apply``. output: the .onnx file to write, under a
    temporary name first and renamed only once it has passed validation. accuracy_level:
    MatMulNBits' attribute, 0-4 (module docstring). validate: run onnxruntime (CPU) on
    ``reference_runs`` and compare with the PyTorch compressed model; rel_err above ``tolerance``
    (default ``TOLERANCE[accuracy_level]``) raises CompressError. external_data: weights in
    ``<output>.data``: None does so only above 2 GB (the protobuf limit), True always.
    past_key_values: causal LMs take and return the key/value cache (``_Wrapper``'s signature).
    """
    require_onnx()
    out = Path(output)
    if out.is_dir():
        raise CompressError(f"output {out} is a directory; give a file name such as {out / 'model.onnx'}")
    if out.exists() and not overwrite:
        raise CompressError(f"output {out} exists; pass --overwrite to replace it")
    if accuracy_level not in TOLERANCE:
        raise CompressError(f"accuracy_level must be one of {sorted(TOLERANCE)}, got {accuracy_level}")
    if not 18 <= opset <= 23:
        raise CompressError(f"opset must be between 18 and 23, got {opset}")
    tolerance = TOLERANCE[accuracy_level] if tolerance is None else tolerance

    lm = load_compressed(model_dir)
    if lm.kind not in _SUPPORTED_KINDS:
        raise CompressError(f"{model_dir}: exporting {lm.kind} models is not supported (supported: "
                            f"{', '.join(_SUPPORTED_KINDS)})")
    if past_key_values and lm.kind != "causal-lm":
        raise CompressError(f"{model_dir}: past key/values need a causal LM, this is an {lm.kind} model")
    bad = unmappable_layers(lm.model)
    if bad:
        listed = "; ".join(f"{t} ({len(n)}: {', '.join(n[:3])})" for t, n in bad.items())
        raise CompressError(f"{model_dir}: no ONNX mapping for layer types {listed}")
    from .evaluate import size_report

    fp32_bytes = 4 * size_report(lm.model).params
    config = lm.model.config
    wrapper = _Wrapper(lm.model, lm.kind, past_key_values).eval()
    runs = reference_runs(wrapper, config) if validate else []
    layers, reblocked = swap_for_export(lm.model, _graph_dtype(lm.model), accuracy_level, opset,
                                        ort_supports_nbits(8))
    names = io_names(lm.kind, config, past_key_values)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        start = time.perf_counter()
        program = _torch_export(wrapper, config, names, opset, model_dir)
        _strip_debug_metadata(program.model)
        program.save(tmp / out.name, external_data=external_data)
        report = ExportReport(
            path=str(out), external_data=None, kind=lm.kind, past_key_values=past_key_values, opset=opset,
            accuracy_level=accuracy_level, layers=layers, reblocked=reblocked,
            onnx_bytes=sum(f.stat().st_size for f in tmp.iterdir()),
            compressed_bytes=(Path(model_dir) / WEIGHTS).stat().st_size, fp32_bytes=fp32_bytes,
            export_seconds=time.perf_counter() - start, validated=validate)
        if validate:
            session = ort_session(tmp / out.name)
            got = [session.run(None, _feeds(names[0], args)) for args, _ in runs]
            report.max_abs_err, report.rel_err = compare(got, runs)
            report.tolerance = tolerance
            report.validation_shapes = [list(args[0].shape) for args, _ in runs]
            if not report.rel_err <= tolerance:
                raise CompressError(
                    f"{model_dir}: onnxruntime output differs from PyTorch by rel error {report.rel_err:.3g} "
                    f"(max abs {report.max_abs_err:.3g}) > tolerance {tolerance:g} at accuracy_level "
                    f"{accuracy_level}; nothing was written")
        report.external_data = _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _torch_export(wrapper: _Wrapper, config, names: tuple[list[str], list[str]], opset: int, model_dir):
    """torch.onnx (dynamo) export with the batch, sequence and past axes dynamic; CompressError on failure.

    Traced at batch 2, sequence 8 (and past length 3): sizes 0 and 1 would be specialised.
    """
    batch, seq = {0: "batch", 1: "sequence"}, 8
    if wrapper.past:
        example = (torch.randint(0, 100, (2, seq)), torch.ones(2, seq + 3, dtype=torch.long),
                   _empty_past(config, 2, 3))
        dynamic = (batch, {0: "batch", 1: "total_sequence"},
                   [{0: "batch", 2: "past_sequence"}] * len(example[2]))
    else:
        example = (torch.randint(0, 100, (2, seq)), torch.ones(2, seq, dtype=torch.long))
        dynamic = (batch, batch)
    try:
        with _quiet_exporter():
            return torch.onnx.export(
                wrapper, example, dynamo=True, opset_version=opset, optimize=True, verbose=False,
                input_names=names[0], output_names=names[1], dynamic_shapes=dynamic)
    except Exception as exc:  # torch.onnx raises many types; the first line says what failed
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CompressError(f"{model_dir}: torch.onnx could not export the model: {first}") from exc


def _strip_debug_metadata(model) -> None:
    """Drop torch.onnx's per-node stack traces and FX dumps (most of a small model's file size)."""
    model.metadata_props.clear()
    model.graph.metadata_props.clear()
    for node in model.graph.all_nodes():
        node.metadata_props.clear()


def _move_into_place(tmp: Path, out: Path) -> str | None:
    """Rename the graph (and its external data, first) from ``tmp`` to ``out``; returns the data path."""
    data = [f for f in tmp.iterdir() if f.name != out.name]
    target_data = None
    for f in data:
        target_data = out.parent / f.name
        os.replace(f, target_data)
    stale = out.with_name(out.name + ".data")
    if not data and stale.exists() and out.exists():
        stale.unlink()  # an earlier export of this name had external data; this one has none
    os.replace(tmp / out.name, out)
    return str(target_data) if target_data else None
