"""GPTQ: error-compensating quantization of one linear layer (Frantar et al., 2022).

Round-to-nearest (``compress.quant.quantize``) quantizes every weight on its own. GPTQ quantizes the
columns of W (N, K) one at a time and, after each, moves the rounding error onto the columns not yet
quantized so that the layer's *output* on calibration inputs X stays close: it minimises
‖X Wᵀ − X Ŵᵀ‖² row by row, whose Hessian is H = 2/n · Xᵀ X (K, K). With the upper Cholesky factor
U of H⁻¹ (H⁻¹ = Uᵀ U), quantizing column j with error e = (w_j − ŵ_j) / U_jj is compensated by
W[:, j+1:] −= e ⊗ U[j, j+1:]. Updates are applied lazily: exactly inside a block of ``block_size``
columns, and to the columns after the block in one matrix product when the block is done.

The result is a ``QuantizedWeight`` in exactly the storage format of ``compress.quant`` (see its
docstring): the same tensors, dtypes, shapes, padding and packing as ``quantize`` gives for the same
spec, so QuantLinear, the kernels and ONNX export take it unchanged. Group qparams come from
``quant.int4_qparams`` (int4) or are RTN's per-row scales (int8); the codes are the rounded,
clamped weights under exactly those stored qparams.

Calibration: a ``HessianAccumulator`` per layer collects H from the layer's inputs, typically from a
forward pre-hook (``module.register_forward_pre_hook(acc.pre_hook)``) while calibration batches run.
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .errors import CompressError
from .mse import DEFAULT_GRID, mse_int4_qparams, mse_int8_scales
from .refit import qparams_of, refit_scales
from .quant import QuantizedWeight, QuantSpec, check_finite, dequantize, int4_qparams, pack_int4, quantize_int8

# Each failed Cholesky multiplies the damping by this factor, at most this many times.
_DAMP_GROWTH = 10.0
_DAMP_RETRIES = 4
# The most damping the token rule gives (λ = mean(diag H)): there GPTQ is already close to RTN.
_TOKEN_DAMP_CAP = 1.0


def layer_damp(damp: float, token_damp: float, in_features: int, tokens: int | None) -> float:
    """The damping of one layer: max(damp, token_damp · K / n), at most 1, where K = in_features
    and n = the token rows its H was accumulated from (``HessianAccumulator.n_samples``); ``damp``
    alone when n is unknown (None) or token_damp is 0.

    Why: H is estimated from n tokens of a K-dimensional input, and GPTQ's updates divide by its
    small eigenvalues, the worst estimated where n is small next to K; a ridge that grows with
    K / n is the usual shrinkage for that. Measured, not derived: on MiniLM (6.7k calibration
    tokens, K 384 / 1536, damp 0.01) a planned 5.5-bit model's 1 - cos was 0.00098 on the
    calibration texts and 0.00380 on held-out ones; the rule gives 0.00130 / 0.00341; stories260K
    (33k tokens, K <= 172) stays at the floor (bench/results/peers-cpu-tokendamp-*). Layer by
    layer it is not always better on held-out tokens (on i.i.d. anisotropic Gaussian inputs more
    damping is worse even at n = 1.5 K, bench/results/damp-synthetic-cpu.md), so it is a default
    to measure, not a theorem: token_damp 0 turns it off.
    """
    if not tokens or token_damp == 0:
        return damp
    return max(damp, min(_TOKEN_DAMP_CAP, token_damp * in_features / tokens))


class HessianAccumulator:
    """Running H = 2/n · Σ xᵀx (K, K) float32 over the n real token rows x (K,) of a layer's inputs.

    Kept as a running mean, so H's scale does not depend on how many batches were seen (damping is
    relative to mean(diag H) anyway, but a mean also keeps float32 sums of many batches accurate).
    Padding positions must not count: a padded batch's pad tokens still produce activations, and
    in H they pull the solution towards inputs the model never sees in use. ``add`` takes the
    batch's token mask; ``pre_hook`` uses ``self.mask``, which whoever runs the forward sets to the
    current batch's mask (``collect_hessians`` does it).

    With ``drift``, it also keeps D = 2/n · Σ (x_ref − x) xᵀ (K, K) float32, where x_ref is the same
    token's input to this layer in the full-precision model (``add``'s ``reference``): how far the
    already-quantized layers before it have moved its inputs (``fp_target_weight`` uses it).
    """

    def __init__(self, in_features: int, name: str = "layer", drift: bool = False) -> None:
        self.in_features = in_features
        self.name = name
        self.n_samples = 0  # token rows accumulated (padding excluded)
        self.mask: torch.Tensor | None = None  # bool (B, T) of the batch now running, or None
        self.reference: list[torch.Tensor] = []  # with drift: the fp inputs of the calls to come, in order
        self.drift_free = False  # with drift: the batch now running is its own reference (zero drift)
        self._h: torch.Tensor | None = None
        self.keeps_drift = drift
        self._drift: torch.Tensor | None = None

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None,
            reference: torch.Tensor | None = None) -> None:
        """Accumulate inputs x: (..., K) float16/bfloat16/float32; every leading index is one row.

        mask: None (every row counts) or bool/0-1 (...) with x's leading shape, e.g. (B, T) for x
        (B, T, K): only rows where it is true count, in H and in the normaliser n.
        reference: the full-precision model's inputs for the same tokens, x's shape; required with
        ``drift`` (and only then).
        """
        if x.shape[-1] != self.in_features:
            raise CompressError(
                f"layer {self.name}: Hessian expects inputs with {self.in_features} features, "
                f"got shape {tuple(x.shape)}"
            )
        if (reference is None) == self.keeps_drift:
            raise CompressError(f"layer {self.name}: reference inputs are needed exactly when the drift term is kept")
        if reference is not None and reference.shape != x.shape:
            raise CompressError(
                f"layer {self.name}: reference inputs of shape {tuple(reference.shape)} do not match the "
                f"inputs' {tuple(x.shape)}"
            )
        shape = tuple(x.shape)
        drifted = reference is not None and reference is not x  # the input itself: zero drift
        x = x.detach().reshape(-1, self.in_features)  # (m, K)
        keep = None
        if mask is not None:
            if mask.numel() != x.shape[0]:
                raise CompressError(
                    f"layer {self.name}: token mask of shape {tuple(mask.shape)} ({mask.numel()} positions) "
                    f"does not match inputs of shape {shape} ({x.shape[0]} rows)"
                )
            keep = mask.reshape(-1).to(device=x.device, dtype=torch.bool)
            x = x[keep]
        x = x.float()
        m = x.shape[0]
        if m == 0:
            return
        if self._h is None:
            self._h = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=x.device)
        total = self.n_samples + m
        # H_new = n/(n+m) · H_old + 2/(n+m) · xᵀx  ==  2/(n+m) · Σ_all xᵀx
        self._h.mul_(self.n_samples / total).addmm_(x.T, x.to(self._h.device), alpha=2.0 / total)
        if reference is not None:
            if self._drift is None:
                self._drift = torch.zeros_like(self._h)
            self._drift.mul_(self.n_samples / total)
            if drifted:
                dx = reference.detach().reshape(-1, self.in_features).to(x.device)
                dx = (dx[keep] if keep is not None else dx).float() - x  # (m, K)
                self._drift.addmm_(dx.T.to(self._h.device), x.to(self._h.device), alpha=2.0 / total)
        self.n_samples = total

    def pre_hook(self, module: torch.nn.Module, args: tuple) -> None:
        """``register_forward_pre_hook`` callback: accumulate the module's first positional input
        under ``self.mask`` (None: every position), paired with the next of ``self.reference``
        (with the drift term; the input itself when ``self.drift_free``)."""
        reference = None
        if self.keeps_drift and self.drift_free:
            reference = args[0]
        elif self.keeps_drift:
            if not self.reference:
                raise CompressError(f"layer {self.name}: called more often on the inputs than on the reference inputs")
            reference = self.reference.pop(0)
        self.add(args[0], self.mask, reference)

    @property
    def hessian(self) -> torch.Tensor:
        """H (K, K) float32, on the device of the first inputs added."""
        if self._h is None:
            raise CompressError(
                f"layer {self.name}: no calibration samples reached this layer (0 inputs); "
                f"cannot build its Hessian"
            )
        return self._h

    @property
    def drift(self) -> torch.Tensor | None:
        """D = 2/n · Σ (x_ref − x) xᵀ (K, K) float32 (see the class), or None when it is not kept."""
        if not self.keeps_drift:
            return None
        if self._drift is None:
            raise CompressError(f"layer {self.name}: no calibration samples reached this layer (0 inputs); "
                                f"cannot build its input drift")
        return self._drift


def token_mask(batch: dict) -> torch.Tensor | None:
    """The real-token mask bool (B, T) of a tokenizer batch (its ``attention_mask``), or None.

    None when the batch has no attention mask (causal-LM windows are never padded).
    """
    mask = batch.get("attention_mask")
    if mask is None:
        return None
    if mask.dim() != 2:
        raise CompressError(f"attention_mask must be (batch, tokens), got shape {tuple(mask.shape)}")
    return mask.bool()


@torch.no_grad()
def collect_hessians(block: torch.nn.Module, layers: dict[str, torch.nn.Module],
                     inputs: list[tuple[tuple, dict]], masks: list[torch.Tensor | None] | None = None,
                     prefix: str = "", reference: list[tuple[tuple, dict]] | None = None,
                     ) -> dict[str, HessianAccumulator]:
    """H of every layer in ``layers`` (local name -> nn.Linear or Conv1D inside ``block``) from one pass.

    inputs: the block's calibration inputs, (args, kwargs) per batch; masks: per batch, the batch's
    token mask bool (B, T) (``token_mask``) or None, aligned with inputs; None for all: no padding.
    Each layer's input (B, T, K) is accumulated on the batch's real tokens only.
    reference: the same batches as the full-precision model feeds this block (walk_blocks'
    ``reference``), or None. With it, each accumulator also keeps its drift term (how the quantized
    blocks before this one moved the layer's inputs), from a second pass of the still unquantized
    block on each reference batch; batches where the two streams are one object add zero drift.
    """
    if masks is not None and len(masks) != len(inputs):
        raise CompressError(f"collect_hessians: {len(masks)} token masks for {len(inputs)} input batches")
    if reference is not None and len(reference) != len(inputs):
        raise CompressError(f"collect_hessians: {len(reference)} reference batches for {len(inputs)} input batches")
    # K: nn.Linear's in_features; transformers' Conv1D stores its weight as (K, N).
    accs = {name: HessianAccumulator(layer.in_features if isinstance(layer, torch.nn.Linear) else layer.weight.shape[0],
                                     prefix + name, drift=reference is not None) for name, layer in layers.items()}

    def remember(name: str):
        def hook(_module, args):
            accs[name].reference.append(args[0])
        return hook

    handles = []
    try:
        for i, (args, kwargs) in enumerate(inputs):
            if reference is not None:
                ref_args, ref_kwargs = reference[i]
                same = ref_args is args and ref_kwargs is kwargs  # no quantized block before this one yet
                for acc in accs.values():
                    acc.drift_free = same
                if not same:
                    handles = [layer.register_forward_pre_hook(remember(name)) for name, layer in layers.items()]
                    block(*ref_args, **ref_kwargs)
                    for h in handles:
                        h.remove()
            handles = [layer.register_forward_pre_hook(accs[name].pre_hook) for name, layer in layers.items()]
            for acc in accs.values():
                acc.mask = masks[i] if masks is not None else None
            block(*args, **kwargs)
            for h in handles:
                h.remove()
            handles = []
            leftover = [acc.name for acc in accs.values() if acc.reference]
            if leftover:
                raise CompressError(f"layer {leftover[0]}: its reference inputs and inputs were not called alike")
    finally:
        for h in handles:
            h.remove()
        for acc in accs.values():
            acc.mask = None
            acc.reference = []
            acc.drift_free = False
    return accs


def fp_target_weight(weight: torch.Tensor, H: torch.Tensor, drift: torch.Tensor, alpha: float,
                     damp: float, name: str = "layer") -> torch.Tensor:
    """The weight GPTQ should aim at when its inputs have drifted: (N, K) float32.

    GPTQ fits ‖X Wᵀ − X Ŵᵀ‖² on the layer's inputs X as the quantized blocks before it produce them;
    what matters is the full-precision model's output, X_ref Wᵀ (GPTQv2 / GPTAQ's "asymmetric
    calibration", Li et al. 2025). With H = 2/n XᵀX and D = 2/n (X_ref − X)ᵀX (K, K) (the
    accumulator's ``drift``), ‖X Ŵᵀ − X_ref Wᵀ‖² equals tr((Ŵ − W*) H (Ŵ − W*)ᵀ) plus a constant for
    W* = W + W D H⁻¹, so GPTQ (and the MSE search and refit, which all measure against the weight
    they are given, on H) runs unchanged on W*. Here H⁻¹ is (H + λI)⁻¹, λ = damp · mean(diag H)
    (a ridge that pulls W* towards W, not towards zero), and only ``alpha`` of the step is taken:
    the full step fits the calibration tokens' drift exactly and measured worse end to end (MiniLM
    int4 g32 1 − cos 0.0294 vs 0.0095 without, 0.0087 at 0.25; bench/results/peers-cpu-fptarget-minilm.md),
    as GPTAQ also scales its term (by 0.25).
    weight (N, K) float, H / drift (K, K) float32; alpha in [0, 1].
    """
    W = weight.detach().float()
    if alpha == 0 or not drift.any():  # no drift (the first quantized block): W itself, no solve
        return W
    H = H.to(device=W.device, dtype=torch.float32)
    lam = damp * H.diagonal().mean()
    L, info = torch.linalg.cholesky_ex(H + lam * torch.eye(H.shape[0], dtype=H.dtype, device=H.device))
    if info != 0:
        raise CompressError(f"layer {name}: the damped Hessian is not positive definite (damp {damp:g}); "
                            f"cannot aim at the full-precision outputs")
    shift = torch.cholesky_solve((W @ drift.to(W.device)).T, L).T  # W D (H + λI)⁻¹, (N, K)
    return W + alpha * shift


def _check_inputs(weight: torch.Tensor, H: torch.Tensor, spec: QuantSpec, damp: float,
                  block_size: int, name: str) -> None:
    if weight.dim() != 2:
        raise CompressError(f"layer {name}: weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    if spec.bits not in (4, 8):
        raise CompressError(f"layer {name}: GPTQ quantizes to 4 or 8 bits, got bits {spec.bits}")
    check_finite(weight, name)
    k = weight.shape[1]
    if tuple(H.shape) != (k, k):
        raise CompressError(
            f"layer {name}: Hessian shape {tuple(H.shape)} does not match weight shape "
            f"{tuple(weight.shape)} (expected ({k}, {k}))"
        )
    bad = ~torch.isfinite(H)
    if bad.any():
        raise CompressError(f"layer {name}: Hessian has {int(bad.sum())} non-finite values (NaN/Inf)")
    if not (H.diagonal() > 0).any():
        raise CompressError(
            f"layer {name}: Hessian diagonal is all zero (no calibration samples, or all inputs zero)"
        )
    if not damp >= 0:
        raise CompressError(f"layer {name}: damp must be >= 0, got {damp}")
    if block_size < 1:
        raise CompressError(f"layer {name}: block_size must be >= 1, got {block_size}")


def _inverse_cholesky(H: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor U (K, K) of (H + λI)⁻¹, λ = damp · mean(diag H); more damping on failure."""
    mean_diag = H.diagonal().mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    # damp 0 cannot grow by multiplication; its first retry uses 1e-4 of the mean diagonal.
    tries = [damp] + [max(damp, 1e-5) * _DAMP_GROWTH**r for r in range(1, _DAMP_RETRIES + 1)]
    for d in tries:
        L, info = torch.linalg.cholesky_ex(H + d * mean_diag * eye)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0:
                if d != damp:
                    warnings.warn(
                        f"layer {name}: Hessian not positive definite with damp {damp:g}; "
                        f"used damp {d:g} instead", stacklevel=3
                    )
                return U
    raise CompressError(f"layer {name}: Cholesky of the damped Hessian failed even with damp {tries[-1]:g}")


def gptq_quantize(
    weight: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    name: str = "layer",
    static_groups: bool | None = None,
    mse: bool = False,
    mse_grid: Sequence[float] = DEFAULT_GRID,
    refit: int = 0,
) -> QuantizedWeight:
    """Quantize weight (N, K) float to ``spec`` with GPTQ, given H (K, K) float32 from its inputs.

    Returns a QuantizedWeight identical in format to ``quant.quantize(weight, spec)``.
    - Dead inputs (H_jj == 0) carry no signal: their weight columns are set to zero, H_jj to 1.
    - damp: λ = damp · mean(diag H) is added to H's diagonal (retried larger, with a warning, if the
      Cholesky fails; CompressError naming ``name`` if it still fails).
    - act_order: columns are processed in order of decreasing H_jj (the inputs carrying the most
      signal first, while the most columns remain to absorb their error).
    - static_groups (default: act_order): all group qparams (int4) are computed up front from the
      original weights, and each column is quantized with its own group's qparams whatever order it
      is reached in (GPTQ's "static groups"; groups stay contiguous in K, as the storage format
      needs). False: a group's qparams are computed when its first column is reached, from its
      *current* weights (already moved by the errors of earlier columns), as in the GPTQ paper;
      only possible in natural order. int8 always uses per-row scales of the original weights.
    - mse: also run GPTQ with qparams from the clip-ratio search of ``compress.mse`` (error weighted
      by diag H, over ``mse_grid``) and keep, for this layer, whichever result has the smaller
      objective tr(ΔW H ΔWᵀ) (min-max on ties): never worse than min-max on H, twice the time.
      The format is unchanged.
    - refit: rounds of alternating scales and codes, each kept only where it lowers the objective:
      re-solve every group's scale by least squares on H with the codes fixed (compress.refit),
      then (from the second round on) run GPTQ again under those scales and zero points, which
      picks codes for them. 0: off; each round after the first costs one more GPTQ run. int4
      only (int8 gains < 0.3 %). The format is unchanged.
    - Padding (int4, K not a multiple of g): only the K real columns are processed; a group's qparams
      see its zero padding (which never changes them), and the padded codes are the zero point, so
      padded columns dequantize to exact zeros, as with ``quantize``.
    """
    _check_inputs(weight, H, spec, damp, block_size, name)
    static = act_order if static_groups is None else static_groups
    if act_order and not static:
        raise CompressError(
            f"layer {name}: act_order needs static groups (static_groups true): a group's columns are "
            f"not reached together in activation order, so its qparams cannot wait for them"
        )
    run = functools.partial(_gptq, weight, H, spec, damp, block_size, act_order, static, name, mse_grid)
    plain = run(mse=False)
    if not mse:
        return _alternate(weight, H, plain, run, refit)
    # Clipped qparams are chosen before GPTQ moves the weights; its updates can then push later
    # columns past a clipped range (measured on MiniLM g32 with act-order: worse on 1/3 of the
    # layers). Keep the clip search only where it lowers the layer's GPTQ objective on H.
    searched = run(mse=True)
    best = searched if output_error(weight, searched, H) < output_error(weight, plain, H) else plain
    return _alternate(weight, H, best, run, refit)


def _alternate(weight: torch.Tensor, H: torch.Tensor, best: QuantizedWeight, run, rounds: int) -> QuantizedWeight:
    """``rounds`` of scale refits and GPTQ re-runs under the refit qparams (see gptq_quantize's
    ``refit``), starting from ``best``; stops at the first round that does not lower the objective."""
    if rounds < 1 or best.spec.bits == 8:
        # int8's one scale per row is refit for < 0.3 % of the objective, at the price of a full
        # (N, K) x (K, K) product (bench/results/refit-cost-cpu.md): not worth it.
        return best
    best = refit_scales(weight, best, H)
    if rounds == 1:  # the default: no objective to compare against
        return best
    err = output_error(weight, best, H)
    for _ in range(rounds - 1):
        cand = refit_scales(weight, run(mse=False, fixed=qparams_of(best)), H)
        cand_err = output_error(weight, cand, H)
        if not cand_err < err:
            break
        best, err = cand, cand_err
    return best


def output_error(weight: torch.Tensor, qw: QuantizedWeight, H: torch.Tensor) -> float:
    """GPTQ's objective tr(ΔW H ΔWᵀ), ΔW = weight − dequantize(qw): weight (N, K), H (K, K) float32.

    Proportional to the mean squared output error ‖X ΔWᵀ‖² on the calibration inputs.
    """
    d = weight.detach().float() - dequantize(qw)
    H = H.to(device=d.device, dtype=torch.float32)
    return float(((d @ H) * d).sum())


def _gptq(weight: torch.Tensor, H: torch.Tensor, spec: QuantSpec, damp: float, block_size: int,
          act_order: bool, static: bool, name: str, mse_grid: Sequence[float], mse: bool,
          fixed: tuple[torch.Tensor, torch.Tensor] | None = None) -> QuantizedWeight:
    """The GPTQ pass of ``gptq_quantize`` with its options resolved (inputs already checked).
    fixed: int4 (scales fp16 (N, G), zero points (N, G)) to quantize under instead of computing them."""
    n, k = weight.shape
    device = weight.device
    W = weight.detach().to(torch.float32).clone()  # (N, K)
    H = H.detach().to(device=device, dtype=torch.float32).clone()  # (K, K)

    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    g = spec.effective_group(k) if spec.bits == 4 else k
    kp = spec.padded_in_features(k)
    n_groups = kp // g
    # Column importance for the MSE search: diag H, zero on padding (which is exact anyway).
    col_w = F.pad(H.diagonal().clone(), (0, kp - k)).reshape(n_groups, g) if spec.bits == 4 else H.diagonal()

    def qparams(cols: torch.Tensor, grp: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(scales fp16, zeros) (N, G') of weights (N, G', g) in groups ``grp``."""
        if mse:
            return mse_int4_qparams(cols, spec.symmetric, col_w[grp], mse_grid)
        return int4_qparams(cols, spec.symmetric)

    if spec.bits == 8:
        scales = mse_int8_scales(W, H.diagonal(), mse_grid) if mse else quantize_int8(W).scales  # (N, 1)
        zeros = torch.zeros(n, 1, device=device)
        qmin, qmax = -128, 127
    else:
        scales = torch.empty(n, n_groups, dtype=torch.float16, device=device)
        zeros = torch.empty(n, n_groups, device=device)
        qmin, qmax = 0, 15
        if fixed is not None:
            scales, zeros = fixed
        elif static:
            scales, zeros = qparams(F.pad(W, (0, kp - k)).reshape(n, n_groups, g), slice(None))

    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
    else:
        perm = torch.arange(k, device=device)
    dynamic = spec.bits == 4 and not static and fixed is None
    W = W[:, perm]
    U = _inverse_cholesky(H[perm][:, perm], damp, name)  # (K, K) upper
    group_of = (perm // g).tolist()  # group of each column, in processing order (no GPU syncs)

    Q = torch.empty(n, k, device=device)  # codes, in processing order
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()  # (N, B) exact current weights of this block
        E1 = torch.zeros_like(W1)  # (N, B) scaled errors, for the lazy update of later columns
        U1 = U[i1:i2, i1:i2]
        for j in range(i2 - i1):
            c = i1 + j
            grp = group_of[c]
            if dynamic and c == grp * g:
                # Current weights of the group: this block's from W1; columns past the block have
                # not yet received this block's updates, so apply them here (without storing).
                end = min(c + g, k)
                cur = W1[:, j : j + end - c]
                if end > i2:
                    later = W[:, i2:end] - E1 @ U[i1:i2, i2:end]
                    cur = torch.cat((cur, later), dim=1)
                cur = F.pad(cur, (0, g - cur.shape[1]))  # zero padding changes no qparam
                s, z = qparams(cur[:, None, :], slice(grp, grp + 1))
                scales[:, grp], zeros[:, grp] = s[:, 0], z[:, 0]
            s = scales[:, grp].float()
            z = zeros[:, grp]
            w = W1[:, j]
            q = torch.clamp(torch.round(w / s) + z, qmin, qmax)
            Q[:, c] = q
            err = (w - (q - z) * s) / U1[j, j]
            W1[:, j + 1 :] -= err[:, None] * U1[j, j + 1 :][None, :]
            E1[:, j] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]

    Q = Q[:, torch.argsort(perm)]  # back to the original column order
    if spec.bits == 8:
        return QuantizedWeight(spec, k, Q.to(torch.int8), scales)
    pad_codes = zeros[:, -1:].expand(n, kp - k)  # padding lies in the last group
    qweight = pack_int4(torch.cat((Q, pad_codes), dim=1).to(torch.uint8))
    packed_zeros = None
    if not spec.symmetric:
        z8 = zeros.to(torch.uint8)
        packed_zeros = pack_int4(F.pad(z8, (0, z8.shape[1] % 2)))
    return QuantizedWeight(spec, k, qweight, scales, packed_zeros)
