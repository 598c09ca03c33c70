"""Least-squares scales for fixed codes: after GPTQ has chosen every code, choose each group's scale
again to minimise GPTQ's own objective tr(ΔW H ΔWᵀ).

GPTQ (with static groups, act-order's default) fixes a group's scale from the *original* weights,
before its updates move them; the codes it then picks fit the moved weights, under a scale chosen
for other ones. With the codes q and zero points z held fixed, the dequantized row is linear in its
scales, ŵ = A s with A (K, G) holding (q − z) on each group's columns, so the best scales solve

    (Aᵀ H A) s = Aᵀ H w        per row: a G × G system (G groups; one scale per row for int8)

Nothing of the storage format changes (codes, zero points and shapes are kept; scales stay
float16), so loading, kernels and exporters take the result unchanged. The refit is kept only where
it lowers the objective after the scales' float16 rounding, so it is never worse on H.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .quant import QuantizedWeight, unpack_int4

# Ridge towards the old scales, relative to the mean diagonal of the normal matrix: keeps a group
# whose codes all sit at the zero point (a singular row of Aᵀ H A) at its old scale.
_RIDGE = 1e-6
# Rows per chunk: the intermediate (rows, K, G) stays under about this many floats.
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


def qparams_of(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scales float16 (N, G), zero points float32 (N, G)) of a packed weight, as GPTQ takes them
    (int4: the stored zero points, 8 when symmetric; int8: zero points None)."""
    if qw.spec.bits == 8:
        return qw.scales, None
    n_groups = qw.scales.shape[1]
    if qw.zeros is None:
        return qw.scales, torch.full(qw.scales.shape, 8.0, device=qw.scales.device)
    return qw.scales, unpack_int4(qw.zeros)[:, :n_groups].float()


@torch.no_grad()
def refit_scales(weight: torch.Tensor, qw: QuantizedWeight, H: torch.Tensor) -> QuantizedWeight:
    """``qw`` with its scales re-solved by least squares on H, codes and zero points kept.

    weight: float (N, K), the layer's original weight; qw: its packed storage (any int4 group,
    either symmetry, or int8 per row); H: (K, K) float32, the layer's Hessian from calibration.
    Returns a QuantizedWeight of the same format, with float16 scales (N, G); ``qw`` itself where
    the refit does not lower tr(ΔW H ΔWᵀ).
    """
    from .gptq import output_error

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
    new = torch.empty_like(old)
    rows = max(1, _CHUNK_FLOATS // max(1, kp * n_groups))
    Hg = Hp.reshape(kp, n_groups, g)
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        Dg = D[r0:r1].reshape(r1 - r0, n_groups, g)
        # P[n, i, h] = Σ_b H[i, (h, b)] · D[n, (h, b)];  M[n, g, h] = Σ_a D[n, (g, a)] · P[n, (g, a), h]
        P = torch.einsum("ihb,nhb->nih", Hg, Dg).reshape(r1 - r0, n_groups, g, n_groups)
        M = torch.einsum("nga,ngah->ngh", Dg, P)
        rhs = (Dg * wH[r0:r1].reshape(r1 - r0, n_groups, g)).sum(-1)  # (R, G)
        lam = _RIDGE * M.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)  # (R,)
        M = M + lam[:, None, None] * torch.eye(n_groups, device=w.device)
        rhs = rhs + lam[:, None] * old[r0:r1]
        new[r0:r1] = torch.linalg.solve(M, rhs[..., None])[..., 0]
    s16 = new.to(qw.scales.dtype)
    bad = ~torch.isfinite(s16.float()) | (s16.float() <= 0)
    s16 = torch.where(bad, qw.scales, s16)
    out = QuantizedWeight(qw.spec, qw.in_features, qw.qweight, s16, qw.zeros)
    return out if output_error(w, out, H) < output_error(w, qw, H) else qw
