"""The plan: one versioned JSON file that says how every layer of one model is stored.

Written by ``compress plan``, read by ``compress apply``, editable by a person::

    {"format": "compress.plan", "version": 1,
     "model": {"path": "minilm", "fingerprint": "..."},
     "budget": {"avg_bits": 4.5} | {"max_bytes": 12000000} | {"ratio": 4.0} | null,
     "sensitivity": {"method": "pmpq", "granularity": "block", "scores": {...}} | null,
     "quantizer": {"method": "rtn"} | {"method": "gptq", "damp": 0.01, ...},
     "layers": {"encoder.layer.0.attention.self.query": {"bits": 8, "group_size": -1,
                                                          "symmetric": true}, ...},
     "default": {"bits": 16},
     "units": {"encoder.layer.0": {"bits": 8}, ...},   # optional: the planner's choice per unit
     "target": "vllm" | "gguf" | "any",                 # optional: where it must load (compress.servable)
     "token_dropping": {...},          # optional, see compress.hired
     "anytime": {...}}                 # optional, see compress.anytime

``layers`` entries win; every other quantizable layer takes ``default``. A layer entry may say
``"pad_to_group": true`` to store an int4 layer whose in_features is not a multiple of its group
size (in_features is zero-padded to whole groups; see compress.quant). This module is data, JSON
and strict validation only: types are checked, never coerced, and every error names the entry.
Building plans is compress.planner's job.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .checks import expect, expect_keys, expect_mapping
from .errors import CompressError
from .quant import DEFAULT_GROUP, DEFAULT_SYMMETRIC, SUPPORTED_BITS, QuantSpec, fit_group

FORMAT = "compress.plan"
VERSION = 1
def _default_quantizer() -> dict:
    """Round to nearest with its default options, as a plan records it once loaded."""
    from .quantizers import quantizer_config

    return quantizer_config(None).to_dict()


TOP_KEYS = {"format", "version", "model", "budget", "sensitivity", "quantizer", "layers", "default", "units",
            "target", "token_dropping", "anytime"}
LAYER_KEYS = {"bits", "group_size", "symmetric", "pad_to_group"}
MODEL_KEYS = {"path", "fingerprint"}
BUDGET_KEYS = {"avg_bits", "max_bytes", "ratio"}


@dataclass(frozen=True)
class LayerPlan:
    """How one layer is stored; ``pad_to_group`` allows in_features that groups do not divide."""

    bits: int
    group_size: int = -1
    symmetric: bool = True
    pad_to_group: bool = False

    def __post_init__(self) -> None:
        self.spec()  # validates bits / group size / symmetry

    def spec(self) -> QuantSpec:
        if self.bits == 16:
            return QuantSpec(16)
        return QuantSpec(self.bits, self.group_size, self.symmetric)

    def to_dict(self) -> dict:
        d = {"bits": self.bits}
        if self.bits != 16:
            d.update(group_size=self.group_size, symmetric=self.symmetric)
        if self.pad_to_group:
            d["pad_to_group"] = True
        return d

    @classmethod
    def from_dict(cls, d, where: str) -> "LayerPlan":
        where = f"plan {where}"
        expect_mapping(d, where)
        expect_keys(d, LAYER_KEYS, where)
        if "bits" not in d:
            raise CompressError(f"{where}: missing \"bits\"")
        bits = expect(d["bits"], int, where, "bits")
        if bits not in SUPPORTED_BITS:
            raise CompressError(f"{where}: bits {bits!r} is not one of 4, 8, 16")
        group = expect(d.get("group_size", DEFAULT_GROUP[bits]), int, where, "group_size")
        symmetric = expect(d.get("symmetric", DEFAULT_SYMMETRIC[bits]), bool, where, "symmetric")
        pad = expect(d.get("pad_to_group", False), bool, where, "pad_to_group")
        try:
            return cls(bits, group, symmetric, pad)
        except CompressError as exc:
            raise CompressError(f"{where}: {exc}") from None


@dataclass
class Plan:
    """A parsed, structurally valid plan (see the module docstring for the JSON)."""

    layers: dict[str, LayerPlan]
    default: LayerPlan = field(default_factory=lambda: LayerPlan(16))
    model_path: str | None = None
    fingerprint: str | None = None
    budget: dict | None = None
    sensitivity: dict | None = None
    quantizer: dict = field(default_factory=lambda: _default_quantizer())
    units: dict[str, LayerPlan] | None = None
    target: str | None = None
    token_dropping: dict | None = None
    anytime: dict | None = None
    # What the planner counted ({"target", "layers", "model"} bytes: compress.planner.counted_bytes);
    # shown by ``compress plan``, not saved (the shapes and the layers above determine it).
    counted_bytes: dict | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict:
        d = {
            "format": FORMAT,
            "version": VERSION,
            "model": {"path": self.model_path, "fingerprint": self.fingerprint},
            "budget": self.budget,
            "sensitivity": self.sensitivity,
            "quantizer": self.quantizer,
            "layers": {name: lp.to_dict() for name, lp in self.layers.items()},
            "default": self.default.to_dict(),
        }
        if self.units is not None:
            d["units"] = {u: lp.to_dict() for u, lp in self.units.items()}
        if self.target is not None:
            d["target"] = self.target
        if self.token_dropping is not None:
            d["token_dropping"] = self.token_dropping
        if self.anytime is not None:
            d["anytime"] = self.anytime
        return d

    @classmethod
    def from_dict(cls, d) -> "Plan":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise CompressError(f"not a plan: \"format\" must be \"{FORMAT}\"")
        if d.get("version") != VERSION or isinstance(d.get("version"), bool):
            raise CompressError(f"plan version {d.get('version')!r} is not supported (this is version {VERSION})")
        expect_keys(d, TOP_KEYS, "plan")
        model = expect_mapping(d.get("model", {}), "plan \"model\"")
        expect_keys(model, MODEL_KEYS, "plan \"model\"")
        for key in MODEL_KEYS:
            expect(model.get(key), (str, type(None)), "plan \"model\"", key)
        budget = check_budget_section(d.get("budget"))
        sensitivity = d.get("sensitivity")
        if sensitivity is not None:
            expect_mapping(sensitivity, "plan \"sensitivity\"")
        from .quantizers import quantizer_config

        quantizer = d.get("quantizer")
        if quantizer is not None:
            expect_mapping(quantizer, "plan \"quantizer\"")
        quantizer = quantizer_config(quantizer, "plan \"quantizer\"").to_dict()
        if d.get("token_dropping") is not None:
            from .hired import HiredConfig

            HiredConfig.from_dict(expect_mapping(d["token_dropping"], "plan \"token_dropping\""))
        if d.get("anytime") is not None:
            from .anytime import anytime_config

            anytime_config(expect_mapping(d["anytime"], "plan \"anytime\""))
        target = d.get("target")
        if target is not None:
            from .servable import check_target

            check_target(expect(target, str, "plan", "target"))
        layers = expect_mapping(d.get("layers", {}), "plan \"layers\"")
        units = d.get("units")
        if units is not None:
            units = {u: LayerPlan.from_dict(e, f"unit {u}") for u, e in expect_mapping(units, "plan \"units\"").items()}
        return cls(
            layers={name: LayerPlan.from_dict(e, f"layer {name}") for name, e in layers.items()},
            default=LayerPlan.from_dict(d.get("default", {"bits": 16}), "default"),
            model_path=model.get("path"),
            fingerprint=model.get("fingerprint"),
            budget=budget,
            sensitivity=sensitivity,
            quantizer=quantizer,
            units=units,
            target=target,
            token_dropping=d.get("token_dropping"),
            anytime=d.get("anytime"),
        )

    def save(self, path: str | Path, overwrite: bool = True) -> None:
        """Write the plan as indented JSON (atomically: a temporary file, then rename)."""
        from .atomic import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1) + "\n", overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        if not path.is_file():
            raise CompressError(f"plan file {path} does not exist")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise CompressError(f"plan file {path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
        except UnicodeDecodeError:
            raise CompressError(f"plan file {path} is not a text file") from None
        return cls.from_dict(d)

    def resolve(self, model: nn.Module, quantizable: dict[str, nn.Module],
                fingerprint: str | None = None) -> dict[str, LayerPlan]:
        """Every layer's storage for this model: explicit entries, then ``default`` for the rest.

        quantizable: the layers ``default`` covers (compress.models.quantizable_linears). Explicit
        entries may name any linear layer of the model (an output head included). Raises
        CompressError for a fingerprint mismatch, a name the model lacks, a non-linear module, or a
        group size that does not divide in_features without ``pad_to_group``.
        """
        from .models import is_linear, linear_shape, tied_heads

        if fingerprint is not None and self.fingerprint is not None and fingerprint != self.fingerprint:
            raise CompressError(
                f"plan was written for another model (fingerprint {self.fingerprint}, "
                f"this model is {fingerprint}); re-run `compress plan` for it"
            )
        modules = dict(model.named_modules())
        out: dict[str, LayerPlan] = {}
        for name in self.layers:
            if name not in modules:
                close = [n for n in quantizable if n.endswith(name.rsplit(".", 1)[-1])][:3]
                hint = f" (layers like it: {', '.join(close)})" if close else ""
                raise CompressError(f"plan names layer {name}, which the model does not have{hint}")
            if not (is_linear(modules[name]) or isinstance(modules[name], nn.Embedding)):
                raise CompressError(f"plan names {name}, a {type(modules[name]).__name__}, not a linear layer "
                                    f"or an embedding table")
        for name, module in {**quantizable, **{n: modules[n] for n in self.layers}}.items():
            lp = self.layers.get(name, self.default)
            in_features = linear_shape(module)[1]
            check_group(name, lp, in_features)
            if lp.bits == 4 and fit_group(lp.group_size, in_features)[0] != lp.group_size:
                lp = LayerPlan(4, -1, lp.symmetric)  # one group spans the row: store it per row
            out[name] = lp
        for head, table in tied_heads(model).items():
            # A tied head IS its table: it is stored once, with the table's scheme.
            h, t = out.get(head, LayerPlan(16)), out.get(table, LayerPlan(16))
            if head in out and h != t:
                raise CompressError(f"plan stores {head} as {h.to_dict()} but it is tied to {table}, stored as "
                                    f"{t.to_dict()}: a tied pair is one table; give both the same entry")
            if table in out and t.bits != 16:
                out[head] = t
        return out


def check_budget_section(budget) -> dict | None:
    """A plan's budget: null, or exactly one of avg_bits / max_bytes / ratio with a positive number."""
    if budget is None:
        return None
    where = "plan \"budget\""
    expect_mapping(budget, where)
    forms = {k: v for k, v in budget.items() if k != "scope"}
    if len(forms) != 1 or set(forms) - BUDGET_KEYS:
        raise CompressError(f"{where} {budget!r}: give exactly one of {sorted(BUDGET_KEYS)}")
    (kind, value), = forms.items()
    value = expect(value, int if kind == "max_bytes" else float, where, kind)
    if value <= 0:
        raise CompressError(f"{where}: {kind} must be positive, got {value}")
    out = {kind: value}
    if "scope" in budget:
        scope = expect(budget["scope"], str, where, "scope")
        if kind != "avg_bits" or scope not in ("linears", "model"):
            raise CompressError(f"{where}: scope {scope!r} applies to avg_bits only and is \"linears\" or \"model\"")
        out["scope"] = scope
    return out


def check_group(name: str, lp: LayerPlan, in_features: int) -> None:
    """Refuse an int4 group size that does not divide in_features unless the entry pads."""
    if lp.bits != 4 or lp.pad_to_group or not fit_group(lp.group_size, in_features)[1]:
        return
    works = [g for g in (32, 64, 128) if in_features % g == 0] + [-1]
    padded = -(-in_features // lp.group_size) * lp.group_size
    raise CompressError(
        f"layer {name}: group_size {lp.group_size} does not divide in_features {in_features}; "
        f"group sizes that do: {works}, or set \"pad_to_group\": true to pad in_features to {padded}"
    )
