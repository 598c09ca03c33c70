"""What every sensitivity analyzer shares: the result type, the config base, units, the registry.

An analyzer scores *units*: at granularity "block" a unit is one transformer block (all the
quantizable linears inside it), at "module" each quantizable linear layer. Higher score = more
sensitive. Methods that predict the damage of each candidate width also return ``damage``:
unit -> {bits: predicted increase of the calibration metric when only that unit is stored at
``bits``}, with 16 -> 0. The metric: for causal LMs the mean KL(p_unmodified ‖ p) over every
position ("kl", DEFAULT_CAUSAL_METRIC) or the change in mean next-token NLL ("nll"); for encoders
1 − mean cosine of mean-pooled embeddings against the unmodified model's.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..errors import CompressError
from ..models import (BlockList, find_blocks, is_conv1d, linear_shape, quantizable_embeddings,  # noqa: F401
                      quantizable_linears, tied_heads)
from ..quant import INT4_GROUP_SIZES, QuantSpec

GRANULARITIES = ("block", "module")
CAUSAL_METRICS = ("nll", "kl")
# The causal-LM damage measure wherever none is given (analyze, plan, the oracle, the CLI's --metric):
# kl ranks units closer to a KL oracle on held-out text than nll does, for every analyzer, and nll's
# damage can change sign (bench/results/metric-cpu.md).
DEFAULT_CAUSAL_METRIC = "kl"
CANDIDATE_BITS = (4, 8)


@dataclass
class Sensitivity:
    """One analyzer's verdict on one model (see the module docstring for the fields' meaning).

    units: unit name -> the linear layer names it covers, in model order
    params: unit -> number of weights it holds (sum of N*K over its linears)
    scores: unit -> scalar sensitivity, higher = more sensitive
    damage: unit -> {bits: predicted metric increase}, or None for rank-only methods
    provenance: samples, seq_len, seed, seconds, model path, metric name, config, ...
    """

    method: str
    granularity: str
    units: dict[str, list[str]]
    params: dict[str, int]
    scores: dict[str, float]
    damage: dict[str, dict[int, float]] | None
    provenance: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready (damage's integer keys become strings, as JSON requires)."""
        d = dataclasses.asdict(self)
        if self.damage is not None:
            d["damage"] = {u: {str(b): v for b, v in dmg.items()} for u, dmg in self.damage.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Sensitivity":
        missing = {"method", "granularity", "units", "params", "scores"} - set(d)
        if missing:
            raise CompressError(f"sensitivity record lacks {sorted(missing)}")
        damage = d.get("damage")
        if damage is not None:
            damage = {u: {int(b): float(v) for b, v in dmg.items()} for u, dmg in damage.items()}
        return cls(d["method"], d["granularity"], {u: list(v) for u, v in d["units"].items()},
                   {u: int(v) for u, v in d["params"].items()},
                   {u: float(v) for u, v in d["scores"].items()}, damage, dict(d.get("provenance", {})))


@dataclass
class AnalyzerConfig:
    """Options every analyzer takes; each method subclasses it with its own fields.

    samples: calibration samples (encoder: texts; causal LM: token windows of ``seq_len``)
    seq_len: causal-LM window length, or the encoder's truncation length (max_length)
    batch_size: samples per forward pass
    seed: picks the calibration samples and every random draw of a method
    granularity: "block" or "module"
    group_size, symmetric: the candidate int4 format (int8 is per channel, symmetric)
    bits: candidate widths scored by methods that predict damage
    causal_metric: "kl" (DEFAULT_CAUSAL_METRIC: mean KL from the unmodified model's next-token
        distributions, never negative, less noisy; keeps the unmodified logits, samples x seq_len
        x vocab float32s: 32 x 128 tokens of a 128k vocabulary are 2.1 GB, on the CPU, or in a
        streamed analysis in its store, spilling to disk) or "nll" (mean next-token NLL on the
        windows: keeps nothing); encoders ignore it
    exclude, include_heads: which linears are quantizable (compress.models.quantizable_linears)
    include_embeddings: embedding tables are units too (a table and the head tied to it are one)
    """

    samples: int = 32
    seq_len: int = 128
    batch_size: int = 8
    seed: int = 0
    granularity: str = "block"
    group_size: int = 32
    symmetric: bool = False
    bits: tuple[int, ...] = CANDIDATE_BITS
    causal_metric: str = DEFAULT_CAUSAL_METRIC
    exclude: tuple[str, ...] = ()
    include_heads: bool = False
    include_embeddings: bool = False
    progress: bool = True

    method: ClassVar[str] = "analyzer"
    min_samples: ClassVar[int] = 1

    def __post_init__(self) -> None:
        self.bits = tuple(sorted(set(self.bits)))
        self.exclude = tuple(self.exclude)
        if self.samples < self.min_samples:
            raise CompressError(
                f"{self.method} needs at least {self.min_samples} calibration samples, got samples={self.samples}"
            )
        if self.seq_len < 2:
            raise CompressError(f"seq_len must be at least 2 tokens, got {self.seq_len}")
        if self.batch_size < 1:
            raise CompressError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.granularity not in GRANULARITIES:
            raise CompressError(f"granularity {self.granularity!r} is not one of {GRANULARITIES}")
        if self.group_size not in INT4_GROUP_SIZES:
            raise CompressError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {self.group_size}")
        if self.causal_metric not in CAUSAL_METRICS:
            raise CompressError(f"causal_metric {self.causal_metric!r} is not one of {CAUSAL_METRICS}")
        if not self.bits or not set(self.bits) <= set(CANDIDATE_BITS):
            raise CompressError(f"candidate bits must be a non-empty subset of {CANDIDATE_BITS}, got {self.bits}")

    def spec(self, bits: int) -> QuantSpec:
        """The candidate storage at ``bits``: int4 with this config's group/symmetry, or int8."""
        return QuantSpec(4, self.group_size, self.symmetric) if bits == 4 else QuantSpec(bits)


@dataclass
class UnitMap:
    """Units of one analysis: names -> linear names, the linears, and where each unit starts.

    start: unit -> index of the first block a change to the unit can affect (0 for linears
    outside the blocks), so perturbation methods re-run only the blocks from there on.
    """

    units: dict[str, list[str]]
    linears: dict[str, nn.Module]  # nn.Linear or Conv1D (compress.models.is_linear)
    blocks: BlockList | None
    start: dict[str, int]

    def params(self) -> dict[str, int]:
        """unit -> N*K summed over its linears (linear_shape: either weight layout counts the same);
        a head tied to its table counts once."""
        out = {}
        for u, names in self.units.items():
            weights = {id(self.linears[n].weight): math.prod(linear_shape(self.linears[n])) for n in names}
            out[u] = sum(weights.values())
        return out

    def modules_of(self, unit: str) -> list[nn.Module]:
        return [self.linears[n] for n in self.units[unit]]


def build_units(model: nn.Module, granularity: str, exclude: tuple[str, ...] = (),
                include_heads: bool = False, include_embeddings: bool = False) -> UnitMap:
    """Units at ``granularity`` over the model's quantizable linears (see UnitMap).

    block: one unit per transformer block, named like the block ("encoder.layer.3"); a
    quantizable linear outside every block is a unit of its own. module: one unit per linear.
    include_embeddings: every quantizable embedding table is a unit of its own, together with
    the output head tied to it (one tensor: quantizing the table quantizes the head).
    """
    linears = quantizable_linears(model, exclude=exclude, include_heads=include_heads)
    if not linears:
        what = f" after excluding {list(exclude)}" if exclude else ""
        raise CompressError(f"{type(model).__name__} has no quantizable linear layers{what}: nothing to analyze")
    blocks = find_blocks(model, linears)
    units: dict[str, list[str]] = {}
    start: dict[str, int] = {}
    tied = {t: h for h, t in tied_heads(model).items()}
    for lname in linears:
        if lname in tied.values() and include_embeddings:
            continue  # joins its table's unit below
        idx = blocks.block_of(lname) if blocks is not None else None
        unit = f"{blocks.name}.{idx}" if granularity == "block" and idx is not None else lname
        units.setdefault(unit, []).append(lname)
        start.setdefault(unit, idx if idx is not None else 0)
    if include_embeddings:
        modules = dict(model.named_modules())
        for ename, emb in quantizable_embeddings(model, exclude).items():
            linears[ename] = emb
            units[ename] = [ename]
            start[ename] = 0
            if ename in tied:
                linears[tied[ename]] = modules[tied[ename]]
                units[ename].append(tied[ename])
    return UnitMap(units, linears, blocks, start)


def weight_layout(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """Map a tensor between the (N, K) orientation (compress.models.linear_weight) and the module's
    own weight layout: unchanged for nn.Linear, transposed for Conv1D (which stores (K, N)).

    A transpose is its own inverse, so the same call turns a Conv1D weight's gradient (K, N) into
    (N, K) and an (N, K) trial weight into the (K, N) tensor the Conv1D must hold.
    """
    return tensor.t() if is_conv1d(module) else tensor


@contextmanager
def patched(linears: list[nn.Module], weights: list[torch.Tensor]) -> Iterator[None]:
    """Run with each linear's weight replaced by a new tensor; the original Parameter comes back.

    weights: one (N, K) = (out, in) tensor per linear, in linear_weight's orientation; a Conv1D
    gets it transposed into its own (K, N) layout (weight_layout). The original Parameter object
    is put back untouched (not copied), so the model is bit-identical afterwards and a weight tied
    to another module (an output head sharing the embedding) is not changed for that other module
    during the trial either.
    """
    for lin, w in zip(linears, weights, strict=True):
        if tuple(w.shape) != linear_shape(lin):
            raise CompressError(f"trial weight for {type(lin).__name__} has shape {tuple(w.shape)}, "
                                f"expected (N, K) = {linear_shape(lin)}")
    saved = [lin._parameters["weight"] for lin in linears]
    try:
        for lin, w in zip(linears, weights):
            lin._parameters["weight"] = nn.Parameter(weight_layout(lin, w), requires_grad=False)
        yield
    finally:
        for lin, p in zip(linears, saved):
            lin._parameters["weight"] = p


AnalyzeFn = Callable[..., tuple[dict[str, float], dict[str, dict[int, float]] | None, dict]]
REGISTRY: dict[str, tuple[type[AnalyzerConfig], AnalyzeFn]] = {}


def register(name: str, config_cls: type[AnalyzerConfig]) -> Callable[[AnalyzeFn], AnalyzeFn]:
    """Register ``fn(model, units, calib, config) -> (scores, damage | None, provenance)`` as ``name``."""
    def wrap(fn: AnalyzeFn) -> AnalyzeFn:
        if name in REGISTRY:
            raise ValueError(f"analyzer {name!r} is registered twice")
        config_cls.method = name
        REGISTRY[name] = (config_cls, fn)
        return fn

    return wrap


def get_analyzer(name: str) -> tuple[type[AnalyzerConfig], AnalyzeFn]:
    """The (config class, function) registered as ``name``; CompressError listing the known names."""
    if name not in REGISTRY:
        raise CompressError(f"unknown sensitivity method {name!r} (known: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name]


def make_config(method: str, **overrides) -> AnalyzerConfig:
    """The method's config with ``overrides``; an unknown option is named with the known ones."""
    config_cls, _ = get_analyzer(method)
    known = [f.name for f in dataclasses.fields(config_cls)]
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise CompressError(f"{method}: unknown option(s) {unknown} (known: {', '.join(known)})")
    return config_cls(**overrides)
