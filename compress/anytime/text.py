"""Anytime heads on a model's text features: the plan's ``anytime`` section, fitting, prediction.

The head (compress.anytime.head) is fitted on the mean-pooled embeddings of the *compressed* model, so
it matches the features it will see, and saved beside the weights as ``anytime.safetensors`` +
``anytime.json``. Its number of active hidden units is chosen when loading
(``compress.load(dir, active_units=m)``) or changed on the fly (``lm.head.active_units = m``).

Plan section::

    "anytime": {"labels": "train.jsonl", "task": "classification", "units": 100,
                "units_per_step": 5, "active_units": 50, "learning_rate": 0.5, "max_length": 128}
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CompressError

ANYTIME_DEFAULTS = {"task": "classification", "units": 100, "units_per_step": 5, "active_units": None,
                    "learning_rate": 0.5, "max_length": 128}
HEAD_NAME = "anytime"


def anytime_config(section: dict) -> dict:
    """The plan's ``anytime`` section with defaults filled in; unknown keys are refused."""
    if not isinstance(section, dict) or "labels" not in section:
        raise CompressError('plan anytime section needs "labels": a .jsonl or .csv file of text,label')
    unknown = set(section) - set(ANYTIME_DEFAULTS) - {"labels"}
    if unknown:
        raise CompressError(f"plan anytime: unknown keys {sorted(unknown)} "
                            f"(known: {sorted(set(ANYTIME_DEFAULTS) | {'labels'})})")
    cfg = {**ANYTIME_DEFAULTS, **section}
    if cfg["units"] % cfg["units_per_step"]:
        raise CompressError(f"plan anytime: units {cfg['units']} is not a multiple of "
                            f"units_per_step {cfg['units_per_step']}")
    return cfg


def fit_text_head(model, tokenizer, kind: str, section: dict, progress: bool = False):
    """Fit an AnytimeHead on pooled embeddings of the labelled texts named by ``section``."""
    from ..data import read_labelled_file
    from ..evaluate import pooled_embeddings
    from .boosting import fit_boosted

    if kind != "encoder":
        raise CompressError(f"anytime heads are fitted on text-encoder embeddings; this model is a {kind}")
    cfg = anytime_config(section)
    texts, labels = read_labelled_file(cfg["labels"], cfg["task"])
    feats = pooled_embeddings(model, tokenizer, texts, cfg["max_length"], progress=progress)  # (n, d)
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
    head = fit_boosted(feats, y, task=cfg["task"], n_classes=n_classes, n_units=cfg["units"],
                       units_per_step=cfg["units_per_step"], learning_rate=cfg["learning_rate"], meta=meta)
    if cfg["active_units"] is not None:
        head.active_units = cfg["active_units"]  # the setter checks the range and names it
    return head


def save_text_head(head, directory: str | Path) -> Path:
    """Write the head beside a compressed model's weights."""
    from .head import save_head

    return save_head(head, directory, HEAD_NAME)


def load_text_head(directory: str | Path, active_units: int | None = None):
    """The head saved in a compressed directory, or None when it has none."""
    from .head import load_head

    if not (Path(directory) / f"{HEAD_NAME}.json").is_file():
        if active_units is not None:
            raise CompressError(f"{directory} has no anytime head; active_units needs one")
        return None
    return load_head(directory, HEAD_NAME, active_units=active_units)


@torch.no_grad()
def predict_texts(model, tokenizer, head, texts: list[str], active_units: int | None = None) -> list:
    """Class labels (classification) or values (regression) for ``texts`` with ``active_units``."""
    from ..evaluate import pooled_embeddings

    if active_units is not None:
        head.active_units = active_units
    feats = pooled_embeddings(model, tokenizer, texts, head.meta.get("max_length", 128))
    scores = head(feats)  # (n, K)
    if head.meta.get("task") == "classification":
        classes = head.meta["classes"]
        return [classes[i] for i in scores.argmax(-1).tolist()]
    return scores.squeeze(-1).tolist()
