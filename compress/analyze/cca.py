"""Ridge-regularised canonical correlation analysis in torch (float64).

The first canonical correlation of X (N, dx) and Y (N, dy) is the largest singular value of
Cxx^{-1/2} Cxy Cyy^{-1/2}, with C the sample covariances. Ridge: Cxx + λ I with λ = ridge × the
mean variance of X (so ``ridge`` is scale-free), which keeps the whitening defined when N <= d
(there plain CCA is 1 for any X, Y: with no more samples than dimensions some direction of each
fits the other exactly). ridge = 0 is plain CCA and needs N > d.

Whitening uses the Cholesky factor of the regularised covariance (a d x d matrix: O(d²) memory per
representation); Z = X_c L^{-T} then has Zᵀ Z / (N-1) ≈ I and the whitened cross-covariance is
Z_xᵀ Z_y / (N-1). For many pairs each Z is first reduced to an (N, min(N, d)) basis B with
B Bᵀ = Z Zᵀ, so a pair costs one SVD of a min(N, dx) x min(N, dy) matrix.
"""
from __future__ import annotations

import torch

from ..errors import CompressError


def whitened_basis(x: torch.Tensor, ridge: float, name: str = "representation") -> torch.Tensor:
    """Centered, whitened samples in a reduced basis.

    x: float (N, d), N >= 2  ->  float64 (N, min(N, d)) B with B Bᵀ = Z Zᵀ (see module docstring).
    """
    n, d = x.shape
    if n < 2:
        raise CompressError(f"canonical correlation needs at least 2 samples, {name} has {n}")
    x = x.double()
    x = x - x.mean(0)
    cov = x.T @ x / (n - 1)  # (d, d)
    lam = ridge * cov.diagonal().mean()
    chol, info = torch.linalg.cholesky_ex(cov + lam * torch.eye(d, dtype=cov.dtype, device=cov.device))
    if info.item() != 0 or cov.diagonal().sum() == 0:
        if cov.diagonal().sum() == 0:
            raise CompressError(f"{name} is the same for every calibration sample: no correlation is defined")
        raise CompressError(f"{name}: covariance of {n} samples in {d} dimensions is singular; "
                            f"use ridge > 0 (got {ridge}) or more than {d} samples")
    z = torch.linalg.solve_triangular(chol, x.T, upper=False).T  # (N, d): x L^{-T}
    if d <= n:
        return z
    u, s, _ = torch.linalg.svd(z, full_matrices=False)  # (N, N), (N,)
    return u * s


def correlation_from_bases(bx: torch.Tensor, by: torch.Tensor) -> float:
    """First canonical correlation from two whitened bases of the same N samples (whitened_basis)."""
    n = bx.shape[0]
    return min(1.0, torch.linalg.svdvals(bx.T @ by)[0].item() / (n - 1))


def first_canonical_correlation(x: torch.Tensor, y: torch.Tensor, ridge: float = 0.0) -> float:
    """First canonical correlation of x (N, dx) and y (N, dy), rows paired, ridge as above."""
    if x.shape[0] != y.shape[0]:
        raise CompressError(f"canonical correlation needs paired samples: {x.shape[0]} vs {y.shape[0]} rows")
    return correlation_from_bases(whitened_basis(x, ridge, "x"), whitened_basis(y, ridge, "y"))


def correlation_matrix(reps: dict[str, torch.Tensor], ridge: float) -> torch.Tensor:
    """Pairwise first canonical correlations of named representations, each (N, d_i), same N.

    Returns float64 (U, U) in the order of ``reps``, ones on the diagonal.
    """
    bases = [whitened_basis(x, ridge, name) for name, x in reps.items()]
    u = len(bases)
    rho = torch.eye(u, dtype=torch.float64)
    for i in range(u):
        for j in range(i + 1, u):
            rho[i, j] = rho[j, i] = correlation_from_bases(bases[i], bases[j])
    return rho
