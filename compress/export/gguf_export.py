"""GGUF export of compressed Llama-architecture causal LMs, for llama.cpp, ollama and what runs on them.

What is written (gguf's GGUFWriter, its constants and its per-architecture tensor-name map)
    tensors      every weight under llama.cpp's name (token_embd, blk.N.attn_q, ..., output_norm,
                 output): quantized layers in the block type their storage maps onto exactly
                 (``gguf_blocks``: Q4_0 / Q4_1 / Q8_0), 16-bit weights F16 (BF16 for a bfloat16
                 model), norms and biases F32. A tied output head is not written (llama.cpp reads
                 token_embd for it). For the "llama" architecture the rows of q and k (and their
                 scales, zero points and biases) are permuted back to llama.cpp's interleaved RoPE
                 order (``gguf_blocks.rope_interleave_perm``); Qwen2 keeps Hugging Face's order, as
                 llama.cpp's qwen2 graph uses rotate-half RoPE.
    metadata     {arch}.context_length, embedding_length, block_count, feed_forward_length,
                 attention.head_count / head_count_kv / layer_norm_rms_eps, rope.dimension_count,
                 rope.freq_base (+ key/value_length when head_dim is not hidden / heads), RoPE
                 scaling (linear as rope.scaling.*, llama3 as the rope_freqs tensor), vocab_size,
                 general.file_type (the most common linear type) and quantization_version.
    tokenizer    ``gguf_vocab``: tokens, scores, types, merges, special ids, chat template.

The file is written under a temporary name beside the output, read back with gguf's reader, every
tensor dequantized with gguf.quants.dequantize and compared with compress's own dequantized weight
(bit-exact for Q4_0 / Q8_0 / F16 of 16-bit weights; Q4_1 within its fp16 offset's rounding), and
only then renamed into place.
"""
from __future__ import annotations

import importlib.util
import logging
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..checkpoint import load_compressed
from ..errors import CompressError
from ..quant import QuantizedWeight, dequantize
from ._output import check_output, staging_dir, weights_bytes
from .gguf_blocks import encode_weight, gguf_type, permute_rows, rope_interleave_perm

# Hugging Face architecture -> llama.cpp architecture, and whether q/k rows need re-interleaving.
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
_PERMUTE_QK = {"llama": True, "qwen2": False}
_ROPE_TYPES = ("default", "linear", "llama3")
INSTALL_HINT = "pip install gguf (from a compress checkout: pip install '.[gguf]')"
_FILE_TYPES = {"Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q8_0": "MOSTLY_Q8_0", "F16": "MOSTLY_F16",
               "BF16": "MOSTLY_BF16", "F32": "ALL_F32"}
# Q4_1's offset m = -d*z is rounded to fp16 once: |error| <= 2^-11 |m| (plus float32 rounding).
Q4_1_REL_BOUND = 2.0 ** -11


def require_gguf() -> None:
    """CompressError naming the package when gguf is not installed."""
    if importlib.util.find_spec("gguf") is None:
        raise CompressError(f"GGUF export needs the gguf package: {INSTALL_HINT}")


@dataclass
class GGUFReport:
    """What export_gguf wrote. Sizes in bytes; ``max_abs_err`` by GGUF type, against compress's
    dequantized weights (0.0 means bit-exact)."""

    path: str
    architecture: str
    hf_architecture: str
    tokenizer: str
    vocab_size: int
    tensor_types: dict[str, int]
    layers: dict[str, str]
    f16_fallback: list[str]
    gguf_bytes: int
    compressed_bytes: int
    export_seconds: float
    validated: bool
    max_abs_err: dict[str, float] = field(default_factory=dict)

    kind = "causal-lm"  # the only kind GGUF export takes (a class attribute: not in to_dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def rows(self) -> list[tuple[str, object]]:
        """(label, value) rows for a terminal table."""
        rows = [("output", self.path), ("architecture", f"{self.architecture} (from {self.hf_architecture})"),
                ("tokenizer", f"{self.tokenizer}, {self.vocab_size} tokens")]
        rows += [(f"tensors {t}", n) for t, n in sorted(self.tensor_types.items())]
        if self.f16_fallback:
            rows.append(("stored F16 (no GGUF block type, --allow-f16)",
                         f"{len(self.f16_fallback)}: {', '.join(self.f16_fallback[:3])}"
                         + (", ..." if len(self.f16_fallback) > 3 else "")))
        rows += [("gguf bytes", self.gguf_bytes), ("compressed weights bytes", self.compressed_bytes),
                 ("export seconds", round(self.export_seconds, 1))]
        if self.validated:
            rows += [(f"max |gguf - compress| {t}", e) for t, e in sorted(self.max_abs_err.items())]
        else:
            rows.append(("validated", "no (validate=False)"))
        return rows


@dataclass
class _Tensor:
    """One tensor to write: its GGUF name and type, the array, and how to recompute compress's
    value of it for the read-back check (float32, in GGUF's row order)."""

    name: str
    kind: str
    array: np.ndarray
    source: str
    expected: object  # () -> torch.Tensor float32
    fell_back: bool = False


def _describe(qw: QuantizedWeight) -> str:
    s = qw.spec
    if s.bits == 8:
        return "int8"
    return f"int{s.bits} g{s.group_size} {'sym' if s.symmetric else 'asym'}"


def _rope_scaling(config) -> tuple[float, str, torch.Tensor | None]:
    """(rope theta, rope type, per-frequency divisors (D/2,) float32 or None when all are 1)."""
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    theta = params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
    if rope_type not in _ROPE_TYPES:
        raise CompressError(f"RoPE type {rope_type!r} is not supported for GGUF export (supported: "
                            f"{', '.join(_ROPE_TYPES)})")
    if rope_type == "default":
        return float(theta), rope_type, None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    dim = scaled.numel() * 2
    base = 1.0 / (float(theta) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if abs(float(attention_scaling) - 1.0) > 1e-6:
        raise CompressError(f"RoPE type {rope_type!r} with attention scaling {attention_scaling} has no GGUF form")
    return float(theta), rope_type, (base / scaled.double()).float()


def _add_metadata(writer, config, arch: str, name: str, file_type: str, rope: tuple) -> None:
    import gguf

    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    theta, rope_type, divisors = rope
    writer.add_rope_freq_base(theta)
    if divisors is not None and torch.allclose(divisors, divisors[0].expand_as(divisors)):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(divisors[0]))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(int(getattr(gguf.LlamaFileType, _FILE_TYPES[file_type])))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _is_quantized(module: nn.Module) -> bool:
    """QuantLinear, or any module holding packed weights the same way (quantized embeddings)."""
    return callable(getattr(module, "quantized_weight", None)) and hasattr(module, "spec")


def _tied_head(model: nn.Module) -> bool:
    """Whether the output head shares its weight tensor(s) with the token embedding."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or emb is None:
        return False
    if _is_quantized(head) != _is_quantized(emb):
        return False
    if _is_quantized(head):
        return head.quantized_weight().qweight.data_ptr() == emb.quantized_weight().qweight.data_ptr()
    return head.weight.data_ptr() == emb.weight.data_ptr()


def collect_tensors(model: nn.Module, arch: str, allow_f16: bool, model_dir,
                    float_type: str | None = None) -> list[_Tensor]:
    """Every tensor of ``model`` to write, in module order, under llama.cpp's names; 16-bit weights
    as ``float_type`` (None: BF16 for a bfloat16 model, else F16).

    CompressError listing every layer that no GGUF type holds (unless ``allow_f16``) and every
    tensor the architecture's name map does not know.
    """
    import gguf

    config = model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    prefer = float_type or ("BF16" if next(model.parameters()).dtype == torch.bfloat16 else "F16")
    heads = {"q_proj": config.num_attention_heads,
             "k_proj": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    tied = _tied_head(model)
    head = model.get_output_embeddings()
    out: list[_Tensor] = []
    no_block, unknown = [], []

    def gguf_name(hf: str) -> str | None:
        name = name_map.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            unknown.append(hf)
        return name

    for mod_name, module in model.named_modules():
        if tied and module is head:
            continue
        perm = None
        leaf = mod_name.rpartition(".")[2]
        if _PERMUTE_QK[arch] and leaf in heads:
            rows = module.out_features
            perm = rope_interleave_perm(rows, heads[leaf])
        weight_name = f"{mod_name}.weight"
        if _is_quantized(module):
            qw = module.quantized_weight()
            if perm is not None:
                qw = permute_rows(qw, perm)
            try:
                kind, arr, fell_back = encode_weight(qw, None, allow_f16, prefer)
            except ValueError:
                no_block.append(f"{mod_name} ({_describe(qw)}, K={qw.in_features}"
                                f"{' not a multiple of 32' if qw.in_features % 32 else ''})")
                continue
            name = gguf_name(weight_name)
            if name:
                out.append(_Tensor(name, kind, arr, mod_name, lambda qw=qw: dequantize(qw), fell_back))
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            w = module.weight.detach()
            if perm is not None:
                w = w[perm]
            kind, arr, _ = encode_weight(None, w, allow_f16, prefer)
            name = gguf_name(weight_name)
            if name:
                out.append(_Tensor(name, kind, arr, mod_name, lambda w=w, k=kind: _rounded(w, k)))
        elif isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 1:
            name = gguf_name(weight_name)  # norms: F32 (llama.cpp multiplies them in float32)
            if name:
                w = module.weight.detach().float()
                out.append(_Tensor(name, "F32", w.numpy(), mod_name, lambda w=w: w))
        else:
            own = [n for n, _ in module.named_parameters(recurse=False) if n != "bias"]
            if own:
                unknown.append(f"{mod_name} ({type(module).__name__})")
            continue
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            b = bias.detach().float()
            if perm is not None:
                b = b[perm]
            name = gguf_name(f"{mod_name}.bias")
            if name:
                out.append(_Tensor(name, "F32", b.numpy(), mod_name, lambda b=b: b))
    if no_block:
        raise CompressError(f"{model_dir}: {len(no_block)} layers have no GGUF block type: "
                            f"{'; '.join(no_block[:4])}{'; ...' if len(no_block) > 4 else ''}; re-plan them "
                            f"(int4 g32 / int8 / 16 bits, K a multiple of 32: plan --target gguf) or pass "
                            f"--allow-f16 to store them as F16")
    if unknown:
        raise CompressError(f"{model_dir}: no GGUF name for {', '.join(unknown[:5])} in llama.cpp's {arch} "
                            f"tensor map")
    return out


def _rounded(w: torch.Tensor, kind: str) -> torch.Tensor:
    """A 16-bit weight as the file holds it, in float32."""
    if kind == "F32":
        return w.float()
    return w.to(torch.bfloat16 if kind == "BF16" else torch.float16).float()


def export_gguf(model_dir: str | Path, output: str | Path, overwrite: bool = False, allow_f16: bool = False,
                validate: bool = True, progress: bool = False, float_type: str | None = None) -> GGUFReport:
    """Write a compressed Llama-architecture causal LM as one GGUF file (module docstring).

    model_dir: a directory written by ``compress.apply`` (its tokenizer.json is written too).
    output: the .gguf file, written under a temporary name and renamed only when complete and,
    with ``validate``, read back and checked tensor by tensor. allow_f16: store layers that no
    GGUF block type holds (K not a multiple of 32, odd groups) as F16 of their dequantized weight,
    listed in the report; without it they are a CompressError naming them. float_type: "F16",
    "BF16" or "F32" for the weights left unquantized (default: BF16 for a bfloat16 model, else
    F16; F32 makes an exact input for llama.cpp's own quantizer). Refuses an existing
    output unless ``overwrite``, architectures outside SUPPORTED_ARCHITECTURES, and tokenizers
    llama.cpp cannot run.
    """
    require_gguf()
    import gguf

    from .gguf_vocab import add_vocab, read_vocab

    out = Path(output)
    check_output(out, overwrite, "model.gguf")
    start = time.perf_counter()
    lm = load_compressed(model_dir)
    config = lm.model.config
    hf_arch = (getattr(config, "architectures", None) or [type(lm.model).__name__])[0]
    if lm.kind != "causal-lm" or hf_arch not in SUPPORTED_ARCHITECTURES:
        raise CompressError(f"{model_dir}: GGUF export supports the architectures "
                            f"{', '.join(SUPPORTED_ARCHITECTURES)}; this model is {hf_arch} ({lm.kind})")
    arch = SUPPORTED_ARCHITECTURES[hf_arch]
    rope = _rope_scaling(config)
    vocab = read_vocab(Path(model_dir), config.vocab_size)  # a tokenizer llama.cpp cannot run fails here
    if float_type not in (None, "F16", "BF16", "F32"):
        raise CompressError(f"float_type must be F16, BF16 or F32, got {float_type!r}")
    tensors = collect_tensors(lm.model, arch, allow_f16, model_dir, float_type)
    if rope[2] is not None and not torch.allclose(rope[2], rope[2][0].expand_as(rope[2])):
        if arch != "llama":
            raise CompressError(f"{model_dir}: RoPE type {rope[1]!r} needs llama.cpp's rope_freqs tensor, "
                                f"which its {arch} graph does not read")
        freqs = rope[2].float()
        tensors.insert(0, _Tensor("rope_freqs.weight", "F32", freqs.numpy(), "rotary_emb", lambda f=freqs: f))
    linear_kinds = Counter(t.kind for t in tensors if t.array.ndim == 2 and t.name.startswith("blk."))
    file_type = linear_kinds.most_common(1)[0][0] if linear_kinds else "F16"

    with staging_dir(out) as tmp, _quiet_gguf():
        path = tmp / out.name
        writer = gguf.GGUFWriter(path, arch)
        _add_metadata(writer, config, arch, Path(model_dir).name, file_type, rope)
        add_vocab(writer, vocab, Path(model_dir), config.vocab_size)
        for t in tensors:
            raw = None if t.kind in ("F16", "F32") else gguf.GGMLQuantizationType[t.kind]  # uint8 bytes
            writer.add_tensor(t.name, t.array, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
        errors = check_file(path, tensors) if validate else {}
        report = GGUFReport(
            path=str(out), architecture=arch, hf_architecture=hf_arch, tokenizer=vocab.model
            + (f" (pre {vocab.pre})" if vocab.model == "gpt2" else ""), vocab_size=len(vocab.tokens),
            tensor_types=dict(Counter(t.kind for t in tensors)),
            layers={t.source: t.kind for t in tensors if t.array.ndim == 2},
            f16_fallback=[t.source for t in tensors if t.fell_back], gguf_bytes=path.stat().st_size,
            compressed_bytes=weights_bytes(Path(model_dir)), export_seconds=0.0, validated=validate,
            max_abs_err=errors)
        path.replace(out)
    report.export_seconds = time.perf_counter() - start
    return report


@contextmanager
def _quiet_gguf():
    """gguf logs every step at INFO and its guesses about tokenizer templates at WARNING: what
    matters is in the report, and a real problem raises."""
    loggers = [logging.getLogger(n) for n in ("gguf", "gguf.vocab", "gguf.gguf_writer")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def check_file(path: Path, tensors: list[_Tensor]) -> dict[str, float]:
    """Read ``path`` back with gguf's reader and compare every tensor, dequantized by
    gguf.quants.dequantize, with compress's value; returns the largest |difference| per type.

    CompressError when a tensor is missing, has the wrong type or shape, or differs by more than
    its type allows (0 for all but Q4_1, whose offsets are rounded to fp16; F16 fallbacks of
    quantized layers are compared with the fp16 rounding of compress's dequantized weight).
    """
    import gguf

    reader = gguf.GGUFReader(path)
    found = {t.name: t for t in reader.tensors}
    worst: dict[str, float] = {}
    for t in tensors:
        r = found.get(t.name)
        if r is None or r.tensor_type.name != t.kind:
            raise CompressError(f"{path}: tensor {t.name} reads back as {r.tensor_type.name if r else 'missing'}, "
                                f"expected {t.kind}")
        got = torch.from_numpy(np.array(gguf.quants.dequantize(r.data, r.tensor_type), dtype=np.float32))
        want = t.expected().float()
        if t.fell_back:
            want = _rounded(want, t.kind)
        if tuple(got.shape) != tuple(want.shape):
            raise CompressError(f"{path}: tensor {t.name} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        err = float((got - want).abs().max()) if got.numel() else 0.0
        bound = 0.0
        if t.kind == "Q4_1":  # per block: fp16 d, fp16 m, 16 code bytes
            m = np.ascontiguousarray(r.data.reshape(-1, 20)[:, 2:4]).view(np.float16)
            bound = Q4_1_REL_BOUND * float(np.abs(m.astype(np.float32)).max()) + 2.0 ** -23 * float(want.abs().max())
        if err > bound:
            raise CompressError(f"{path}: tensor {t.name} ({t.kind}) differs from compress's weights by {err:.3g} "
                                f"> {bound:.3g}; nothing was written")
        worst[t.kind] = max(worst.get(t.kind, 0.0), err)
    return worst


__all__ = ["GGUFReport", "SUPPORTED_ARCHITECTURES", "check_file", "collect_tensors", "export_gguf", "gguf_type",
           "require_gguf"]
