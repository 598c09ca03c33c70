"""scikit-learn estimators over the boosted anytime head: GBNNClassifier and GBNNRegressor.

Both are ordinary scikit-learn estimators (they pass ``sklearn.utils.estimator_checks.
check_estimator``, tests/test_anytime_sklearn.py): constructor arguments are the parameters, input
is validated by scikit-learn's own ``validate_data`` (NaN, infinity, complex and sparse input are
refused with its messages, a wrong column count at predict time too), ``fit`` returns ``self``,
fitted attributes end in ``_``. What they add is the anytime switch: ``units=`` on every predicting
method uses only the first ``units`` hidden units of the fitted head (1..n_units), and the
``staged_*`` methods yield the model after each boosting step.

Predictions are computed in float64 (the head's float32 weights are widened on the fly), so a
row's score does not depend on which rows share its batch; ``head_`` itself stays float32.

They need scikit-learn (the ``anytime`` extra): ``pip install 'scikit-learn>=1.6'``.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

try:
    from sklearn.base import BaseEstimator, ClassifierMixin, MultiOutputMixin, RegressorMixin
    from sklearn.metrics import accuracy_score, r2_score
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import check_is_fitted, validate_data
except ImportError as exc:  # validate_data is new in scikit-learn 1.6
    raise ImportError("GBNNClassifier and GBNNRegressor need scikit-learn >= 1.6 (the anytime "
                      "extra): pip install 'scikit-learn>=1.6'") from exc

from ..errors import CompressError
from .boosting import fit_boosted
from .head import AnytimeHead


def _as_tensor(x: np.ndarray, device: torch.device) -> torch.Tensor:
    # A copy: validated input may be a read-only view of the caller's array (or a memmap), which
    # torch.from_numpy would share and warn about.
    return torch.tensor(x, device=device)


class _GBNNBase(BaseEstimator):
    """Parameters and plumbing shared by :class:`GBNNClassifier` and :class:`GBNNRegressor`.

    Parameters: ``n_units`` hidden units in all (T·J, a multiple of ``units_per_step``),
    ``units_per_step`` (J, units fitted per boosting step), ``learning_rate`` in (0, 1] (shrinks
    every step), ``subsample`` in (0, 1] (share of rows each learner is fitted on), ``alpha``
    (L2 penalty of each learner), ``max_iter`` (L-BFGS iterations per learner), ``random_state``
    (an int seed), ``device`` (None: CPU; "cuda" fits and predicts on the GPU).

    Fitted attributes: ``head_`` (the :class:`AnytimeHead`, float32), ``n_features_in_``,
    ``n_iter_`` (boosting steps fitted, T = n_units / units_per_step).
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

    def _fit_head(self, X: np.ndarray, y: torch.Tensor, n_classes: int | None, meta: dict) -> None:
        """Fit ``head_`` on validated ``X`` ``(n, d)`` and targets ``y`` (codes or values)."""
        if isinstance(self.random_state, bool) or not isinstance(self.random_state, (int, np.integer)):
            raise CompressError(f"random_state must be an integer seed, got {self.random_state!r}")
        self.head_ = fit_boosted(
            torch.from_numpy(X.astype(np.float32)), y, task=self._task, n_classes=n_classes,
            n_units=self.n_units, units_per_step=self.units_per_step, learning_rate=self.learning_rate,
            subsample=self.subsample, alpha=self.alpha, max_iter=self.max_iter,
            random_state=self.random_state, device=self.device, meta=meta)
        self.n_iter_ = self.head_.n_steps

    def _head_input(self, X) -> tuple[AnytimeHead, torch.Tensor]:
        """The fitted head and ``X`` validated against it, as float64 ``(n, d)`` on its device."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        return self.head_, _as_tensor(X, self.head_.hidden.weight.device)

    @torch.no_grad()
    def _raw(self, X, units: int | None) -> np.ndarray:
        """Scores ``(n, K)`` float64 with the first ``units`` hidden units (default: all)."""
        head, x = self._head_input(X)
        return head(x, head.n_units if units is None else units).cpu().numpy()

    @torch.no_grad()
    def _staged_raw(self, X) -> Iterator[np.ndarray]:
        head, x = self._head_input(X)
        for scores in head.staged_forward(x):
            yield scores.cpu().numpy()


class GBNNClassifier(ClassifierMixin, _GBNNBase):
    """Gradient-boosted one-hidden-layer network for classification (softmax over K >= 2 classes).

    ``fit(X (n, d), y (n,))`` with discrete labels of any kind (sorted into ``classes_``;
    continuous targets are refused, as scikit-learn's classifiers refuse them). ``predict`` returns
    labels ``(n,)``, ``predict_proba`` ``(n, K)``, ``decision_function`` ``(n,)`` for two classes
    (the score of ``classes_[1]`` minus that of ``classes_[0]``, > 0 where it is predicted) and
    ``(n, K)`` for more; ``units=`` on each of them truncates the hidden layer; ``staged_*`` yield
    the same after each boosting step. Defaults (100 units in steps of 5, learning_rate 0.5,
    subsample 1.0, alpha 1, 40 L-BFGS iterations) were chosen on scikit-learn's small data sets and
    MNIST (bench/anytime.py) and are the same for every data set there.
    """

    _task = "classification"

    def fit(self, X, y):  # noqa: N803 (scikit-learn's argument names)
        """Fit on ``X`` ``(n, d)`` and labels ``y`` ``(n,)``; returns ``self``."""
        X, y = validate_data(self, X, y, dtype=(np.float64, np.float32), ensure_min_samples=2)
        check_classification_targets(y)
        classes, codes = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise CompressError(f"classification needs at least 2 classes, got 1 class: {classes.tolist()}")
        self.classes_ = classes
        self._fit_head(X, torch.from_numpy(codes.astype(np.int64)), len(classes),
                       {"classes": classes.tolist()})
        return self

    def _decision(self, scores: np.ndarray) -> np.ndarray:
        # Two classes: one score per row, as scikit-learn's binary classifiers give.
        return scores[:, 1] - scores[:, 0] if scores.shape[1] == 2 else scores

    def _proba(self, scores: np.ndarray) -> np.ndarray:
        z = np.exp(scores - scores.max(1, keepdims=True))
        return z / z.sum(1, keepdims=True)

    def decision_function(self, X, units: int | None = None) -> np.ndarray:  # noqa: N803
        """Scores: ``(n,)`` float64 for two classes, else ``(n, K)`` (one per class)."""
        return self._decision(self._raw(X, units))

    def predict_proba(self, X, units: int | None = None) -> np.ndarray:  # noqa: N803
        """Class probabilities ``(n, K)`` float64, columns in ``classes_`` order."""
        return self._proba(self._raw(X, units))

    def predict_log_proba(self, X, units: int | None = None) -> np.ndarray:  # noqa: N803
        """Log class probabilities ``(n, K)`` float64."""
        s = self._raw(X, units)
        s = s - s.max(1, keepdims=True)
        return s - np.log(np.exp(s).sum(1, keepdims=True))

    def predict(self, X, units: int | None = None) -> np.ndarray:  # noqa: N803
        """Labels ``(n,)`` from ``classes_``."""
        scores = self._raw(X, units)  # first: it raises NotFittedError before classes_ is read
        return self.classes_[scores.argmax(1)]

    def staged_decision_function(self, X) -> Iterator[np.ndarray]:  # noqa: N803
        """``decision_function`` after each boosting step 1..T."""
        for scores in self._staged_raw(X):
            yield self._decision(scores)

    def staged_predict_proba(self, X) -> Iterator[np.ndarray]:  # noqa: N803
        """``predict_proba`` after each boosting step 1..T."""
        for scores in self._staged_raw(X):
            yield self._proba(scores)

    def staged_predict(self, X) -> Iterator[np.ndarray]:  # noqa: N803
        """``predict`` after each boosting step 1..T."""
        for scores in self._staged_raw(X):
            yield self.classes_[scores.argmax(1)]

    def score(self, X, y, sample_weight=None, units: int | None = None) -> float:  # noqa: N803
        """Accuracy on ``X``, ``y`` with the first ``units`` hidden units."""
        return float(accuracy_score(y, self.predict(X, units), sample_weight=sample_weight))


class GBNNRegressor(MultiOutputMixin, RegressorMixin, _GBNNBase):
    """Gradient-boosted one-hidden-layer network for (multi-output) least-squares regression.

    ``fit(X (n, d), y (n,) or (n, K))``; ``predict`` returns float64 of the shape ``y`` had;
    ``units=`` truncates the hidden layer, ``staged_predict`` yields the prediction after each step.
    """

    _task = "regression"

    def fit(self, X, y):  # noqa: N803
        """Fit on ``X`` ``(n, d)`` and targets ``y`` ``(n,)`` or ``(n, K)``; returns ``self``."""
        X, y = validate_data(self, X, y, dtype=(np.float64, np.float32), y_numeric=True,
                             multi_output=True, ensure_min_samples=2)
        self._single_output = y.ndim == 1
        self._fit_head(X, torch.from_numpy(np.asarray(y, dtype=np.float32)), None, {})
        return self

    def _shape(self, scores: np.ndarray) -> np.ndarray:
        return scores[:, 0] if self._single_output else scores

    def predict(self, X, units: int | None = None) -> np.ndarray:  # noqa: N803
        """Predictions ``(n,)`` or ``(n, K)`` float64, using the first ``units`` hidden units."""
        return self._shape(self._raw(X, units))

    def staged_predict(self, X) -> Iterator[np.ndarray]:  # noqa: N803
        """``predict`` after each boosting step 1..T."""
        for scores in self._staged_raw(X):
            yield self._shape(scores)

    def score(self, X, y, sample_weight=None, units: int | None = None) -> float:  # noqa: N803
        """R^2 (averaged over outputs) on ``X``, ``y`` with the first ``units`` hidden units."""
        return float(r2_score(y, self.predict(X, units), sample_weight=sample_weight))
