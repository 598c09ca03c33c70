"""Least-squares scales for fixed codes: after GPTQ has chosen every code, choose each group's scale
again to minimise GPTQ's own objective tr(ΔW H ΔWᵀ).

GPTQ (with static groups, act-order's default) fixes a group's scale from the *original* weights,
before its updates move them; the codes it then picks fit the moved weights, under a scale chosen
for other ones. With the codes q and zero points z held fixed, the dequantized row is linear in its
scales, ŵ = A s with A (K, G) holding (q − z) on each group's columns, so the best scales solve

    (Aᵀ H A) s = Aᵀ H w        per row: a G × G system (G groups; one scale per row for int8)

Nothing of the storage format changes (codes, zero points and shapes are kept; scales stay
float16), so loading, kernels and exporters take the result unchanged. A row keeps its new scales
only where they lower its objective after float16 rounding, so the refit is never worse on H.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .quant import QuantizedWeight, unpack_int4

# Ridge towards the old scales, relative to the mean diagonal of the normal matrix: keeps a group
# whose codes all sit at the zero point (a singular row of Aᵀ H A) at its old scale.
_RIDGE = 1e-6
# Rows per chunk: the intermediate (rows, K) stays under about this many floats.
_CHUNK_FLOATS = 1 << 25


def codes_minus_zero(qw: QuantizedWeight) -> torch.Tensor:
    """(q − z) as float32 (N, Kp) of a packed weight: Kp = K padded to whole groups for int4 (the
    padding's codes equal their zero point, so its entries are 0); Kp = K for int8 (z = 0)."""
    if qw.spec.bits == 8:
        return qw.qweight.float()
    q = unpack_int4(qw.qweight).float()  # (N, Kp)
    _, z = qparams_of(qw)
    g = q.shape[1] // z.shape[1]
    return q - z.repeat_interleave(g, dim=1)


def qparams_of(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales float16 (N, G), zero points float32 (N, G)) of a packed int4 weight, as GPTQ takes
    them: the stored zero points, 8 when symmetric."""
    n_groups = qw.scales.shape[1]
    if qw.zeros is None:
        return qw.scales, torch.full(qw.scales.shape, 8.0, device=qw.scales.device)
    return qw.scales, unpack_int4(qw.zeros)[:, :n_groups].float()


@torch.no_grad()
def refit_scales(weight: torch.Tensor, qw: QuantizedWeight, H: torch.Tensor) -> QuantizedWeight:
    """``qw`` with its scales re-solved by least squares on H, codes and zero points kept.

    weight: float (N, K), the layer's original weight; qw: its packed storage (any int4 group,
    either symmetry, or int8 per row); H: (K, K) float32 (symmetric), the layer's Hessian from
    calibration. Returns a QuantizedWeight of the same format with float16 scales (N, G): a row
    takes its new scales only where they lower its part of tr(ΔW H ΔWᵀ) after float16 rounding.
    Cost: about three (N, K) x (K, K) products.
    """
    w = weight.detach().float()
    n, k = w.shape
    H = H.to(device=w.device, dtype=torch.float32)
    D = codes_minus_zero(qw)  # (N, Kp)
    kp = D.shape[1]
    n_groups = qw.scales.shape[1]
    g = kp // n_groups
    Hp = F.pad(H, (0, kp - k, 0, kp - k))  # padding columns carry D = 0: no effect
    wH = F.pad(w @ H, (0, kp - k))  # (N, Kp)
    old = qw.scales.float()
    scales = qw.scales.clone()
    rows = max(1, _CHUNK_FLOATS // kp)
    eye = torch.eye(n_groups, device=w.device)
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        Dg = D[r0:r1].reshape(r1 - r0, n_groups, g)
        # M = Aᵀ H A per row: block (a, b) of M[n] is D[n, a] · H_ab · D[n, b]; M is symmetric, so
        # one product per group a against the groups b >= a.
        M = torch.empty(r1 - r0, n_groups, n_groups, device=w.device)
        for a in range(n_groups):
            part = Dg[:, a, :] @ Hp[a * g : (a + 1) * g, a * g :]  # (R, (G - a) g)
            M[:, a, a:] = (part.reshape(r1 - r0, n_groups - a, g) * Dg[:, a:, :]).sum(-1)
            M[:, a + 1 :, a] = M[:, a, a + 1 :]
        rhs = (Dg * wH[r0:r1].reshape(r1 - r0, n_groups, g)).sum(-1)  # Aᵀ H w: (R, G)
        lam = _RIDGE * M.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)  # (R,)
        s = torch.linalg.solve(M + lam[:, None, None] * eye, (rhs + lam[:, None] * old[r0:r1])[..., None])[..., 0]
        s16 = s.to(qw.scales.dtype)
        ok = torch.isfinite(s16.float()).all(1) & (s16.float() > 0).all(1)
        s16 = torch.where(ok[:, None], s16, qw.scales[r0:r1])
        # A row's objective is sᵀ M s − 2 sᵀ rhs + wᵀ H w: compare old and new without the constant.
        Md, rd = M.double(), rhs.double()

        def objective(sc: torch.Tensor) -> torch.Tensor:
            sc = sc.double()
            return (sc[:, None, :] @ Md @ sc[:, :, None])[:, 0, 0] - 2 * (sc * rd).sum(1)

        better = objective(s16) < objective(qw.scales[r0:r1])
        scales[r0:r1] = torch.where(better[:, None], s16, qw.scales[r0:r1])
    return QuantizedWeight(qw.spec, qw.in_features, qw.qweight, scales, qw.zeros)
