"""Gaussians of feature vectors: Ledoit-Wolf covariance, a precision matrix that stays finite when the covariance is
singular, and Mahalanobis distances. Used by the global image score (:mod:`dmdd.models.global_score`) and the
regional texture map (:mod:`dmdd.models.regional`).

Why the precision is built from an eigendecomposition: with N training vectors in D dimensions the sample covariance
has rank at most N - 1, and for N = 2 Ledoit-Wolf's shrinkage is exactly 0, so the covariance is singular. Whether
``torch.linalg.inv`` raises on such a matrix depends on rounding, and so on the CPU and its BLAS kernels; where it did
not raise it returned entries of order 1e33 and the image scores became NaN. Here singularity is decided from the
matrix itself: eigenvalues below ``RTOL`` times the largest are treated as zero (a pseudo-inverse), far above the
rounding noise of a float64 eigendecomposition (~1e-16 relative) and far below any real direction of spread.
"""

from __future__ import annotations

import torch

# eigenvalues below RTOL * the largest one are taken as exactly zero
RTOL = 1e-10


def ledoit_wolf(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mean, shrunk covariance and shrinkage of the rows of ``x`` (N, D), computed in float64.

    The covariance is ``(1 - a) S + a (tr(S) / D) I`` with ``S`` the maximum-likelihood covariance and ``a`` the
    Ledoit-Wolf (2004) estimate ``min(b2, d2) / d2``, ``d2 = ||S - (tr(S) / D) I||_F^2``,
    ``b2 = sum_k ||x_k x_k^T - S||_F^2 / N^2`` over the centred rows ``x_k``.
    """
    x = x.double()
    n, d = x.shape
    loc = x.mean(dim=0)
    xc = x - loc
    s = xc.T @ xc / n
    mu = torch.trace(s) / d
    d2 = ((s - mu * torch.eye(d, dtype=s.dtype, device=s.device)) ** 2).sum()
    # sum_k ||x_k x_k^T - S||^2 = sum_k ||x_k||^4 - 2 sum_k x_k^T S x_k + N ||S||^2, without the N (D, D) products
    sq = (xc**2).sum(dim=1)
    b2 = ((sq**2).sum() - 2 * ((xc @ s) * xc).sum() + n * (s**2).sum()) / n**2
    shrinkage = float(torch.clamp(b2, max=d2) / d2) if d2 > 0 else 1.0
    cov = (1 - shrinkage) * s + shrinkage * mu * torch.eye(d, dtype=s.dtype, device=s.device)
    return loc, cov, shrinkage


def precision(cov: torch.Tensor, rtol: float = RTOL) -> torch.Tensor:
    """The inverse of a symmetric positive semi-definite covariance, computed in float64 from its eigendecomposition;
    directions whose eigenvalue is below ``rtol`` times the largest get zero precision (the pseudo-inverse). A zero
    covariance (one sample, or identical samples) gives a zero precision: every distance is 0."""
    cov = cov.double()
    cov = (cov + cov.T) / 2
    values, vectors = torch.linalg.eigh(cov)
    top = values.max().clamp_min(0)
    keep = values > rtol * top
    inverse = torch.where(keep, 1.0 / torch.where(keep, values, torch.ones_like(values)), torch.zeros_like(values))
    return (vectors * inverse) @ vectors.T


def mahalanobis(z: torch.Tensor, loc: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """(N,) Mahalanobis distances of the rows of ``z`` (N, D) under a mean and a precision matrix."""
    diff = z - loc
    return ((diff @ precision) * diff).sum(dim=1).clamp_min(0).sqrt()


def out_of_fold(z: torch.Tensor, folds: int) -> torch.Tensor:
    """(N,) Mahalanobis distance of each row of ``z`` (N, D) to the Ledoit-Wolf Gaussian of the rows outside its
    fold (row k is in fold ``k % folds``), in float64."""
    z = z.double()
    fold = torch.arange(z.shape[0]) % folds
    out = torch.zeros(z.shape[0], dtype=torch.float64)
    for k in range(folds):
        loc, cov, _ = ledoit_wolf(z[fold != k])
        out[fold == k] = mahalanobis(z[fold == k], loc, precision(cov))
    return out
