"""Running a model over a labelled split: image scores, maps at the evaluation size, masks and labels."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from dmdd.config import Config
from dmdd.data.datasets import AnomalyDataset, Record
from dmdd.data.geometry import to_square
from dmdd.data.io import TILED_DECODE_PIXELS, decoded_size, read_image
from dmdd.data.tiles import TileSpec, cut, grid, padded, scaled, scaled_shape, score_tiled
from dmdd.models.dmdd import DMDD


@dataclass
class Predictions:
    """Model outputs on a labelled split, at the evaluation size.

    Attributes:
        scores: (N,) image scores.
        maps: (N, E, E) anomaly maps.
        masks: (N, E, E) ground truth.
        labels: (N,) 0 normal, 1 anomalous.
        defect_types: N names.
        paths: N image paths.
        has_mask: (N,) whether the image's ground truth is known per pixel (good images always; defect images
            only with a mask file); ``None``: all.
    """

    scores: np.ndarray
    maps: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    defect_types: list[str]
    paths: list[str]
    has_mask: np.ndarray | None = None
    resize: str = "squash"

    def pixel_labelled(self) -> np.ndarray:
        return np.ones(self.labels.size, bool) if self.has_mask is None else np.asarray(self.has_mask, bool)


@torch.inference_mode()
def run_model(model: DMDD, images: torch.Tensor, device: torch.device, size: int | None = None):
    """Eval forward on a batch of (B, 3, S, S) images -> (scores (B,), maps (B, size, size)) as numpy."""
    out = model(images.to(device))
    maps = out.anomaly_map
    if size is not None and maps.shape[-1] != size:
        maps = torch.nn.functional.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)
    return out.pred_score.float().cpu().numpy(), maps[:, 0].float().cpu().numpy()


def tile_runner(model: DMDD, device: torch.device):
    """(B, S, S, 3) uint8 tiles -> (scores (B,), maps (B, S, S)): the model as :func:`dmdd.data.tiles.score_tiled`
    calls it."""

    def run(tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        batch = torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2).float() / 255.0
        return run_model(model, batch, device)

    return run


def score_tiled_image(model: DMDD, image: np.ndarray, cfg: Config, device: torch.device, batch_size: int = 8):
    """(score, stitched map at the image's size) of one (H, W, 3) uint8 image with the model's tile settings."""
    spec = TileSpec.of(cfg.model)
    return score_tiled(image, spec, cfg.model.image_size, tile_runner(model, device), batch_size)


def preload_tiles(records: list[Record], cfg: Config, cap: int = 1024) -> torch.Tensor:
    """Every tile of the inference grid of each image of ``records`` (at most ``cap``, a seeded choice):
    (N, 3, S, S) uint8, what :func:`preload_images` is for whole images (statistics fitted on tiles)."""
    spec, size = TileSpec.of(cfg.model), cfg.model.image_size
    positions = []  # (record, top, left) from the headers; only the chosen tiles' images are decoded
    for i, r in enumerate(records):
        h, w = scaled_shape(decoded_size(r.image), spec)
        positions += [(i, t, x) for t, x in grid((max(h, spec.size), max(w, spec.size)), spec)]
    if len(positions) > cap:
        keep = np.sort(np.random.default_rng([cfg.train.seed, 11]).choice(len(positions), cap, replace=False))
        positions = [positions[k] for k in keep]
    tiles = []
    for i in sorted({p[0] for p in positions}):
        image = padded(scaled(read_image(records[i].image, reduce_above=TILED_DECODE_PIXELS), spec), spec.size)
        top, left = image.shape[0] - spec.size, image.shape[1] - spec.size  # a header size off by one stays inside
        tiles += [cut(image, min(t, top), min(x, left), spec.size, size) for j, t, x in positions if j == i]
    if not tiles:
        return torch.zeros(0, 3, size, size, dtype=torch.uint8)
    return torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).contiguous()


def predict_split(model: DMDD, records: list[Record], cfg: Config, device: torch.device, batch_size: int = 8):
    """Run the model over a labelled split; masks are read at ``cfg.train.eval_size`` (nearest). With tiles
    (``model.tile``) each image is scored tile by tile at its own size and the stitched map brought to the
    evaluation size."""
    model.eval()
    eval_size = cfg.train.eval_size
    spec = TileSpec.of(cfg.model)
    resize = cfg.model.resize if spec is None else "squash"
    data = AnomalyDataset(records, cfg.model.image_size, mask_size=eval_size, resize=resize)
    scores, maps, masks, labels, types, paths, has_mask = [], [], [], [], [], [], []
    for batch in DataLoader(data, batch_size=batch_size, num_workers=cfg.train.num_workers):
        has_mask.append(np.asarray(batch["has_mask"], bool))
        if spec is None:
            s, m = run_model(model, batch["image"], device, eval_size)
        else:
            tiled = [score_tiled_image(model, read_image(path, reduce_above=TILED_DECODE_PIXELS), cfg, device,
                                       batch_size) for path in batch["path"]]  # fmt: skip
            s = np.array([score for score, _ in tiled], np.float32)
            m = np.stack([to_square(stitched, eval_size) for _, stitched in tiled])
        scores.append(s)
        maps.append(m.astype(np.float32))
        masks.append(batch["mask"][:, 0].numpy().astype(bool))
        labels.append(np.asarray(batch["label"]))
        types += list(batch["defect_type"])
        paths += list(batch["path"])
    return Predictions(np.concatenate(scores), np.concatenate(maps), np.concatenate(masks), np.concatenate(labels),
                       types, paths, np.concatenate(has_mask), resize)  # fmt: skip


def preload_images(records: list[Record], cfg: Config) -> torch.Tensor:
    """The images of ``records`` decoded once at the model size: (N, 3, S, S) uint8 (what :class:`AnomalyDataset`
    yields, times 255), for passes repeated every epoch."""
    size, mode = cfg.model.image_size, cfg.model.resize
    images = [torch.tensor(read_image(r.image, size, mode)).permute(2, 0, 1) for r in records]
    return torch.stack(images) if images else torch.zeros(0, 3, size, size, dtype=torch.uint8)


def image_batches(images: list[Record] | torch.Tensor, cfg: Config, batch_size: int) -> Iterator[torch.Tensor]:
    """(B, 3, S, S) float images in [0, 1] from records (decoded by a DataLoader) or a :func:`preload_images`
    tensor (the same values)."""
    if isinstance(images, torch.Tensor):
        for start in range(0, len(images), batch_size):
            yield images[start : start + batch_size].float() / 255.0
        return
    data = AnomalyDataset(images, cfg.model.image_size, resize=cfg.model.resize)
    for batch in DataLoader(data, batch_size=batch_size, num_workers=cfg.train.num_workers):
        yield batch["image"]
