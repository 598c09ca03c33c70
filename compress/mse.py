"""MSE-optimal scales: a clip-ratio grid search per int4 group or per int8 row.

Min-max scales (``quant.int4_qparams``, ``quant.quantize_int8``) spend code levels on a group's
extreme weights; shrinking the range by a ratio r < 1 clips those few weights but rounds all the
others more finely, and for most groups some r in [0.7, 1] gives a smaller reconstruction error.
The search tries every ratio of a grid (1.0 always included, and kept on ties) and keeps, per group
(or per row for int8), the one with the smallest error

    err(r) = Σ_j d_j · (w_j − ŵ_j(r))²     over the group's columns j,

where d (K,) is the per-input-column importance: diag(H) of the layer's Hessian when one exists
(the diagonal of the output error ‖X ΔWᵀ‖²), all ones for plain MSE (RTN without calibration).

The result is in exactly the storage format of ``compress.quant``: a clipped range is the min-max
range of the weights multiplied by r, so ``int4_qparams(r · groups)`` gives its float16 scales and
4-bit zero points (and int8 scales ``max|r · w| / 127``), and the codes are rounded and clamped
under those stored qparams. Loading, the kernels and export therefore take it unchanged.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .errors import CompressError
from .quant import QuantizedWeight, QuantSpec, check_finite, int4_qparams, pack_int4, quantize_int8

# Ratios 1.00, 0.99, ..., 0.70: measured on MiniLM and stories260K, the chosen ratios stay above
# 0.75 for int4 groups (rarer below), so the grid's end costs little and bounds the clipping.
DEFAULT_GRID: tuple[float, ...] = tuple(round(1.0 - 0.01 * i, 2) for i in range(31))


def _check_grid(grid: Sequence[float]) -> list[float]:
    ratios = [float(r) for r in grid]
    if not ratios or any(not 0.0 < r <= 1.0 for r in ratios):
        raise CompressError(f"MSE clip ratios must lie in (0, 1], got {list(grid)}")
    # 1.0 first: min-max is the incumbent, replaced only by a strictly smaller error.
    return [1.0] + [r for r in ratios if r != 1.0]


def _column_weights(d: torch.Tensor | None, k: int, device) -> torch.Tensor:
    if d is None:
        return torch.ones(k, device=device)
    if d.shape != (k,):
        raise CompressError(f"column importance must have shape ({k},), got {tuple(d.shape)}")
    if not torch.isfinite(d).all() or (d < 0).any():
        raise CompressError("column importance (diag H) must be finite and >= 0")
    return d.to(device=device, dtype=torch.float32)


def mse_int4_qparams(groups: torch.Tensor, symmetric: bool, col_weights: torch.Tensor | None = None,
                     grid: Sequence[float] = DEFAULT_GRID) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip-searched scales and zero points of grouped weights, in ``int4_qparams``' format.

    groups: float32 (N, G, g); col_weights: None or float (G, g) / (g,) importance of each column
    (diag H, reshaped like the groups; zero on padding). Returns scales float16 (N, G) and zeros
    float32 (N, G) (integers in [0, 15]); with grid (1.0,) exactly ``int4_qparams(groups)``.
    """
    ratios = _check_grid(grid)
    groups = groups.float()
    d = torch.ones(groups.shape[-1], device=groups.device) if col_weights is None else col_weights.float()
    best_err = best_s = best_z = None
    for r in ratios:
        s, z = int4_qparams(groups * r, symmetric)
        sf = s.float()[..., None]
        q = torch.clamp(torch.round(groups / sf) + z[..., None], 0, 15)
        err = (((q - z[..., None]) * sf - groups).square() * d).sum(-1)  # (N, G)
        if best_err is None:
            best_err, best_s, best_z = err, s, z
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return best_s, best_z


def mse_int8_scales(weight: torch.Tensor, col_weights: torch.Tensor | None = None,
                    grid: Sequence[float] = DEFAULT_GRID) -> torch.Tensor:
    """Clip-searched per-row int8 scales: weight float (N, K), col_weights None or (K,) -> float16 (N, 1)."""
    ratios = _check_grid(grid)
    w = weight.detach().float()
    d = _column_weights(col_weights, w.shape[1], w.device)
    best_err = best_s = None
    for r in ratios:
        s = quantize_int8(w * r).scales  # (N, 1) float16: max|r w| / 127, zeros stored as 1.0
        q = torch.clamp(torch.round(w / s.float()), -128, 127)
        err = ((q * s.float() - w).square() * d).sum(-1, keepdim=True)  # (N, 1)
        if best_err is None:
            best_err, best_s = err, s
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
    return best_s


def mse_quantize(weight: torch.Tensor, spec: QuantSpec, col_weights: torch.Tensor | None = None,
                 grid: Sequence[float] = DEFAULT_GRID, name: str = "weight") -> QuantizedWeight:
    """Round to nearest under clip-searched qparams: weight float (N, K) -> QuantizedWeight.

    Identical in format to ``quant.quantize(weight, spec)`` (tensors, dtypes, shapes, padding,
    packing). col_weights: None (plain MSE) or float (K,) column importance, e.g. diag(H).
    """
    check_finite(weight, name)
    n, k = weight.shape
    d = _column_weights(col_weights, k, weight.device)
    if spec.bits == 8:
        w = weight.detach().float()
        scales = mse_int8_scales(w, d, grid)
        q = torch.clamp(torch.round(w / scales.float()), -128, 127).to(torch.int8)
        return QuantizedWeight(spec, k, q, scales)
    if spec.bits != 4:
        raise CompressError(f"layer {name}: bits {spec.bits} is not a quantized format")
    kp, g = spec.padded_in_features(k), spec.effective_group(k)
    groups = F.pad(weight.detach().float(), (0, kp - k)).reshape(n, kp // g, g)
    dg = F.pad(d, (0, kp - k)).reshape(kp // g, g)  # padding weighs nothing (it is exact anyway)
    scales, zeros = mse_int4_qparams(groups, spec.symmetric, dg, grid)
    q = torch.clamp(torch.round(groups / scales.float()[..., None]) + zeros[..., None], 0, 15)
    qweight = pack_int4(q.reshape(n, kp).to(torch.uint8))
    packed_zeros = None
    if not spec.symmetric:
        z8 = zeros.to(torch.uint8)
        packed_zeros = pack_int4(F.pad(z8, (0, z8.shape[1] % 2)))
    return QuantizedWeight(spec, k, qweight, scales, packed_zeros)


def weighted_error(weight: torch.Tensor, approx: torch.Tensor, col_weights: torch.Tensor | None = None) -> float:
    """Σ_n Σ_j d_j (W − Ŵ)²_nj: weight, approx float (N, K), col_weights None (all ones) or (K,)."""
    diff = (weight.detach().float() - approx.detach().float()).square()
    d = _column_weights(col_weights, weight.shape[1], weight.device)
    return float((diff * d).sum())
