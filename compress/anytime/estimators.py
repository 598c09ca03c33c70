"""scikit-learn estimators over the boosted anytime head: GBNNClassifier and GBNNRegressor."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ..errors import CompressError
from .boosting import fit_boosted
from .head import AnytimeHead


def _as_features(x, n_features: int | None = None) -> torch.Tensor:
    """``x`` as a float32 ``(n, d)`` tensor (a copy only where a conversion needs one)."""
    t = torch.as_tensor(np.asarray(x, dtype=np.float32) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != 2:
        raise CompressError(f"features must be a 2-D (n, d) array, got shape {tuple(t.shape)}")
    if n_features is not None and t.shape[1] != n_features:
        raise CompressError(f"features have {t.shape[1]} columns, the head was fitted on {n_features}")
    return t.float()


class _GBNNBase:
    """Shared parameters and plumbing of :class:`GBNNClassifier` and :class:`GBNNRegressor`.

    scikit-learn conventions without depending on it: constructor arguments are the parameters
    (``get_params`` / ``set_params``, so ``sklearn.base.clone`` works), ``fit`` returns ``self``,
    fitted attributes end in ``_`` (``head_``, ``n_features_in_``), predictions are NumPy arrays.
    """

    _task = ""

    def __init__(self, n_units: int = 100, units_per_step: int = 5, learning_rate: float = 0.5,
                 subsample: float = 1.0, alpha: float = 1.0, max_iter: int = 40,
                 random_state: int = 0, device: str | None = None):
        self.n_units = n_units
        self.units_per_step = units_per_step
        self.learning_rate = learning_rate
        self.subsample = subsample
        self.alpha = alpha
        self.max_iter = max_iter
        self.random_state = random_state
        self.device = device

    _params = ("n_units", "units_per_step", "learning_rate", "subsample", "alpha", "max_iter",
               "random_state", "device")

    def get_params(self, deep: bool = True) -> dict:
        return {name: getattr(self, name) for name in self._params}

    def set_params(self, **params):
        for name, value in params.items():
            if name not in self._params:
                raise CompressError(f"unknown parameter {name!r} for {type(self).__name__}; "
                                    f"expected one of {', '.join(self._params)}")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.get_params().items())})"

    def _fit_head(self, x, y, n_classes: int | None, meta: dict) -> None:
        x = _as_features(x)
        self.head_ = fit_boosted(x, y, task=self._task, n_classes=n_classes, n_units=self.n_units,
                                 units_per_step=self.units_per_step, learning_rate=self.learning_rate,
                                 subsample=self.subsample, alpha=self.alpha, max_iter=self.max_iter,
                                 random_state=self.random_state, device=self.device, meta=meta)
        self.n_features_in_ = x.shape[1]

    def _check_fitted(self) -> AnytimeHead:
        if not hasattr(self, "head_"):
            raise CompressError(f"this {type(self).__name__} is not fitted yet; call fit(X, y) first")
        return self.head_

    @torch.no_grad()
    def decision_function(self, x, units: int | None = None) -> np.ndarray:
        """Raw scores ``(n, K)`` using the first ``units`` hidden units (default: all)."""
        head = self._check_fitted()
        xt = _as_features(x, self.n_features_in_).to(head.hidden.weight.device)
        return head(xt, head.n_units if units is None else units).cpu().numpy()

    @torch.no_grad()
    def staged_decision_function(self, x) -> Iterator[np.ndarray]:
        """Raw scores ``(n, K)`` after each boosting step 1..T."""
        head = self._check_fitted()
        xt = _as_features(x, self.n_features_in_).to(head.hidden.weight.device)
        for scores in head.staged_forward(xt):
            yield scores.cpu().numpy()


class GBNNClassifier(_GBNNBase):
    """Gradient-boosted one-hidden-layer network for classification (softmax over K >= 2 classes).

    ``fit(X (n, d), y (n,))`` with any hashable labels (sorted into ``classes_``); ``predict``
    returns labels, ``predict_proba`` ``(n, K)`` probabilities; ``units=`` on either truncates the
    hidden layer; ``staged_predict`` yields the predictions after each boosting step.
    Defaults (100 units in steps of 5, learning_rate 0.5, subsample 1.0, alpha 1, 40 L-BFGS
    iterations) were chosen on scikit-learn's small data sets and MNIST (bench/anytime.py) and are
    the same for every data set there.
    """

    _task = "classification"

    def fit(self, x, y):
        labels = np.asarray(y)
        if labels.ndim != 1:
            raise CompressError(f"labels must be 1-D (n,), got shape {labels.shape}")
        classes, codes = np.unique(labels, return_inverse=True)
        if len(classes) < 2:
            raise CompressError(f"classification needs at least 2 classes, got {len(classes)}: "
                                f"{classes.tolist()}")
        self.classes_ = classes
        self._fit_head(x, torch.as_tensor(codes.astype(np.int64)), len(classes),
                       {"classes": classes.tolist()})
        return self

    def predict_proba(self, x, units: int | None = None) -> np.ndarray:
        scores = torch.from_numpy(self.decision_function(x, units))
        return torch.softmax(scores, 1).numpy()

    def predict(self, x, units: int | None = None) -> np.ndarray:
        scores = self.decision_function(x, units)
        return self.classes_[scores.argmax(1)]

    def staged_predict(self, x) -> Iterator[np.ndarray]:
        for scores in self.staged_decision_function(x):
            yield self.classes_[scores.argmax(1)]

    def score(self, x, y, units: int | None = None) -> float:
        """Accuracy."""
        return float(np.mean(self.predict(x, units) == np.asarray(y)))


class GBNNRegressor(_GBNNBase):
    """Gradient-boosted one-hidden-layer network for (multi-output) least-squares regression.

    ``fit(X (n, d), y (n,) or (n, K))``; ``predict`` returns the same shape as ``y`` had.
    """

    _task = "regression"

    def fit(self, x, y):
        target = np.asarray(y, dtype=np.float32)
        if target.ndim not in (1, 2):
            raise CompressError(f"regression targets must be (n,) or (n, K), got shape {target.shape}")
        self._single_output = target.ndim == 1
        self._fit_head(x, torch.from_numpy(target), None, {})
        return self

    def _shape(self, scores: np.ndarray) -> np.ndarray:
        return scores[:, 0] if self._single_output else scores

    def predict(self, x, units: int | None = None) -> np.ndarray:
        return self._shape(self.decision_function(x, units))

    def staged_predict(self, x) -> Iterator[np.ndarray]:
        for scores in self.staged_decision_function(x):
            yield self._shape(scores)

    def score(self, x, y, units: int | None = None) -> float:
        """Coefficient of determination R^2 (averaged over outputs)."""
        y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
        p = np.asarray(self.predict(x, units), dtype=np.float64).reshape(len(y), -1)
        ss_res = ((y - p) ** 2).sum(0)
        ss_tot = ((y - y.mean(0)) ** 2).sum(0)
        return float(np.mean(1.0 - ss_res / np.where(ss_tot > 0, ss_tot, 1.0)))

