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
- The classification line search is bounded: no training score moves by more than ``max_step``
  (16 logits, about where float32 probabilities saturate: e^-16 ~ float32 epsilon) in one step.
  Where the classes are separable along a learner the loss has no minimum and, unbounded, rho ran
  to 1e12 and more on a separable toy set; a step stopped on the bound is reported by a
  ``BoostingStepWarning`` naming it. The rho recorded is the multiplier of the learner's raw output,
  which shrinks with the residuals, so rho itself is large wherever the training loss is near 0.
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

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from ..data import TASKS
from ..errors import CompressError
from .head import AnytimeHead

# The line search's bound on the change of any training score (logit) in one boosting step:
# e^-16 ~ float32 epsilon, so a larger move only saturates probabilities. Exact minima on real data
# move a score by less than this at almost every step; separable directions, whose minimum is at
# infinity, stop here. bench/anytime.py with the bound: every GBNN score within 0.013 of the run
# without it (iris; MNIST 0.918 vs 0.920 with all units, digits 0.975 vs 0.976).
MAX_STEP = 16.0


class BoostingStepWarning(UserWarning):
    """A boosting step's line search ended on its bound (the loss has no minimum along the learner)."""


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


def _softmax_step(scores: torch.Tensor, y: torch.Tensor, f: torch.Tensor, max_step: float = math.inf,
                  iters: int = 20) -> tuple[float, bool]:
    """argmin over rho of the cross-entropy of ``scores + rho f`` (all ``(n, K)``), subject to
    ``|rho| * max|f| <= max_step``: no score of any row moves by more than ``max_step`` (logits).

    The loss is convex in rho: Newton's method with the exact second derivative
    ``sum_i <p_i, f_i^2> - <p_i, f_i>^2`` from rho = 0, each step clipped to the bound and halved
    while it does not lower the loss, so every accepted rho lowers it (never diverges). Returns
    ``(rho, capped)``; ``capped`` is True when rho ended on the bound, i.e. the loss still falls
    there: where the data are separable along f the minimum is at infinity, and without the bound
    rho grows with every Newton step (to 1e12 and more once the residuals are tiny).
    """
    f_max = float(f.abs().max())
    if not f_max > 0.0:
        return 0.0, False
    bound = max_step / f_max
    rho, loss = 0.0, _cross_entropy(scores, y)
    for _ in range(iters):
        p = torch.softmax(scores + rho * f, 1)
        grad = float(((p - y) * f).sum())
        pf = (p * f).sum(1)
        curv = float(((p * f * f).sum(1) - pf * pf).sum())
        if not curv > 0.0:
            break
        step = -grad / curv
        if abs(rho + step) > bound:                  # clip the Newton step to the bound
            step = math.copysign(bound, rho + step) - rho
            if step == 0.0:                          # already on the bound, and the loss falls beyond
                break
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
    return rho, abs(rho) >= bound * (1.0 - 1e-12)


def _squared_step(residual: torch.Tensor, f: torch.Tensor) -> float:
    """argmin over rho of ``|residual - rho f|^2`` (exact)."""
    denom = float(f.square().sum())
    return float((residual * f).sum()) / denom if denom > 0.0 else 0.0


def fit_boosted(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, *, task: str,
                n_classes: int | None = None, n_units: int = 100, units_per_step: int = 5,
                learning_rate: float = 0.5, subsample: float = 1.0, alpha: float = 1.0,
                max_iter: int = 40, max_step: float = MAX_STEP, random_state: int = 0,
                device: str | torch.device | None = None, return_staged: bool = False,
                meta: dict | None = None):
    """Train an anytime head by gradient boosting; returns an :class:`AnytimeHead` on ``device``.

    ``x``: ``(n, d)`` features (raw: standardised here, folded into the head). ``y``: class
    indices ``(n,)`` in ``[0, n_classes)`` for ``task="classification"`` (softmax cross-entropy;
    two classes use two softmax outputs), or targets ``(n,)``/``(n, K)`` for ``"regression"``.
    ``n_units`` (T·J) must be a multiple of ``units_per_step`` (J). Each step fits J units to the
    residuals ``y - p`` (or ``y - F``) of a random ``subsample`` of the rows by L-BFGS (``max_iter``
    iterations, L2 penalty ``alpha``), finds rho by a line search on all rows and adds
    ``learning_rate * rho * f``. Classification bounds the line search: no training row's score
    (logit) moves by more than ``max_step`` in it; a step that ends on that bound (the classes are
    separable along the learner, so the loss has no minimum) is recorded in ``meta["capped_steps"]``
    and reported by one :class:`BoostingStepWarning` per fit naming the step and its rho.
    Regression steps need no bound: rho f is the projection of the residuals onto f, so a step
    moves the scores by at most the residuals' norm. Seeded by ``random_state``: the same seed on the same device gives
    the same head. With ``return_staged`` also returns the training scores after every step,
    ``(T, n, K)``, accumulated from the unmerged learners (what the merged head must reproduce).
    The folded first layer computes ``W1/s . x + (b1 - W1/s . m)`` in float32: features whose mean
    is many orders of magnitude above their spread lose precision there; centre them first.
    """
    if task not in TASKS:
        raise CompressError(f"task must be one of {TASKS}, got {task!r}")
    for name, value in (("n_units", n_units), ("units_per_step", units_per_step), ("max_iter", max_iter)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise CompressError(f"{name} must be an integer, got {value!r}")
    if not max_step > 0.0:
        raise CompressError(f"max_step must be > 0 (the largest change of a score in one step), got {max_step}")
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
    blocks, rhos, staged, capped = [], [], [], []
    for t in range(steps):
        resid = target - (torch.softmax(scores, 1) if task == "classification" else scores)
        idx = torch.randperm(n, generator=gen, device=dev)[:rows] if rows < n else slice(None)
        w1, b1, w2, b2 = _fit_learner(z[idx], resid[idx], units_per_step, alpha, max_iter, gen)
        f = torch.addmm(b2, torch.sigmoid(torch.addmm(b1, z, w1.T)), w2.T)   # (n, K)
        if task == "classification":
            rho, at_cap = _softmax_step(scores, target, f, max_step)
            if at_cap:
                capped.append(t + 1)
        else:
            rho = _squared_step(resid, f)
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
    if capped:
        first = capped[0]
        warnings.warn(
            f"boosting step {first} of {steps} hit the step cap: rho = {rhos[first - 1]:.3g} moves a "
            f"training score by max_step = {max_step:g} and the loss still falls beyond (the classes "
            f"are separable along this learner); {len(capped)} of {steps} steps capped. The scores "
            f"grow at every such step, so the probabilities are overconfident: fewer units, a larger "
            f"alpha or a smaller learning_rate temper them", BoostingStepWarning, stacklevel=2)
    info = {"task": task, "learning_rate": learning_rate, "rhos": rhos, "subsample": subsample,
            "alpha": alpha, "max_iter": max_iter, "random_state": int(random_state)}
    if task == "classification":
        info.update(max_step=max_step, capped_steps=capped)
    info.update(meta or {})
    head = AnytimeHead(w1_raw.float(), b1_raw.float(), torch.cat([b[2] for b in blocks], 1),
                       bias0, torch.stack([b[3] for b in blocks]), units_per_step, info)
    return (head, torch.stack(staged)) if return_staged else head

