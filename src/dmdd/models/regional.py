"""A regional texture-statistics map for textures (a deviation from docs/design.md §6, see docs/deviations.md).

DMDD's maps compare student and teacher feature by feature with a cosine distance; on textures a defect can change
an area's *statistics* a little without changing any single feature's direction much (magnetic_tile's "uneven"
tiles). Here the frozen teacher's features of stages 2 and 3 are summarised around every position by their
per-channel mean and standard deviation over a k x k window, and windows are sampled from the training images,
positions pooled: a texture looks alike everywhere, so no alignment is assumed (on objects it would mix background
and part, which is why the engine fits it only where the foreground policy says "texture"). One Gaussian
(Ledoit-Wolf shrinkage) of the sampled windows gives the metric. Each window is then scored by its distance, in that
metric, to the nearest of ``bank`` sampled training windows kept by greedy k-centre selection (the bank covers every
look the good texture takes, where one broad Gaussian blurs several looks into one mode); ``bank = 0`` scores the
Mahalanobis distance to the Gaussian's mean instead (checkpoints written before the bank). The per-stage distance
maps are upsampled and summed; the model's map and this one, each standardised by its pixel mean and standard
deviation over the held-out good images, are added.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dmdd.config import ModelConfig
from dmdd.models.gaussian import ledoit_wolf, precision

# The teacher stages (1-based) the map summarises, and the default window side at each, in that stage's cells: 7 x 8 px
# at stage 2, 5 x 16 px at stage 3 (measured on magnetic_tile and tire by a probe, benchmarks/regional_probe.py at
# commit f7f427b); the sides are ``model.regional_windows``.
STAGES = (2, 3)


def windows_of(sides: tuple[int, ...]) -> dict[int, int]:
    """``model.regional_windows`` (one side per stage of ``STAGES``) -> {stage: side}."""
    return dict(zip(STAGES, sides, strict=True))


WINDOWS = windows_of(ModelConfig.regional_windows)  # the default: {2: 7, 3: 5}

# Bank windows compared at a time: the distances are a (batch, positions, chunk) matrix, 32 MiB at stage 2 for 256 px
# and batch 8 instead of 128 MiB for the whole 4096-window bank. At 512 px and batch 8 the map's peak memory grew by
# 344 MiB instead of 1083 MiB (Lite0's channels, one thread, on this project's CPU machine).
BANK_CHUNK = 1024


def local_stats(f: torch.Tensor, k: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, 2C, H, W): per-channel mean and standard deviation over the k x k window around each
    position (windows cut at the border, padding not counted)."""
    f = f.float()
    mean = F.avg_pool2d(f, k, stride=1, padding=k // 2, count_include_pad=False)
    square = F.avg_pool2d(f * f, k, stride=1, padding=k // 2, count_include_pad=False)
    return torch.cat([mean, (square - mean**2).clamp_min(0).sqrt()], 1)


def whitening(precision_matrix: torch.Tensor) -> torch.Tensor:
    """W with ``(x W) . (x W) = x P x`` for the symmetric positive semi-definite precision P: distances between
    whitened vectors are Mahalanobis distances."""
    p = precision_matrix.double()
    values, vectors = torch.linalg.eigh((p + p.T) / 2)
    return vectors * values.clamp_min(0).sqrt()


def k_centres(x: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` rows of ``x`` (N, D) by greedy k-centre selection: first the row nearest the mean, then each time the row
    farthest from those already chosen (deterministic; ties to the lowest index). With N <= n every row is kept and
    the rows are repeated in order up to ``n`` (repeats change no nearest-neighbour distance)."""
    if len(x) <= n:
        return x[torch.arange(n) % len(x)]
    picks = [int((x - x.mean(0)).norm(dim=1).argmin())]
    nearest = (x - x[picks[0]]).norm(dim=1)
    for _ in range(n - 1):
        picks.append(int(nearest.argmax()))
        nearest = torch.minimum(nearest, (x - x[picks[-1]]).norm(dim=1))
    return x[picks]


class RegionalGaussian(nn.Module):
    """Per stage, one Gaussian of window statistics (the metric) and a bank of training windows, and the
    standardisation that adds its map to the model's.

    Args:
        channels: the teacher's channels per stage.
        windows: stage (1-based) -> window side in cells.
        bank: training windows kept per stage for the nearest-window distance; 0: the distance to the mean.
    """

    def __init__(self, channels: tuple[int, ...], windows: dict[int, int] | None = None, bank: int = 0) -> None:
        super().__init__()
        self.windows = dict(WINDOWS if windows is None else windows)
        self.bank = bank
        for stage in self.windows:
            d = 2 * channels[stage - 1]
            self.register_buffer(f"loc{stage}", torch.zeros(d))
            self.register_buffer(f"precision{stage}", torch.eye(d))
            if bank:  # whitened training windows, and the whitening
                self.register_buffer(f"whiten{stage}", torch.eye(d))
                self.register_buffer(f"bank{stage}", torch.zeros(bank, d))
        # pixel mean and std over held-out good images of the model's map, then of this map (both smoothed)
        self.register_buffer("pixel_stats", torch.tensor([0.0, 1.0, 0.0, 1.0]))
        self.register_buffer("gaussian_fitted", torch.zeros(()))
        self.register_buffer("fitted", torch.zeros(()))  # pixel_stats set: the maps are combined

    def window_vectors(self, teacher: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        """Per stage, (B, H * W, 2C) window statistics at every position."""
        return {s: local_stats(teacher[s - 1], k).flatten(2).transpose(1, 2) for s, k in self.windows.items()}

    @torch.no_grad()
    def fit(self, vectors: dict[int, torch.Tensor]) -> dict[int, float]:
        """Fit each stage's Gaussian to (N, 2C) sampled window vectors; returns the shrinkage per stage."""
        shrinkage = {}
        for stage, v in vectors.items():
            loc, cov, a = ledoit_wolf(v.double().cpu())
            getattr(self, f"loc{stage}").copy_(loc.float())
            getattr(self, f"precision{stage}").copy_(precision(cov).float())
            shrinkage[stage] = a
            if self.bank:
                w = whitening(getattr(self, f"precision{stage}")).float()
                getattr(self, f"whiten{stage}").copy_(w)
                getattr(self, f"bank{stage}").copy_(k_centres((v.float().cpu() - loc.float()) @ w, self.bank))
        self.gaussian_fitted.fill_(1.0)
        return shrinkage

    def raw_map(self, teacher: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """(B, 1, *size): the sum over stages of each window's distance (in the Gaussian's metric) to the nearest
        bank window, or to the mean without a bank, upsampled bilinearly."""
        total = None
        for stage, v in self.window_vectors(teacher).items():
            diff = v - getattr(self, f"loc{stage}")
            if self.bank:  # |q - b|^2 = |q|^2 - 2 q.b + |b|^2, the nearest of the bank (matrix products: exportable)
                q, bank = diff @ getattr(self, f"whiten{stage}"), getattr(self, f"bank{stage}")
                qq, nearest = (q * q).sum(-1, keepdim=True), None
                for start in range(0, len(bank), BANK_CHUNK):  # a fixed number of chunks: the export unrolls them
                    b = bank[start : start + BANK_CHUNK]
                    square = (qq - 2 * q @ b.T + (b * b).sum(-1)).amin(-1)
                    nearest = square if nearest is None else torch.minimum(nearest, square)
                d = nearest.clamp_min(0).sqrt()
            else:
                d = ((diff @ getattr(self, f"precision{stage}")) * diff).sum(-1).clamp_min(0).sqrt()
            h, w = teacher[stage - 1].shape[-2:]
            d = F.interpolate(d.view(-1, 1, h, w), size=size, mode="bilinear", align_corners=False)
            total = d if total is None else total + d
        return total

    @torch.no_grad()
    def fit_pixel_stats(self, model_map: tuple[float, float], regional_map: tuple[float, float]) -> None:
        """(mean, std) of the model's smoothed map and of this smoothed map over held-out good pixels."""
        stats = [model_map[0], max(model_map[1], 1e-6), regional_map[0], max(regional_map[1], 1e-6)]
        self.pixel_stats.copy_(torch.tensor(stats))
        self.fitted.fill_(1.0)

    def combine(self, model_map: torch.Tensor, regional_map: torch.Tensor) -> torch.Tensor:
        """The sum of the two standardised maps once fitted, else the model's map unchanged."""
        m_mean, m_std, r_mean, r_std = self.pixel_stats.unbind()
        combined = (model_map - m_mean) / m_std + (regional_map - r_mean) / r_std
        return torch.where(self.fitted > 0, combined, model_map)
