"""MSN variants on one trained student: the same maps, the same synthetic pairs, the same number of head steps.

The student of a checkpoint is frozen. A pool of fresh synthetic pairs (a random stream training never used) made
from the training images gives the stacked maps once; each head variant then trains for ``--steps`` steps on
batches drawn from that pool (normal images in every batch, L_seg of eq. 5) and is scored on the test split next to
the plain sum of the same standardised maps:

- ``residual``: dmdd's default head (correction on top of the plain sum, 8 x 8 G);
- ``paper``: the paper's head alone (no residual), full-resolution G;
- ``paper_g8``: the paper's head with the 8 x 8 G.

Example:
    python benchmarks/msn_heads.py runs/tire/last.pt --category tire --steps 100
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from common import checkpoint_parser, open_checkpoint
from torch.utils.data import DataLoader

from dmdd import metrics
from dmdd.data import load_category
from dmdd.data.datasets import AnomalyDataset, PairDataset
from dmdd.data.foreground import ForegroundCache
from dmdd.data.synthesis import AnomalySynthesizer
from dmdd.engine import split_holdout
from dmdd.losses import segmentation_loss
from dmdd.models.segmentation import SegmentationHead, gaussian_blur, top_k_score

POOL_STREAM = 20_000


@torch.inference_mode()
def pool_maps(model, records, cfg, pairs: int, seed: int):
    synth = AnomalySynthesizer(cfg.synthesis)
    data = PairDataset(records, cfg.model.image_size, synth, seed, ForegroundCache(cfg.synthesis))
    data.set_epoch(0, POOL_STREAM)
    order = np.random.default_rng([seed, POOL_STREAM]).permutation(len(data))[:pairs]
    normal_maps, anomalous_maps, masks = [], [], []
    for start in range(0, len(order), 8):
        batch = [data[int(i)] for i in order[start : start + 8]]
        normal_maps.append(model.stacked_maps(torch.stack([b[0] for b in batch])))
        anomalous_maps.append(model.stacked_maps(torch.stack([b[1] for b in batch])))
        masks.append(torch.stack([b[2] for b in batch]))
    return torch.cat(normal_maps), torch.cat(anomalous_maps), torch.cat(masks)


@torch.inference_mode()
def test_maps(model, records, cfg):
    data = AnomalyDataset(records, cfg.model.image_size, mask_size=cfg.model.image_size)
    maps, masks, labels = [], [], []
    for batch in DataLoader(data, batch_size=8):
        maps.append(model.stacked_maps(batch["image"]))
        masks.append(batch["mask"][:, 0].numpy().astype(bool))
        labels.append(np.asarray(batch["label"]))
    return torch.cat(maps), np.concatenate(masks), np.concatenate(labels)


def train_head(head, pool, steps: int, lr: float, top_k: int, seed: int):
    normal, anomalous, masks = pool
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    head.train()
    for _ in range(steps):
        i = torch.randperm(len(normal), generator=gen)[:8]
        x = torch.cat([normal[i], anomalous[i]])
        y = torch.cat([torch.zeros_like(masks[i]), masks[i]])
        logits = head(x)
        loss = segmentation_loss(logits, top_k_score(torch.sigmoid(logits), top_k), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return head.eval()


def scores(maps: np.ndarray, image_scores: np.ndarray, masks, labels) -> dict:
    return {"image_auroc": metrics.auroc(labels, image_scores), "pixel_auroc": metrics.auroc(masks, maps),
            "au_pro": metrics.au_pro(masks, maps)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = checkpoint_parser(__doc__)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--pairs", type=int, default=64, help="size of the pool of synthetic pairs")
    p.add_argument("--out", help="JSON file for the results")
    args = p.parse_args(argv)
    model, payload, cfg = open_checkpoint(args)
    category = load_category(args.data, args.category)
    train, _ = split_holdout(category.train, cfg.train.holdout_fraction, cfg.train.seed)
    start = time.perf_counter()
    pool = pool_maps(model, train, cfg, args.pairs, cfg.train.seed)
    maps, masks, labels = test_maps(model, category.test, cfg)
    sigma = cfg.model.map_sigma
    smooth = (lambda m: gaussian_blur(m, sigma)) if sigma > 0 else (lambda m: m)  # noqa: E731
    plain = smooth(maps.sum(1, keepdim=True))[:, 0].numpy()
    result = {"plain_sum": scores(plain, plain.reshape(len(plain), -1).max(1), masks, labels)}
    k, size = maps.shape[1], maps.shape[-1]
    variants = {"residual": dict(global_size=cfg.model.global_attention_size or size, residual=True),
                "paper": dict(global_size=size, residual=False),
                "paper_g8": dict(global_size=8, residual=False)}  # fmt: skip
    for name, kw in variants.items():
        torch.manual_seed(cfg.train.seed)
        head = SegmentationHead(k, size, cfg.model.seg_channels, cfg.model.multi_perception, **kw)
        head = train_head(head, pool, args.steps, cfg.train.seg_lr, cfg.model.top_k, cfg.train.seed)
        with torch.inference_mode():
            out = torch.cat([smooth(torch.sigmoid(head(maps[i : i + 16]))) for i in range(0, len(maps), 16)])
        result[name] = scores(out[:, 0].numpy(), top_k_score(out, cfg.model.top_k).numpy(), masks, labels)
    record = {"checkpoint": args.checkpoint, "step": payload.get("step"), "head_steps": args.steps,
              "pool_pairs": args.pairs, "seconds": round(time.perf_counter() - start, 1), **result}  # fmt: skip
    print(json.dumps(record))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
