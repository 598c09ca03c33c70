"""The anytime head: one merged hidden layer whose leading units can be switched off at run time.

:class:`AnytimeHead` is what :func:`compress.anytime.boosting.fit_boosted` returns: the T boosted
learners of J logistic units concatenated into ``Linear(d, T·J) -> Sigmoid -> Linear(T·J, K)``.
Keeping the first m units is the boosted model after m / J steps. Also here: the unit-count check,
:func:`truncate` (a standalone smaller network) and the two-file format (safetensors + JSON, no
unpickling) of :func:`save_head` / :func:`load_head`.

Shapes: features ``(n, d)`` float; raw scores ``(n, K)``.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CompressError

HEAD_FORMAT = "compress.anytime"
HEAD_VERSION = 1


class AnytimeHead(nn.Module):
    """The merged boosted network, with a run-time switch for how many hidden units are used.

    Holds ``hidden: Linear(d, T·J)`` and ``output: Linear(T·J, K, bias=False)`` plus the output
    bias bookkeeping: ``bias0`` ``(K,)`` (the initial model F0) and ``block_bias`` ``(T, K)``
    (``eta * rho_t * b2_t``, learner t's output bias as it enters the sum).

    ``active_units`` may be any count in ``1..T·J``. Block t's bias term is included as soon as any
    of its units is active, because the bias is part of that learner's output; so at block
    boundaries (multiples of J) the head equals the boosted model after ``active_units / J`` steps
    exactly, and in between it is that model plus the leading units of the next learner with its
    bias. Changing ``active_units`` copies no weights: ``forward`` uses slices of the full matrices.
    """

    def __init__(self, hidden_weight: torch.Tensor, hidden_bias: torch.Tensor,
                 output_weight: torch.Tensor, bias0: torch.Tensor, block_bias: torch.Tensor,
                 units_per_step: int, meta: dict | None = None):
        super().__init__()
        units, d = hidden_weight.shape
        k = output_weight.shape[0]
        steps = block_bias.shape[0]
        if units_per_step < 1 or steps * units_per_step != units:
            raise CompressError(f"anytime head: {units} hidden units is not T={steps} blocks of "
                                f"J={units_per_step}")
        if (hidden_bias.shape != (units,) or output_weight.shape != (k, units)
                or bias0.shape != (k,) or block_bias.shape != (steps, k)):
            raise CompressError(
                f"anytime head: inconsistent shapes hidden {tuple(hidden_weight.shape)}, hidden "
                f"bias {tuple(hidden_bias.shape)}, output {tuple(output_weight.shape)}, bias0 "
                f"{tuple(bias0.shape)}, block_bias {tuple(block_bias.shape)}")
        like = {"device": hidden_weight.device, "dtype": hidden_weight.dtype}
        self.hidden = nn.Linear(d, units, **like)
        self.output = nn.Linear(units, k, bias=False, **like)
        with torch.no_grad():
            self.hidden.weight.copy_(hidden_weight)
            self.hidden.bias.copy_(hidden_bias)
            self.output.weight.copy_(output_weight)
        self.register_buffer("bias0", bias0.detach().clone())
        self.register_buffer("block_bias", block_bias.detach().clone())
        self.units_per_step = int(units_per_step)
        self.meta = dict(meta or {})
        self._active = units
        self.requires_grad_(False)

    @property
    def n_units(self) -> int:
        """T·J, the total number of hidden units."""
        return self.hidden.out_features

    @property
    def n_steps(self) -> int:
        """T, the number of boosting steps (blocks of J units)."""
        return self.block_bias.shape[0]

    @property
    def in_features(self) -> int:
        return self.hidden.in_features

    @property
    def out_features(self) -> int:
        return self.output.out_features

    @property
    def active_units(self) -> int:
        """How many leading hidden units ``forward`` uses (1..T·J)."""
        return self._active

    @active_units.setter
    def active_units(self, units: int) -> None:
        self._active = check_units(units, self.n_units, self.units_per_step)

    def bias_for(self, units: int) -> torch.Tensor:
        """Output bias ``(K,)`` for the first ``units`` hidden units: F0 plus the bias terms of every
        block with at least one active unit."""
        blocks = -(-check_units(units, self.n_units, self.units_per_step) // self.units_per_step)
        return self.bias0 + self.block_bias[:blocks].sum(0)

    def forward(self, x: torch.Tensor, units: int | None = None) -> torch.Tensor:
        """Raw scores ``(n, K)`` (logits, or regression outputs) from features ``(n, d)``, using
        the first ``units`` hidden units (default: ``active_units``). Computed in ``x``'s dtype:
        float64 features widen the weights on the fly (what the estimators use, so a row's score
        does not depend on its batch); features in the weights' dtype copy nothing."""
        m = self._active if units is None else check_units(units, self.n_units, self.units_per_step)
        dt = x.dtype
        h = torch.sigmoid(F.linear(x, self.hidden.weight[:m].to(dt), self.hidden.bias[:m].to(dt)))
        return F.linear(h, self.output.weight[:, :m].to(dt), self.bias_for(m).to(dt))

    def staged_forward(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """Raw scores ``(n, K)`` after each boosting step 1..T (the hidden layer is computed once),
        in ``x``'s dtype like :meth:`forward`."""
        j, dt = self.units_per_step, x.dtype
        h = torch.sigmoid(F.linear(x, self.hidden.weight.to(dt), self.hidden.bias.to(dt)))  # (n, T·J)
        w2, block_bias = self.output.weight.to(dt), self.block_bias.to(dt)
        scores = self.bias0.to(dt).expand(x.shape[0], -1).clone()
        for t in range(self.n_steps):
            sl = slice(t * j, (t + 1) * j)
            scores = scores + F.linear(h[:, sl], w2[:, sl], block_bias[t])
            yield scores

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, units={self.n_units} (T={self.n_steps} x "
                f"J={self.units_per_step}), out={self.out_features}, active={self._active}")


def check_units(units: int, total: int, units_per_step: int = 1) -> int:
    """``units`` as an int if it is in 1..total, else a CompressError stating the range."""
    if isinstance(units, bool) or not isinstance(units, (int, np.integer)):
        raise CompressError(f"units to keep must be an integer in 1..{total}, got {units!r}")
    if not 1 <= units <= total:
        raise CompressError(f"units to keep must be in 1..{total} (T·J = {total // units_per_step}"
                            f"·{units_per_step}), got {units}")
    return int(units)


def truncate(head: AnytimeHead, units: int) -> nn.Sequential:
    """A standalone ``Linear(d, units) -> Sigmoid -> Linear(units, K)`` equal to ``head`` with
    ``active_units = units`` (weights copied, so it no longer depends on ``head``); with
    ``units = T·J`` it is the whole merged network. Units outside 1..T·J raise a CompressError."""
    units = check_units(units, head.n_units, head.units_per_step)
    first = nn.Linear(head.in_features, units).to(head.hidden.weight)
    last = nn.Linear(units, head.out_features).to(head.hidden.weight)
    with torch.no_grad():
        first.weight.copy_(head.hidden.weight[:units])
        first.bias.copy_(head.hidden.bias[:units])
        last.weight.copy_(head.output.weight[:, :units])
        last.bias.copy_(head.bias_for(units))
    return nn.Sequential(first, nn.Sigmoid(), last).requires_grad_(False)


def save_head(head: AnytimeHead, directory: str | Path, name: str = "anytime") -> Path:
    """Write ``<name>.safetensors`` (tensors) and ``<name>.json`` (everything else) into
    ``directory``; each file goes to a temporary name first and is renamed when complete.
    Returns the JSON path."""
    from safetensors.torch import save_file

    directory = Path(directory)
    if not directory.is_dir():
        raise CompressError(f"directory {directory} does not exist")
    meta = {"format": HEAD_FORMAT, "version": HEAD_VERSION, "in_features": head.in_features,
            "out_features": head.out_features, "n_units": head.n_units, "n_steps": head.n_steps,
            "units_per_step": head.units_per_step, "active_units": head.active_units, **head.meta}
    tensors = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    weights, sidecar = directory / f"{name}.safetensors", directory / f"{name}.json"
    tmp_w, tmp_j = weights.with_name(f".{weights.name}.tmp"), sidecar.with_name(f".{sidecar.name}.tmp")
    try:
        save_file(tensors, tmp_w, metadata={"format": "pt"})
        tmp_j.write_text(json.dumps(meta, indent=1) + "\n")
        os.replace(tmp_w, weights)
        os.replace(tmp_j, sidecar)
    finally:
        for tmp in (tmp_w, tmp_j):
            tmp.unlink(missing_ok=True)
    return sidecar


def load_head(directory: str | Path, name: str = "anytime", device: str | torch.device = "cpu",
              active_units: int | None = None) -> AnytimeHead:
    """Read a head written by :func:`save_head` (no unpickling); ``active_units`` overrides the
    saved setting (1..T·J)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    weights, sidecar = directory / f"{name}.safetensors", directory / f"{name}.json"
    for p in (weights, sidecar):
        if not p.is_file():
            raise CompressError(f"anytime head file {p} does not exist")
    try:
        meta = json.loads(sidecar.read_text())
    except json.JSONDecodeError as err:
        raise CompressError(f"{sidecar}: not valid JSON ({err.msg})") from None
    if meta.get("format") != HEAD_FORMAT or meta.get("version") != HEAD_VERSION:
        raise CompressError(f"{sidecar}: expected format {HEAD_FORMAT!r} version {HEAD_VERSION}, got "
                            f"{meta.get('format')!r} version {meta.get('version')!r}")
    t = load_file(weights)
    expected = {"hidden.weight", "hidden.bias", "output.weight", "bias0", "block_bias"}
    if set(t) != expected:
        raise CompressError(f"{weights}: tensors {sorted(t)} are not the expected {sorted(expected)}")
    head = AnytimeHead(t["hidden.weight"], t["hidden.bias"], t["output.weight"], t["bias0"],
                       t["block_bias"], meta["units_per_step"], {
                           k: v for k, v in meta.items()
                           if k not in ("format", "version", "in_features", "out_features", "n_units",
                                        "n_steps", "units_per_step", "active_units")})
    for key, value in (("in_features", head.in_features), ("out_features", head.out_features),
                       ("n_units", head.n_units), ("n_steps", head.n_steps)):
        if meta.get(key) != value:
            raise CompressError(f"{sidecar}: {key} is {meta.get(key)} but the tensors say {value}")
    classes = meta.get("classes")
    if meta.get("task") == "classification" and (classes is None or len(classes) != head.out_features):
        raise CompressError(f"{sidecar}: {head.out_features} outputs but classes is {classes!r}")
    head.active_units = meta.get("active_units", head.n_units) if active_units is None else active_units
    return head.to(device)
