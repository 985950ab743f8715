"""Small defects in camera-size images: squash-256 against tiles, per defect size.

``make`` builds an MVTec-layout category from a development set: its good images upscaled ``--upscale`` times
(train/good, test/good), and for each size in ``--sizes`` one test folder (``size08``, ``size16``, ...) where every
good test image carries one real defect cut out of the set's defective test images with its mask, scaled so that
its longer side is that many pixels, and pasted (alpha-blended by its mask) at a seeded random position of the
image's central half; the masks go to ground_truth/. Then ``benchmarks/suites/small_defects.yaml`` trains and
tests dmdd on it with and without tiles at equal minutes (per-size rows: ``table=per_type``).

``speed`` measures inference on one camera-size image (5 MP and 20 MP by default) per checkpoint, each in a fresh
process: seconds per image and the process's peak resident memory.

    python benchmarks/small_defects.py make --category tire --out runs/small_defects
    DMDD_SMALL=runs/small_defects dmdd benchmark benchmarks/suites/small_defects.yaml
    python benchmarks/small_defects.py speed CKPT [CKPT ...] --out docs/results/small_defects_speed.json
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from common import DATA, parser

from dmdd.data import load_category
from dmdd.data.io import read_image, read_mask


def defect_patches(category) -> list[tuple[np.ndarray, np.ndarray]]:
    """(RGB crop, float mask crop) around each defective test image's mask."""
    patches = []
    for r in category.test:
        if not r.label or r.mask is None:
            continue
        image, mask = read_image(r.image), read_mask(r.mask)
        ys, xs = np.nonzero(mask)
        if ys.size < 4:
            continue
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        patches.append((image[y0:y1, x0:x1], mask[y0:y1, x0:x1].astype(np.float32)))
    return patches


def paste(base: np.ndarray, patch: tuple[np.ndarray, np.ndarray], size: int, rng: np.random.Generator):
    """``base`` with the patch scaled to a longer side of ``size`` px at a random place of its central half."""
    crop, alpha = patch
    factor = size / max(crop.shape[:2])
    hw = (max(1, round(crop.shape[1] * factor)), max(1, round(crop.shape[0] * factor)))
    crop = cv2.resize(crop, hw, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
    alpha = cv2.resize(alpha, hw, interpolation=cv2.INTER_LINEAR)[..., None]
    h, w = base.shape[:2]
    ph, pw = crop.shape[:2]
    top = int(rng.integers(h // 4, max(h // 4 + 1, 3 * h // 4 - ph)))
    left = int(rng.integers(w // 4, max(w // 4 + 1, 3 * w // 4 - pw)))
    out = base.astype(np.float32)
    region = out[top : top + ph, left : left + pw]
    out[top : top + ph, left : left + pw] = region * (1 - alpha) + crop * alpha
    mask = np.zeros((h, w), np.uint8)
    mask[top : top + ph, left : left + pw] = (alpha[..., 0] >= 0.5) * 255
    return out.round().astype(np.uint8), mask


def make(args) -> int:
    category = load_category(args.data, args.category)
    out = Path(args.out) / f"{args.category}_x{args.upscale}"
    rng = np.random.default_rng(args.seed)
    patches = defect_patches(category)

    def big(path: Path) -> np.ndarray:
        image = read_image(path)
        return cv2.resize(image, (image.shape[1] * args.upscale, image.shape[0] * args.upscale),
                          interpolation=cv2.INTER_CUBIC)  # fmt: skip

    def write(path: Path, rgb: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 else rgb,
                    [cv2.IMWRITE_PNG_COMPRESSION, 1])  # fmt: skip

    for i, r in enumerate(category.train):
        write(out / "train" / "good" / f"{i:03d}.png", big(r.image))
    goods = [r for r in category.test if not r.label]
    for i, r in enumerate(goods):
        base = big(r.image)
        write(out / "test" / "good" / f"{i:03d}.png", base)
        for size in args.sizes:
            image, mask = paste(base, patches[int(rng.integers(len(patches)))], size, rng)
            write(out / "test" / f"size{size:02d}" / f"{i:03d}.png", image)
            write(out / "ground_truth" / f"size{size:02d}" / f"{i:03d}_mask.png", mask)
    print(f"{out}: {len(category.train)} train, {len(goods)} good test images, {len(goods)} per size {args.sizes}, "
          f"{len(patches)} defect patches")  # fmt: skip
    return 0


def speed_one(checkpoint: str, megapixels: float, repeats: int, threads: int) -> dict:
    """In this process: score one synthetic camera image (upscaled noise) ``repeats`` times."""
    import torch

    from dmdd.deploy.predict import Predictor

    torch.set_num_threads(threads)
    h = int(round((megapixels * 1e6 * 3 / 4) ** 0.5))
    w = int(round(h * 4 / 3))
    small = np.random.default_rng(0).integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
    image = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    predictor = Predictor(checkpoint, "cpu")
    predictor.score_full([image])  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        predictor.score_full([image])
    seconds = (time.perf_counter() - start) / repeats
    return {"checkpoint": checkpoint, "tile": predictor.tiles.size if predictor.tiles else 0, "width": w, "height": h,
            "megapixels": round(h * w / 1e6, 1), "seconds_per_image": round(seconds, 2), "threads": threads,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # fmt: skip


def speed(args) -> int:
    rows = []
    for ckpt in args.checkpoints:
        for mp in args.megapixels:
            done = subprocess.run([sys.executable, __file__, "_speed_one", ckpt, str(mp), str(args.repeats),
                                   str(args.threads)],
                                  capture_output=True, text=True, check=True)  # fmt: skip
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    return 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_speed_one":
        print(json.dumps(speed_one(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))))
        return 0
    p = parser(__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make")
    m.add_argument("--category", required=True)
    m.add_argument("--data", default=str(DATA))
    m.add_argument("--upscale", type=int, default=4)
    m.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[8, 16, 32, 64])
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--out", required=True)
    s = sub.add_parser("speed")
    s.add_argument("checkpoints", nargs="+")
    s.add_argument("--megapixels", type=lambda v: [float(x) for x in v.split(",")], default=[5.0, 20.0])
    s.add_argument("--repeats", type=int, default=2)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--out", required=True)
    args = p.parse_args()
    return make(args) if args.command == "make" else speed(args)


if __name__ == "__main__":
    raise SystemExit(main())
