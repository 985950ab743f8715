"""Compare models trained with different ``model.resize`` modes on the same pixels: each image's own.

`dmdd test` scores a model on its square input, so a padded model is also scored on its black borders and a
cropped one never on what it cut away. Here every map is brought back to its image's own pixels
(``dmdd.geometry.from_square``: the padding dropped, the cropped-away parts at the map's minimum, i.e. missed) and
then resampled, like the mask, onto one E x E grid of the original image (stretched); all modes are scored on
exactly the same pixels. The image score is the model's own.

Example:
    python benchmarks/resize_modes.py squash=runs/resize_squash.pt pad=runs/resize_pad/last.pt \\
        crop=runs/resize_crop/last.pt --category tire --out benchmarks/resize_modes_tire.json
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import torch
from common import add_data_args, parser
from PIL import Image
from torch.utils.data import DataLoader

from dmdd import metrics
from dmdd.checkpoint import config_of, restore_model
from dmdd.data import load_category
from dmdd.data.datasets import AnomalyDataset
from dmdd.geometry import from_square


@torch.inference_mode()
def on_original_pixels(model, cfg, records, eval_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores (N,), maps (N, E, E)) with every map on its image's own pixels, stretched to E x E."""
    data = AnomalyDataset(records, cfg.model.image_size, resize=cfg.model.resize)
    scores, maps = [], []
    for start, batch in zip(range(0, len(records), 8), DataLoader(data, batch_size=8)):
        out = model(batch["image"])
        scores.append(out.pred_score.numpy())
        for record, amap in zip(records[start : start + 8], out.anomaly_map[:, 0].numpy()):
            w, h = Image.open(record.image).size
            own = from_square(amap, (h, w), cfg.model.resize)
            maps.append(cv2.resize(own, (eval_size, eval_size), interpolation=cv2.INTER_LINEAR))
    return np.concatenate(scores), np.stack(maps)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("models", nargs="+", help="NAME=CHECKPOINT")
    add_data_args(p)
    p.add_argument("--eval-size", type=int, default=256)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    category = load_category(args.data, args.category)
    truth = AnomalyDataset(category.test, args.eval_size)  # masks stretched to E x E, like the maps
    masks = np.stack([truth[i]["mask"][0].numpy().astype(bool) for i in range(len(truth))])
    labels = np.array([r.label for r in category.test])
    result = {}
    for spec in args.models:
        name, path = spec.split("=", 1)
        model, payload = restore_model(path)
        cfg = config_of(payload, path)
        scores, maps = on_original_pixels(model, cfg, category.test, args.eval_size)
        result[name] = {"checkpoint": path, "resize": cfg.model.resize, "step": payload.get("step"),
                        "image_auroc": metrics.auroc(labels, scores), "pixel_auroc": metrics.auroc(masks, maps),
                        "au_pro": metrics.au_pro(masks, maps)}  # fmt: skip
        print(name, json.dumps(result[name]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
