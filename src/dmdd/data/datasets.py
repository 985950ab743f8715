"""Dataset layouts (MVTec AD and friends, BTAD, VisA, MVTec 3D-AD RGB, plain folders) and torch datasets."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dmdd.data.foreground import ForegroundCache, resolve_policy
from dmdd.data.geometry import from_square, to_square
from dmdd.data.io import IMAGE_SUFFIXES, TILED_DECODE_PIXELS, image_size_of, list_images, read_image, read_mask
from dmdd.data.synthesis import AnomalySynthesizer
from dmdd.data.tiles import TileSpec, random_tile, scaled
from dmdd.errors import DatasetError

GOOD = "good"


@dataclass(frozen=True)
class Record:
    """One image of a dataset split.

    Attributes:
        image: image file.
        mask: ground-truth mask file; ``None`` for good images.
        label: 0 normal, 1 anomalous.
        defect_type: ``good`` or the defect folder name.
    """

    image: Path
    mask: Path | None
    label: int
    defect_type: str


@dataclass(frozen=True)
class Category:
    """Train and test records of one category."""

    name: str
    root: Path
    train: list[Record]
    test: list[Record]


def _first_file(folder: Path, stem: str, suffixes: tuple[str, ...]) -> Path | None:
    return next((folder / f"{stem}{s}" for s in suffixes if (folder / f"{stem}{s}").is_file()), None)


def _find_mask(folder: Path, stem: str, suffixes: tuple[str, ...], image: Path) -> Path:
    found = _first_file(folder, stem, suffixes)
    if found is not None:
        return found
    raise DatasetError(
        f"defect image {image} has no mask; expected {folder / (stem + suffixes[0])}: add the mask or move the image"
    )


def _good(folder: Path, recursive: bool = False) -> list[Record]:
    return [Record(p, None, 0, GOOD) for p in list_images(folder, recursive)]


def _require_train(records: list[Record], folder: Path) -> list[Record]:
    if not records:
        raise DatasetError(f"no training images in {folder}; put the good training images there")
    return records


def load_mvtec(root: Path) -> Category:
    """MVTec AD layout; also MPDD and ``../shared/data``: ``train/good``, ``test/<type>``,
    ``ground_truth/<type>/<stem>_mask.png``."""
    train = _require_train(_good(root / "train" / GOOD), root / "train" / GOOD)
    test: list[Record] = []
    for folder in sorted(p for p in (root / "test").iterdir() if p.is_dir()) if (root / "test").is_dir() else []:
        if folder.name == GOOD:
            test += _good(folder)
            continue
        for img in list_images(folder):
            mask = _find_mask(root / "ground_truth" / folder.name, f"{img.stem}_mask", (".png", ".bmp", ".tif"), img)
            test.append(Record(img, mask, 1, folder.name))
    return Category(root.name, root, train, test)


def load_btad(root: Path) -> Category:
    """BTAD: ``train/ok``, ``test/{ok,ko}``, ``ground_truth/ko/<stem>.{png,bmp}``."""
    train = _require_train(_good(root / "train" / "ok"), root / "train" / "ok")
    test = _good(root / "test" / "ok")
    for img in list_images(root / "test" / "ko"):
        test.append(Record(img, _find_mask(root / "ground_truth" / "ko", img.stem, (".png", ".bmp"), img), 1, "ko"))
    return Category(root.name, root, train, test)


def load_mvtec3d(root: Path) -> Category:
    """MVTec 3D-AD, RGB only: ``{train,test}/<type>/rgb/*.png``, masks ``test/<type>/gt/<stem>.png``."""
    train = _require_train(_good(root / "train" / GOOD / "rgb"), root / "train" / GOOD / "rgb")
    test: list[Record] = []
    for folder in sorted(p for p in (root / "test").iterdir() if p.is_dir()):
        if folder.name == GOOD:
            test += _good(folder / "rgb")
            continue
        for img in list_images(folder / "rgb"):
            test.append(Record(img, _find_mask(folder / "gt", img.stem, (".png",), img), 1, folder.name))
    return Category(root.name, root, train, test)


def load_visa(root: Path) -> Category:
    """VisA in its original form: ``<cat>/Data/{Images,Masks}``, split from ``<visa root>/split_csv/1cls.csv``."""
    visa_root, name = root.parent, root.name
    split_file = visa_root / "split_csv" / "1cls.csv"
    if not split_file.is_file():
        raise DatasetError(f"VisA split file not found: {split_file}; it ships with VisA beside the category folders")
    train, test = [], []
    with split_file.open(newline="") as f:
        for row in csv.DictReader(f):
            if row.get("object") != name:
                continue
            image = visa_root / row["image"]
            anomalous = row["label"].strip().lower() == "anomaly"
            mask = visa_root / row["mask"] if anomalous and row.get("mask") else None
            if anomalous and (mask is None or not mask.is_file()):
                raise DatasetError(f"defect image {image} has no mask (expected {mask}); restore the VisA masks")
            record = Record(image, mask, int(anomalous), "anomaly" if anomalous else GOOD)
            (train if row["split"].strip() == "train" else test).append(record)
    train.sort(key=lambda r: str(r.image))
    test.sort(key=lambda r: (r.defect_type != GOOD, str(r.image)))
    return Category(name, root, _require_train(train, split_file), test)


def load_folder(
    train_dir: Path,
    test_dirs: dict[str, Path] | None = None,
    mask_dir: Path | None = None,
) -> Category:
    """Plain folders: good training images (searched recursively), optional test folders by defect name (``good`` =
    normal), masks by stem in ``mask_dir`` or its sub-folder of the same name as the defect.

    Defect images without a mask are kept: they count for image metrics; pixel metrics use the images with masks.
    """
    train = _require_train(_good(train_dir, recursive=True), train_dir)
    return Category(train_dir.name, train_dir, train, folder_test_records(test_dirs or {}, mask_dir))


def folder_test_records(test_dirs: dict[str, Path], mask_dir: Path | None = None) -> list[Record]:
    """Labelled test records from plain folders: ``{defect name or "good": folder}``; see :func:`load_folder`."""
    test: list[Record] = []
    for name, folder in sorted(test_dirs.items()):
        if not folder.is_dir():
            raise DatasetError(f"test folder not found: {folder}")
        images = list_images(folder, recursive=True)
        if not images:
            raise DatasetError(f"test folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        if name == GOOD:
            test += [Record(p, None, 0, GOOD) for p in images]
            continue
        masks = mask_dir / name if mask_dir and (mask_dir / name).is_dir() else mask_dir
        for img in images:  # masks may cover only some images
            mask = _first_file(masks, img.stem, (".png", "_mask.png", ".bmp", ".tif")) if masks else None
            test.append(Record(img, mask, 1, name))
    return test


def load_classes(root: Path) -> Category:
    """A category folder holding ``good/`` and one folder per defect type (no train/test split): ``good`` trains,
    the defect folders are the test split; masks from ``ground_truth/<type>/`` or ``masks/<type>/`` when present."""
    masks = next((root / n for n in ("ground_truth", "masks") if (root / n).is_dir()), None)
    defects = {p.name: p for p in _class_folders(root) if p.name != GOOD}
    return load_folder(root / GOOD, defects, masks)


def _class_folders(root: Path) -> list[Path]:
    skip = {"ground_truth", "masks"}
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name not in skip and not p.name.startswith("."))


LOADERS = {"mvtec": load_mvtec, "btad": load_btad, "visa": load_visa, "mvtec3d": load_mvtec3d,
           "classes": load_classes, "folder": load_folder}  # fmt: skip


def _structured_layout(root: Path) -> str | None:
    if (root / "train" / GOOD / "rgb").is_dir():
        return "mvtec3d"
    if (root / "train" / GOOD).is_dir():
        return "mvtec"
    if (root / "train" / "ok").is_dir():
        return "btad"
    if (root / "Data" / "Images").is_dir():
        return "visa"
    if (root / GOOD).is_dir() and list_images(root / GOOD, recursive=True):
        return "classes"
    return None


def detect_layout(root: Path) -> str:
    """Name of the layout of a category folder: a known benchmark layout, ``classes`` (``good/`` beside defect
    folders) or ``folder`` (a plain folder of good images, searched recursively)."""
    layout = _structured_layout(root)
    if layout:
        return layout
    if root.is_dir() and not list_categories(root) and list_images(root, recursive=True):
        return "folder"
    found = sorted(p.name for p in root.iterdir() if p.is_dir())[:8] if root.is_dir() else []
    raise DatasetError(
        f"unknown dataset layout in {root} (sub-folders: {found or 'none'}): expected a folder of good images, "
        "good/ beside defect folders, train/good (MVTec AD, MPDD), train/good/rgb (MVTec 3D-AD), train/ok (BTAD) "
        "or Data/Images (VisA)"
    )


def list_categories(root: Path) -> list[str]:
    """Sub-folders of a dataset root that hold a known benchmark layout or ``good/`` beside defect folders, sorted."""
    if not root.is_dir():
        return []
    return [p.name for p in sorted(q for q in root.iterdir() if q.is_dir()) if _structured_layout(p)]


def load_category(root: str | Path, category: str | None = None, layout: str = "auto") -> Category:
    """Load a category from a dataset root plus ``category``, or from the category folder itself."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data folder not found: {root}")
    folder = root / category if category else root
    if not folder.is_dir():
        found = list_categories(root)
        raise DatasetError(f"category {category!r} not found in {root}; categories there: {found or 'none'}")
    layout = detect_layout(folder) if layout == "auto" else layout
    if layout not in LOADERS:
        raise DatasetError(f"unknown layout {layout!r}; choose auto, {', '.join(LOADERS)}")
    return LOADERS[layout](folder)


# --- torch datasets -----------------------------------------------------------------------------------------------


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 or float in [0, 1] -> (3, H, W) float32 in [0, 1]."""
    t = torch.from_numpy(np.array(image, copy=not image.flags.writeable or not image.flags.c_contiguous))
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    return t.permute(2, 0, 1).contiguous()


class AnomalyDataset(Dataset):
    """Evaluation samples: dicts with ``image`` (3, S, S), ``mask`` (1, E, E), ``has_mask``, ``label``,
    ``defect_type``, ``path``. A defect image without a mask file has ``has_mask`` false (and an empty mask).

    E = ``mask_size`` (default S); masks are resized with nearest neighbour.

    A mask whose size differs from its image raises :class:`DatasetError` naming both files.
    """

    def __init__(
        self, records: list[Record], image_size: int, mask_size: int | None = None, resize: str = "squash"
    ) -> None:
        self.records = records
        self.image_size = image_size
        self.mask_size = mask_size or image_size
        self.resize = resize

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        r = self.records[index]
        image = read_image(r.image, self.image_size, self.resize)
        if r.mask is None:
            mask = np.zeros((self.mask_size, self.mask_size), dtype=bool)
        else:
            mask = read_mask(r.mask, expected_hw=image_size_of(r.image), size=self.mask_size, mode=self.resize)
        return {
            "image": to_tensor(image),
            "mask": torch.from_numpy(mask.astype(np.float32))[None],
            "has_mask": r.label == 0 or r.mask is not None,
            "label": r.label,
            "defect_type": r.defect_type,
            "path": str(r.image),
        }


class PairDataset(Dataset):
    """Training pairs (normal image, synthetic anomalous image, mask), each (3|1, S, S) float in [0, 1].

    Images are decoded and resized once; foreground masks are computed once per image (cached). The pair of index
    ``i`` in epoch ``e`` draws from ``numpy.random.default_rng([seed, e, stream, i])``, so it is the same whatever
    the worker count or the order of access; items are indexed by ``i`` or by the key ``(e, stream, i)``.

    With ``tiles`` each image is kept at its own size (scaled by the tile scale) and an epoch still has one pair
    per image: a tile at a random position of it (a fresh one every epoch), with the synthetic anomaly made on the
    tile. The foreground (object or texture, and the object's mask) is decided on the whole
    image squashed to ``image_size`` and the mask cut with the tile.
    """

    def __init__(
        self,
        records: list[Record],
        image_size: int,
        synthesizer: AnomalySynthesizer,
        seed: int,
        foregrounds: ForegroundCache | None = None,
        resize: str = "squash",
        tiles: TileSpec | None = None,
    ) -> None:
        if not records:
            raise DatasetError("no training images")
        self.records = records
        self.tiles, self.image_size = tiles, image_size
        self.images = [read_image(r.image, image_size, resize) for r in records] if tiles is None else [
            scaled(read_image(r.image, reduce_above=TILED_DECODE_PIXELS), tiles) for r in records]  # fmt: skip
        squares = self.images if tiles is None else [to_square(im, image_size) for im in self.images]
        self.synthesizer = synthesizer
        self.seed = seed
        self.epoch = 0
        self.stream = 0
        cfg = synthesizer.cfg
        self.foregrounds = foregrounds or ForegroundCache(cfg)
        self.policy = "texture" if not cfg.fas else resolve_policy(squares, cfg, self.foregrounds)
        full = np.ones((image_size, image_size), dtype=bool)
        self.masks = [self.foregrounds.get(sq) if self.policy == "object" else full for sq in squares]
        if tiles is not None:
            self.masks = [None if self.policy != "object" else from_square(m.astype(np.float32), im.shape[:2]) > 0.5
                          for m, im in zip(self.masks, self.images)]  # fmt: skip

    def set_epoch(self, epoch: int, stream: int = 0) -> None:
        """Select the pairs of an epoch; ``stream`` 1 gives fresh pairs for the segmentation phase."""
        self.epoch = epoch
        self.stream = stream

    def __len__(self) -> int:
        return len(self.images)

    def pair(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.tiles is None:
            image, foreground = self.images[index], self.masks[index]
        else:
            image, foreground = random_tile(self.images[index], self.masks[index], self.tiles, self.image_size, rng)
        if foreground is None:
            foreground = np.ones(image.shape[:2], dtype=bool)
        anomalous, mask = self.synthesizer(image, foreground, rng)
        return image, anomalous, mask

    def __getitem__(self, key: int | tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pair of ``key``: an index (in the epoch and stream of :meth:`set_epoch`) or a key ``(epoch, stream,
        index)`` as :class:`~dmdd.data.order.EpochBatches` gives them."""
        epoch, stream, index = key if isinstance(key, tuple) else (self.epoch, self.stream, key)
        rng = np.random.default_rng([self.seed, epoch, stream, index])
        normal, anomalous, mask = self.pair(index, rng)
        return to_tensor(normal), to_tensor(anomalous), torch.from_numpy(mask)[None]


__all__ = [
    "IMAGE_SUFFIXES", "AnomalyDataset", "Category", "PairDataset", "Record", "detect_layout", "list_categories",
    "load_btad", "load_category", "load_folder", "load_mvtec", "load_mvtec3d", "load_visa",
]  # fmt: skip
