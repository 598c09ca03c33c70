"""ONNX export of compressed directories, validated in ONNX Runtime.

How the graph is made
    The compressed directory is loaded as usual (``compress.load``); the PyTorch outputs on sample
    inputs are recorded (``validate.reference_runs``); then every QuantLinear is swapped for an
    export module (``onnx_ops``) that holds its tensors in the ONNX operator's layout, and the model
    is exported with ``torch.onnx.export`` (dynamo). Each export module's forward emits its ONNX node
    itself, so the exported graph holds the quantized operator with the packed tensors as
    initializers: no placeholder op, no rewriting of the graph afterwards, and the rest of the model
    (attention, norms, masks, 16-bit layers) is whatever torch.onnx makes of it.

Quantized embedding tables (QuantEmbedding) become com.microsoft GatherBlockQuantized and a head
tied to one a MatMulNBits over the same initializers (``onnx_embed``); a table whose form the
installed onnxruntime cannot run is exported dense, and the report's ``tables`` says which.

accuracy_level (MatMulNBits attribute, per node): 0 computes in float (matches PyTorch to float
rounding; 1 and 2 compute the same on the CPU); 4 quantizes the activations to int8 per block
inside the kernel, onnxruntime's fast CPU path (2-6x faster single-token products) at a cost that
bench/onnx_accuracy.py measures against the quantization's own: on stories260K level 4 adds
0.6 % of int4 g32's KL but 130 % of int8's. The default (None) therefore gives 4-bit layers level
4 and 8-bit layers level 0, keeping the export within 10 % of the quantization's own KL. Validation
bounds follow the levels used (``validate.TOLERANCE`` and ``KL_TOLERANCE``).

dtype: the graph computes in the model's floating dtype (``compress apply --dtype``): its inputs
and outputs, the key/value cache included, are float32 or float16 accordingly. A bfloat16 model is
exported computing in float32 (its 16-bit tensors upcast, exactly): onnxruntime's CPU provider has
no bfloat16 kernels for most operators (Mul, Softmax, ...), so a bfloat16 graph would not run
where it is validated. The report says so (``source_dtype``).

Models: causal LMs (input_ids, attention_mask -> logits; optionally with the key/value cache in
and out, for decoding) and encoders (input_ids, attention_mask -> last_hidden_state), batch,
sequence and past axes dynamic (see ``_Wrapper``). Models whose weights exceed 2 GB are written with
external data (``<output>.data`` beside the graph).
"""
from __future__ import annotations

import inspect
import logging
import re
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import load_compressed, set_module
from ..errors import CompressError
from ..qlinear import QuantEmbedding, QuantLinear
from . import onnx_embed, onnx_inplace, onnx_ops
from ._output import check_output, move_into_place, staging_dir, weights_bytes
from .onnx_ops import DequantizeMatMulLinear, MatMulNBitsLinear, ort_session, require_onnx
from .validate import (DTYPE_TOLERANCE, KL_TOLERANCE, TOLERANCE, compare, empty_past, feeds, kv_shape,
                       reference_runs)

# None = per layer: 4 (int8 activations, the fast CPU path) for 4-bit layers, 0 (float) for 8-bit
# ones. Measured (bench/results/onnx_accuracy.md): level 4 adds 0.6-1.5 % of int4 quantization's
# own KL / 1 - cos, but 120-135 % of int8's; levels 0-2 add float rounding only.
DEFAULT_ACCURACY_LEVEL = None
AUTO_LEVELS = {4: 4, 8: 0}
_SUPPORTED_KINDS = ("causal-lm", "encoder")
# Opsets torch.onnx writes and compress validates; FAST_OPSET is the default where the installed
# onnxruntime runs it (see default_opset).
OPSET_RANGE = (18, 23)
FAST_OPSET, FALLBACK_OPSET = 23, 21
FAST_OPSET_RUNTIME = (1, 23)  # the first onnxruntime with opset 23's Attention / RotaryEmbedding / RMSNormalization
GEMMA_MODEL_TYPES = ("gemma", "gemma2", "gemma3", "gemma3_text")  # exported at FALLBACK_OPSET (default_opset)
_TORCH_NAMESPACES = ("torch.", "transformers.")
_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes")


class _Wrapper(nn.Module):
    """The exported signature (P = past length, L layers, H_kv key/value heads of size D_h).

    encoder:        input_ids, attention_mask int64 (B, T) -> last_hidden_state (B, T, D)
    causal-lm:      input_ids, attention_mask int64 (B, T) -> logits (B, T, V)
    causal-lm past: input_ids (B, T), attention_mask (B, P + T), past = [key, value] * L, each
                    (B, H_kv, P, D_h) -> logits (B, T, V), [key, value] * L of (B, H_kv, P + T, D_h);
                    positions continue from P (right padding only), P = 0 for the prompt.
    Floating inputs and outputs are in the model's dtype. Every output is returned in a tuple.
    """

    def __init__(self, model: nn.Module, kind: str, past: bool = False) -> None:
        super().__init__()
        self.model, self.kind, self.past = model, kind, past
        # transformers 5.2x renamed past_key_values to cache (argument and output).
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.takes_positions = "position_ids" in params

    def _positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """position_ids int64 (B, T), P + 0..T-1, the values the model derives itself, but with the batch
        axis: from them torch.onnx builds the (B, T, D/2) cos / sin caches that opset 23's
        RotaryEmbedding requires (the model's own (1, T) ones make a graph that fails at B > 1)."""
        if not self.takes_positions:
            return {}
        b, t = input_ids.shape
        start = attention_mask.shape[1] - t
        return {"position_ids": (start + torch.arange(t, device=input_ids.device)).expand(b, t)}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                past: list[torch.Tensor] = ()) -> tuple[torch.Tensor, ...]:
        if self.kind == "encoder":
            return (self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state,)
        if not self.past:
            return (self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                               **self._positions(input_ids, attention_mask)).logits,)
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(0, len(past), 2):
            cache.update(past[i], past[i + 1], i // 2)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                         **{self.cache_kw: cache}, **self._positions(input_ids, attention_mask))
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        return (out.logits, *[t for layer in cache.layers for t in (layer.keys, layer.values)])


def default_opset(model_type: str | None = None) -> tuple[int, str]:
    """The opset an export uses when none is given, and why (one line for the report): the one owner
    of that choice. model_type: the model's ``config.model_type`` ("llama", "bert", ...).

    23 when the installed onnxruntime is >= 1.23: torch.onnx then writes attention, RoPE and RMSNorm
    as single operators, which onnxruntime fuses (bench/results/gguf-cpu.md: decode 0.91x llama.cpp
    Q4_0 at 23 vs 0.83x at 21 on the random 206M Llama). Encoders and causal LMs alike: BERT,
    RoBERTa, DistilBERT, GPT-2, OPT, GPT-NeoX, Llama, Mistral, Qwen2 and Phi-3 all validate at 23
    (tests/test_families.py with COMPRESS_TEST_ALL_ONNX=1). 21 for the Gemma family
    (GEMMA_MODEL_TYPES): its float16 graphs at 23 do not load in onnxruntime 1.32 ("Type parameter
    (T) of Optype (Mul) bound to different types (tensor(float16) and tensor(float))", gemma2 and
    gemma3_text measured; gemma / gemma3 share their (1 + weight) float32 RMSNorm, not measured). 21
    with an older onnxruntime (pyproject allows >= 1.20), whose CPU provider lacks opset 23's
    kernels. Without onnxruntime, 21 as well: export_onnx refuses before that anyway
    (require_onnx: onnxruntime validates every export), and a graph nothing here can check should
    be the one more runtimes load.
    """
    try:
        import onnxruntime
    except ImportError:
        return FALLBACK_OPSET, "default: onnxruntime not installed"
    version = onnxruntime.__version__
    if _version_tuple(version) < FAST_OPSET_RUNTIME:
        return FALLBACK_OPSET, (f"default: onnxruntime {version} installed, opset {FAST_OPSET} needs "
                                f">= {'.'.join(map(str, FAST_OPSET_RUNTIME))}")
    if model_type in GEMMA_MODEL_TYPES:
        return FALLBACK_OPSET, (f"default for {model_type}: its opset {FAST_OPSET} float16 graph does not "
                                f"load in onnxruntime")
    return FAST_OPSET, f"default: onnxruntime {version} installed"


def _version_tuple(version: str) -> tuple[int, ...]:
    """'1.23.2' / '1.24.0.dev20250101' / '1.23rc1' -> (1, 23, 2) / (1, 24, 0) / (1, 23): the
    leading number of each of the first three dot-separated parts, up to the first without one."""
    out = []
    for part in version.split(".")[:3]:
        m = re.match(r"\d+", part)
        if m is None:
            break
        out.append(int(m.group()))
    return tuple(out)


def io_names(kind: str, config, past: bool) -> tuple[list[str], list[str]]:
    """ONNX input and output names (onnxruntime-genai's past_key_values.i.key / present.i.key)."""
    inputs, outputs = ["input_ids", "attention_mask"], ["logits" if kind == "causal-lm" else "last_hidden_state"]
    if past:
        kv = [f"{i}.{t}" for i in range(kv_shape(config)[0]) for t in ("key", "value")]
        inputs += [f"past_key_values.{n}" for n in kv]
        outputs += [f"present.{n}" for n in kv]
    return inputs, outputs


@dataclass
class ExportReport:
    """What export_onnx wrote and how well it matched PyTorch. Sizes in bytes."""

    path: str
    external_data: str | None
    kind: str
    past_key_values: bool
    opset: int
    accuracy_level: int | str
    layers: dict[str, int]
    reblocked: list[str]
    onnx_bytes: int
    compressed_bytes: int
    fp32_bytes: int
    export_seconds: float
    validated: bool
    dtype: str = "float32"
    source_dtype: str = "float32"
    max_abs_err: float | None = None
    rel_err: float | None = None
    tolerance: float | None = None
    kl: float | None = None
    top1: float | None = None
    kl_tolerance: float | None = None
    validation_shapes: list[list[int]] = field(default_factory=list)
    # Quantized embedding tables and tied heads: how each was written and what it stores (bytes of
    # its initializers in the file; a tied head sharing its table's counts 0).
    tables: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # Why this opset: "given" (--opset), or default_opset's line ("default: onnxruntime 1.32.0 installed").
    opset_source: str = "given"
    # inplace_cache: attention blocks written as GroupQueryAttention (onnx_inplace), RoPE table length.
    inplace_cache: bool = False
    max_length: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def rows(self) -> list[tuple[str, object]]:
        """(label, value) rows for a terminal table."""
        inputs = ("input_ids, seqlens_k, total_sequence_length, past_key_values.* (in-place buffers, "
                  f"max_length {self.max_length}: onnx_inplace.InplaceDecoder)") if self.inplace_cache else (
            "input_ids, attention_mask" + (", past_key_values.*" if self.past_key_values else ""))
        rows = [("output", self.path), ("inputs", inputs)]
        if self.external_data:
            rows.append(("external data", self.external_data))
        rows += [(f"layers {op}", n) for op, n in self.layers.items()]
        if self.reblocked:
            rows.append(("re-blocked per-row layers", f"{len(self.reblocked)}, e.g. {self.reblocked[0]}"))
        rows += [(f"table {name}", form) for name, form in self.tables.items()]
        rows += [("note", note) for note in self.notes]
        dtype = self.dtype if self.dtype == self.source_dtype else (
            f"{self.dtype} (the {self.source_dtype} model upcast: onnxruntime's CPU has no {self.source_dtype} kernels)")
        rows += [("dtype", dtype), ("opset", self.opset if self.opset_source == "given" else f"{self.opset} ({self.opset_source})"), ("accuracy_level", self.accuracy_level),
                 ("onnx bytes", self.onnx_bytes), ("compressed weights bytes", self.compressed_bytes),
                 ("fp32 bytes", self.fp32_bytes), ("onnx / compressed", self.onnx_bytes / self.compressed_bytes),
                 ("export seconds", round(self.export_seconds, 1))]
        if self.validated:
            rows += [("max abs error vs torch", self.max_abs_err), ("rel error vs torch", self.rel_err),
                     ("tolerance (rel)", self.tolerance)]
            if self.kl is not None:
                rows += [("KL(torch || onnx), nats", self.kl), ("top-1 agreement vs torch", self.top1),
                         ("tolerance (KL)", self.kl_tolerance)]
        else:
            rows.append(("validated", "no (validate=False)"))
        return rows


def unmappable_layers(model: nn.Module) -> dict[str, list[str]]:
    """Modules the exporter has no mapping for, by type: anything not from torch or transformers
    other than QuantLinear (the anytime head, third-party quantized linears, ...)."""
    bad: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        cls = type(module)
        if isinstance(module, (QuantLinear, QuantEmbedding)) or cls.__module__.startswith(_TORCH_NAMESPACES):
            continue
        bad.setdefault(f"{cls.__module__}.{cls.__qualname__}", []).append(name or "<root>")
    return bad


def swap_for_export(model: nn.Module, dtype: torch.dtype, accuracy_level: int | None, opset: int,
                    int8_nbits: bool) -> tuple[dict[str, int], list[str]]:
    """Replace every QuantLinear of ``model`` by its export module, in place; accuracy_level None
    picks ``AUTO_LEVELS[bits]`` per layer.

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
        level = AUTO_LEVELS[module.bits] if accuracy_level is None else accuracy_level
        new = MatMulNBitsLinear.from_quant_linear(module, dtype, level)
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


def graph_dtype(model: nn.Module) -> torch.dtype:
    """The model's floating dtype: that of its first floating parameter (float32 if none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def export_onnx(model_dir: str | Path, output: str | Path, overwrite: bool = False, validate: bool = True,
                accuracy_level: int | None = DEFAULT_ACCURACY_LEVEL, opset: int | None = None, tolerance: float | None = None,
                external_data: bool | None = None, past_key_values: bool = False,
                kl_tolerance: float | None = None, inplace_cache: bool = False,
                max_length: int | None = None) -> ExportReport:
    """Export a compressed directory to an ONNX file and check it in onnxruntime.

    model_dir: a directory written by ``compress.apply``. output: the .onnx file to write, under a
    temporary name first and renamed only once it has passed validation. accuracy_level:
    MatMulNBits' attribute, 0-4, or None: 4 for 4-bit layers and 0 for 8-bit (module docstring). validate: run onnxruntime (CPU) on
    ``validate.reference_runs`` and compare with the PyTorch compressed model: rel_err above
    ``tolerance`` (default ``TOLERANCE[accuracy_level]``, looser for 16-bit models) or, for causal
    LMs, mean KL above ``kl_tolerance`` (default ``KL_TOLERANCE[accuracy_level]``) raises
    CompressError and writes nothing. external_data: weights in ``<output>.data``: None does so
    only above 2 GB (the protobuf limit), True always. past_key_values: causal LMs take and return
    the key/value cache (``_Wrapper``'s signature), in the model's dtype. opset: 18-23; None:
    ``default_opset()`` (23 with onnxruntime >= 1.23, else 21), named in the report.
    inplace_cache: causal LMs at opset 23 (float32 graphs) with the cache updated in place by
    com.microsoft GroupQueryAttention (``onnx_inplace``: another signature, run through
    ``onnx_inplace.InplaceDecoder``; implies past_key_values); max_length: its RoPE table length,
    the longest sequence (default the config's max_position_embeddings, at most 4096).
    """
    require_onnx()
    out = Path(output)
    check_output(out, overwrite, "model.onnx")
    if accuracy_level is not None and accuracy_level not in TOLERANCE:
        raise CompressError(f"accuracy_level must be one of {sorted(TOLERANCE)}, got {accuracy_level}")
    if opset is not None and not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        raise CompressError(f"opset must be between {OPSET_RANGE[0]} and {OPSET_RANGE[1]}, got {opset}")

    lm = load_compressed(model_dir)
    if lm.kind not in _SUPPORTED_KINDS:
        raise CompressError(f"{model_dir}: exporting {lm.kind} models is not supported (supported: "
                            f"{', '.join(_SUPPORTED_KINDS)})")
    past_key_values = past_key_values or inplace_cache
    if past_key_values and lm.kind != "causal-lm":
        raise CompressError(f"{model_dir}: past key/values need a causal LM, this is an {lm.kind} model")
    bad = unmappable_layers(lm.model)
    if bad:
        listed = "; ".join(f"{t} ({len(n)}: {', '.join(n[:3])})" for t, n in bad.items())
        raise CompressError(f"{model_dir}: no ONNX mapping for layer types {listed}")
    from ..evaluate import size_report

    opset, opset_source = (opset, "given") if opset is not None else default_opset(
        getattr(lm.model.config, "model_type", None))
    source_dtype = graph_dtype(lm.model)
    if source_dtype == torch.bfloat16:
        _upcast(lm.model, torch.bfloat16)
    dtype = graph_dtype(lm.model)
    rope = _inplace_tables(lm.model, opset, dtype, max_length, model_dir) if inplace_cache else None
    fp32_bytes = 4 * size_report(lm.model).params
    config = lm.model.config
    wrapper = _Wrapper(lm.model, lm.kind, past_key_values).eval()
    runs = (onnx_inplace.reference_runs(wrapper, config) if inplace_cache else reference_runs(wrapper, config, dtype)) \
        if validate else []
    # Looked up on the module at call time, so a test can stand in for an onnxruntime without 8-bit.
    int8_nbits = onnx_ops.ort_supports_nbits(8)
    table_counts, tables, sharing = onnx_embed.swap_tables_for_export(lm.model, dtype, accuracy_level, int8_nbits)
    layers, reblocked = swap_for_export(lm.model, dtype, accuracy_level, opset, int8_nbits)
    onnx_embed.count_own_heads(lm.model, tables, sharing)
    layers = dict(sorted((Counter(layers) + Counter(table_counts)).items()))
    # Bounds of the least exact level in the graph.
    bound = accuracy_level if accuracy_level is not None else (4 if layers.get("MatMulNBits (bits=4)") else 0)
    rel_floor, kl_floor = DTYPE_TOLERANCE.get(dtype, (0.0, 0.0))
    tolerance = max(TOLERANCE[bound], rel_floor) if tolerance is None else tolerance
    kl_tolerance = max(KL_TOLERANCE[bound], kl_floor) if kl_tolerance is None else kl_tolerance
    names = io_names(lm.kind, config, past_key_values)

    with staging_dir(out) as tmp:
        start = time.perf_counter()
        program = _torch_export(wrapper, config, names, opset, model_dir, dtype)
        _strip_debug_metadata(program.model)
        _refold_transposed_copies(program.model)
        shared, saved = onnx_embed.share_tied_initializers(program.model)
        notes = _sharing_notes(sharing, shared, saved)
        program.save(tmp / out.name, external_data=external_data)
        if inplace_cache:
            onnx_inplace.rewrite_file(tmp / out.name, *rope)
        report = ExportReport(
            path=str(out), external_data=None, kind=lm.kind, past_key_values=past_key_values, opset=opset,
            accuracy_level=accuracy_level if accuracy_level is not None else "auto (4-bit: 4, 8-bit: 0)",
            layers=layers, reblocked=reblocked,
            onnx_bytes=sum(f.stat().st_size for f in tmp.iterdir()),
            compressed_bytes=weights_bytes(Path(model_dir)), fp32_bytes=fp32_bytes,
            export_seconds=time.perf_counter() - start, validated=validate, dtype=str(dtype).removeprefix("torch."),
            source_dtype=str(source_dtype).removeprefix("torch."), tables=tables, notes=notes,
            opset_source=opset_source, inplace_cache=inplace_cache,
            max_length=rope[0].shape[0] if inplace_cache else None)
        if validate:
            _validate(report, tmp / out.name, names, runs, lm.kind, tolerance, kl_tolerance, model_dir)
        report.external_data = move_into_place(tmp, out)
    return report


def _sharing_notes(sharing: dict[str, int | None], shared: int, saved: int) -> list[str]:
    """What the report says about tied heads: the bytes stored once, or that the pass fell short."""
    expected = sum(v for v in sharing.values() if v is not None)
    if not expected:
        return []
    if saved != expected:
        return [f"tied heads: expected to share {expected} B of their tables' initializers, shared {saved} B "
                f"({shared} inputs); the rest is stored twice"]
    return [f"tied heads share their tables' initializers: {saved} B stored once ({shared} inputs)"]


def _upcast(model: nn.Module, dtype: torch.dtype) -> None:
    """Every parameter and buffer of ``dtype`` to float32, in place (exact for 16-bit floats);
    QuantLinear's codes and float16 scales are left as they are; a QuantEmbedding then looks up
    float32 rows (what the exported graph computes)."""
    for module in model.modules():
        if isinstance(module, QuantEmbedding) and module.dtype == dtype:
            module.dtype = torch.float32
        for key, t in module._parameters.items():
            if t is not None and t.dtype == dtype:
                module._parameters[key] = nn.Parameter(t.detach().float(), requires_grad=False)
        for key, t in module._buffers.items():
            if t is not None and t.dtype == dtype:
                module._buffers[key] = t.float()


def _inplace_tables(model: nn.Module, opset: int, dtype: torch.dtype, max_length: int | None, model_dir):
    """RoPE (cos, sin) tables for ``inplace_cache``, after checking what it needs; CompressError else."""
    if opset != 23:
        raise CompressError(f"{model_dir}: inplace_cache rewrites opset 23's Attention; got opset {opset}")
    if dtype != torch.float32:
        raise CompressError(f"{model_dir}: inplace_cache needs a float32 graph (torch.onnx spells a {dtype} "
                            f"graph's RoPE out, which the rewrite does not match); apply with --dtype float32")
    limit = getattr(model.config, "max_position_embeddings", None) or onnx_inplace.MAX_LENGTH_CAP
    length = min(limit, onnx_inplace.MAX_LENGTH_CAP) if max_length is None else max_length
    if not 1 <= length <= limit:
        raise CompressError(f"{model_dir}: max_length must be 1..{limit} (max_position_embeddings), got {max_length}")
    return onnx_inplace.rotary_tables(model, length, dtype)


def _validate(report: ExportReport, path: Path, names, runs, kind: str, tolerance: float,
              kl_tolerance: float, model_dir) -> None:
    """Run the written graph on ``runs`` and fill the report's agreement; CompressError if too far."""
    try:
        session = ort_session(path)
    except Exception as exc:  # onnxruntime raises its own pybind types; the first line says what failed
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CompressError(f"{model_dir}: onnxruntime cannot load the exported {report.dtype} graph: {first}; "
                            f"nothing was written") from exc
    if report.inplace_cache:
        got = onnx_inplace.run_references(session, runs)
    else:
        got = [session.run(None, feeds(names[0], args)) for args, _ in runs]
    agree = compare(got, runs, logits=kind == "causal-lm")
    report.max_abs_err, report.rel_err, report.tolerance = agree.max_abs_err, agree.rel_err, tolerance
    report.validation_shapes = [list(args[0].shape) for args, _ in runs]
    if agree.kl is not None:
        report.kl, report.top1, report.kl_tolerance = agree.kl, agree.top1, kl_tolerance
    level = report.accuracy_level
    if not agree.rel_err <= tolerance:
        raise CompressError(
            f"{model_dir}: onnxruntime output differs from PyTorch by rel error {agree.rel_err:.3g} "
            f"(max abs {agree.max_abs_err:.3g}) > tolerance {tolerance:g} at accuracy_level {level}; "
            f"nothing was written")
    if agree.kl is not None and not agree.kl <= kl_tolerance:
        raise CompressError(
            f"{model_dir}: onnxruntime's next-token distribution differs from PyTorch's by KL {agree.kl:.3g} "
            f"(top-1 agreement {agree.top1:.3f}) > tolerance {kl_tolerance:g} at accuracy_level {level}; "
            f"nothing was written")


def _torch_export(wrapper: _Wrapper, config, names: tuple[list[str], list[str]], opset: int, model_dir,
                  dtype: torch.dtype = torch.float32):
    """torch.onnx (dynamo) export with the batch, sequence and past axes dynamic; CompressError on failure.

    Traced at batch 2, sequence 8 (and past length 3, the cache in ``dtype``): sizes 0 and 1 would
    be specialised.
    """
    batch, seq = {0: "batch", 1: "sequence"}, 8
    if wrapper.past:
        example = (torch.randint(0, 100, (2, seq)), torch.ones(2, seq + 3, dtype=torch.long),
                   empty_past(config, 2, 3, dtype))
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


def _refold_transposed_copies(model) -> None:
    """Store a tied weight once: torch.onnx's optimizer folds lm_head's transpose of the tied
    embedding (V, D) into a second initializer (D, V), doubling the largest tensor of the file.
    Each 2-D initializer that is exactly the transpose of another becomes a Transpose node of it
    (onnxruntime folds it again in memory at load time; the file holds the table once)."""
    import numpy as np
    import onnx_ir as ir

    graph = model.graph
    by_shape: dict[tuple, list] = {}
    for value in graph.initializers.values():
        if value.const_value is not None and len(value.const_value.shape) == 2:
            by_shape.setdefault(tuple(value.const_value.shape), []).append(value)
    first = next(iter(graph), None)
    for shape, values in list(by_shape.items()):
        for copy in values:
            for source in by_shape.get(shape[::-1], []):
                if source is copy or copy.name not in graph.initializers or source.name not in graph.initializers:
                    continue
                a, b = copy.const_value.numpy(), source.const_value.numpy()
                if a.dtype != b.dtype or not np.array_equal(a, b.T):
                    continue
                node = ir.node("Transpose", [source], {"perm": [1, 0]}, name=f"{copy.name}_transpose")
                node.outputs[0].name = f"{copy.name}_t"
                if first is not None:
                    graph.insert_before(first, node)
                else:
                    graph.append(node)
                copy.replace_all_uses_with(node.outputs[0])
                graph.initializers.pop(copy.name)
                break


def _strip_debug_metadata(model) -> None:
    """Drop torch.onnx's per-node stack traces and FX dumps (most of a small model's file size)."""
    model.metadata_props.clear()
    model.graph.metadata_props.clear()
    for node in model.graph.all_nodes():
        node.metadata_props.clear()
