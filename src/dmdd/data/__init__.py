"""Datasets, image decoding, foreground masks and anomaly synthesis."""

from dmdd.data.datasets import (
    AnomalyDataset,
    Category,
    PairDataset,
    Record,
    detect_layout,
    list_categories,
    load_btad,
    load_category,
    load_folder,
    load_mvtec,
    load_mvtec3d,
    load_visa,
)
from dmdd.data.io import read_image, read_mask
from dmdd.data.synthesis import AnomalySynthesizer, TextureSource

__all__ = [
    "AnomalyDataset", "AnomalySynthesizer", "Category", "PairDataset", "Record", "TextureSource", "detect_layout",
    "list_categories", "load_btad", "load_category", "load_folder", "load_mvtec", "load_mvtec3d", "load_visa",
    "read_image", "read_mask",
]  # fmt: skip
