"""compress.anytime: boosting fit, merged/truncated heads, estimators, label files, save/load."""
import json
import math

import numpy as np
import pytest
import torch

sklearn = pytest.importorskip("sklearn")  # the estimators need the anytime extra
from sklearn.exceptions import NotFittedError  # noqa: E402

from compress.anytime import (
    MAX_STEP,
    AnytimeHead,
    BoostingStepWarning,
    GBNNClassifier,
    GBNNRegressor,
    fit_boosted,
    load_head,
    save_head,
    truncate,
)
from compress.anytime.boosting import _lbfgs, _softmax_step, _squared_step
from compress.data import read_labelled_file
from compress.errors import CompressError

FAST = dict(max_iter=15)


@pytest.fixture(autouse=True)
def one_thread():
    # The learners are tiny: with several threads on a busy machine, synchronisation dominates.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _classes(n=90, d=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * 3 + 5          # raw, unstandardised features
    y = (x[:, 0] + x[:, 1] ** 2 / 10 > 6).long() + (x[:, 2] > 5).long()
    return x, y


def _regression(n=80, d=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.stack([torch.sin(2 * x[:, 0]) + x[:, 1], 0.5 * x[:, 2] * x[:, 3] - 1.0], 1)
    return x, y


def _reference(head: AnytimeHead, x: torch.Tensor, units: int) -> torch.Tensor:
    """Independent of AnytimeHead.forward: the full network with units >= ``units`` zeroed in the
    output layer and the bias terms of blocks with no active unit left out, in float64."""
    j = head.units_per_step
    w2 = head.output.weight.double().clone()
    w2[:, units:] = 0
    blocks = math.ceil(units / j)
    bias = head.bias0.double() + head.block_bias.double()[:blocks].sum(0)
    h = torch.sigmoid(x.double() @ head.hidden.weight.double().T + head.hidden.bias.double())
    return h @ w2.T + bias


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_merged_head_equals_staged_boosting(task):
    x, y = _classes() if task == "classification" else _regression()
    head, staged = fit_boosted(x, y, task=task, n_units=12, units_per_step=3, return_staged=True, **FAST)
    assert staged.shape == (4, x.shape[0], head.out_features)
    assert not torch.allclose(staged[0], staged[-1])   # the steps do change the model
    for t in range(head.n_steps):
        units = (t + 1) * 3
        head.active_units = units
        assert (head(x) - staged[t]).abs().max() < 1e-5
        assert (truncate(head, units)(x) - staged[t]).abs().max() < 1e-5
    for t, scores in enumerate(head.staged_forward(x)):
        assert (scores - staged[t]).abs().max() < 1e-5


def test_partial_blocks_add_their_bias_once_any_unit_is_active():
    x, y = _classes()
    head = fit_boosted(x, y, task="classification", n_units=12, units_per_step=3, **FAST)
    assert head.block_bias.abs().min() > 0             # else the bias bookkeeping is untested
    for units in range(1, 13):
        head.active_units = units
        ref = _reference(head, x, units)
        assert (head(x).double() - ref).abs().max() < 1e-5, units
        assert (truncate(head, units)(x).double() - ref).abs().max() < 1e-5, units
    # One unit into block 2 = the 1-step model plus that unit and block 2's whole bias term.
    head.active_units = 3
    one_step = head(x)
    head.active_units = 4
    h4 = torch.sigmoid(x @ head.hidden.weight[3] + head.hidden.bias[3])
    expect = one_step + h4[:, None] * head.output.weight[:, 3] + head.block_bias[1]
    assert (head(x) - expect).abs().max() < 1e-5


def test_active_units_switch_without_copying():
    x, y = _classes()
    head = fit_boosted(x, y, task="classification", n_units=12, units_per_step=3, **FAST)
    ptrs = [p.data_ptr() for p in head.parameters()]
    full = head(x)
    head.active_units = 5
    part = head(x)
    head.active_units = 12
    assert torch.equal(head(x), full) and not torch.allclose(part, full)
    assert torch.equal(head(x, units=5), part) and head.active_units == 12
    assert [p.data_ptr() for p in head.parameters()] == ptrs
    small = truncate(head, 5)
    assert [m.weight.shape for m in (small[0], small[2])] == [(5, 7), (3, 5)]


@pytest.mark.parametrize("units", [0, 13, -1])
def test_units_outside_range_name_the_range(units):
    x, y = _classes()
    head = fit_boosted(x, y, task="classification", n_units=12, units_per_step=3, **FAST)
    msg = rf"units to keep must be in 1\.\.12 \(T·J = 4·3\), got {units}"
    with pytest.raises(CompressError, match=msg):
        head.active_units = units
    with pytest.raises(CompressError, match=msg):
        truncate(head, units)
    with pytest.raises(CompressError, match="integer"):
        head.active_units = 2.5


def test_same_seed_same_head_other_seed_differs():
    x, y = _classes()
    a = fit_boosted(x, y, task="classification", n_units=6, units_per_step=3, random_state=3, **FAST)
    b = fit_boosted(x, y, task="classification", n_units=6, units_per_step=3, random_state=3, **FAST)
    c = fit_boosted(x, y, task="classification", n_units=6, units_per_step=3, random_state=4, **FAST)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.hidden.weight, c.hidden.weight)
    assert a.meta["rhos"] == b.meta["rhos"]


def test_training_loss_never_increases_even_at_learning_rate_one():
    # Separable classes: gbnn's single Newton step overflows here; the line search must not.
    x, y = _classes()
    y = (x[:, 0] > 5).long()
    head, staged = fit_boosted(x, y, task="classification", n_units=8, units_per_step=2,
                               learning_rate=1.0, return_staged=True, **FAST)
    losses = [float(torch.nn.functional.cross_entropy(s, y)) for s in staged]
    assert all(math.isfinite(v) for v in losses) and all(math.isfinite(r) for r in head.meta["rhos"])
    prior = float(torch.nn.functional.cross_entropy(head.bias0.expand(len(y), -1), y))
    assert all(b <= a + 1e-6 for a, b in zip([prior] + losses, losses))
    assert losses[-1] < 0.25 * prior


def test_line_searches_find_the_minimum():
    g = torch.Generator().manual_seed(5)
    scores, f = torch.randn(40, 4, generator=g), torch.randn(40, 4, generator=g)
    y = torch.nn.functional.one_hot(torch.randint(0, 4, (40,), generator=g), 4).float()
    rho, capped = _softmax_step(scores, y, f)

    def loss(r):
        z = (scores + r * f).double()
        return float((torch.logsumexp(z, 1) - (y * z).sum(1)).sum())
    assert loss(rho) <= min(loss(rho - 1e-3), loss(rho + 1e-3))
    assert loss(rho) < loss(0.0) and not capped
    # A bound below the minimiser: rho stops on it (|rho| max|f| = max_step), still lowering the loss.
    bound = 0.5 * abs(rho) * float(f.abs().max())
    low, capped = _softmax_step(scores, y, f, max_step=bound)
    assert capped and abs(low) * float(f.abs().max()) == pytest.approx(bound, rel=1e-9)
    assert math.copysign(1, low) == math.copysign(1, rho) and loss(rho) < loss(low) < loss(0.0)
    resid = torch.randn(40, 2, generator=g)
    fr = torch.randn(40, 2, generator=g)
    best = float((resid * fr).sum() / (fr * fr).sum())
    assert _squared_step(resid, fr) == pytest.approx(best, rel=1e-6)
    assert _squared_step(resid, torch.zeros_like(fr)) == 0.0


def _separable(n=24, d=40, seed=0):
    """Two classes apart along every feature: the cross-entropy has no minimum."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    return torch.randn(n, d, generator=g) + 1.5 * y[:, None], y


def test_separable_steps_are_capped_and_reported():
    x, y = _separable()
    with pytest.warns(BoostingStepWarning) as record:
        head, staged = fit_boosted(x, y, task="classification", n_units=40, units_per_step=4,
                                   return_staged=True, **FAST)
    capped = head.meta["capped_steps"]
    assert len(record) == 1 and capped and head.meta["max_step"] == MAX_STEP
    first = capped[0]
    msg = str(record[0].message)
    assert msg.startswith(f"boosting step {first} of 10 hit the step cap: rho = "
                          f"{head.meta['rhos'][first - 1]:.3g} moves a training score by max_step = 16 ")
    assert f"{len(capped)} of 10 steps capped" in msg
    # The bound holds: no step moves a training score by more than learning_rate * max_step.
    prior = head.bias0.expand(len(y), -1)
    moves = [float((b - a).abs().max()) for a, b in zip([prior, *staged], staged)]
    assert max(moves) <= 0.5 * MAX_STEP * (1 + 1e-5)
    assert [t + 1 for t, m in enumerate(moves) if m >= 0.5 * MAX_STEP * (1 - 1e-5)] == capped
    # Without the bound the same data make steps far larger (what the bound is there for).
    free, staged_free = fit_boosted(x, y, task="classification", n_units=40, units_per_step=4,
                                    max_step=math.inf, return_staged=True, **FAST)
    free_moves = [float((b - a).abs().max()) for a, b in zip([prior, *staged_free], staged_free)]
    assert max(free_moves) > 2 * MAX_STEP and free.meta["capped_steps"] == []
    with pytest.raises(CompressError, match="max_step must be > 0 .*, got 0"):
        fit_boosted(x, y, task="classification", max_step=0)


def test_ordinary_data_are_not_capped(recwarn):
    x, y = _classes()
    head = fit_boosted(x, y, task="classification", n_units=12, units_per_step=3, **FAST)
    assert head.meta["capped_steps"] == [] and not [w for w in recwarn if w.category is BoostingStepWarning]


def test_lbfgs_reaches_known_minima():
    g = torch.Generator().manual_seed(6)
    m = torch.randn(30, 30, generator=g, dtype=torch.float64)
    a = m @ m.T + 0.5 * torch.eye(30, dtype=torch.float64)    # ill-conditioned but convex
    b = torch.randn(30, generator=g, dtype=torch.float64)
    quad = lambda t: (0.5 * t @ a @ t - b @ t, a @ t - b)  # noqa: E731
    sol = _lbfgs(quad, torch.zeros(30, dtype=torch.float64), max_iter=500, tol_change=0.0)
    assert torch.allclose(sol, torch.linalg.solve(a, b), atol=1e-5)

    def rosenbrock(t):
        x, y = t
        loss = (1 - x) ** 2 + 100 * (y - x * x) ** 2
        return loss, torch.stack([-2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)])
    sol = _lbfgs(rosenbrock, torch.tensor([-1.2, 1.0], dtype=torch.float64), max_iter=500, tol_change=0.0)
    assert torch.allclose(sol, torch.ones(2, dtype=torch.float64), atol=1e-4)


def test_fit_learns_held_out_data():
    from sklearn.datasets import load_iris

    x, y = load_iris(return_X_y=True)
    perm = np.random.RandomState(0).permutation(len(y))
    tr, te = perm[:100], perm[100:]
    clf = GBNNClassifier(n_units=20, max_iter=30).fit(x[tr], y[tr])
    assert clf.score(x[te], y[te]) >= 0.9
    xr, yr = _regression(n=300)
    reg = GBNNRegressor(n_units=30, max_iter=30).fit(xr[:200].numpy(), yr[:200, 0].numpy())
    assert reg.score(xr[200:].numpy(), yr[200:, 0].numpy()) >= 0.8


def test_classifier_api():
    x, y = _classes()
    names = np.array(["ant", "bee", "cat"])[y.numpy()]
    clf = GBNNClassifier(n_units=9, units_per_step=3, **FAST)
    assert clf.fit(x.numpy(), names) is clf
    assert list(clf.classes_) == ["ant", "bee", "cat"] and clf.n_features_in_ == 7
    pred = clf.predict(x)
    assert pred.shape == (90,) and set(pred) <= {"ant", "bee", "cat"}
    proba = clf.predict_proba(x)
    assert proba.shape == (90, 3) and np.allclose(proba.sum(1), 1, atol=1e-5)
    assert np.array_equal(clf.classes_[proba.argmax(1)], pred)
    staged = list(clf.staged_predict(x))
    assert len(staged) == 3 and np.array_equal(staged[-1], pred)
    assert np.array_equal(clf.predict(x, units=3), staged[0])
    assert clf.head_.meta["classes"] == ["ant", "bee", "cat"]
    assert clf.score(x, names) == np.mean(pred == names)
    # Binary labels use two softmax outputs.
    binary = GBNNClassifier(n_units=4, units_per_step=2, **FAST).fit(x, (y > 0).numpy())
    assert binary.predict_proba(x).shape == (90, 2) and list(binary.classes_) == [False, True]


def test_regressor_api_single_and_multi_output():
    x, y = _regression()
    one = GBNNRegressor(n_units=6, units_per_step=3, **FAST).fit(x, y[:, 0])
    assert one.predict(x).shape == (80,)
    staged = list(one.staged_predict(x))
    assert len(staged) == 2 and np.allclose(staged[-1], one.predict(x))
    two = GBNNRegressor(n_units=6, units_per_step=3, **FAST).fit(x, y)
    assert two.predict(x).shape == (80, 2) and two.head_.meta["task"] == "regression"


def test_params_roundtrip_and_clone():
    clf = GBNNClassifier(n_units=20, units_per_step=4, learning_rate=0.3)
    params = clf.get_params()
    assert params["units_per_step"] == 4 and params["learning_rate"] == 0.3
    assert GBNNClassifier(**params).get_params() == params
    assert clf.set_params(alpha=2.0) is clf and clf.alpha == 2.0
    with pytest.raises(ValueError, match="Invalid parameter 'depth' for estimator GBNNClassifier"):
        clf.set_params(depth=3)
    copy = sklearn.base.clone(clf)
    assert copy is not clf and copy.get_params() == clf.get_params()


def test_estimator_bad_input():
    x, y = _classes()
    with pytest.raises(NotFittedError, match="This GBNNClassifier instance is not fitted yet"):
        GBNNClassifier().predict(x)
    with pytest.raises(ValueError, match=r"inconsistent numbers of samples: \[90, 89\]"):
        GBNNClassifier(**FAST).fit(x, y[:89])
    with pytest.raises(CompressError, match=r"at least 2 classes, got 1 class: \[0\]"):
        GBNNClassifier(**FAST).fit(x, np.zeros(90, dtype=int))
    clf = GBNNClassifier(n_units=3, units_per_step=3, **FAST).fit(x, y)
    with pytest.raises(ValueError, match="X has 6 features, but GBNNClassifier is expecting 7 features as input"):
        clf.predict(x[:, :6])
    with pytest.raises(CompressError, match=r"units to keep must be in 1\.\.3"):
        clf.predict(x, units=4)
    with pytest.raises(CompressError, match=r"n_units \(10\) must be a positive multiple of units_per_step \(3\)"):
        fit_boosted(x, y, task="classification", n_units=10, units_per_step=3)
    with pytest.raises(CompressError, match="learning_rate must be in"):
        fit_boosted(x, y, task="classification", learning_rate=1.5)
    with pytest.raises(CompressError, match="NaN"):
        fit_boosted(torch.full((4, 2), float("nan")), torch.tensor([0, 1, 0, 1]), task="classification")
    with pytest.raises(CompressError, match="features and labels differ in length: 90 rows of features, 89 labels"):
        fit_boosted(x, y[:89], task="classification")
    with pytest.raises(CompressError, match=r"n_units must be an integer, got 10\.0"):
        fit_boosted(x, y, task="classification", n_units=10.0)
    with pytest.raises(ValueError, match=r"inconsistent numbers of samples: \[80, 79\]"):
        GBNNRegressor().fit(*_regression()[:1], _regression()[1][:79])


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_read_labelled_file_jsonl_and_csv(tmp_path):
    jl = _write(tmp_path / "a.jsonl", '{"text": "good film", "label": 1}\n\n{"label": 0, "text": "bad"}\n')
    assert read_labelled_file(jl) == (["good film", "bad"], [1, 0])
    cs = _write(tmp_path / "a.csv", 'label,text\npos,"fine, really"\nneg,awful\n')
    assert read_labelled_file(cs) == (["fine, really", "awful"], ["pos", "neg"])
    rg = _write(tmp_path / "r.csv", "text,label\na,1.5\nb,2\n")
    assert read_labelled_file(rg, task="regression") == (["a", "b"], [1.5, 2.0])


@pytest.mark.parametrize("name, text, task, msg", [
    ("u.jsonl", '{"text": "a", "label": 1, "lang": "en"}\n', "classification", r"line 1\): columns must be text,label; unknown lang"),
    ("m.jsonl", '{"text": "a"}\n{"text": "b", "label": 1}\n', "classification", r"line 1\): columns must be text,label; missing label"),
    ("u.csv", "text,label,score\na,1,2\n", "classification", r"header\): columns must be text,label; unknown score"),
    ("m.csv", "sentence,label\na,1\n", "classification", r"header\): columns must be text,label; missing text; unknown sentence"),
    ("s.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n', "classification", "single class 'x'"),
    ("e.csv", "text,label\n", "classification", "has no rows"),
    ("e.jsonl", "\n", "classification", "has no rows"),
    ("j.jsonl", '{"text": "a", "label": 1}\n{"text": \n', "classification", r"j\.jsonl:2: not valid JSON"),
    ("t.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": "1"}\n', "classification", r"mix types \(int, str\)"),
    ("r.csv", "text,label\na,1\nb,high\n", "regression", r"r\.csv:3: regression label 'high' is not a number"),
    ("x.txt", "a\t1\n", "classification", r"must end in \.jsonl or \.csv"),
])
def test_read_labelled_file_bad_input(tmp_path, name, text, task, msg):
    with pytest.raises(CompressError, match=msg):
        read_labelled_file(_write(tmp_path / name, text), task=task)


def test_read_labelled_file_missing(tmp_path):
    with pytest.raises(CompressError, match="does not exist"):
        read_labelled_file(tmp_path / "none.csv")


def test_save_load_roundtrip(tmp_path):
    x, y = _classes()
    clf = GBNNClassifier(n_units=9, units_per_step=3, **FAST).fit(x, np.array(["a", "b", "c"])[y.numpy()])
    head = clf.head_
    head.active_units = 7
    meta_path = save_head(head, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["anytime.json", "anytime.safetensors"]
    meta = json.loads(meta_path.read_text())
    assert meta["format"] == "compress.anytime" and meta["task"] == "classification"
    assert meta["classes"] == ["a", "b", "c"] and (meta["n_steps"], meta["units_per_step"]) == (3, 3)
    assert meta["in_features"] == 7 and meta["learning_rate"] == 0.5 and len(meta["rhos"]) == 3
    loaded = load_head(tmp_path)
    assert loaded.active_units == 7 and torch.equal(loaded(x), head(x))
    assert load_head(tmp_path, active_units=9).active_units == 9
    with pytest.raises(CompressError, match=r"units to keep must be in 1\.\.9"):
        load_head(tmp_path, active_units=10)
    save_head(head, tmp_path, name="other")
    meta["n_units"] = 12
    (tmp_path / "other.json").write_text(json.dumps(meta))
    with pytest.raises(CompressError, match="n_units is 12 but the tensors say 9"):
        load_head(tmp_path, name="other")
    meta["format"] = "something"
    (tmp_path / "other.json").write_text(json.dumps(meta))
    with pytest.raises(CompressError, match="expected format 'compress.anytime'"):
        load_head(tmp_path, name="other")
    with pytest.raises(CompressError, match="does not exist"):
        load_head(tmp_path, name="missing")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fit_matches_staged():
    x, y = _classes()
    head, staged = fit_boosted(x, y, task="classification", n_units=6, units_per_step=3,
                               device="cuda", return_staged=True, **FAST)
    assert head.hidden.weight.is_cuda
    head.active_units = 3
    assert (head(x.cuda()) - staged[0]).abs().max() < 1e-5
