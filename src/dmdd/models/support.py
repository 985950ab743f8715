"""Where the object can be: a foreground support map for objects (a deviation from docs/design.md §6, see
docs/deviations.md).

The distillation maps compare student and teacher everywhere in the image. On an object photographed on a plain
background, the background is what the student learns least (it carries no structure to distil, only sensor noise
and shading), and its discrepancies there rank above faint defects on the part: on tire, at the threshold that
flags 1 % of good pixels, 47 % of dmdd's false alarms fell on the background, against 3 % of PatchCore's
(docs/diagnosis.md).

The support is the union of the foreground masks that the synthesis already finds on every training image (GrabCut,
:mod:`dmdd.data.foreground`), dilated by 1/32 of the image side and smoothed: 1 wherever some good training image
had its object, falling to 0 where none ever had. The anomaly map is multiplied by it, so a position no good part
ever covered scores the good images' mean (0 for the standardised sum, the bottom of the MSN's range) and cannot
outrank a defect on the part. Objects whose position varies cover the whole image with their union, and the map is
left as it was. Limits: only on objects (a texture's foreground is the whole image), only without tiles (a tile's
position in the image varies), and a defect lying entirely where no good part ever was (a foreign body on an empty
background) is suppressed; ``model.foreground_support: off`` keeps the paper's map.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def support_map(masks: np.ndarray) -> np.ndarray:
    """(N, S, S) boolean foreground masks -> (S, S) float32 support in [0, 1]: their union, dilated by S/32 pixels
    (an elliptic structuring element) and smoothed by a Gaussian of half that radius."""
    size = masks.shape[-1]
    radius = max(1, round(size / 32))
    union = np.any(masks, axis=0).astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    grown = cv2.dilate(union, kernel).astype(np.float32)
    return np.clip(cv2.GaussianBlur(grown, (0, 0), radius / 2, borderType=cv2.BORDER_REPLICATE), 0.0, 1.0)


class ForegroundSupport(nn.Module):
    """The support map (a buffer, saved in checkpoints and exported with the model) and its use on anomaly maps."""

    def __init__(self, image_size: int) -> None:
        super().__init__()
        self.register_buffer("prior", torch.ones(1, 1, image_size, image_size))
        self.register_buffer("fitted", torch.zeros(()))

    def fit(self, masks: np.ndarray) -> None:
        """Fit from the training images' foreground masks at the model's input size, (N, S, S) booleans."""
        if masks.ndim != 3 or masks.shape[1:] != tuple(self.prior.shape[-2:]):
            raise ValueError(f"foreground masks must be (N, {self.prior.shape[-1]}, {self.prior.shape[-1]}), "
                             f"got {masks.shape}")  # fmt: skip
        self.prior.copy_(torch.from_numpy(support_map(masks)).view_as(self.prior))
        self.fitted.fill_(1.0)

    def forward(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) map times the support (resized to H x W when they differ)."""
        prior = self.prior.to(anomaly_map.dtype)
        if prior.shape[-2:] != anomaly_map.shape[-2:]:
            prior = F.interpolate(prior, size=anomaly_map.shape[-2:], mode="bilinear", align_corners=False)
        return anomaly_map * prior

    @property
    def coverage(self) -> float:
        """Share of the image where the support is above one half."""
        return float((self.prior > 0.5).float().mean())
