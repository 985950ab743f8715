"""Where the student drifts from the teacher, and where its maps peak on good test images.

For a checkpoint: (1) relative weight change ||W_student - W_teacher|| / ||W_teacher|| per stage, split into
convolution weights and BatchNorm affine parameters, and of the 1x1 split convs from their identity start;
(2) on the good test images, the share of each map's top-1 % pixels that fall on the background (outside the
GrabCut foreground used by anomaly synthesis), next to the background's share of all pixels.

Example:
    python benchmarks/drift_probe.py runs/tire/last.pt --category tire
"""

from __future__ import annotations

import json

import numpy as np
import torch
from common import checkpoint_parser, open_checkpoint
from torch import nn
from torch.nn import functional as F

from dmdd.data import load_category
from dmdd.data.datasets import to_tensor
from dmdd.data.foreground import ForegroundCache
from dmdd.data.io import read_image


def weight_drift(model) -> dict:
    out = {}
    for i, (s_stage, t_stage) in enumerate(zip(model.student.stages, model.teacher), start=1):
        conv_num = conv_den = bn_num = bn_den = 0.0
        for s_mod, t_mod in zip(s_stage.modules(), t_stage.modules()):
            if isinstance(s_mod, nn.Conv2d):
                conv_num += float((s_mod.weight - t_mod.weight).pow(2).sum())
                conv_den += float(t_mod.weight.pow(2).sum())
            elif isinstance(s_mod, nn.modules.batchnorm._BatchNorm) and s_mod.affine:
                for p, q in ((s_mod.weight, t_mod.weight), (s_mod.bias, t_mod.bias)):
                    bn_num += float((p - q).pow(2).sum())
                    bn_den += float(q.pow(2).sum())
        split = model.student.splits[i - 1].weight
        c = split.shape[1]
        eye = torch.cat([torch.eye(c), torch.eye(c)]).view_as(split)
        out[f"stage{i}"] = {"conv": (conv_num / conv_den) ** 0.5, "bn_affine": (bn_num / max(bn_den, 1e-12)) ** 0.5,
                            "split_1x1": float((split - eye).norm() / eye.norm())}  # fmt: skip
    return out


@torch.inference_mode()
def background_share(model, cfg, records) -> dict:
    cache = ForegroundCache(cfg.synthesis)
    names = [f"ngm{i}" for i in range(1, 5)] + [f"aim{i}" for i in range(1, 5)]
    hits = np.zeros(len(names))
    total = np.zeros(len(names))
    background = []
    for r in records:
        image = read_image(r.image, cfg.model.image_size)
        fg = torch.from_numpy(cache.get(image)).bool()
        ngm, aim = model.stage_maps(model.features(to_tensor(image)[None]))
        maps = torch.cat([F.interpolate(m, size=fg.shape, mode="bilinear") for m in ngm + aim], 1)[0]
        background.append(float((~fg).float().mean()))
        for k in range(maps.shape[0]):
            top = maps[k] >= torch.quantile(maps[k].flatten(), 0.99)
            hits[k] += float((top & ~fg).sum())
            total[k] += float(top.sum())
    return {"background_pixel_share": float(np.mean(background)),
            **{n: float(h / t) for n, h, t in zip(names, hits, total)}}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = checkpoint_parser(__doc__, threads=1).parse_args(argv)
    model, payload, cfg = open_checkpoint(args)
    good = [r for r in load_category(args.data, args.category).test if r.label == 0]
    result = {"checkpoint": args.checkpoint, "step": payload.get("step"), "weight_drift": weight_drift(model),
              "top1pct_on_background_good_test": background_share(model, cfg, good)}  # fmt: skip
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
