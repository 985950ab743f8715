"""Decoupled student and Pyramid Modeling Network (paper §3.2, docs/design.md §1)."""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F


class DecoupledStudent(nn.Module):
    """The backbone stages plus a 1x1 conv after each stage that splits it into normality and abnormality features.

    Stage ``i`` output ``x_i`` (C_i channels) becomes ``conv1x1(x_i)`` with 2·C_i channels, split into N_i and A_i.
    N_i is the input of stage ``i + 1``. The 1x1 convs start as identity on each half, so at initialisation
    N_i = A_i = x_i and the student equals its pretrained backbone.
    """

    def __init__(self, stages: nn.ModuleList, channels: tuple[int, ...]) -> None:
        super().__init__()
        self.stages = copy.deepcopy(stages)
        self.splits = nn.ModuleList(nn.Conv2d(c, 2 * c, kernel_size=1) for c in channels)
        for split, c in zip(self.splits, channels):
            with torch.no_grad():
                eye = torch.eye(c).view(c, c, 1, 1)
                split.weight.copy_(torch.cat([eye, eye], dim=0))
                split.bias.zero_()

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Returns the normality features N_1..N_4 and abnormality features A_1..A_4, each (B, C_i, H_i, W_i)."""
        normal, abnormal = [], []
        for stage, split in zip(self.stages, self.splits):
            x = stage(x)
            n, a = split(x).chunk(2, dim=1)  # (B, 2C, h, w) -> 2 x (B, C, h, w)
            normal.append(n)
            abnormal.append(a)
            x = n
        return normal, abnormal


def _zero_init_bn(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """Start a fusion branch at zero so the PMN begins as the identity (chosen, like zero-init residuals)."""
    nn.init.zeros_(bn.weight)
    return bn


class _Upsample(nn.Module):
    """Coarser -> finer: bilinear x2 upsampling, then 1x1 conv + BN to the target channels."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), _zero_init_bn(nn.BatchNorm2d(c_out)))

    def forward(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)
        return self.proj(x)


class _Downsample(nn.Module):
    """Finer -> coarser: 3x3 stride-2 conv, then 1x1 conv + BN to the target channels."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.resample = nn.Conv2d(c_in, c_in, 3, stride=2, padding=1, bias=False)
        self.proj = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), _zero_init_bn(nn.BatchNorm2d(c_out)))

    def forward(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.proj(self.resample(x))


class _TopDown(nn.Module):
    """y_4 = x_4; y_i = x_i + proj(up(y_{i+1})) for i = 3, 2, 1."""

    def __init__(self, channels: tuple[int, ...]) -> None:
        super().__init__()
        self.fuse = nn.ModuleList(_Upsample(channels[i + 1], channels[i]) for i in range(len(channels) - 1))

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        out = list(xs)
        for i in reversed(range(len(xs) - 1)):
            out[i] = xs[i] + self.fuse[i](out[i + 1], xs[i])
        return out


class _BottomUp(nn.Module):
    """y_1 = x_1; y_i = x_i + proj(down(y_{i-1})) for i = 2, 3, 4."""

    def __init__(self, channels: tuple[int, ...]) -> None:
        super().__init__()
        self.fuse = nn.ModuleList(_Downsample(channels[i - 1], channels[i]) for i in range(1, len(channels)))

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        out = list(xs)
        for i in range(1, len(xs)):
            out[i] = xs[i] + self.fuse[i - 1](out[i - 1], xs[i])
        return out


class PyramidModelingNetwork(nn.Module):
    """One branch of the PMN: an inner path then an outer path in the opposite direction (paper Fig. 4).

    ``top-down-top`` (normality branch): inner top-down (stage 4 guides 3 guides 2 guides 1), outer bottom-up.
    ``down-top-down`` (abnormality branch): inner bottom-up, outer top-down.
    Outputs keep C_i channels so they compare with the teacher by cosine.
    """

    def __init__(
        self,
        channels: tuple[int, ...],
        direction: Literal["top-down-top", "down-top-down"],
        inner: bool = True,
        outer: bool = True,
    ) -> None:
        super().__init__()
        down_first = direction == "down-top-down"
        paths: list[nn.Module] = []
        if inner:
            paths.append(_BottomUp(channels) if down_first else _TopDown(channels))
        if outer:
            paths.append(_TopDown(channels) if down_first else _BottomUp(channels))
        self.paths = nn.ModuleList(paths)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        for path in self.paths:
            xs = path(xs)
        return xs
