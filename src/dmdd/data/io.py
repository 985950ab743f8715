"""Image and mask decoding with one clear error per bad file."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from dmdd.data.geometry import to_square
from dmdd.errors import DatasetError, ImageReadError, ImageTooLargeError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# Images larger than this (pixels) are reduced while decoding, before any full-size array exists.
MAX_DECODE_PIXELS = 4096 * 4096
# Models that work on tiles keep every pixel up to this (a 20 MP camera image is decoded whole, 60 MB as RGB).
TILED_DECODE_PIXELS = 8192 * 8192
MIN_SIDE = 8  # smaller images carry no usable detail at any backbone stride


def _pil_open(source: Path | io.BytesIO, name: object) -> Image.Image:
    """Open (header only) without Pillow's pixel limit: huge images are reduced while decoding instead."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)
            image.MAX_IMAGE_PIXELS = None
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(name, f"image too large ({exc})") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        detail = f": {exc}" if isinstance(source, Path) else ""  # an in-memory file's message names only the buffer
        raise ImageReadError(name, f"not a readable image ({type(exc).__name__}{detail})") from exc
    return image


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise ImageReadError(path, "file not found")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "the file is empty (0 bytes)")
    return _pil_open(path, path)


def _open_bytes(data: bytes, name: str, max_pixels: int | None) -> Image.Image:
    """Open an uploaded image from memory; refuse more than ``max_pixels`` from the header alone (no decoding)."""
    if not data:
        raise ImageReadError(name, "the file is empty (0 bytes)")
    image = _pil_open(io.BytesIO(data), name)
    w, h = image.size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageTooLargeError(name, f"image is {w}x{h} px, more than the limit of {max_pixels} pixels")
    return image


def _decode(image: Image.Image, path: Path | str, max_side: int | None,
            reduce_above: int = MAX_DECODE_PIXELS) -> Image.Image:  # fmt: skip
    """Load pixel data, reducing images of more than ``reduce_above`` pixels early (JPEG draft mode, then integer
    reduce)."""
    w, h = image.size
    if w < MIN_SIDE or h < MIN_SIDE:
        raise ImageReadError(path, f"image is {w}x{h} px, smaller than the minimum side of {MIN_SIDE} px")
    try:
        if max_side is not None and image.format == "JPEG" and image.mode in ("RGB", "L", "CMYK"):
            image.draft(image.mode, (max_side, max_side))  # decode at 1/2, 1/4 or 1/8 scale
        image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageReadError(path, f"corrupt or truncated image data ({type(exc).__name__}: {exc})") from exc
    factor = 1
    if max_side is not None:
        factor = max(1, min(image.size) // max_side)
    if image.size[0] * image.size[1] > reduce_above:
        factor = max(factor, int(np.ceil(np.sqrt(image.size[0] * image.size[1] / reduce_above))))
    if factor > 1 and image.mode not in ("P", "1"):
        image = image.reduce(factor)
    return image


def _to_uint8_rgb(image: Image.Image) -> np.ndarray:
    """Grey, 16-bit, RGBA, palette and CMYK images -> (H, W, 3) uint8 RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        grey = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def read_image(path: str | Path, size: int | None = None, mode: str = "squash",
               reduce_above: int = MAX_DECODE_PIXELS) -> np.ndarray:  # fmt: skip
    """Read an image as (H, W, 3) uint8 RGB, brought to (size, size) with ``mode`` when given (see
    :func:`to_square`); images of more than ``reduce_above`` pixels are reduced while decoding (models on tiles
    pass ``TILED_DECODE_PIXELS``).

    Raises:
        ImageReadError: missing, empty, truncated or undecodable file.
    """
    path = Path(path)
    image = _decode(_open(path), path, size, reduce_above)
    arr = _to_uint8_rgb(image)
    return arr if size is None else to_square(arr, size, mode)


def decode_image(data: bytes, name: str = "upload", max_pixels: int | None = None,
                 reduce_above: int = MAX_DECODE_PIXELS) -> np.ndarray:  # fmt: skip
    """Decode image bytes (an upload) as (H, W, 3) uint8 RGB, huge images reduced as :func:`read_image` does.

    Raises:
        ImageReadError: empty, not an image, truncated, or more than ``max_pixels`` pixels (checked on the header,
            before any pixel is decoded: a decompression bomb costs nothing).
    """
    return _to_uint8_rgb(_decode(_open_bytes(data, name, max_pixels), name, None, reduce_above))


def read_mask(
    path: str | Path, expected_hw: tuple[int, int] | None = None, size: int | None = None, mode: str = "squash"
) -> np.ndarray:
    """Read a ground-truth mask as a (H, W) bool array (pixels >= 128 of 255 are anomalous).

    Args:
        path: mask file.
        expected_hw: the (H, W) of its image; a different mask size is an error.
        size: bring to (size, size) with ``mode`` (as its image), nearest neighbour.
        mode: ``squash``, ``pad`` or ``crop`` (see :func:`to_square`).

    Raises:
        ImageReadError: undecodable file.
        DatasetError: mask size differs from its image.
    """
    path = Path(path)
    image = _open(path)
    if expected_hw is not None and (image.size[1], image.size[0]) != tuple(expected_hw):
        raise DatasetError(
            f"mask {path} is {image.size[0]}x{image.size[1]} but its image is {expected_hw[1]}x{expected_hw[0]}; "
            "masks must have the size of their image"
        )
    image = _decode(image, path, None)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        grey = arr / (65535.0 if arr.max() > 255 else 255.0) * 255.0
    else:
        grey = np.asarray(image.convert("L"), dtype=np.float64)
    if grey.max() <= 1.0 and grey.max() > 0:  # 0/1 masks
        grey = grey * 255.0
    levels = np.unique(grey)
    if levels.size > 2 or (levels.size == 2 and levels[0] != 0):
        warnings.warn(
            f"mask {path} is not binary ({levels.size} grey levels); pixels >= 128 count as anomalous",
            stacklevel=2,
        )
    mask = grey >= 128
    if size is not None and (mask.shape != (size, size) or mode != "squash"):
        mask = to_square(mask.astype(np.uint8), size, mode, nearest=True).astype(bool)
    return mask


def image_size_of(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image file from its header."""
    image = _open(Path(path))
    return image.size[1], image.size[0]


def decoded_size(path: str | Path, reduce_above: int = TILED_DECODE_PIXELS) -> tuple[int, int]:
    """(H, W) that :func:`read_image` will return (no size given), from the header: reduced like the decoder."""
    h, w = image_size_of(path)
    factor = int(np.ceil(np.sqrt(h * w / reduce_above))) if h * w > reduce_above else 1
    return (-(-h // factor), -(-w // factor)) if factor > 1 else (h, w)


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (and, with ``recursive``, its sub-folders, hidden ones skipped, symlinked folders not
    followed), sorted by path; symlink loops and unreadable entries are skipped."""
    if not folder.is_dir():
        return []
    if recursive:
        found: list[Path] = []
        for parent, dirs, _ in os.walk(folder, followlinks=False):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found += list_images(Path(parent))
        return sorted(found)
    out = []
    for p in folder.iterdir():
        try:
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
                out.append(p)
        except OSError:  # e.g. a symlink loop
            continue
    return sorted(out)
