"""What a serving engine can load quantized: the rules of each target, written once.

Targets:
    vllm   compressed-tensors checkpoints as vLLM runs them: the shards vLLM fuses into one matmul
           (q/k/v -> qkv_proj, gate/up -> gate_up_proj) share one scheme; int4 groups divide K
           (vLLM's Marlin / Machete kernels take group -1, 32, 64, 128, no padded groups); int8
           per channel; embeddings and heads stay 16-bit.
    gguf   llama.cpp: one GGUF type per tensor: int4 group 32 (Q4_0 symmetric, Q4_1 asymmetric),
           int8 (Q8_0), 16 bits (F16); every block type needs K to be a multiple of 32.
    any    whatever compress itself runs (padded groups included).
"""
from __future__ import annotations

from torch import nn

from .errors import CompressError
from .quant import QuantSpec, fit_group

TARGETS = ("vllm", "gguf", "any")

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


def fit_spec(bits: int, group_size: int, symmetric: bool, in_features: int, target: str) -> tuple[QuantSpec, bool] | None:
    """The storage a candidate width takes on a layer of ``in_features`` under ``target``:
    (spec, pad_to_group), or None when the target cannot store it (e.g. GGUF with K % 32 != 0).

    any: compress.quant.fit_group (pads ragged K). vllm: no padding: a group that does not divide
    K becomes one group per row. gguf: int4 is group 32 only.
    """
    if bits == 16:
        return QuantSpec(16), False
    if target == "gguf":
        if in_features % 32:
            return None
        if bits == 4:
            return QuantSpec(4, 32, symmetric), False
        return QuantSpec(8), False
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
            if k % 32:
                out[name] = f"in_features {k} is not a multiple of 32 (every GGUF block type needs it)"
            elif spec.bits == 4 and spec.group_size != 32:
                out[name] = f"int4 group {spec.group_size} has no GGUF type (Q4_0 / Q4_1 are group 32)"
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
