"""GBNNClassifier / GBNNRegressor as scikit-learn estimators: check_estimator, and the contract
points it covers spelled out one by one (so a failure names the broken promise)."""
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
from sklearn.base import clone, is_classifier, is_regressor  # noqa: E402
from sklearn.exceptions import NotFittedError  # noqa: E402
from sklearn.utils import get_tags  # noqa: E402
from sklearn.utils.estimator_checks import check_estimator  # noqa: E402

from compress.anytime import GBNNClassifier, GBNNRegressor  # noqa: E402
from compress.errors import CompressError  # noqa: E402

SMALL = dict(n_units=10, units_per_step=5, max_iter=10)  # 2 steps: check_estimator in ~5 s


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("est", [GBNNClassifier(**SMALL), GBNNRegressor(**SMALL)], ids=lambda e: type(e).__name__)
def test_check_estimator(est):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the checks' toy data are separable: BoostingStepWarning
        results = check_estimator(est, on_fail=None)
    failed = [f"{r['check_name']}: {r['exception']!r}"[:400] for r in results if r["status"] == "failed"]
    assert len(results) > 40 and not failed, "\n".join(failed)


def _blobs(n=60, d=4, classes=2, seed=0):
    rng = np.random.RandomState(seed)
    y = np.arange(n) % classes
    return rng.normal(size=(n, d)) + y[:, None] * 1.0, y


def test_tags_and_kinds():
    assert is_classifier(GBNNClassifier()) and is_regressor(GBNNRegressor())
    assert get_tags(GBNNRegressor()).target_tags.multi_output
    assert not get_tags(GBNNClassifier()).input_tags.sparse and not get_tags(GBNNClassifier()).input_tags.allow_nan


def test_binary_decision_function_is_one_column():
    x, y = _blobs()
    labels = np.array(["no", "yes"])[y]
    clf = GBNNClassifier(**SMALL).fit(x, labels)
    dec = clf.decision_function(x)
    assert dec.shape == (60,) and dec.dtype == np.float64
    assert np.array_equal(clf.predict(x), clf.classes_[(dec > 0).astype(int)])
    proba = clf.predict_proba(x)
    assert proba.shape == (60, 2) and np.allclose(proba[:, 1], 1 / (1 + np.exp(-dec)))
    assert np.allclose(clf.predict_log_proba(x), np.log(proba))
    assert [s.shape for s in clf.staged_decision_function(x)] == [(60,), (60,)]
    assert clf.decision_function(x, units=5).shape == (60,)
    three = GBNNClassifier(**SMALL).fit(*_blobs(classes=3))
    assert three.decision_function(x).shape == (60, 3)


def test_fitted_attributes_and_not_fitted():
    x, y = _blobs()
    clf = GBNNClassifier(**SMALL)
    for method in ("predict", "predict_proba", "decision_function"):
        with pytest.raises(NotFittedError, match="This GBNNClassifier instance is not fitted yet"):
            getattr(clf, method)(x)
    with pytest.raises(NotFittedError):
        GBNNRegressor().predict(x)
    clf.fit(x, y)
    assert clf.n_features_in_ == 4 and clf.n_iter_ == 2 and list(clf.classes_) == [0, 1]
    assert GBNNRegressor(n_units=15, units_per_step=5, max_iter=5).fit(x, x[:, 0]).n_iter_ == 3
    with pytest.raises(ValueError, match="X has 3 features, but GBNNClassifier is expecting 4 features as input"):
        clf.predict(x[:, :3])


@pytest.mark.parametrize("bad, msg", [
    (np.nan, "Input X contains NaN"),
    (np.inf, "Input X contains infinity"),
])
def test_non_finite_input_rejected(bad, msg):
    x, y = _blobs()
    x_bad = x.copy()
    x_bad[3, 1] = bad
    for est in (GBNNClassifier(**SMALL), GBNNRegressor(**SMALL)):
        with pytest.raises(ValueError, match=msg):
            est.fit(x_bad, y)
    fitted = GBNNClassifier(**SMALL).fit(x, y)
    with pytest.raises(ValueError, match=msg):
        fitted.predict(x_bad)


def test_complex_sparse_and_empty_input_rejected():
    sparse = pytest.importorskip("scipy.sparse")
    x, y = _blobs()
    with pytest.raises(ValueError, match="Complex data not supported"):
        GBNNClassifier(**SMALL).fit(x + 1j, y)
    with pytest.raises(TypeError, match="Sparse data was passed for X, but dense data is required"):
        GBNNClassifier(**SMALL).fit(sparse.csr_matrix(x), y)
    with pytest.raises(ValueError, match=r"Found array with 0 sample\(s\) \(shape=\(0, 4\)\) while a minimum of 2 "
                                         r"is required by GBNNClassifier"):
        GBNNClassifier(**SMALL).fit(np.empty((0, 4)), np.empty(0))
    with pytest.raises(ValueError, match=r"0 feature\(s\) \(shape=\(60, 0\)\) while a minimum of 1 is required"):
        GBNNRegressor(**SMALL).fit(np.empty((60, 0)), y)
    fitted = GBNNRegressor(**SMALL).fit(x, x[:, 0])
    with pytest.raises(ValueError, match=r"Found array with 0 sample\(s\)"):
        fitted.predict(np.empty((0, 4)))


def test_continuous_targets_are_not_classes():
    x, _ = _blobs()
    with pytest.raises(ValueError, match="Unknown label type: continuous"):
        GBNNClassifier(**SMALL).fit(x, x[:, 0])
    with pytest.raises(CompressError, match=r"at least 2 classes, got 1 class: \['a'\]"):
        GBNNClassifier(**SMALL).fit(x, np.array(["a"] * 60))


def test_predictions_do_not_depend_on_the_batch():
    # float64 scoring: a row's output is the same, to float64 rounding, alone, in a subset or in
    # another order (scikit-learn asks for 1e-7; float32 matrix products differ by more).
    x, y = _blobs(n=200, d=6, classes=3)
    clf = GBNNClassifier(**SMALL).fit(x, y)
    full = clf.predict_proba(x)
    alone = np.vstack([clf.predict_proba(x[i:i + 1]) for i in range(0, 200, 37)])
    np.testing.assert_allclose(alone, full[::37], rtol=1e-12, atol=1e-15)
    perm = np.random.RandomState(1).permutation(200)
    np.testing.assert_allclose(clf.predict_proba(x[perm]), full[perm], rtol=1e-12, atol=1e-15)


def test_clone_keeps_anytime_params_and_units_api():
    x, y = _blobs()
    clf = GBNNClassifier(n_units=20, units_per_step=5, learning_rate=0.3, max_iter=5)
    fitted = clone(clf).fit(x, y)
    assert fitted.get_params() == clf.get_params()
    assert [fitted.score(x, y, units=u) >= 0.5 for u in (5, 20)] == [True, True]
    with pytest.raises(CompressError, match=r"units to keep must be in 1\.\.20"):
        fitted.predict(x, units=21)
