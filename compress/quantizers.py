"""Per-layer quantizers, registered by name: one config dataclass each (torchao's pattern).

A quantizer turns one float weight (N, K) into the packed storage of ``compress.quant`` for a
given QuantSpec; every quantizer writes the same format, so loading, the kernels and the
exporters never need to know which one ran. A config is validated in ``__post_init__`` and is
what the plan's ``"quantizer"`` section holds: ``{"method": "gptq", "damp": 0.01, ...}``.

    rtn    round to nearest (no calibration)
    gptq   GPTQ (Frantar et al.): needs each layer's Hessian H = 2/n Σ xᵀx from calibration inputs
"""
from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from .checks import expect, expect_keys, expect_mapping
from .errors import CompressError
from .quant import QuantizedWeight, QuantSpec, quantize

REGISTRY: dict[str, type["QuantizerConfig"]] = {}


def register_quantizer(name: str) -> Callable[[type], type]:
    """Class decorator: register a QuantizerConfig subclass as ``name``."""
    def wrap(cls: type) -> type:
        if name in REGISTRY:
            raise ValueError(f"quantizer {name!r} is registered twice")
        cls.method = name
        REGISTRY[name] = cls
        return cls

    return wrap


@dataclass
class QuantizerConfig:
    """Options of one quantizer. Subclasses add fields (their types are checked strictly)."""

    method: ClassVar[str] = ""
    needs_hessian: ClassVar[bool] = False

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            expect(getattr(self, f.name), _runtime_types(hints[f.name]), f"quantizer {self.method}", f.name)

    def quantize(self, weight: torch.Tensor, spec: QuantSpec, name: str,
                 hessian: torch.Tensor | None = None, drift: torch.Tensor | None = None,
                 tokens: int | None = None) -> QuantizedWeight:
        """weight float (N, K) -> packed storage for ``spec`` (4 or 8 bits). hessian: (K, K) float32;
        drift: (K, K) float32, the accumulator's drift term (only where ``needs_reference``);
        tokens: the token rows hessian was accumulated from (HessianAccumulator.n_samples)."""
        raise NotImplementedError

    @property
    def needs_reference(self) -> bool:
        """Whether calibration should also carry the full-precision stream (the drift term)."""
        return False

    def to_dict(self) -> dict:
        return {"method": self.method, **dataclasses.asdict(self)}


def _runtime_types(hint) -> tuple[type, ...]:
    """int | None -> (int, NoneType); float -> (float,)."""
    args = typing.get_args(hint)
    return tuple(args) if args else (hint,)


@register_quantizer("rtn")
@dataclass
class RTNConfig(QuantizerConfig):
    """Round to nearest, no calibration. mse: scales from a clip-ratio search per group (per row for
    int8) minimising ‖W − Q(W)‖² (compress.mse; diag H weights the error when a Hessian is given),
    else from each group's (or row's) min-max range."""

    mse: bool = False

    def quantize(self, weight, spec, name, hessian=None, drift=None, tokens=None):
        if self.mse:
            from .mse import mse_quantize

            return mse_quantize(weight, spec, None if hessian is None else hessian.diagonal(), name=name)
        return quantize(weight, spec, name)


@register_quantizer("gptq")
@dataclass
class GPTQConfig(QuantizerConfig):
    """GPTQ. damp: the least λ / mean(diag H) added to H (token_damp raises it per layer); act_order: columns by decreasing H_jj
    (static groups; the default: on MiniLM and stories260K it lowers GPTQ's objective on the same H
    from 0.314 to 0.254 of RTN's and the end-to-end KL / 1 - cos, bench/results/peers-*); mse: clip-searched qparams weighted by diag H, kept per layer where they lower
    GPTQ's objective (compress.mse); refit: rounds of least-squares scales for GPTQ's codes, each
    after the first with GPTQ re-run under them (compress.refit; 0 = off; default 1: never worse on
    H, and measured better end to end: MiniLM int4 g32 1 - cos 0.00974 -> 0.00946, stories260K
    mixed KL 0.0457 -> 0.0451, bench/results/peers-cpu-refit-*); block_size: columns per lazy update. samples / seq_len / data: the
    calibration text (recorded so the plan says how the model was made). fp_target: the share of
    the step towards the full-precision model's outputs (compress.gptq.fp_target_weight: GPTQ aims
    at what the layer computes in the unquantized model, not at its own output on the drifted
    inputs; 0 = off, the paper's GPTQ; costs one more block pass per batch and a second copy of the
    calibration activations; default 0.25: MiniLM int4 g32 1 - cos 0.00946 -> 0.00872, stories260K
    mixed KL 0.0450 -> 0.0405, bench/results/peers-cpu-fptarget-*). token_damp: a layer whose H
    comes from n tokens of K inputs is damped max(damp, token_damp · K / n) (compress.gptq.layer_damp:
    H is noisy where the tokens are few for the width; 0 = damp alone; default 1: MiniLM planned
    at 5.5 bits 1 - cos 0.00380 -> 0.00341, stories260K unchanged, bench/results/peers-cpu-tokendamp-*)."""

    damp: float = 0.01
    token_damp: float = 1.0
    act_order: bool = True
    mse: bool = False
    refit: int = 1
    fp_target: float = 0.25
    block_size: int = 128
    samples: int = 128
    seq_len: int = 512
    data: str | None = None
    needs_hessian: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.damp < 1:
            raise CompressError(f"quantizer gptq: damp must be in (0, 1), got {self.damp}")
        if not 0 <= self.fp_target <= 1:
            raise CompressError(f"quantizer gptq: fp_target must be in [0, 1], got {self.fp_target}")
        if not 0 <= self.token_damp <= 100:
            raise CompressError(f"quantizer gptq: token_damp must be in [0, 100], got {self.token_damp}")
        if not 0 <= self.refit <= 10:
            raise CompressError(f"quantizer gptq: refit must be 0 (off) to 10 rounds, got {self.refit}")
        for key in ("block_size", "samples", "seq_len"):
            if getattr(self, key) < 1:
                raise CompressError(f"quantizer gptq: {key} must be at least 1, got {getattr(self, key)}")

    @property
    def needs_reference(self) -> bool:
        return self.fp_target > 0

    def quantize(self, weight, spec, name, hessian=None, drift=None, tokens=None):
        from .gptq import fp_target_weight, gptq_quantize, layer_damp

        if hessian is None:
            raise CompressError(f"layer {name}: GPTQ needs calibration inputs (a Hessian); none reached it")
        damp = layer_damp(self.damp, self.token_damp, hessian.shape[0], tokens)
        if drift is not None and self.fp_target > 0:
            weight = fp_target_weight(weight, hessian, drift, self.fp_target, damp, name)
        return gptq_quantize(weight, hessian, spec, damp=damp, block_size=self.block_size,
                             act_order=self.act_order, mse=self.mse, refit=self.refit, name=name)


def quantizer_config(section: dict | str | None, where: str = "plan quantizer", **overrides) -> QuantizerConfig:
    """A validated config from a plan's section ({"method": ..., options}), a bare name, or None
    (round to nearest). ``overrides`` (CLI options; None = not given) win over the section."""
    if section is None:
        section = {"method": "rtn"}
    elif isinstance(section, str):
        section = {"method": section}
    section = dict(expect_mapping(section, where))
    method = expect(section.pop("method", "rtn"), str, where, "method")
    if method not in REGISTRY:
        raise CompressError(f"{where}: unknown method {method!r} (known: {', '.join(sorted(REGISTRY))})")
    cls = REGISTRY[method]
    known = {f.name for f in dataclasses.fields(cls)}
    section.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(section) - known)
    if unknown:
        takes = ", ".join(sorted(known)) or "no options"
        raise CompressError(f"{where} ({method}): {method} does not take {unknown} (it takes: {takes}); "
                            f"calibration options (data, samples, seq_len, damp, act_order) are for gptq")
    return cls(**section)
