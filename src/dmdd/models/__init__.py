"""Networks: backbone adapter, decoupled student with PMN, segmentation head, the DMDD module."""

from dmdd.models.backbone import Backbone, available_backbones, build_backbone, register_backbone
from dmdd.models.dmdd import DMDD, Features, InferenceOutput, SegmentationOutput

__all__ = [
    "DMDD",
    "Backbone",
    "Features",
    "InferenceOutput",
    "SegmentationOutput",
    "available_backbones",
    "build_backbone",
    "register_backbone",
]
