"""The plan: one versioned JSON file that says how every layer of one model is stored.

Written by ``compress plan``, read by ``compress apply``, editable by a person::

    {"format": "compress.plan", "version": 1,
     "model": {"path": "...", "fingerprint": "..."},
     "budget": {"avg_bits": 4.5} | {"max_bytes": 12000000} | {"ratio": 4.0} | null,
     "sensitivity": {"method": "pmpq", "granularity": "block", "scores": {...}} | null,
     "quantizer": {"method": "rtn"},
     "layers": {"encoder.layer.0.attention.self.query": {"bits": 8, "group_size": -1,
                                                          "symmetric": true}, ...},
     "default": {"bits": 16},
     "token_dropping": {...},          # optional, see compress.hired
     "anytime": {...}}                 # optional, see compress.anytime

``layers`` entries win; every other quantizable linear layer takes ``default``. A layer entry may
say ``"pad_to_group": true`` to store an int4 layer whose in_features is not a multiple of its
group size (in_features is zero-padded to whole groups; see compress.quant). Loading validates
everything and names the offending entry; nothing is guessed from file names.
"""
from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from torch import nn

from .errors import CompressError
from .quant import QuantSpec

FORMAT = "compress.plan"
VERSION = 1
TOP_KEYS = {"format", "version", "model", "budget", "sensitivity", "quantizer", "layers", "default",
            "token_dropping", "anytime"}
LAYER_KEYS = {"bits", "group_size", "symmetric", "pad_to_group"}
BUDGET_KEYS = {"avg_bits", "max_bytes", "ratio"}
QUANTIZERS = ("rtn", "gptq")


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
    def from_dict(cls, d: dict, where: str) -> "LayerPlan":
        if not isinstance(d, dict):
            raise CompressError(f"plan {where}: expected an object like {{\"bits\": 4}}, got {d!r}")
        unknown = set(d) - LAYER_KEYS
        if unknown:
            raise CompressError(f"plan {where}: unknown keys {sorted(unknown)} (known: {sorted(LAYER_KEYS)})")
        if "bits" not in d:
            raise CompressError(f"plan {where}: missing \"bits\"")
        bits = d["bits"]
        if bits not in (4, 8, 16) or isinstance(bits, bool):
            raise CompressError(f"plan {where}: bits {bits!r} is not one of 4, 8, 16")
        default_group = 128 if bits == 4 else -1
        default_sym = bits != 4
        try:
            return cls(bits, int(d.get("group_size", default_group)), bool(d.get("symmetric", default_sym)),
                       bool(d.get("pad_to_group", False)))
        except CompressError as exc:
            raise CompressError(f"plan {where}: {exc}") from None


@dataclass
class Plan:
    """A parsed, structurally valid plan (see the module docstring for the JSON)."""

    layers: dict[str, LayerPlan]
    default: LayerPlan = field(default_factory=lambda: LayerPlan(16))
    model_path: str | None = None
    fingerprint: str | None = None
    budget: dict | None = None
    sensitivity: dict | None = None
    quantizer: dict = field(default_factory=lambda: {"method": "rtn"})
    token_dropping: dict | None = None
    anytime: dict | None = None

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
        if self.token_dropping is not None:
            d["token_dropping"] = self.token_dropping
        if self.anytime is not None:
            d["anytime"] = self.anytime
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise CompressError(f"not a plan: \"format\" must be \"{FORMAT}\"")
        if d.get("version") != VERSION:
            raise CompressError(f"plan version {d.get('version')!r} is not supported (this is version {VERSION})")
        unknown = set(d) - TOP_KEYS
        if unknown:
            raise CompressError(f"plan: unknown keys {sorted(unknown)} (known: {sorted(TOP_KEYS)})")
        model = d.get("model") or {}
        budget = d.get("budget")
        if budget is not None:
            if not isinstance(budget, dict) or len(budget) != 1 or set(budget) - BUDGET_KEYS:
                raise CompressError(f"plan budget {budget!r}: give exactly one of {sorted(BUDGET_KEYS)}")
        quantizer = d.get("quantizer") or {"method": "rtn"}
        if quantizer.get("method") not in QUANTIZERS:
            raise CompressError(f"plan quantizer {quantizer.get('method')!r} is not one of {QUANTIZERS}")
        if d.get("token_dropping") is not None:
            from .hired import HiredConfig

            HiredConfig.from_dict(d["token_dropping"])  # validates; errors name the bad key or value
        if d.get("anytime") is not None:
            from .anytime import anytime_config

            anytime_config(d["anytime"])
        layers = d.get("layers") or {}
        if not isinstance(layers, dict):
            raise CompressError("plan \"layers\" must be an object mapping layer names to entries")
        return cls(
            layers={name: LayerPlan.from_dict(e, f"layer {name}") for name, e in layers.items()},
            default=LayerPlan.from_dict(d.get("default", {"bits": 16}), "default"),
            model_path=model.get("path"),
            fingerprint=model.get("fingerprint"),
            budget=budget,
            sensitivity=d.get("sensitivity"),
            quantizer=quantizer,
            token_dropping=d.get("token_dropping"),
            anytime=d.get("anytime"),
        )

    def save(self, path: str | Path) -> None:
        """Write the plan as indented JSON (atomically: a temporary file, then rename)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        if not path.is_file():
            raise CompressError(f"plan file {path} does not exist")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise CompressError(f"plan file {path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
        return cls.from_dict(d)

    def resolve(self, model: nn.Module, quantizable: dict[str, nn.Linear],
                fingerprint: str | None = None) -> dict[str, LayerPlan]:
        """Every layer's storage for this model: explicit entries, then ``default`` for the rest.

        quantizable: the layers ``default`` covers (compress.models.quantizable_linears). Explicit
        entries may name any nn.Linear of the model (an output head included). Raises CompressError
        for a fingerprint mismatch, a name the model lacks, a non-linear module, or a group size
        that does not divide in_features without ``pad_to_group``.
        """
        if fingerprint is not None and self.fingerprint is not None and fingerprint != self.fingerprint:
            raise CompressError(
                f"plan was written for another model (fingerprint {self.fingerprint}, "
                f"this model is {fingerprint}); re-run `compress plan` for it"
            )
        modules = dict(model.named_modules())
        out: dict[str, LayerPlan] = {}
        for name, lp in self.layers.items():
            if name not in modules:
                close = [n for n in quantizable if n.endswith(name.rsplit(".", 1)[-1])][:3]
                hint = f" (layers like it: {', '.join(close)})" if close else ""
                raise CompressError(f"plan names layer {name}, which the model does not have{hint}")
            if not isinstance(modules[name], nn.Linear):
                raise CompressError(f"plan names {name}, a {type(modules[name]).__name__}, not a linear layer")
        for name, module in {**quantizable, **{n: modules[n] for n in self.layers}}.items():
            lp = self.layers.get(name, self.default)
            check_group(name, lp, module.in_features)
            out[name] = lp
        return out


def check_group(name: str, lp: LayerPlan, in_features: int) -> None:
    """Refuse an int4 group size that does not divide in_features unless the entry pads."""
    if lp.bits != 4 or lp.group_size == -1 or in_features % lp.group_size == 0 or lp.pad_to_group:
        return
    works = [g for g in (32, 64, 128) if in_features % g == 0] + [-1]
    padded = -(-in_features // lp.group_size) * lp.group_size
    raise CompressError(
        f"layer {name}: group_size {lp.group_size} does not divide in_features {in_features}; "
        f"group sizes that do: {works}, or set \"pad_to_group\": true to pad in_features to {padded}"
    )


def uniform_plan(quantizable: dict[str, nn.Linear], bits: int, group_size: int = 128,
                 symmetric: bool | None = None) -> Plan:
    """Every quantizable layer at the same storage, listed explicitly so a person sees each one.

    Layers whose in_features the group size does not divide get ``pad_to_group`` (recorded in the
    plan, reported by ``compress plan``); layers no wider than one group get one group per row
    (group_size -1, the same quantization without padding).
    """
    sym = (bits != 4) if symmetric is None else symmetric
    layers = {}
    for name, module in quantizable.items():
        if bits == 4:
            group = fit_group(group_size, module.in_features)
            pad = group != -1 and module.in_features % group != 0
            layers[name] = LayerPlan(4, group, sym, pad)
        else:
            layers[name] = LayerPlan(bits)
    return Plan(layers=layers)


def fit_group(group_size: int, in_features: int) -> int:
    """The group size to store: one group per row (-1) when a group would span the whole row.

    A group of 128 on a 64-wide layer would pad every row to 128 and double its bytes for nothing:
    a single group per row is the same quantization without the padding.
    """
    return -1 if group_size != -1 and group_size >= in_features else group_size


def load_profile(name_or_path: str) -> dict:
    """A named preset from profiles/ (shipped with the package) or a .toml file path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.is_file():
        text = path.read_text()
    else:
        pkg = resources.files("compress.profiles")
        entry = pkg / f"{name_or_path}.toml"
        if not entry.is_file():
            known = sorted(p.name[:-5] for p in pkg.iterdir() if p.name.endswith(".toml"))
            raise CompressError(f"unknown profile {name_or_path!r} (known: {', '.join(known)})")
        text = entry.read_text()
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CompressError(f"profile {name_or_path}: invalid TOML ({exc})") from None
