"""Gradient-boosted anytime heads (GBNN) whose hidden units can be truncated at run time.

Modules: ``head`` (AnytimeHead, the unit check, truncate, save_head / load_head), ``boosting``
(fit_boosted: the learners, L-BFGS and the step sizes), ``estimators`` (GBNNClassifier /
GBNNRegressor, scikit-learn estimators; they need the ``anytime`` extra, scikit-learn), ``text``
(heads on a compressed text encoder's embeddings: the plan's ``anytime`` section, fit, save, load,
predict). Labelled text files are read by :func:`compress.data.read_labelled_file`.
"""
from __future__ import annotations

from .boosting import MAX_STEP, BoostingStepWarning, fit_boosted
from .head import HEAD_FORMAT, HEAD_VERSION, AnytimeHead, check_units, load_head, save_head, truncate
from .text import anytime_config, fit_text_head, load_text_head, predict_texts, save_text_head

__all__ = ["HEAD_FORMAT", "HEAD_VERSION", "MAX_STEP", "AnytimeHead", "BoostingStepWarning", "GBNNClassifier",
           "GBNNRegressor", "anytime_config", "check_units", "fit_boosted", "fit_text_head", "load_head",
           "load_text_head", "predict_texts", "save_head", "save_text_head", "truncate"]


def __getattr__(name: str):
    # The estimators import scikit-learn, an optional dependency: loaded on first use only, so the
    # rest of compress (plans, apply, text heads) works without it.
    if name in ("GBNNClassifier", "GBNNRegressor"):
        from . import estimators

        return getattr(estimators, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
