"""GBNN anytime heads vs MLPs of the same size trained whole (Adam, L-BFGS), and truncation.

For scikit-learn's digits, breast cancer, wine, iris (accuracy) and diabetes (R^2), 5-fold CV
(stratified for classification, shuffled, seed 0), and MNIST from the shared data (the 10,000-image
t10k set, seeded 8000 / 2000 split; skipped with a message when absent):

- GBNN: ``compress.anytime`` estimators with their defaults (100 hidden units), raw features in
  (they standardise inside);
- Adam MLP / L-BFGS MLP: scikit-learn ``MLPClassifier`` / ``MLPRegressor`` with one hidden layer of
  100 logistic units (the architecture of the merged GBNN head), default settings, standardised
  inputs (and, for regression, standardised targets: on raw diabetes targets Adam's 200 epochs
  leave R^2 < 0);
- the score keeping the first 10 / 25 / 50 / 75 / 100 % of hidden units, for GBNN (its block bias
  bookkeeping) and for the MLPs cut the same way (first m units, output bias unchanged);
- fit time (process CPU seconds and wall seconds; one thread for torch and NumPy's BLAS alike, so
  the machine's other load matters as little as it can);
- a robustness grid: learning rate x units per step x subsample on iris and diabetes, reporting any
  non-finite score (the authors' gbnn 0.0.2 at its default learning rate 1.0 gives NaN on iris);
- inference time of the head against active units (CPU; CUDA too when there is one).

    python bench/anytime.py                 # full run, writes bench/results/anytime.{json,md}
    python bench/anytime.py --quick         # 2 folds, small sets only: a smoke test
"""
from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from scipy.special import expit
import torch

from compress.anytime import AnytimeHead, GBNNClassifier, GBNNRegressor, truncate
from compress.data import shared_data_dir
from _common import cpu_name  # noqa: E402  (bench/ is the script's directory)

FRACTIONS = (0.1, 0.25, 0.5, 0.75, 1.0)
HIDDEN = 100
MODELS = {"gbnn": "GBNN (ours)", "adam": "MLP, Adam", "lbfgs": "MLP, L-BFGS"}
MNIST_SEEDS = (0, 1, 2)




def read_idx(path: Path) -> np.ndarray:
    """An MNIST idx file (gzip): big-endian header of magic (dtype code, ndim) and dims, then uint8."""
    raw = gzip.open(path).read()
    if raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_mnist() -> tuple[np.ndarray, np.ndarray] | None:
    root = shared_data_dir()
    images = root / "mnist" / "t10k-images-idx3-ubyte.gz" if root else None
    labels = root / "mnist" / "t10k-labels-idx1-ubyte.gz" if root else None
    if images is None or not images.is_file() or not labels.is_file():
        return None
    x = read_idx(images).reshape(-1, 28 * 28).astype(np.float32) / 255.0
    return x, read_idx(labels).astype(np.int64)


def units_kept(fraction: float) -> int:
    return max(1, round(HIDDEN * fraction))


def mlp_truncated_scores(model, x: np.ndarray, y: np.ndarray, regression: bool,
                         y_mean: float = 0.0, y_std: float = 1.0) -> list[float]:
    """Score of a fitted scikit-learn MLP keeping only its first m hidden units (logistic)."""
    w1, w2 = model.coefs_
    b1, b2 = model.intercepts_
    out = []
    for frac in FRACTIONS:
        m = units_kept(frac)
        h = expit(x @ w1[:, :m] + b1[:m])
        s = h @ w2[:m] + b2
        if regression:
            out.append(r2(y, s[:, 0] * y_std + y_mean))
        elif s.shape[1] == 1:                     # scikit-learn's binary head: one logit
            out.append(float(np.mean(model.classes_[(s[:, 0] > 0).astype(int)] == y)))
        else:
            out.append(float(np.mean(model.classes_[s.argmax(1)] == y)))
    return out


def r2(y: np.ndarray, p: np.ndarray) -> float:
    return float(1.0 - ((y - p) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def timed(fn):
    c0, w0 = time.process_time(), time.perf_counter()
    result = fn()
    return result, time.process_time() - c0, time.perf_counter() - w0


def run_split(xtr, ytr, xte, yte, regression: bool, seed: int) -> dict:
    """GBNN, Adam MLP and L-BFGS MLP on one train/test split: scores per kept fraction, fit times."""
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.preprocessing import StandardScaler

    res = {}
    est = (GBNNRegressor if regression else GBNNClassifier)(random_state=seed)
    _, cpu, wall = timed(lambda: est.fit(xtr, ytr))
    res["gbnn"] = {"scores": [est.score(xte, yte, units=units_kept(f)) for f in FRACTIONS],
                   "cpu_s": cpu, "wall_s": wall, "rhos": est.head_.meta["rhos"]}
    res["head"] = est.head_
    scaler = StandardScaler().fit(xtr)
    ztr, zte = scaler.transform(xtr), scaler.transform(xte)
    y_mean, y_std = (float(ytr.mean()), float(ytr.std())) if regression else (0.0, 1.0)
    target = (ytr - y_mean) / y_std if regression else ytr
    for solver in ("adam", "lbfgs"):
        cls = MLPRegressor if regression else MLPClassifier
        mlp = cls(hidden_layer_sizes=(HIDDEN,), activation="logistic", solver=solver, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")       # ConvergenceWarning at the default max_iter
            _, cpu, wall = timed(lambda: mlp.fit(ztr, target))
        res[solver] = {"scores": mlp_truncated_scores(mlp, zte, yte, regression, y_mean, y_std),
                       "cpu_s": cpu, "wall_s": wall}
    return res


def run_dataset(name: str, x: np.ndarray, y: np.ndarray, regression: bool, folds: int) -> dict:
    from sklearn.model_selection import KFold, StratifiedKFold

    cv = (KFold if regression else StratifiedKFold)(folds, shuffle=True, random_state=0)
    runs = [run_split(x[tr], y[tr], x[te], y[te], regression, seed=i)
            for i, (tr, te) in enumerate(cv.split(x, y))]
    return summarise(name, runs, regression, f"{folds}-fold CV")


def summarise(name: str, runs: list[dict], regression: bool, protocol: str) -> dict:
    out = {"dataset": name, "metric": "R2" if regression else "accuracy", "protocol": protocol,
           "splits": len(runs), "models": {}}
    for model in MODELS:
        scores = np.array([r[model]["scores"] for r in runs])        # (splits, fractions)
        out["models"][model] = {
            "mean": scores.mean(0).tolist(), "std": scores.std(0).tolist(),
            "cpu_s": statistics.mean(r[model]["cpu_s"] for r in runs),
            "wall_s": statistics.mean(r[model]["wall_s"] for r in runs),
            "per_split": scores.tolist()}
    return out


def robustness(datasets: dict, folds: int) -> list[dict]:
    """Learning rate x units per step x subsample: is any score non-finite, and how low does it go?"""
    from sklearn.model_selection import KFold, StratifiedKFold

    rows = []
    for name in ("iris", "diabetes"):
        if name not in datasets:
            continue
        x, y, regression = datasets[name]
        cv = (KFold if regression else StratifiedKFold)(folds, shuffle=True, random_state=0)
        for lr in (0.1, 1.0):
            for j in (1, 4):
                for sub in (0.5, 1.0):
                    scores, rmse, finite = [], [], True
                    for tr, te in cv.split(x, y):
                        est = (GBNNRegressor if regression else GBNNClassifier)(
                            n_units=HIDDEN, units_per_step=j, learning_rate=lr, subsample=sub)
                        est.fit(x[tr], y[tr])
                        raw = est.predict(x[te]) if regression else est.decision_function(x[te])
                        finite &= bool(np.isfinite(raw).all())
                        scores.append(est.score(x[te], y[te]))
                        if regression:
                            rmse.append(float(np.sqrt(np.mean((est.predict(x[te]) - y[te]) ** 2))))
                    rows.append({"dataset": name, "learning_rate": lr, "units_per_step": j,
                                 "n_units": HIDDEN, "subsample": sub, "finite": finite,
                                 "mean": float(np.mean(scores)), "min": float(np.min(scores)),
                                 "rmse": float(np.mean(rmse)) if rmse else None})
    return rows


def inference_times(heads: dict, device: str, batches=(1, 256, 4096)) -> list[dict]:
    """Median forward time of each head at each kept fraction of its units: the AnytimeHead
    switched by ``active_units`` (weight slices) and the standalone copy ``truncate`` returns."""
    rows = []
    for label, head in heads.items():
        head = head.to(device)
        for batch in batches:
            x = torch.randn(batch, head.in_features, device=device)
            for frac in FRACTIONS:
                units = max(1, round(head.n_units * frac))
                head.active_units = units
                small = truncate(head, units)
                for kind, fn in (("active_units", lambda: head(x)), ("truncate", lambda: small(x))):
                    rows.append({"head": label, "how": kind, "device": device, "batch": batch,
                                 "units": units, "fraction": frac, "ms": median_ms(fn, device)})
            head.active_units = head.n_units
    return rows


@torch.inference_mode()
def median_ms(fn, device: str, min_time: float = 0.2) -> float:
    for _ in range(3):
        fn()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    start = time.perf_counter()
    while len(times) < 7 or time.perf_counter() - start < min_time:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        if len(times) >= 2000:
            break
    return 1e3 * statistics.median(times)


def table(results: list[dict]) -> str:
    head = ("| data set | metric | model | full (100 units) | 10 % | 25 % | 50 % | 75 % | "
            "fit CPU s | fit wall s |\n|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for res in results:
        for model, label in MODELS.items():
            m = res["models"][model]
            cells = [f"{m['mean'][i]:.3f}" for i in range(4)]
            full = f"{m['mean'][4]:.3f} ± {m['std'][4]:.3f}"
            lines.append(f"| {res['dataset']} ({res['protocol']}) | {res['metric']} | {label} | "
                         f"{full} | {' | '.join(cells)} | {m['cpu_s']:.2f} | {m['wall_s']:.2f} |")
    return head + "\n".join(lines) + "\n"


def robustness_table(rows: list[dict]) -> str:
    out = ("| data set | learning rate | J | units | subsample | all finite | mean | min | RMSE |\n"
           "|---|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        rmse = f"{r['rmse']:.1f}" if r["rmse"] is not None else ""
        out += (f"| {r['dataset']} | {r['learning_rate']} | {r['units_per_step']} | {r['n_units']} | "
                f"{r['subsample']} | {r['finite']} | {r['mean']:.3f} | {r['min']:.3f} | {rmse} |\n")
    return out


def inference_table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys((r["head"], r["how"], r["device"], r["batch"]) for r in rows))
    out = ("| head | how | device | batch | " + " | ".join(f"{int(f * 100)} % units" for f in FRACTIONS)
           + " |\n|---|---|---|---|" + "---|" * len(FRACTIONS) + "\n")
    for key in keys:
        cells = [f"{r['ms']:.3f}" for r in rows if (r["head"], r["how"], r["device"], r["batch"]) == key]
        out += f"| {' | '.join(map(str, key))} | " + " | ".join(cells) + " |\n"
    return out + "\n(milliseconds per forward, median)\n"


def claims_table(results: list[dict]) -> str:
    """The issue's targets per data set: GBNN's full score minus Adam's, each model's score at 25 %
    of its units as a share of its own full score, and GBNN's fit CPU time over Adam's."""
    out = ("| data set | GBNN − Adam (full) | GBNN 25 % / full | Adam 25 % / full | "
           "GBNN 10 % / full | Adam 10 % / full | fit CPU GBNN / Adam |\n|---|---|---|---|---|---|---|\n")
    for res in results:
        g, a = res["models"]["gbnn"], res["models"]["adam"]
        out += (f"| {res['dataset']} | {g['mean'][4] - a['mean'][4]:+.3f} | "
                f"{g['mean'][1] / g['mean'][4]:.3f} | {a['mean'][1] / a['mean'][4]:.3f} | "
                f"{g['mean'][0] / g['mean'][4]:.3f} | {a['mean'][0] / a['mean'][4]:.3f} | "
                f"{g['cpu_s'] / a['cpu_s']:.2f} |\n")
    return out


def main() -> None:
    from sklearn import datasets as skd

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 folds, no MNIST, small robustness grid")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch and BLAS threads (default 1)")
    ap.add_argument("--out", default="bench/results/anytime.json")
    args = ap.parse_args()
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    folds = 2 if args.quick else args.folds
    loaders = {"digits": (skd.load_digits, False), "breast_cancer": (skd.load_breast_cancer, False),
               "wine": (skd.load_wine, False), "iris": (skd.load_iris, False),
               "diabetes": (skd.load_diabetes, True)}
    if args.quick:
        loaders = {k: loaders[k] for k in ("iris", "wine", "diabetes")}
    data = {}
    for name, (loader, regression) in loaders.items():
        x, y = loader(return_X_y=True)
        data[name] = (x.astype(np.float32), y.astype(np.float32) if regression else y, regression)

    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_name(),
            "cores": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
            "python": sys.version.split()[0],
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_start": os.getloadavg()}
    import sklearn
    meta["sklearn"] = sklearn.__version__
    results, mnist_head = [], None
    with threadpool_limits(args.threads):
        for name, (x, y, regression) in data.items():
            results.append(run_dataset(name, x, y, regression, folds))
            print(f"{name}: done", flush=True)
        mnist = None if args.quick else load_mnist()
        if mnist is None and not args.quick:
            print("MNIST skipped: no mnist/t10k-*.gz under the shared data folder "
                  "(set COMPRESS_DATA)", flush=True)
        if mnist is not None:
            x, y = mnist
            perm = np.random.RandomState(0).permutation(len(y))
            tr, te = perm[:8000], perm[8000:]
            runs = [run_split(x[tr], y[tr], x[te], y[te], regression=False, seed=s)
                    for s in MNIST_SEEDS]
            results.append(summarise("MNIST", runs, False,
                                     f"8000/2000 split, seeds {', '.join(map(str, MNIST_SEEDS))}"))
            mnist_head = runs[0]["head"]
            print("MNIST: done", flush=True)
        robust = robustness(data, folds)

    heads = {}
    if mnist_head is not None:
        heads["MNIST GBNN, d=784, 100 units"] = mnist_head
    g = torch.Generator().manual_seed(0)
    # Timing only, so random weights: a head as wide as MiniLM-L12 features with 2000 units.
    heads["random, d=384, 2000 units"] = AnytimeHead(
        torch.randn(2000, 384, generator=g), torch.randn(2000, generator=g),
        torch.randn(10, 2000, generator=g), torch.zeros(10), torch.zeros(100, 10), 20)
    infer = []
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        infer += inference_times(heads, device)
    meta["load_average_end"] = os.getloadavg()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "fractions": FRACTIONS, "hidden_units": HIDDEN, "results": results,
           "robustness": robust, "inference": infer}
    out.write_text(json.dumps(doc, indent=1) + "\n")
    md = (f"# GBNN anytime heads vs MLPs of the same size\n\n`python bench/anytime.py"
          f"{' --quick' if args.quick else ''}` on {meta['cpu']} ({meta['cores']} cores, "
          f"{args.threads} thread), torch {meta['torch']}, scikit-learn {meta['sklearn']}, "
          f"{meta['date']}; load average {meta['load_average_start'][0]:.1f} at the start, "
          f"{meta['load_average_end'][0]:.1f} at the end (the machine is shared).\n\n"
          f"## Score keeping the first 10/25/50/75/100 % of the 100 hidden units\n\n"
          f"Mean over splits (± std at full size).\n\n{table(results)}\n"
          f"## Against the targets\n\n{claims_table(results)}\n"
          f"## Robustness: every setting on iris and diabetes ({folds}-fold)\n\n"
          f"{robustness_table(robust)}\n## Inference time vs active units\n\n{inference_table(infer)}")
    out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
