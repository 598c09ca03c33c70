"""compressed-tensors "pack-quantized" tensors and config: conversion to and from compress's storage.

The compressed directory is a compressed-tensors checkpoint, so transformers and vLLM load it as
it is. Per quantized linear layer L with weight (N, K):

    L.weight_packed      int32 (N, ceil(K·b/32))  32/b codes per int32 along K, element 0 in the
                                                  lowest bits, stored value q + 2^(b-1) (q signed)
    L.weight_scale       (N, G) or (N, 1)         in the checkpoint's scale dtype
    L.weight_zero_point  int32 (ceil(N/8), G)     asymmetric int4 only: zp + 8 packed along N
    L.weight_shape       int64 [N, K]
    w = (q - zp) · scale

Read as little-endian bytes this is compress's own int4 layout (code c = q + 8, zero point
z = zp + 8, two codes a byte low nibble first): int4 converts without requantizing, only zero
points are re-laid out (along N instead of along the groups). int8 is per channel symmetric,
stored as q + 128 in four bytes an int32. compressed-tensors has no padded groups: a layer whose
group does not divide K (compress pads it) cannot be written in this format (see ``unsupported``).
"""
from __future__ import annotations

import torch

from .errors import CompressError
from .quant import INT4_GROUP_SIZES, QuantizedWeight, QuantSpec, pack_int4, pack_zeros, unpack_int4, unpack_zeros

QUANT_METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
TENSORS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def unsupported(spec: QuantSpec, in_features: int) -> str | None:
    """Why a layer stored as ``spec`` cannot be written as compressed-tensors, or None if it can."""
    if spec.bits == 4 and spec.group_size != -1 and in_features % spec.group_size:
        return (f"group {spec.group_size} does not divide in_features {in_features} "
                f"(compressed-tensors has no padded groups)")
    return None


def weights_args(spec: QuantSpec) -> dict:
    """The ``weights`` entry of a compressed-tensors config group for ``spec``."""
    grouped = spec.bits == 4 and spec.group_size != -1
    return {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric,
            "strategy": "group" if grouped else "channel", "group_size": spec.group_size if grouped else None,
            "dynamic": False, "actorder": None, "observer": "minmax", "block_structure": None}


def spec_from_args(args: dict, where: str) -> QuantSpec:
    """The QuantSpec of a compressed-tensors ``weights`` entry, or CompressError naming what compress
    cannot run (float types such as fp8, other widths, tensor/block strategies, int8 groups)."""
    if not isinstance(args, dict):
        raise CompressError(f"{where}: no weight quantization (a 16-bit or activation-only scheme)")
    kind, bits, strategy = args.get("type", "int"), args.get("num_bits"), args.get("strategy")
    sym, group = args.get("symmetric", True), args.get("group_size")
    if kind != "int":
        raise CompressError(f"{where}: {kind} {bits}-bit weights (e.g. fp8) are not a scheme compress runs "
                            f"(it runs int4 group/channel and int8 channel)")
    if bits == 8 and strategy == "channel" and sym:
        return QuantSpec(8)
    if bits == 4 and strategy == "channel":
        return QuantSpec(4, -1, bool(sym))
    if bits == 4 and strategy == "group" and group in INT4_GROUP_SIZES:
        return QuantSpec(4, int(group), bool(sym))
    raise CompressError(f"{where}: int{bits} {strategy} weights (group {group}, symmetric {sym}) are not a "
                        f"scheme compress runs (int4 group 32/64/128 or channel, int8 channel symmetric)")


def _bytes_to_int32(b: torch.Tensor, words: int) -> torch.Tensor:
    """uint8 (N, L) -> int32 (N, words), little-endian, zero-padded or truncated to 4·words bytes."""
    b = b[:, : 4 * words]
    if b.shape[1] < 4 * words:
        b = torch.nn.functional.pad(b, (0, 4 * words - b.shape[1]))
    return b.contiguous().view(torch.int32)


def _pack_along_rows(z: torch.Tensor) -> torch.Tensor:
    """4-bit values uint8 (N, G) -> int32 (ceil(N/8), G), eight rows per int32, row 0 lowest."""
    n, g = z.shape
    z = torch.nn.functional.pad(z.to(torch.int64), (0, 0, 0, -n % 8)).reshape(-1, 8, g)
    word = sum(z[:, i, :] << (4 * i) for i in range(8))  # (ceil(N/8), G) in [0, 2^32)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def _unpack_along_rows(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of _pack_along_rows: int32 (ceil(N/8), G) -> uint8 (N, G)."""
    w = packed.to(torch.int64) & 0xFFFFFFFF
    rows = torch.stack([(w >> (4 * i)) & 0xF for i in range(8)], dim=1)  # (ceil(N/8), 8, G)
    return rows.reshape(-1, packed.shape[1])[:n].to(torch.uint8)


def to_ct(qw: QuantizedWeight, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """compress storage -> compressed-tensors tensors (names without the layer prefix).

    scale_dtype: dtype of weight_scale (the checkpoint's; float16 or float32 hold compress's fp16
    scales exactly, bfloat16 would round them and is refused).
    """
    if scale_dtype == torch.bfloat16:
        raise CompressError("bfloat16 cannot hold compress's float16 scales exactly; store them as float32")
    spec, n, k = qw.spec, qw.out_features, qw.in_features
    why = unsupported(spec, k)
    if why:
        raise CompressError(f"cannot write this layer as compressed-tensors: {why}")
    words = -(-k * spec.bits // 32)
    if spec.bits == 8:
        codes = (qw.qweight.view(torch.uint8) ^ 0x80)  # q + 128 as a byte
        out = {"weight_packed": _bytes_to_int32(codes, words)}
    else:
        out = {"weight_packed": _bytes_to_int32(qw.qweight, words)}
    out["weight_scale"] = qw.scales.to(scale_dtype).contiguous()
    if spec.bits == 4 and not spec.symmetric:
        out["weight_zero_point"] = _pack_along_rows(unpack_zeros(qw.zeros, qw.scales.shape[1]))
    out["weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
    return out


def from_ct(tensors: dict[str, torch.Tensor], spec: QuantSpec, name: str) -> QuantizedWeight:
    """compressed-tensors tensors of one layer -> compress storage, every shape checked (one line
    naming the tensor and the shapes for a truncated or mis-shaped one)."""
    for key in ("weight_packed", "weight_scale", "weight_shape"):
        if key not in tensors:
            raise CompressError(f"layer {name}: {key} is missing")
    shape = tensors["weight_shape"].tolist()
    if len(shape) != 2:
        raise CompressError(f"layer {name}: weight_shape {shape} is not [N, K]")
    n, k = (int(v) for v in shape)
    words = -(-k * spec.bits // 32)
    packed = tensors["weight_packed"]
    if packed.dtype != torch.int32 or tuple(packed.shape) != (n, words):
        raise CompressError(f"layer {name}: weight_packed has shape {tuple(packed.shape)} {packed.dtype}, "
                            f"expected ({n}, {words}) torch.int32 for {spec.bits}-bit weight_shape [{n}, {k}]")
    groups = 1 if spec.bits == 8 or spec.group_size == -1 else k // spec.group_size
    scale = tensors["weight_scale"]
    if tuple(scale.shape) != (n, groups) or not scale.is_floating_point():
        raise CompressError(f"layer {name}: weight_scale has shape {tuple(scale.shape)} {scale.dtype}, "
                            f"expected ({n}, {groups}) floating")
    raw = packed.contiguous().view(torch.uint8)  # (N, 4·words)
    if not torch.isfinite(scale).all():
        raise CompressError(f"layer {name}: weight_scale holds non-finite values")
    # float16 when it holds the scales exactly (compress's own storage), else the checkpoint's
    # values as float32: rounding them would make every figure differ from the checkpoint's own.
    scales = scale.to(torch.float16) if holds_in_float16(scale) else scale.to(torch.float32)
    if spec.bits == 8:
        return QuantizedWeight(spec, k, (raw[:, :k] ^ 0x80).view(torch.int8).contiguous(), scales)
    zeros_nz = torch.full((n, groups), 8, dtype=torch.uint8)
    if not spec.symmetric:
        zp = tensors.get("weight_zero_point")
        want = (-(-n // 8), groups)
        if zp is None or zp.dtype != torch.int32 or tuple(zp.shape) != want:
            got = "missing" if zp is None else f"{tuple(zp.shape)} {zp.dtype}"
            raise CompressError(f"layer {name}: weight_zero_point is {got}, expected {want} torch.int32")
        zeros_nz = _unpack_along_rows(zp, n)
    # Codes for the K real columns, then compress's padding: the zero point of the last group.
    codes = unpack_int4(raw)[:, :k]
    kp = spec.padded_in_features(k)
    codes = torch.cat((codes, zeros_nz[:, -1:].expand(n, kp - k)), dim=1)
    return QuantizedWeight(spec, k, pack_int4(codes), scales, None if spec.symmetric else pack_zeros(zeros_nz))


def holds_in_float16(scale: torch.Tensor) -> bool:
    """Whether float16 holds every value of a finite weight_scale (N, G), any float dtype, exactly."""
    return scale.dtype == torch.float16 or bool((scale.to(torch.float16).to(scale.dtype) == scale).all())


def quantization_config(groups: dict[QuantSpec, list[str]], ignore: list[str]) -> dict:
    """config.json's ``quantization_config``: one config group per distinct scheme, exact module
    names as targets; ``ignore`` lists the linear layers left in 16 bits."""
    config_groups = {}
    for i, (spec, names) in enumerate(sorted(groups.items(), key=lambda kv: (kv[0].bits, kv[0].group_size,
                                                                              kv[0].symmetric))):
        config_groups[f"group_{i}"] = {"targets": sorted(names), "weights": weights_args(spec),
                                       "input_activations": None, "output_activations": None, "format": FORMAT}
    out = {"quant_method": QUANT_METHOD, "format": FORMAT, "quantization_status": "compressed",
           "config_groups": config_groups, "ignore": sorted(ignore), "kv_cache_scheme": None}
    if len(groups) == 1 and any(spec.bits == 4 and not spec.symmetric for spec in groups):
        # transformers 5.24 with compressed-tensors 0.20 lays the compressed module out with
        # unpacked zero points (N, G), then refuses the packed (ceil(N/8), G) ones compressed-tensors
        # itself writes; dequantizing at load time reads them right, but that path applies one
        # scheme to every layer, so it helps single-scheme checkpoints only (transformers 5.17 with
        # compressed-tensors 0.19 loads every scheme packed and ignores this option). Serving
        # engines (vLLM) read the packed weights and ignore it too.
        out["dequantize"] = True
    return out


def layer_specs(qconfig: dict, module_names: list[str], where: str) -> dict[str, QuantSpec]:
    """Which modules a compressed-tensors config quantizes, and how: name -> QuantSpec.

    Targets may be exact names, "re:" regexes, or class names (resolved by the caller passing only
    the names of linear modules). Schemes compress cannot run (activation quantization such as
    W8A8, fp8, 2:4 sparsity) are refused in one line.
    """
    import re

    if qconfig.get("quant_method") != QUANT_METHOD:
        raise CompressError(f"{where}: quantization_config is {qconfig.get('quant_method')!r}, not compressed-tensors")
    if qconfig.get("sparsity_config"):
        fmt = qconfig["sparsity_config"].get("format", "sparse")
        raise CompressError(f"{where}: sparsity ({fmt}) is not something compress runs")
    fmt = qconfig.get("format")
    ignore = qconfig.get("ignore") or []

    def matches(name: str, target: str) -> bool:
        if target.startswith("re:"):
            return re.match(target[3:], name) is not None
        return name == target or target in ("Linear",)

    out: dict[str, QuantSpec] = {}
    for gname, group in (qconfig.get("config_groups") or {}).items():
        gfmt = group.get("format") or fmt
        if gfmt != FORMAT:
            raise CompressError(f"{where}: config group {gname} has format {gfmt!r}; compress reads {FORMAT!r}")
        if group.get("input_activations") or group.get("output_activations"):
            raise CompressError(f"{where}: config group {gname} quantizes activations (e.g. W8A8); compress runs "
                                f"weight-only schemes")
        spec = spec_from_args(group.get("weights"), f"{where}: config group {gname}")
        for name in module_names:
            if any(matches(name, t) for t in group.get("targets", [])) and not any(matches(name, i) for i in ignore):
                out[name] = spec
    return out
