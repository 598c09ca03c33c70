"""Anytime heads on a model's text features: the plan's ``anytime`` section, fitting, prediction.

The head (compress.anytime.head) is fitted on the mean-pooled embeddings of the *compressed* model, so
it matches the features it will see, and saved beside the weights as ``anytime.safetensors`` +
``anytime.json``. Its number of active hidden units is chosen when loading
(``compress.load(dir, active_units=m)``) or changed on the fly (``lm.head.active_units = m``).

A share ``holdout`` of the labelled rows (stratified by class; default 0.2) is kept out of the fit,
and the head's scores on both parts are recorded in its metadata (``meta["fit_report"]``, saved in
``anytime.json``): accuracy for classification, R^2 and RMSE for regression. The saved head is the
one those figures describe (fitted on the training part only); ``"holdout": 0`` fits on every row.

Plan section::

    "anytime": {"labels": "train.jsonl", "task": "classification", "units": 100,
                "units_per_step": 5, "active_units": 50, "learning_rate": 0.5, "max_length": 128,
                "holdout": 0.2}
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..checks import expect
from ..errors import CompressError

ANYTIME_DEFAULTS = {"task": "classification", "units": 100, "units_per_step": 5, "active_units": None,
                    "learning_rate": 0.5, "max_length": 128, "holdout": 0.2}
_TYPES = {"labels": str, "task": str, "units": int, "units_per_step": int, "active_units": (int, type(None)),
          "learning_rate": float, "max_length": int, "holdout": float}
HEAD_NAME = "anytime"
HOLDOUT_SEED = 0  # the split is reproducible: the same labels file always holds out the same rows


def anytime_config(section: dict) -> dict:
    """The plan's ``anytime`` section with defaults filled in; unknown keys and values of the wrong
    JSON type (``"units": "10"``, ``"holdout": true``) are refused with one line naming them."""
    if not isinstance(section, dict) or "labels" not in section:
        raise CompressError('plan anytime section needs "labels": a .jsonl or .csv file of text,label')
    unknown = set(section) - set(ANYTIME_DEFAULTS) - {"labels"}
    if unknown:
        raise CompressError(f"plan anytime: unknown keys {sorted(unknown)} "
                            f"(known: {sorted(set(ANYTIME_DEFAULTS) | {'labels'})})")
    cfg = {**ANYTIME_DEFAULTS, **section}
    for key, types in _TYPES.items():
        expect(cfg[key], types, "plan anytime", key)
    if cfg["task"] not in ("classification", "regression"):
        raise CompressError(f"plan anytime: task must be classification or regression, got {cfg['task']!r}")
    if cfg["units_per_step"] < 1 or cfg["units"] < 1:
        raise CompressError(f"plan anytime: units ({cfg['units']}) and units_per_step "
                            f"({cfg['units_per_step']}) must be >= 1")
    if cfg["units"] % cfg["units_per_step"]:
        raise CompressError(f"plan anytime: units {cfg['units']} is not a multiple of "
                            f"units_per_step {cfg['units_per_step']}")
    if not 0.0 <= cfg["holdout"] < 1.0:
        raise CompressError(f"plan anytime: holdout is the share of rows kept out of the fit, in [0, 1); "
                            f"got {cfg['holdout']}")
    return cfg


def holdout_split(y: torch.Tensor, task: str, holdout: float, seed: int = HOLDOUT_SEED
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices ``(train, held_out)`` (int64, sorted) for targets ``y`` ``(n,)``.

    Classification holds out ``round(holdout * n_c)`` rows of each class c but always keeps one
    of every class for training; regression holds out ``round(holdout * n)`` rows, keeping at
    least two. So the held-out part may be empty on a tiny file (the report then says so).
    """
    n = y.shape[0]
    gen = torch.Generator().manual_seed(seed)
    if task == "classification":
        parts = []
        for c in torch.unique(y):
            rows = torch.nonzero(y == c)[:, 0]
            rows = rows[torch.randperm(len(rows), generator=gen)]
            parts.append(rows[:min(round(holdout * len(rows)), len(rows) - 1)])
        held = torch.cat(parts)
    else:
        held = torch.randperm(n, generator=gen)[:min(round(holdout * n), n - 2)]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[held] = True
    return torch.nonzero(~mask)[:, 0], torch.nonzero(mask)[:, 0]


@torch.no_grad()
def head_scores(head, feats: torch.Tensor, y: torch.Tensor, task: str, units: int) -> dict:
    """How well ``head`` with ``units`` active units fits ``feats`` ``(n, d)`` / ``y`` ``(n,)``:
    ``{"accuracy"}`` for classification (``y`` class indices), ``{"r2", "rmse"}`` for regression
    (``r2`` is None when ``y`` is constant: it is undefined). Computed in float64."""
    scores = head(feats.double(), units)  # (n, K)
    if task == "classification":
        return {"accuracy": float((scores.argmax(1) == y).double().mean())}
    t = y.double().reshape(len(y), -1)
    err = (scores - t).square()
    ss_tot = (t - t.mean(0)).square().sum(0)
    r2 = None if bool((ss_tot == 0).any()) else float((1 - err.sum(0) / ss_tot).mean())
    return {"r2": r2, "rmse": math.sqrt(float(err.mean()))}


def fit_text_head(model, tokenizer, kind: str, section: dict, progress: bool = False):
    """Fit an AnytimeHead on pooled embeddings of the labelled texts named by ``section``.

    The rows are split by :func:`holdout_split` (``section["holdout"]``); the head is fitted on the
    training part and ``head.meta["fit_report"]`` records the row counts and :func:`head_scores`
    of both parts at the head's active units and at all units.
    """
    from ..data import read_labelled_file
    from ..evaluate import pooled_embeddings
    from .boosting import fit_boosted

    if kind != "encoder":
        raise CompressError(f"anytime heads are fitted on text-encoder embeddings; this model is a {kind}")
    cfg = anytime_config(section)
    texts, labels = read_labelled_file(cfg["labels"], cfg["task"])
    feats = pooled_embeddings(model, tokenizer, texts, cfg["max_length"], progress=progress)  # (n, d)
    feats = feats.float().cpu()
    meta = {"task": cfg["task"], "features": "mean_pool", "max_length": cfg["max_length"]}
    if cfg["task"] == "classification":
        classes = sorted(set(labels), key=str)
        index = {c: i for i, c in enumerate(classes)}
        y = torch.tensor([index[v] for v in labels])
        meta["classes"] = classes
        n_classes = len(classes)
    else:
        y = torch.tensor(labels, dtype=torch.float32)
        n_classes = None
    train, held = holdout_split(y, cfg["task"], cfg["holdout"])
    head = fit_boosted(feats[train], y[train], task=cfg["task"], n_classes=n_classes, n_units=cfg["units"],
                       units_per_step=cfg["units_per_step"], learning_rate=cfg["learning_rate"], meta=meta)
    if cfg["active_units"] is not None:
        head.active_units = cfg["active_units"]  # the setter checks the range and names it
    report = {"rows": len(y), "train_rows": len(train), "heldout_rows": len(held), "holdout": cfg["holdout"],
              "scores": []}
    for units in sorted({head.active_units, head.n_units}):
        report["scores"].append({
            "units": units, "train": head_scores(head, feats[train], y[train], cfg["task"], units),
            "heldout": head_scores(head, feats[held], y[held], cfg["task"], units) if len(held) else None})
    head.meta["fit_report"] = report
    return head


def save_text_head(head, directory: str | Path) -> list[Path]:
    """Write the head beside a compressed model's weights; returns the two files written."""
    from .head import save_head

    sidecar = save_head(head, directory, HEAD_NAME)
    return [sidecar.with_suffix(".safetensors"), sidecar]


def load_text_head(directory: str | Path, active_units: int | None = None):
    """The head saved in a compressed directory, or None when it has none."""
    from .head import load_head

    if not (Path(directory) / f"{HEAD_NAME}.json").is_file():
        if active_units is not None:
            raise CompressError(f"{directory} has no anytime head; active_units needs one")
        return None
    return load_head(directory, HEAD_NAME, active_units=active_units)


@torch.no_grad()
def predict_texts(model, tokenizer, head, texts: list[str], active_units: int | None = None,
                  proba: bool = False) -> list:
    """Class labels (classification) or values (regression) for ``texts`` with ``active_units``.

    ``proba``: for a classification head, one ``{class: probability}`` mapping per text instead
    (classes in the head's order, probabilities summing to 1); a regression head refuses it.
    """
    from ..evaluate import pooled_embeddings

    classification = head.meta.get("task") == "classification"
    if proba and not classification:
        raise CompressError(f"class probabilities need a classification head; this head's task is "
                            f"{head.meta.get('task')!r} (its predictions are values)")
    if active_units is not None:
        head.active_units = active_units
    feats = pooled_embeddings(model, tokenizer, texts, head.meta.get("max_length", 128))
    scores = head(feats.to(head.hidden.weight))  # (n, K)
    if classification:
        classes = head.meta["classes"]
        if proba:
            return [dict(zip(classes, row)) for row in torch.softmax(scores.double(), -1).tolist()]
        return [classes[i] for i in scores.argmax(-1).tolist()]
    return scores.squeeze(-1).tolist()
