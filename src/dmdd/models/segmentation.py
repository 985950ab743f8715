"""Multi-perception Segmentation Network (paper §3.4.2, DESIGN §4)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def pyramid_upsample(ngm: list[torch.Tensor], aim: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Fuse stage maps across scales before upsampling.

    NGM maps top-down: P_4 = M_4, P_i = M_i + up(P_{i+1}). AIM maps bottom-up: Q_1 = M_1, Q_i = M_i + down(Q_{i-1}).
    Maps are (B, 1, H_i, W_i) with H_i = 2 H_{i+1}.
    """
    p = list(ngm)
    for i in reversed(range(len(p) - 1)):
        p[i] = ngm[i] + F.interpolate(p[i + 1], size=ngm[i].shape[-2:], mode="bilinear", align_corners=False)
    q = list(aim)
    for i in range(1, len(q)):
        q[i] = aim[i] + F.avg_pool2d(q[i - 1], kernel_size=2)
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

    Args:
        num_maps: K, number of stacked anomaly maps (8 for DMDD, 4 with one branch).
        image_size: H = W of the maps; sizes the global attention parameter G (K, H, W).
        channels: width of the compression conv stack.
        multi_perception: use channel, spatial and global attention.
    """

    def __init__(self, num_maps: int, image_size: int, channels: int = 16, multi_perception: bool = True) -> None:
        super().__init__()
        self.multi_perception = multi_perception
        if multi_perception:
            self.channel_attention = ChannelAttention(num_maps, max(num_maps, 4))
            self.spatial_attention = SpatialAttention()
            self.global_attention = nn.Parameter(torch.ones(num_maps, image_size, image_size))
        self.compress = nn.Sequential(
            nn.Conv2d(num_maps, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, 1, 1),
        )

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, K, H, W) stacked maps -> (B, 1, H, W) logits."""
        x = maps
        if self.multi_perception:
            x = self.spatial_attention(self.channel_attention(x))
            x = x * self.global_attention
        return self.compress(x)


def top_k_score(anomaly_map: torch.Tensor, k: int) -> torch.Tensor:
    """Image score: mean of the k largest values of each (B, 1, H, W) map -> (B,)."""
    flat = anomaly_map.flatten(1)
    return flat.topk(min(k, flat.shape[1]), dim=1).values.mean(dim=1)
