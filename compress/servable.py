"""What a serving engine can load quantized: the rules of each target, written once.

Targets:
    vllm   compressed-tensors checkpoints as vLLM runs them: the shards vLLM fuses into one matmul
           (q/k/v -> qkv_proj, gate/up -> gate_up_proj) share one scheme; int4 groups divide K
           (vLLM's Marlin / Machete kernels take group -1, 32, 64, 128, no padded groups); int8
           per channel; embeddings and heads stay 16-bit.
    gguf   llama.cpp: one GGUF type per tensor (``gguf_type``, the one owner of that rule: the planner,
           the servability check and compress.export's GGUF writer all ask it): int4 groups made of
           whole 32-weight blocks (Q4_0 symmetric, Q4_1 asymmetric), int8 (Q8_0), 16 bits (F16);
           every block type needs K to be a multiple of 32. The planner picks group 32 itself (a
           longer group repeats its scale per block: GGUF bytes of g32 for fewer weights' worth)
           and counts every layer in the bytes the GGUF file holds (``layer_bytes``): Q4_0 18 and
           Q4_1 20 bytes per 32 weights, Q8_0 34, F16 2 per weight; norms and biases F32.
    any    whatever compress itself runs (padded groups included).
"""
from __future__ import annotations

from torch import nn

from .errors import CompressError
from .quant import QuantSpec, fit_group, stored_bytes

TARGETS = ("vllm", "gguf", "any")
GGUF_BLOCK = 32  # weights per block of every GGUF type compress writes (Q4_0, Q4_1, Q8_0)
# Bytes per GGUF_BLOCK weights of each block type (ggml's block_q4_0: fp16 d + 16 code bytes;
# block_q4_1: fp16 d, m + 16; block_q8_0: fp16 d + 32), and per value of the plain types: gguf's
# GGML_QUANT_SIZES says the same (tests/test_servable_gguf.py checks it).
GGUF_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
GGUF_PLAIN_BYTES = {"F16": 2, "BF16": 2, "F32": 4}

# Sibling projections vLLM loads into one fused layer (module name suffixes within one parent).
FUSED_SHARDS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"),
                ("query", "key", "value"), ("w1", "w3"))


def default_target(kind: str) -> str:
    """vllm for causal LMs (what users serve them with), any for everything else."""
    return "vllm" if kind == "causal-lm" else "any"


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise CompressError(f"unknown target {target!r} (known: {', '.join(TARGETS)})")
    return target


def gguf_type(spec: QuantSpec, in_features: int) -> str | None:
    """The GGUF type a layer stored as ``spec`` with rows of ``in_features`` maps onto exactly
    ("Q4_0", "Q4_1", "Q8_0", "F16"), or None when no block type holds it (K % 32 != 0, or an int4
    group that is not a whole number of 32-blocks). compress.export.gguf_blocks writes what it says."""
    if gguf_problem(spec, in_features):
        return None
    if spec.bits == 16:
        return "F16"
    if spec.bits == 8:
        return "Q8_0"
    return "Q4_0" if spec.symmetric else "Q4_1"


def gguf_problem(spec: QuantSpec, in_features: int) -> str | None:
    """Why no GGUF type holds ``spec`` on rows of ``in_features`` (one line), or None when one does."""
    if spec.bits == 16:
        return None
    if in_features % GGUF_BLOCK:
        return f"in_features {in_features} is not a multiple of {GGUF_BLOCK} (every GGUF block type needs it)"
    if spec.bits == 4 and spec.effective_group(in_features) % GGUF_BLOCK:
        return (f"int4 group {spec.effective_group(in_features)} has no GGUF type "
                f"(Q4_0 / Q4_1 blocks are {GGUF_BLOCK} weights; a group must hold whole blocks)")
    return None


def layer_bytes(spec: QuantSpec, out_features: int, in_features: int, target: str = "any") -> int:
    """Bytes of one (out_features, in_features) weight stored as ``spec`` where ``target`` keeps it:
    the one owner of that count (the planner's budgets, its summary and the GGUF writer's check
    read it). gguf: the file's bytes of the type ``gguf_type`` names (F16 for 16 bits; CompressError
    when no type holds it). vllm / any: compress's own stored tensors (compress.quant.stored_bytes)."""
    if target != "gguf":
        return stored_bytes(spec, out_features, in_features)
    kind = gguf_type(spec, in_features)
    if kind is None:
        raise CompressError(f"no GGUF type holds {_describe(spec)} on in_features {in_features}: "
                            f"{gguf_problem(spec, in_features)}")
    if kind in GGUF_PLAIN_BYTES:
        return GGUF_PLAIN_BYTES[kind] * out_features * in_features
    return GGUF_BLOCK_BYTES[kind] * out_features * (in_features // GGUF_BLOCK)


def unquantized_bytes(numel: int, ndim: int, target: str = "any") -> int:
    """Bytes of a tensor kept unquantized (embeddings, norms, biases, heads; 16-bit layers are
    ``layer_bytes``) where ``target`` keeps it: 2 a value (fp16 / bf16), except GGUF's 1-D tensors
    (norms, biases), which compress's GGUF writer stores F32 because llama.cpp reads them so."""
    per_value = GGUF_PLAIN_BYTES["F32"] if target == "gguf" and ndim == 1 else 2
    return per_value * numel


def target_group(bits: int, target: str) -> int | None:
    """The one int4 group ``target`` plans (gguf: 32, a whole Q4_0 / Q4_1 block), or None when
    the plan's own group stands."""
    return GGUF_BLOCK if target == "gguf" and bits == 4 else None


def group_problem(bits: int, group_size: int, target: str) -> str | None:
    """Why ``target`` refuses a uniform plan's int4 ``group_size`` (one line), or None."""
    need = target_group(bits, target)
    if need is None or group_size == need:
        return None
    return f"--target {target} stores int4 as Q4_0 / Q4_1, group {need}; got group {group_size}"


def fit_spec(bits: int, group_size: int, symmetric: bool, in_features: int, target: str) -> tuple[QuantSpec, bool] | None:
    """The storage a candidate width takes on a layer of ``in_features`` under ``target``:
    (spec, pad_to_group), or None when the target cannot store it (e.g. GGUF with K % 32 != 0).

    any: compress.quant.fit_group (pads ragged K). vllm: no padding: a group that does not divide
    K becomes one group per row. gguf: int4 is group 32 only.
    """
    if bits == 16:
        return QuantSpec(16), False
    if target == "gguf":
        spec = QuantSpec(4, target_group(4, target), symmetric) if bits == 4 else QuantSpec(8)
        return None if gguf_problem(spec, in_features) else (spec, False)
    if bits == 8:
        return QuantSpec(8), False
    group, pad = fit_group(group_size, in_features)
    if pad and target == "vllm":
        return QuantSpec(4, -1, symmetric), False
    return QuantSpec(4, group, symmetric), pad


def fused_groups(names: list[str]) -> list[list[str]]:
    """Groups of layer names vLLM fuses (siblings named like FUSED_SHARDS), among ``names``."""
    by_parent: dict[str, set[str]] = {}
    for n in names:
        parent, _, leaf = n.rpartition(".")
        by_parent.setdefault(parent, set()).add(leaf)
    out = []
    for parent, leaves in by_parent.items():
        for shards in FUSED_SHARDS:
            if set(shards) <= leaves:
                out.append([f"{parent}.{s}" if parent else s for s in shards])
    return out


def problems(specs: dict[str, QuantSpec], model: nn.Module, target: str) -> dict[str, str]:
    """Layers that keep a model from loading quantized in ``target``, each with the reason.

    specs: every linear layer's storage (16-bit ones included, so fused groups are checked whole).
    """
    from .models import linear_shape

    if target == "any":
        return {}
    out: dict[str, str] = {}
    modules = dict(model.named_modules())
    for name, spec in specs.items():
        if spec.bits == 16:
            continue
        k = linear_shape(modules[name])[1]
        if target == "gguf":
            why = gguf_problem(spec, k)
            if why:
                out[name] = why
        elif spec.bits == 4 and spec.group_size != -1 and k % spec.group_size:
            out[name] = f"group {spec.group_size} does not divide in_features {k} (vLLM has no padded groups)"
    if target == "vllm":
        for group in fused_groups(list(specs)):
            schemes = {specs[n] for n in group}
            if len(schemes) > 1:
                desc = ", ".join(f"{n.rpartition('.')[2]}={_describe(specs[n])}" for n in group)
                for n in group:
                    out.setdefault(n, f"vLLM fuses {'/'.join(x.rpartition('.')[2] for x in group)} into one layer; "
                                      f"its shards must share one scheme ({desc})")
    return out


def _describe(spec: QuantSpec) -> str:
    if spec.bits == 16:
        return "16-bit"
    if spec.bits == 8:
        return "int8"
    return f"int4 g{spec.group_size} {'sym' if spec.symmetric else 'asym'}"
