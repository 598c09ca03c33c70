"""Anytime heads trained by gradient boosting (GBNN: Emami & Martínez-Muñoz, IEEE Access 2023).

A one-hidden-layer head ``Linear(d, T·J) -> Sigmoid -> Linear(T·J, K)`` is trained J hidden units at
a time: step t fits a small network (J logistic units, K linear outputs) to the pseudo-residuals of
steps 1..t-1 by squared error, then adds it with a step size found by a line search. The T small
networks concatenate into one hidden layer, so keeping only the first m blocks of units *is* the
boosted model after m steps: the number of active units can be lowered at run time to trade
accuracy for speed, and the units dropped first are the ones that matter least.

Differences from the authors' code (gbnn 0.0.2), each for robustness, accuracy or speed:

- The step size is an exact line search on the training loss over all rows (safeguarded Newton on
  the convex 1-D cross-entropy; closed form for squared error, where gbnn fixes rho = 1), not one
  diagonal Newton step. The scaled step ``eta * rho`` with ``0 < eta <= 1`` therefore never
  increases the training loss, so the fit cannot diverge (gbnn's single Newton step overflows when
  probabilities saturate, and rho = 1 lets a learner that overfits its subsample through).
- Each learner is fitted to residuals divided by their root mean square, and its output layer is
  scaled back: the L2 penalty then means the same thing at every step and for every target scale.
- Inputs are standardised inside ``fit_boosted`` and the standardisation is folded into the first
  layer, so the returned head takes raw features. Constant columns are skipped.
- Classification starts from the log class priors (the best constant model) rather than 0; two
  classes use two softmax outputs, so binary and multi-class share one code path.
- Defaults: every learner sees all rows (``subsample=1.0``; gbnn's 0.5 cost 1-2 points of accuracy
  on MNIST and digits in bench/anytime.py), L2 penalty ``alpha=1`` (gbnn: 1e-4, which lets each
  learner overfit), 40 L-BFGS iterations (gbnn: 200), learning rate 0.5 (gbnn: 1.0).
- Learners are trained by a compact-form L-BFGS on one flat parameter vector with hand-written
  gradients (no autograd graph): for learners this small the cost is per-op overhead, not
  arithmetic, and ``torch.optim.LBFGS`` spends most of its time in a Python loop over its history.

Shapes: features ``(n, d)`` float; class targets ``(n,)`` int64 in ``[0, K)``; regression targets
``(n,)`` or ``(n, K)`` float; raw scores ``(n, K)``.
"""
from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import CompressError

HEAD_FORMAT = "compress.anytime"
HEAD_VERSION = 1
TASKS = ("classification", "regression")


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
        the first ``units`` hidden units (default: ``active_units``)."""
        m = self._active if units is None else check_units(units, self.n_units, self.units_per_step)
        h = torch.sigmoid(F.linear(x, self.hidden.weight[:m], self.hidden.bias[:m]))
        return F.linear(h, self.output.weight[:, :m], self.bias_for(m))

    def staged_forward(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """Raw scores ``(n, K)`` after each boosting step 1..T (the hidden layer is computed once)."""
        j = self.units_per_step
        h = torch.sigmoid(self.hidden(x))  # (n, T·J)
        scores = self.bias0.expand(x.shape[0], -1).clone()
        for t in range(self.n_steps):
            sl = slice(t * j, (t + 1) * j)
            scores = scores + F.linear(h[:, sl], self.output.weight[:, sl], self.block_bias[t])
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


# ----------------------------------------------------------------------------------- fitting

def _lbfgs(objective, theta: torch.Tensor, max_iter: int, history: int = 10,
           tol_grad: float = 1e-7, tol_change: float = 1e-9) -> torch.Tensor:
    """Minimise ``objective(theta) -> (loss, grad)`` from ``theta`` ``(p,)`` by L-BFGS.

    The search direction uses the compact form of the inverse-Hessian approximation (Byrd, Nocedal
    & Schnabel 1994): ``H = gamma I + [S gamma Y] M [S gamma Y]^T`` with ``M`` built from the
    ``m x m`` products of the last ``history`` steps S and gradient changes Y, so an iteration costs
    a fixed couple of dozen tensor ops and three host syncs whatever ``history`` is;
    ``torch.optim.LBFGS`` loops over the history in Python and syncs on every term. Backtracking
    (Armijo) line search from step 1; a pair is stored only when ``s^T y > 0`` so H stays positive
    definite. Returns the final ``theta``.
    """
    loss, grad = objective(theta)
    s_hist = y_hist = None
    gamma = 1.0
    step = min(1.0, 1.0 / max(float(grad.abs().sum()), 1e-12))   # first step: scaled gradient
    f = float(loss)
    for _ in range(max_iter):
        if s_hist is None:
            direction = -grad
        else:
            sy = s_hist @ y_hist.T                                # (m, m): s_i . y_j
            upper = torch.triu(sy)
            a, b = s_hist @ grad, y_hist @ grad
            u = torch.linalg.solve_triangular(upper, a[:, None], upper=True)[:, 0]
            inner = torch.diagonal(sy) * u + gamma * (y_hist @ (y_hist.T @ u)) - gamma * b
            c_s = torch.linalg.solve_triangular(upper.T, inner[:, None], upper=False)[:, 0]
            direction = -(gamma * grad + s_hist.T @ c_s - gamma * (y_hist.T @ u))
        slope = float(grad @ direction)
        if not slope < 0.0:                      # not a descent direction: restart from -grad
            s_hist = y_hist = None
            direction, slope = -grad, -float(grad @ grad)
        for _ in range(30):
            new_theta = theta + step * direction
            new_loss, new_grad = objective(new_theta)
            new_f = float(new_loss)
            if new_f <= f + 1e-4 * step * slope:
                break
            step *= 0.5
        else:
            break
        s, yv = new_theta - theta, new_grad - grad
        s_y, y_y, g_max = torch.stack([s @ yv, yv @ yv, new_grad.abs().max()]).tolist()  # one sync
        if s_y > 1e-10 * y_y:
            s_hist = s[None] if s_hist is None else torch.cat([s_hist[1 - history:], s[None]])
            y_hist = yv[None] if y_hist is None else torch.cat([y_hist[1 - history:], yv[None]])
            gamma = s_y / y_y
        converged = abs(new_f - f) < tol_change or g_max <= tol_grad
        theta, grad, f, step = new_theta, new_grad, new_f, 1.0
        if converged:
            break
    return theta


def _fit_learner(x: torch.Tensor, r: torch.Tensor, units: int, alpha: float, max_iter: int,
                 gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Fit ``sigmoid(x W1^T + b1) W2^T + b2`` to ``r`` ``(n, K)`` by L2-penalised squared error.

    Objective (scikit-learn's MLPRegressor convention): ``|P - R|^2 / (2 n K) + alpha / (2 n) *
    (|W1|^2 + |W2|^2)`` on residuals scaled to unit RMS; the returned output layer undoes the
    scaling. Returns ``W1 (J, d), b1 (J,), W2 (K, J), b2 (K,)``.
    """
    n, d = x.shape
    k = r.shape[1]
    scale = r.square().mean().sqrt().clamp_min(torch.finfo(r.dtype).tiny)
    target = r / scale

    def glorot(rows: int, cols: int, fan: int) -> torch.Tensor:
        # scikit-learn's initialisation for logistic units: U(-b, b), b = sqrt(2 / (fan_in + fan_out))
        bound = math.sqrt(2.0 / fan)
        return (torch.rand(rows, cols, generator=gen, device=x.device, dtype=x.dtype) * 2 - 1) * bound

    theta = torch.cat([glorot(units, d, d + units).view(-1), glorot(units, 1, d + units).view(-1),
                       glorot(k, units, units + k).view(-1), glorot(k, 1, units + k).view(-1)])
    sizes = [units * d, units, k * units, k]
    lam = alpha / n

    def objective(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w1, b1, w2, b2 = theta.split(sizes)
        w1, w2 = w1.view(units, d), w2.view(k, units)
        h = torch.sigmoid(torch.addmm(b1, x, w1.T))              # (n, J)
        err = torch.addmm(b2, h, w2.T) - target                  # (n, K)
        loss = err.square().sum() / (2 * n * k) + 0.5 * lam * (w1.square().sum() + w2.square().sum())
        g_out = err / (n * k)                                    # dLoss/dP
        dz = (g_out @ w2) * h * (1 - h)                          # (n, J)
        grad = torch.cat([torch.addmm(w1, dz.T, x, beta=lam).view(-1), dz.sum(0),
                          torch.addmm(w2, g_out.T, h, beta=lam).view(-1), g_out.sum(0)])
        return loss, grad

    theta = _lbfgs(objective, theta, max_iter)
    w1, b1, w2, b2 = theta.split(sizes)
    w1, w2 = w1.view(units, d), w2.view(k, units)
    return w1, b1, w2 * scale, b2 * scale


def _cross_entropy(scores: torch.Tensor, y: torch.Tensor) -> float:
    return float((torch.logsumexp(scores, 1) - (y * scores).sum(1)).sum())


def _softmax_step(scores: torch.Tensor, y: torch.Tensor, f: torch.Tensor, iters: int = 20) -> float:
    """argmin over rho of the cross-entropy of ``scores + rho f`` (all ``(n, K)``).

    The loss is convex in rho: Newton's method with the exact second derivative
    ``sum_i <p_i, f_i^2> - <p_i, f_i>^2`` from rho = 0, halving any step that does not lower the
    loss, so every accepted rho lowers it (never diverges). Stops after ``iters`` Newton steps,
    which bounds rho where the data are separable along f and the minimum is at infinity.
    """
    rho, loss = 0.0, _cross_entropy(scores, y)
    for _ in range(iters):
        p = torch.softmax(scores + rho * f, 1)
        grad = float(((p - y) * f).sum())
        pf = (p * f).sum(1)
        curv = float(((p * f * f).sum(1) - pf * pf).sum())
        if not curv > 0.0:
            break
        step = -grad / curv
        for _ in range(30):
            new = _cross_entropy(scores + (rho + step) * f, y)
            if new <= loss:
                break
            step *= 0.5
        else:
            break
        rho, loss = rho + step, new
        if abs(step) <= 1e-6 * max(1.0, abs(rho)):
            break
    return rho


def _squared_step(residual: torch.Tensor, f: torch.Tensor) -> float:
    """argmin over rho of ``|residual - rho f|^2`` (exact)."""
    denom = float(f.square().sum())
    return float((residual * f).sum()) / denom if denom > 0.0 else 0.0


def fit_boosted(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, *, task: str,
                n_classes: int | None = None, n_units: int = 100, units_per_step: int = 5,
                learning_rate: float = 0.5, subsample: float = 1.0, alpha: float = 1.0,
                max_iter: int = 40, random_state: int = 0, device: str | torch.device | None = None,
                return_staged: bool = False, meta: dict | None = None):
    """Train an anytime head by gradient boosting; returns an :class:`AnytimeHead` on ``device``.

    ``x``: ``(n, d)`` features (raw: standardised here, folded into the head). ``y``: class
    indices ``(n,)`` in ``[0, n_classes)`` for ``task="classification"`` (softmax cross-entropy;
    two classes use two softmax outputs), or targets ``(n,)``/``(n, K)`` for ``"regression"``.
    ``n_units`` (T·J) must be a multiple of ``units_per_step`` (J). Each step fits J units to the
    residuals ``y - p`` (or ``y - F``) of a random ``subsample`` of the rows by L-BFGS (``max_iter``
    iterations, L2 penalty ``alpha``), finds rho by a line search on all rows and adds
    ``learning_rate * rho * f``. Seeded by ``random_state``: the same seed on the same device gives
    the same head. With ``return_staged`` also returns the training scores after every step,
    ``(T, n, K)``, accumulated from the unmerged learners (what the merged head must reproduce).
    The folded first layer computes ``W1/s . x + (b1 - W1/s . m)`` in float32: features whose mean
    is many orders of magnitude above their spread lose precision there; centre them first.
    """
    if task not in TASKS:
        raise CompressError(f"task must be one of {TASKS}, got {task!r}")
    if units_per_step < 1 or n_units < units_per_step or n_units % units_per_step:
        raise CompressError(f"n_units ({n_units}) must be a positive multiple of units_per_step "
                            f"({units_per_step})")
    if not 0.0 < learning_rate <= 1.0:
        raise CompressError(f"learning_rate must be in (0, 1], got {learning_rate}")
    if not 0.0 < subsample <= 1.0:
        raise CompressError(f"subsample must be in (0, 1], got {subsample}")
    if alpha < 0.0 or max_iter < 1:
        raise CompressError(f"alpha must be >= 0 and max_iter >= 1, got {alpha} and {max_iter}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    x = torch.as_tensor(x).to(dev, torch.float32)
    if x.ndim != 2 or x.shape[0] < 2:
        raise CompressError(f"features must be (n, d) with n >= 2, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise CompressError("features contain NaN or infinite values")
    y = torch.as_tensor(y).to(dev)
    if y.shape[0] != x.shape[0]:
        raise CompressError(f"features and labels differ in length: {x.shape[0]} rows of features, "
                            f"{y.shape[0]} labels")
    n = x.shape[0]
    if task == "classification":
        if y.ndim != 1 or y.is_floating_point():
            raise CompressError(f"class labels must be integer indices of shape (n,), got "
                                f"{y.dtype} {tuple(y.shape)}")
        k = int(n_classes) if n_classes is not None else int(y.max()) + 1
        if int(y.min()) < 0 or int(y.max()) >= k:
            raise CompressError(f"class indices must be in 0..{k - 1}, got {int(y.min())}..{int(y.max())}")
        present = int(torch.bincount(y, minlength=k).gt(0).sum())
        if present < 2:
            raise CompressError(f"classification needs at least 2 classes in the labels, got {present}")
        target = F.one_hot(y, k).to(torch.float32)
        bias0 = target.mean(0).clamp_min(1.0 / (2 * n)).log()
        bias0 = bias0 - bias0.mean()
    else:
        target = y.to(torch.float32)
        target = target[:, None] if target.ndim == 1 else target
        if target.ndim != 2 or not torch.isfinite(target).all():
            raise CompressError(f"regression targets must be finite, (n,) or (n, K), got {tuple(y.shape)}")
        k = target.shape[1]
        bias0 = target.mean(0)

    mean = x.mean(0)
    std = x.std(0)
    # Constant columns carry nothing: the learners skip them (their first-layer weights stay 0),
    # which also saves their share of every pass over the data (MNIST's blank border pixels).
    varying = std > 1e-6 * std.max().clamp_min(1e-30)
    if not bool(varying.any()):
        raise CompressError(f"all {x.shape[1]} feature columns are constant")
    std = torch.where(varying, std, torch.ones_like(std))
    z = ((x - mean) / std)[:, varying].contiguous()               # (n, d'), d' varying columns

    gen = torch.Generator(device=dev).manual_seed(int(random_state))
    steps = n_units // units_per_step
    rows = max(2, int(round(subsample * n)))
    scores = bias0.expand(n, k).clone()
    blocks, rhos, staged = [], [], []
    for _ in range(steps):
        resid = target - (torch.softmax(scores, 1) if task == "classification" else scores)
        idx = torch.randperm(n, generator=gen, device=dev)[:rows] if rows < n else slice(None)
        w1, b1, w2, b2 = _fit_learner(z[idx], resid[idx], units_per_step, alpha, max_iter, gen)
        f = torch.addmm(b2, torch.sigmoid(torch.addmm(b1, z, w1.T)), w2.T)   # (n, K)
        rho = _softmax_step(scores, target, f) if task == "classification" else _squared_step(resid, f)
        scores = scores + (learning_rate * rho) * f
        blocks.append((w1, b1, w2 * (learning_rate * rho), b2 * (learning_rate * rho)))
        rhos.append(rho)
        if return_staged:
            staged.append(scores)

    w1 = x.new_zeros(n_units, x.shape[1])                        # (T·J, d), on standardised inputs
    w1[:, varying] = torch.cat([b[0] for b in blocks])
    b1 = torch.cat([b[1] for b in blocks])
    # Fold the standardisation into the first layer in float64: W1 (x - m) / s + b1.
    w1_raw = w1.double() / std.double()
    b1_raw = b1.double() - w1_raw @ mean.double()
    info = {"task": task, "learning_rate": learning_rate, "rhos": rhos, "subsample": subsample,
            "alpha": alpha, "max_iter": max_iter, "random_state": int(random_state)}
    info.update(meta or {})
    head = AnytimeHead(w1_raw.float(), b1_raw.float(), torch.cat([b[2] for b in blocks], 1),
                       bias0, torch.stack([b[3] for b in blocks]), units_per_step, info)
    return (head, torch.stack(staged)) if return_staged else head


# --------------------------------------------------------------------------------- estimators

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


# ------------------------------------------------------------------------------ files

def read_labelled_file(path: str | Path, task: str = "classification") -> tuple[list[str], list]:
    """Texts and labels from a ``.jsonl`` (one ``{"text": ..., "label": ...}`` per line) or ``.csv``
    (header ``text,label``) file. Other or missing columns, an empty file, a single class
    (classification) or a non-numeric label (regression) raise a CompressError naming them.
    Labels are returned as written (JSON values; strings for CSV, floats for CSV regression).
    """
    path = Path(path)
    if task not in TASKS:
        raise CompressError(f"task must be one of {TASKS}, got {task!r}")
    if not path.is_file():
        raise CompressError(f"labels file {path} does not exist")
    suffix = path.suffix.lower()
    rows: list[tuple[int, dict]] = []
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    raise CompressError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
                if not isinstance(rec, dict):
                    raise CompressError(f"{path}:{lineno}: expected a JSON object with text and label")
                rows.append((lineno, rec))
    elif suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            for rec in reader:
                if None in rec:
                    raise CompressError(f"{path}:{reader.line_num}: more fields than the header's "
                                        f"{len(reader.fieldnames)}")
                rows.append((reader.line_num, rec))
            header = reader.fieldnames or []
        _check_columns(path, "header", set(header))
    else:
        raise CompressError(f"labels file {path} must end in .jsonl or .csv, got {suffix or 'no suffix'!r}")
    if not rows:
        raise CompressError(f"labels file {path} has no rows")
    texts, labels = [], []
    for lineno, rec in rows:
        _check_columns(path, f"line {lineno}", set(rec))
        text, label = rec["text"], rec["label"]
        if not isinstance(text, str):
            raise CompressError(f"{path}:{lineno}: text must be a string, got {type(text).__name__}")
        if label is None or label == "" or isinstance(label, (list, dict)):
            raise CompressError(f"{path}:{lineno}: label must be a non-empty scalar, got {label!r}")
        if task == "regression":
            try:
                label = float(label)
            except ValueError:
                raise CompressError(f"{path}:{lineno}: regression label {label!r} is not a number") from None
        texts.append(text)
        labels.append(label)
    if task == "classification":
        kinds = {type(v).__name__ for v in labels}
        if len(kinds) > 1:
            raise CompressError(f"labels in {path} mix types ({', '.join(sorted(kinds))})")
        classes = set(labels)
        if len(classes) < 2:
            raise CompressError(f"labels file {path} has a single class {labels[0]!r}; "
                                f"classification needs at least 2")
    return texts, labels


def _check_columns(path: Path, where: str, cols: set) -> None:
    missing, unknown = {"text", "label"} - cols, cols - {"text", "label"}
    if missing or unknown:
        parts = ([f"missing {', '.join(sorted(missing))}"] if missing else []) + (
            [f"unknown {', '.join(sorted(map(str, unknown)))}"] if unknown else [])
        raise CompressError(f"labels file {path} ({where}): columns must be text,label; "
                            f"{'; '.join(parts)}")


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
