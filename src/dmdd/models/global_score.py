"""An image-level score from the distribution of pooled teacher features (a deviation from DESIGN §6, see
docs/deviations.md).

DMDD's maps compare student and teacher position by position with a cosine distance, which is blind to defects that
change a whole image a little rather than a part of it a lot (magnetic_tile's "uneven" tiles: image AUROC 63.8 from
the maps). Each teacher stage's features are pooled over all positions (per-channel mean, and with ``mean_std`` the
per-channel standard deviation too) and scored by their Mahalanobis distance to a Gaussian fitted on the training
images, with Ledoit-Wolf shrinkage (Rippel et al., "Modeling the Distribution of Normal Data in Pre-Trained Deep
Features for Anomaly Detection", ICPR 2020); the distances of the four stages are summed. The teacher is frozen, so
the fit needs only the training images and no training.

The image score is then the larger of two standardised scores: the map's own score and this one, each minus its
mean over held-out good images and divided by its standard deviation there. Until those statistics are fitted
(``fitted`` is 0) the image score is the map's score unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

POOLINGS = ("mean", "mean_std")


def pool(features: list[torch.Tensor], pooling: str) -> list[torch.Tensor]:
    """Per stage, (B, C, H, W) -> (B, C) channel means, or (B, 2C) means and standard deviations over positions."""
    out = []
    for f in features:
        f = f.float()
        mean = f.mean(dim=(2, 3))
        if pooling == "mean_std":
            var = ((f - mean[:, :, None, None]) ** 2).mean(dim=(2, 3))
            mean = torch.cat([mean, var.clamp_min(0).sqrt()], dim=1)
        out.append(mean)
    return out


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


def _mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation (1 for fewer than two values), the deviation floored at 1e-6."""
    std = x.std() if x.numel() > 1 else torch.ones((), dtype=x.dtype, device=x.device)
    return x.mean(), std.clamp_min(1e-6)


class FeatureGaussian(nn.Module):
    """Gaussians of pooled teacher features, one per stage, and the standardisation of the two image scores.

    Args:
        channels: the teacher's channels per stage.
        pooling: ``mean`` or ``mean_std``.
    """

    def __init__(self, channels: tuple[int, ...], pooling: str = "mean_std") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        self.dims = [c * (2 if pooling == "mean_std" else 1) for c in channels]
        for i, d in enumerate(self.dims):
            self.register_buffer(f"loc{i}", torch.zeros(d))
            self.register_buffer(f"precision{i}", torch.eye(d))
        # (mean, std) of the map's image score, then of the Gaussian distance, over held-out good images
        self.register_buffer("score_stats", torch.tensor([0.0, 1.0, 0.0, 1.0]))
        self.register_buffer("gaussian_fitted", torch.zeros(()))
        self.register_buffer("fitted", torch.zeros(()))  # the score statistics, for the current Gaussian

    def distance(self, features: list[torch.Tensor]) -> torch.Tensor:
        """(B,) sum over stages of the Mahalanobis distances of the pooled features."""
        total = None
        for i, z in enumerate(pool(features, self.pooling)):
            diff = z - getattr(self, f"loc{i}")
            d = ((diff @ getattr(self, f"precision{i}")) * diff).sum(dim=1).clamp_min(0).sqrt()
            total = d if total is None else total + d
        return total

    @torch.no_grad()
    def fit(self, pooled: list[torch.Tensor]) -> list[float]:
        """Fit the per-stage Gaussians to (N, D_i) pooled features of training images; returns the shrinkages."""
        shrinkages = []
        for i, z in enumerate(pooled):
            loc, cov, a = ledoit_wolf(z)
            getattr(self, f"loc{i}").copy_(loc.float())
            getattr(self, f"precision{i}").copy_(torch.linalg.inv(cov).float())
            shrinkages.append(a)
        self.gaussian_fitted.fill_(1.0)
        self.fitted.zero_()  # the score statistics belong to the old Gaussian
        return shrinkages

    @torch.no_grad()
    def fit_score_stats(self, map_scores: torch.Tensor, distances: torch.Tensor) -> None:
        """Standardise both scores by their mean and std over held-out good images (N,)."""
        stats = [v for x in (map_scores, distances) for v in _mean_std(x.double().flatten())]
        self.score_stats.copy_(torch.stack(stats).float())
        self.fitted.fill_(1.0)

    def combine(self, map_score: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        """The image score: max of the two standardised scores once fitted, else ``map_score`` itself."""
        m_mean, m_std, g_mean, g_std = self.score_stats.unbind()
        z_map = (map_score - m_mean) / m_std
        z_global = (self.distance(features) - g_mean) / g_std
        return torch.where(self.fitted > 0, torch.maximum(z_map, z_global), map_score)
