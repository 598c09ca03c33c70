"""Sensitivity analyzers: CCA against scikit-learn, units, restoration, ordering, signs, bad input."""
import json
import math
import warnings

import pytest
import torch

from compress.analyze import (REGISTRY, Sensitivity, analyze, analyzer_report, build_units, format_report,
                              spearman)
from compress.analyze.base import make_config, patched
from compress.analyze.calib import Calibration
from compress.analyze.cca import correlation_matrix, first_canonical_correlation
from compress.data import default_corpus
from compress.errors import CompressError
from compress.models import LoadedModel, load_model, quantizable_linears
from compress.quant import QuantSpec, relative_noise

FAST = dict(samples=4, seq_len=24, batch_size=2, progress=False)
METHODS = sorted(REGISTRY)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread avoids waits for a second thread on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def texts():
    return default_corpus()[:60]


@pytest.fixture(scope="module")
def bert(tiny_bert_dir):
    return load_model(tiny_bert_dir)


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return load_model(tiny_llama_dir)


def _run(loaded, method, data, **kw):
    with warnings.catch_warnings():  # cmpq warns that 4 samples < width 64: expected here
        warnings.simplefilter("ignore")
        return analyze(loaded, method, data, **{**FAST, **kw})


# ---- CCA ------------------------------------------------------------------------------------------

def _correlated(n, dx, dy, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=g)
    x = torch.randn(n, dx, generator=g)
    y = torch.randn(n, dy, generator=g)
    x[:, : min(2, dx)] += 0.8 * z[:, : min(2, dx)]
    y[:, -min(2, dy):] += 0.6 * z[:, : min(2, dy)]
    return x, y


@pytest.mark.parametrize("n,dx,dy", [(300, 5, 4), (200, 1, 3), (150, 7, 7), (60, 3, 11)])
def test_cca_matches_sklearn(n, dx, dy):
    np = pytest.importorskip("numpy")
    sk = pytest.importorskip("sklearn.cross_decomposition")
    x, y = _correlated(n, dx, dy, seed=n + dx)
    cca = sk.CCA(n_components=1, max_iter=5000, tol=1e-12).fit(x.numpy(), y.numpy())
    xs, ys = cca.transform(x.numpy(), y.numpy())
    expected = abs(np.corrcoef(xs[:, 0], ys[:, 0])[0, 1])
    assert first_canonical_correlation(x, y) == pytest.approx(expected, abs=1e-6)


def test_cca_ridge_matches_closed_form_below_width():
    """N < d: the reduced-basis computation equals the textbook formula on regularised covariances."""
    x, y = _correlated(20, 30, 25, seed=1)
    x, y = x.double(), y.double()

    def closed_form(a, b, ridge):
        a, b = a - a.mean(0), b - b.mean(0)
        caa, cbb, cab = (a.T @ a, b.T @ b, a.T @ b)
        caa = caa / 19 + ridge * (caa / 19).diagonal().mean() * torch.eye(a.shape[1], dtype=a.dtype)
        cbb = cbb / 19 + ridge * (cbb / 19).diagonal().mean() * torch.eye(b.shape[1], dtype=b.dtype)
        m = torch.linalg.solve(caa, cab / 19) @ torch.linalg.solve(cbb, cab.T / 19)
        return torch.linalg.eigvals(m).real.max().sqrt().item()

    for ridge in (0.01, 0.1, 1.0):
        assert first_canonical_correlation(x, y, ridge) == pytest.approx(closed_form(x, y, ridge), rel=1e-9)
    z = torch.randn(20, 8, generator=torch.Generator().manual_seed(2))
    rho = correlation_matrix({"x": x, "y": y, "z": z}, 0.1)
    assert torch.allclose(rho, rho.T) and torch.all(rho.diagonal() == 1)
    assert rho[0, 2].item() == pytest.approx(first_canonical_correlation(x, z, 0.1), rel=1e-12)


def test_cca_bad_input():
    x, y = _correlated(40, 50, 3, seed=3)
    with pytest.raises(CompressError, match="at least 2 samples"):
        first_canonical_correlation(x[:1], y[:1])
    with pytest.raises(CompressError, match="singular; use ridge > 0 .* or more than 50 samples"):
        first_canonical_correlation(x, y, ridge=0.0)
    with pytest.raises(CompressError, match="same for every calibration sample"):
        first_canonical_correlation(torch.ones(10, 3), y[:10], ridge=0.1)


# ---- units ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("which,blocks", [("bert", "encoder.layer"), ("llama", "model.layers")])
def test_units_cover_every_quantizable_linear_once(which, blocks, request):
    model = request.getfixturevalue(which).model
    linears = quantizable_linears(model)
    block = build_units(model, "block")
    assert list(block.units) == [f"{blocks}.0", f"{blocks}.1"]
    assert sorted(n for names in block.units.values() for n in names) == sorted(linears)
    assert sum(block.params().values()) == sum(m.weight.numel() for m in linears.values())
    module = build_units(model, "module")
    assert module.units == {n: [n] for n in linears}
    assert module.start[f"{blocks}.1.mlp.down_proj" if which == "llama" else f"{blocks}.1.output.dense"] == 1


# ---- every analyzer: runs, restores, well-formed ----------------------------------------------

@pytest.mark.parametrize("granularity", ["block", "module"])
@pytest.mark.parametrize("which", ["bert", "llama"])
@pytest.mark.parametrize("method", METHODS)
def test_analyzer_runs_and_restores_bit_identically(method, which, granularity, request, texts):
    loaded = request.getfixturevalue(which)
    model = loaded.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    sens = _run(loaded, method, texts, granularity=granularity)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "weights changed"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    units = build_units(model, granularity)
    assert sens.units == units.units and sens.params == units.params()
    assert sens.method == method and sens.granularity == granularity
    assert all(math.isfinite(v) for v in sens.scores.values())
    if not (method == "cmpq" and len(units.units) == 2):  # two units share their one correlation
        assert len(set(sens.scores.values())) > 1, "every unit scored the same"
    if sens.damage is not None:
        assert all(set(d) == {4, 8, 16} and d[16] == 0 for d in sens.damage.values())
        assert sens.scores == {u: d[4] for u, d in sens.damage.items()}
    assert sens.provenance["samples"] == 4 and sens.provenance["seed"] == 0
    assert sens.provenance["metric"] == ("mean_kl" if which == "llama" else "one_minus_cosine")  # kl: the default
    back = Sensitivity.from_dict(json.loads(json.dumps(sens.to_dict())))
    assert back == sens


@pytest.mark.parametrize("granularity", ["block", "module"])
@pytest.mark.parametrize("which,metric", [("bert", "nll"), ("llama", "kl")])
def test_oracle_int4_hurts_more_than_int8(which, metric, granularity, request, texts):
    """On divergence metrics (1 − cos, KL), which cannot go below the unmodified model's 0."""
    sens = _run(request.getfixturevalue(which), "oracle", texts, granularity=granularity, causal_metric=metric)
    for unit, d in sens.damage.items():
        assert d[4] > d[8] > 0, (unit, d)


def test_rerun_from_a_block_equals_a_full_forward(llama, bert, texts):
    for loaded in (llama, bert):
        config = make_config("oracle", **FAST)
        units = build_units(loaded.model, "module")
        calib = Calibration(loaded, texts, config, units.blocks)
        base = calib.reference(loaded.model)
        assert calib.metric(loaded.model, 1) == pytest.approx(base, rel=1e-6, abs=1e-7)
        unit = [u for u, s in units.start.items() if s == 1][-1]  # the MLP output layer
        lin = units.linears[unit]
        with torch.no_grad():
            with patched([lin], [lin.weight + torch.randn(lin.weight.shape) * lin.weight.std()]):
                partial, full = calib.metric(loaded.model, 1), calib.metric(loaded.model, 0)
        assert partial == pytest.approx(full, rel=1e-5)
        assert abs(full - base) > 1e-6


def test_token_windows_as_data(llama, bert):
    ids = torch.randint(0, 1000, (5, 16), generator=torch.Generator().manual_seed(0))
    sens = _run(llama, "oracle", ids, samples=5)
    assert sens.provenance["samples"] == 5
    with pytest.raises(CompressError, match="token windows are calibration data for causal LMs only"):
        _run(bert, "oracle", ids)
    with pytest.raises(CompressError, match="int64 \\(n, T\\) with T >= 2"):
        _run(llama, "oracle", ids[:, :1])


# ---- seeds and signs ------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["tdmpq", "fisher", "cmpq"])
def test_same_seed_same_scores(llama, texts, method):
    a = _run(llama, method, texts, granularity="module", seed=3)
    b = _run(llama, method, texts, granularity="module", seed=3)
    c = _run(llama, method, texts, granularity="module", seed=4)
    assert a.scores == b.scores
    assert a.scores != c.scores


BRANCHES = {"bert": ["encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense"],
            "llama": [f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")]}


@pytest.mark.parametrize("which,metric,methods", [
    ("bert", "nll", ("oracle", "pmpq", "tdmpq", "taylor", "fisher")),
    ("llama", "kl", ("oracle", "pmpq", "tdmpq", "taylor", "fisher")),
    ("llama", "nll", ("taylor",)),  # the first-order path; a random model's NLL change has no sign
])
def test_scaled_up_branch_ranks_first(which, metric, methods, request, texts):
    """The MLP output layer of block 0 scaled up 30x: that MLP dominates the residual stream, so
    quantizing any layer of it (whose errors the scale amplifies alike) hurts more than any other."""
    loaded = load_model(request.getfixturevalue(f"tiny_{which}_dir"))
    branch = BRANCHES[which]
    with torch.no_grad():
        loaded.model.get_submodule(branch[-1]).weight.mul_(30)
    for method in methods:
        cheap = {"oracle": {"bits": (4,)}, "taylor": {"bits": (4,), "probes": 8}, "fisher": {"bits": (4,)},
                 "tdmpq": {"probes": 2}}.get(method, {})
        sens = _run(loaded, method, texts, granularity="module", samples=6, causal_metric=metric, **cheap)
        top = sorted(sens.scores, key=sens.scores.get, reverse=True)[: len(branch)]
        assert sorted(top) == sorted(branch), (method, top)


@pytest.mark.parametrize("which,metric", [("bert", "nll"), ("llama", "kl")])
def test_second_order_damage_is_in_metric_units(which, metric, request, texts):
    """taylor's and fisher's predicted damage match the oracle's measured damage in size."""
    loaded = request.getfixturevalue(which)
    opts = dict(granularity="block", samples=8, causal_metric=metric)
    truth = _run(loaded, "oracle", texts, **opts)
    for method in ("taylor", "fisher"):
        pred = _run(loaded, method, texts, probes=16, **opts)
        for unit in truth.damage:
            for bits in (4, 8):
                ratio = pred.damage[unit][bits] / truth.damage[unit][bits]
                assert 0.6 < ratio < 1.7, (method, unit, bits, ratio)


# ---- noise energy, Spearman, report --------------------------------------------------------------

def test_relative_noise():
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))
    e8, e4 = relative_noise(w, QuantSpec(8)), relative_noise(w, QuantSpec(4, 32, False))
    assert relative_noise(w, QuantSpec(16)) == 0.0 and relative_noise(torch.zeros(4, 8), QuantSpec(8)) == 0.0
    assert 0 < e8 < e4 < 0.05
    assert relative_noise(10 * w, QuantSpec(4, 32, False)) == pytest.approx(e4, rel=1e-3)  # scale-free


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        a = torch.randint(0, 6, (30,), generator=g).tolist()
        b = (torch.tensor(a) + torch.randint(0, 4, (30,), generator=g)).tolist()
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_analyzer_report(bert, texts):
    rows = analyzer_report(bert, texts, methods=["pmpq", "fisher"], granularity="module", **FAST)
    assert [r["method"] for r in rows] == ["oracle", "pmpq", "fisher"]
    assert rows[0]["spearman"] == pytest.approx(1) and rows[0]["spearman_8bit"] == pytest.approx(1)
    assert rows[1]["spearman_8bit"] is None and rows[2]["spearman_8bit"] is not None
    assert all(-1 <= r["spearman"] <= 1 and r["seconds"] > 0 and r["units"] == 12 for r in rows)
    table = format_report(rows)
    assert "pmpq" in table and "fisher" in table
    with pytest.raises(CompressError, match="unknown sensitivity method\\(s\\) \\['nope'\\]"):
        analyzer_report(bert, texts, methods=["nope"], **FAST)


# ---- bad input ------------------------------------------------------------------------------------

def test_bad_input(bert, llama, texts):
    with pytest.raises(CompressError, match="unknown sensitivity method 'nope' \\(known: cmpq, fisher, oracle, "
                                            "pmpq, taylor, tdmpq\\)"):
        analyze(bert, "nope", texts)
    with pytest.raises(CompressError, match="cmpq needs at least 2 calibration samples, got samples=1"):
        analyze(bert, "cmpq", texts, samples=1)
    with pytest.raises(CompressError, match="cmpq needs at least 2 calibration samples; the data gave 1"):
        analyze(bert, "cmpq", texts[:1], **FAST)
    with pytest.raises(CompressError, match="fewer than one sequence of 256"):  # 256: the model's context
        analyze(llama, "pmpq", texts[:2], **{**FAST, "seq_len": 256})
    with pytest.raises(CompressError, match="BertModel has no quantizable linear layers after excluding"):
        analyze(bert, "oracle", texts, exclude=("*",), **FAST)
    vision = LoadedModel(bert.model, None, "vision", bert.path)
    with pytest.raises(CompressError, match="vision models is not supported yet"):
        analyze(vision, "pmpq", texts, **FAST)
    with pytest.raises(CompressError, match="pmpq: unknown option\\(s\\) \\['sparsty'\\]"):
        analyze(bert, "pmpq", texts, sparsty=0.5)
    with pytest.raises(CompressError, match="pmpq sparsity must be in \\(0, 1\\), got 1.5"):
        analyze(bert, "pmpq", texts, sparsity=1.5)
    with pytest.raises(CompressError, match="granularity 'layer' is not one of"):
        analyze(bert, "oracle", texts, granularity="layer")
    with pytest.raises(CompressError, match="candidate bits must be a non-empty subset of \\(4, 8\\)"):
        analyze(bert, "oracle", texts, bits=(2,))
    with pytest.raises(CompressError, match="no calibration texts"):
        analyze(bert, "oracle", [], **FAST)
    one_left = ("*.attention.*", "*.intermediate.*", "encoder.layer.1.*")
    with pytest.raises(CompressError, match="cmpq compares units with each other and needs at least 2; .* has 1"):
        analyze(bert, "cmpq", texts, granularity="module", exclude=one_left, **FAST)


def test_cmpq_warns_below_width_and_needs_ridge_there(bert, texts):
    with pytest.warns(UserWarning, match="4 calibration samples for representations up to 80 wide"):
        analyze(bert, "cmpq", texts, granularity="module", **FAST)
    with pytest.raises(CompressError, match="singular; use ridge > 0"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            analyze(bert, "cmpq", texts, ridge=0.0, **FAST)
