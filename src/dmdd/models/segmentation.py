"""Multi-perception Segmentation Network (paper §3.4.2, docs/design.md §4)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def pyramid_upsample(
    ngm: list[torch.Tensor], aim: list[torch.Tensor], factors: list[int] | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Fuse stage maps across scales before upsampling.

    NGM maps top-down: P_4 = M_4, P_i = M_i + up(P_{i+1}). AIM maps bottom-up: Q_1 = M_1, Q_i = M_i + down(Q_{i-1}).
    Maps are (B, 1, H_i, W_i), finest first; up is bilinear, down is f x f average pooling with ``factors[i - 1]``
    the size ratio of neighbouring maps (default 2: consecutive stages; static, so the graph exports).
    """
    p = list(ngm)
    for i in reversed(range(len(p) - 1)):
        p[i] = ngm[i] + F.interpolate(p[i + 1], size=ngm[i].shape[-2:], mode="bilinear", align_corners=False)
    q = list(aim)
    for i in range(1, len(q)):
        f = factors[i - 1] if factors else 2
        q[i] = aim[i] + F.avg_pool2d(q[i - 1], kernel_size=f)
    return p, q


class ChannelAttention(nn.Module):
    """CBAM channel attention: avg- and max-pooled descriptors through a shared MLP, summed, sigmoid."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(x.mean(dim=(2, 3), keepdim=True))
        mx = self.mlp(x.amax(dim=(2, 3), keepdim=True))
        return x * torch.sigmoid(avg + mx)


class SpatialAttention(nn.Module):
    """CBAM spatial attention: channel mean and max, 7x7 conv, sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size=7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        desc = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)  # (B, 2, H, W)
        return x * torch.sigmoid(self.conv(desc))


class SegmentationHead(nn.Module):
    """Multi-perception Segmentation Head: attention over the K stacked maps, then compression to one logit map.

    With ``residual`` (dmdd's default, a deviation from the paper) the compression output is a correction added to
    ``w * base + b`` where ``base = sum_k sum_weights[k] * maps[k]``; :func:`dmdd.evaluation.fit_map_statistics`
    sets ``sum_weights = 1 / std(sum_k maps[k])``, so ``base`` is the plain sum of the (standardised) maps,
    itself standardised on held-out good images. w = 2, b = -5 at the start: a
    good pixel starts near p = 0.007, a pixel 3 standard deviations up near p = 0.7. The correction's last layer
    starts at zero, so the head starts as a monotone function of the plain sum, and training on synthetic anomalies
    only moves it away from there as far as the loss pays for.

    Args:
        num_maps: K, number of stacked anomaly maps (8 for DMDD, 4 with one branch).
        image_size: H = W of the maps.
        channels: width of the compression conv stack.
        multi_perception: use channel, spatial and global attention.
        global_size: side g of the global attention grid G (K, g, g), upsampled bilinearly; 0: g = ``image_size``.
        residual: add the compression output to the logit of the plain sum (see above).
    """

    def __init__(
        self,
        num_maps: int,
        image_size: int,
        channels: int = 16,
        multi_perception: bool = True,
        global_size: int = 0,
        residual: bool = False,
    ) -> None:
        super().__init__()
        self.multi_perception = multi_perception
        self.residual = residual
        if multi_perception:
            self.channel_attention = ChannelAttention(num_maps, max(num_maps, 4))
            self.spatial_attention = SpatialAttention()
            g = global_size or image_size
            self.global_attention = nn.Parameter(torch.ones(num_maps, g, g))
        if residual:
            self.sum_weight = nn.Parameter(torch.full((), 2.0))
            self.sum_bias = nn.Parameter(torch.full((), -5.0))
            self.register_buffer("sum_weights", torch.full((num_maps,), 1.0 / num_maps))
        self.compress = nn.Sequential(
            nn.Conv2d(num_maps, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, 1, 1),
        )
        if residual:
            nn.init.zeros_(self.compress[-1].weight)
            nn.init.zeros_(self.compress[-1].bias)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, K, H, W) stacked maps -> (B, 1, H, W) logits."""
        x = maps
        if self.multi_perception:
            x = self.spatial_attention(self.channel_attention(x))
            g = self.global_attention
            if g.shape[-2:] != maps.shape[-2:]:
                g = F.interpolate(g[None], size=maps.shape[-2:], mode="bilinear", align_corners=False)[0]
            x = x * g
        logits = self.compress(x)
        if self.residual:
            base = (maps * self.sum_weights.view(1, -1, 1, 1)).sum(dim=1, keepdim=True)
            logits = logits + self.sum_weight * base + self.sum_bias
        return logits


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of (B, 1, H, W) maps, kernel radius 4 sigma, replicated borders."""
    radius = max(1, int(4 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = F.pad(maps, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1))
    return F.conv2d(out, kernel.view(1, 1, -1, 1))


def top_k_score(anomaly_map: torch.Tensor, k: int) -> torch.Tensor:
    """Image score: mean of the k largest values of each (B, 1, H, W) map -> (B,)."""
    flat = anomaly_map.flatten(1)
    return flat.topk(min(k, flat.shape[1]), dim=1).values.mean(dim=1)
