"""An image-level score from the distribution of pooled teacher features (a deviation from docs/design.md §6, see
docs/deviations.md).

DMDD's maps compare student and teacher position by position with a cosine distance, which is blind to defects that
change a whole image a little rather than a part of it a lot (magnetic_tile's "uneven" tiles: image AUROC 63.8 from
the maps). Each teacher stage's features are pooled over all positions (per-channel mean, and with ``mean_std`` the
per-channel standard deviation too) and scored by their Mahalanobis distance to a Gaussian fitted on the training
images, with Ledoit-Wolf shrinkage (Rippel et al., "Modeling the Distribution of Normal Data in Pre-Trained Deep
Features for Anomaly Detection", ICPR 2020); the distances of the chosen stages are summed (by default stages 2-4:
stage 1's channel means are colour and brightness statistics, which a change of capture session moves most). The
teacher is frozen, so the fit needs only the training images and no training.

The image score is then the larger of two standardised scores: the map's own score, minus its mean over the held-out
good images and divided by its standard deviation there, and this one, standardised by its mean and standard
deviation over the training images each scored out of sample (five folds). Until the map's statistics are fitted
(``fitted`` is 0) the image score is the map's score unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from dmdd.models.gaussian import ledoit_wolf, mahalanobis, out_of_fold, precision

__all__ = ["FeatureGaussian", "POOLINGS", "ledoit_wolf", "mahalanobis", "out_of_fold", "pool", "precision"]

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


def _mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation (1 for fewer than two values), the deviation floored at 1e-6."""
    std = x.std() if x.numel() > 1 else torch.ones((), dtype=x.dtype, device=x.device)
    return x.mean(), std.clamp_min(1e-6)


class FeatureGaussian(nn.Module):
    """Gaussians of pooled teacher features, one per stage, and the standardisation of the two image scores.

    Args:
        channels: the teacher's channels per stage.
        pooling: ``mean`` or ``mean_std``.
        stages: the stages (1-based) whose features are scored, all by default; buffers keep the stage's 0-based
            index.
    """

    def __init__(self, channels: tuple[int, ...], pooling: str = "mean", stages: tuple[int, ...] | None = None):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        stages = tuple(range(1, len(channels) + 1)) if stages is None else stages
        if not stages or not set(stages) <= set(range(1, len(channels) + 1)):
            raise ValueError(f"stages must be a non-empty subset of 1..{len(channels)}, got {stages!r}")
        self.pooling = pooling
        self.stages = tuple(sorted(s - 1 for s in stages))
        self.dims = [channels[i] * (2 if pooling == "mean_std" else 1) for i in self.stages]
        for i, d in zip(self.stages, self.dims):
            self.register_buffer(f"loc{i}", torch.zeros(d))
            self.register_buffer(f"precision{i}", torch.eye(d))
        # (mean, std) of the map's image score over held-out good images, then of the Gaussian distance over the
        # training images scored out of sample
        self.register_buffer("score_stats", torch.tensor([0.0, 1.0, 0.0, 1.0]))
        self.register_buffer("gaussian_fitted", torch.zeros(()))
        self.register_buffer("fitted", torch.zeros(()))  # the map score's statistics (fit_score_stats)

    def pooled(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """The pooled features of the scored stages, from the teacher's features of all stages."""
        return pool([features[i] for i in self.stages], self.pooling)

    def distance(self, features: list[torch.Tensor]) -> torch.Tensor:
        """(B,) sum over the scored stages of the Mahalanobis distances of the pooled features."""
        total = None
        for i, z in zip(self.stages, self.pooled(features)):
            d = mahalanobis(z, getattr(self, f"loc{i}"), getattr(self, f"precision{i}"))
            total = d if total is None else total + d
        return total

    @torch.no_grad()
    def fit(self, pooled: list[torch.Tensor], folds: int = 5) -> list[float]:
        """Fit the per-stage Gaussians to (N, D_i) pooled features of the training images (:meth:`pooled`), and
        standardise their distance by its mean and std over the same images scored out of sample: image k by
        Gaussians fitted without fold ``k % folds``. (Standardising on the ~20 held-out images of tire gave scales
        that differed 2x between two splits, and 64 % false alarms on one of them.) With fewer than 6 images the
        in-sample distances are used. Returns the shrinkage of each stage's final fit."""
        pooled = [z.double().cpu() for z in pooled]
        n = pooled[0].shape[0]
        folds = min(folds, n // 3)  # every Gaussian sees at least two images
        outside = sum(out_of_fold(z, folds) for z in pooled) if folds >= 2 else None
        shrinkages, inside = [], torch.zeros(n, dtype=torch.float64)
        for i, z in zip(self.stages, pooled):
            loc, cov, a = ledoit_wolf(z)
            prec = precision(cov)
            inside += mahalanobis(z, loc, prec)
            getattr(self, f"loc{i}").copy_(loc.float())
            getattr(self, f"precision{i}").copy_(prec.float())
            shrinkages.append(a)
        g_mean, g_std = _mean_std(outside if outside is not None else inside)
        self.score_stats[2:].copy_(torch.stack([g_mean, g_std]).float())
        self.gaussian_fitted.fill_(1.0)
        return shrinkages

    @torch.no_grad()
    def fit_score_stats(self, map_scores: torch.Tensor) -> None:
        """Standardise the map's image score by its mean and std over held-out good images (N,)."""
        self.score_stats[:2].copy_(torch.stack(_mean_std(map_scores.double().flatten())).float())
        self.fitted.fill_(1.0)

    def combine(self, map_score: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        """The image score: max of the two standardised scores once fitted, else ``map_score`` itself."""
        m_mean, m_std, g_mean, g_std = self.score_stats.unbind()
        z_map = (map_score - m_mean) / m_std
        z_global = (self.distance(features) - g_mean) / g_std
        return torch.where(self.fitted > 0, torch.maximum(z_map, z_global), map_score)
