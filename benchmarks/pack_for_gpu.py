"""Pack one real category (and the DTD textures) small enough to travel to a lent GPU machine (64 MiB a call).

Images are brought to the model's square size here, with dmdd's own reader (``read_image``, squash mode), and stored
as lossless WebP; masks the same way with nearest neighbour, as PNG. Training and evaluation at that size then see
exactly the pixels they see when reading the original files. The textures are squashed to the same size and stored
as lossy WebP (quality 80): the synthesis draws the same files in the same order, but their pixels differ slightly
from the originals (they go through DRAEM's random augmenters anyway). The folder must be ignored by git.

Example:
    python benchmarks/pack_for_gpu.py --category tire --out gpudata
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from common import add_data_args, parser
from PIL import Image

from dmdd.data.io import IMAGE_SUFFIXES, read_image, read_mask


def pack_tree(src: Path, dst: Path, size: int, texture: bool = False) -> int:
    """Every image under ``src`` -> ``dst`` at (size, size); returns bytes written. Files under a ``ground_truth``
    folder are masks."""
    total = 0
    for path in sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        rel = path.relative_to(src)
        is_mask = "ground_truth" in path.relative_to(src.parent).parts
        if is_mask:
            mask = read_mask(path, size=size).astype(np.uint8) * 255
            out, image = (dst / rel).with_suffix(".png"), Image.fromarray(mask)
            kwargs: dict = {}
        else:
            arr = read_image(path, size)
            grey = np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])
            out, image = (dst / rel).with_suffix(".webp"), Image.fromarray(arr[..., 0] if grey else arr)
            kwargs = {"quality": 80, "method": 6} if texture else {"lossless": True, "quality": 100, "method": 6}
        out.parent.mkdir(parents=True, exist_ok=True)
        image.save(out, **kwargs)
        total += out.stat().st_size
    return total


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    add_data_args(p)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    data, out = Path(args.data), Path(args.out)
    for name, texture in ((args.category, False), ("textures/dtd10", True)):
        # tire keeps train/, test/ and ground_truth/ (its validation/ split is not used by the loader)
        src = data / name
        parts = [src / d for d in ("train", "test", "ground_truth")] if not texture else [src]
        written = sum(pack_tree(part, out / name / part.relative_to(src), args.size, texture) for part in parts)
        print(f"{name}: {written / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
