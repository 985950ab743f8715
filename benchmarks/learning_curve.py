"""Learning curves: evaluate the snapshots of a run on the test split, every fusion of the eight maps side by side.

For each ``RUN/snapshots/step_*.pt`` (written by training with ``train.snapshot_every``) one pass over the test
images gives the model's own output (its default fusion) and the eight raw stage maps; from them it scores:

- ``default``: the model's output as configured (MSN or plain sum, normalised, smoothed);
- ``sum_raw``: the plain sum of the eight upsampled raw maps, no smoothing, score = max (the paper's "w/o MSN");
  ``sum_raw_smooth``: the same, smoothed; ``raw_stages...``: raw sums over some stages, smoothed;
- ``sum_norm``: each map standardised by statistics of the held-out good training images, summed, smoothed
  (``sum_norm_sigma0``: not smoothed);
- ``ngm_norm`` / ``aim_norm``: the same over one branch only (Table 4's single-branch maps);
- ``sum_norm_local``: standardised per 16 x 16 grid cell (position-wise statistics of the held-out images);
- ``stages123`` / ``stages23`` / ``stages234`` / ``stages3``: normalised sums over some stages (both branches);
- with ``--per-map``: every single map ``ngm1..4``, ``aim1..4`` (smoothed).

Normalisation statistics come from the run's held-out good training images, never from the test split. Results are
appended to ``RUN/curve.jsonl`` (a finished step is skipped on a rerun) and drawn into ``RUN/curve.png``.

A run trained with ``train.ema_decay`` keeps both the averaged weights (the model's maps) and the raw training
weights in each snapshot; ``--weights training`` scores the raw ones (statistics refitted on the same held-out
images) into ``RUN/curve_training.jsonl``. ``--quick`` scores only ``default`` and ``sum_norm``.

Example:
    python benchmarks/learning_curve.py runs/tire_curve --category tire --per-map
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from common import add_data_args, parser
from torch.nn import functional as F
from torch.utils.data import DataLoader

from dmdd import metrics
from dmdd.checkpoint import config_of, load_checkpoint, restore_model
from dmdd.data import load_category
from dmdd.data.datasets import AnomalyDataset
from dmdd.engine import split_holdout
from dmdd.evaluation import fit_map_statistics
from dmdd.models.segmentation import gaussian_blur


@torch.inference_mode()
def raw_and_default(model, records, image_size: int, eval_size: int, with_masks: bool, device=None):
    """(default maps (N, E, E), default scores (N,), raw maps (N, K, E, E), masks (N, E, E), labels (N,)); the
    model runs on ``device`` (default CPU)."""
    device = torch.device(device or "cpu")
    model.to(device)
    data = AnomalyDataset(records, image_size, mask_size=eval_size)
    maps, scores, raws, masks, labels = [], [], [], [], []
    for batch in DataLoader(data, batch_size=8):
        images = batch["image"].to(device)
        feats = model.features(images)
        ngm, aim = model.stage_maps(feats)
        out = model.fuse(model.stack(ngm, aim, images.shape[-2:]), feats.teacher)  # the model's own image score
        raw = torch.cat([F.interpolate(m, size=images.shape[-2:], mode="bilinear") for m in ngm + aim], 1)
        if eval_size != images.shape[-1]:
            raw = F.interpolate(raw, size=(eval_size, eval_size), mode="bilinear")
            out = out._replace(anomaly_map=F.interpolate(out.anomaly_map, size=(eval_size, eval_size), mode="bilinear"))
        maps.append(out.anomaly_map[:, 0].cpu().numpy())
        scores.append(out.pred_score.cpu().numpy())
        raws.append(raw.cpu().numpy())
        if with_masks:
            masks.append(batch["mask"][:, 0].numpy().astype(bool))
            labels.append(np.asarray(batch["label"]))
    cat = np.concatenate
    return cat(maps), cat(scores), cat(raws), (cat(masks) if masks else None), (cat(labels) if labels else None)


def local_statistics(hold: np.ndarray, grid: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-map mean and std in a grid x grid layout of cells over the held-out maps (N, K, E, E), upsampled
    bilinearly to (K, size, size); the std is floored at half the map's global std."""
    t = torch.from_numpy(hold)
    mean = F.adaptive_avg_pool2d(t, grid).mean(0, keepdim=True)
    square = F.adaptive_avg_pool2d(t**2, grid).mean(0, keepdim=True)
    std = (square - mean**2).clamp_min(0).sqrt()
    floor = torch.from_numpy(hold.std(axis=(0, 2, 3))).view(1, -1, 1, 1) * 0.5
    std = torch.maximum(std, floor)
    up = lambda x: F.interpolate(x, size=(size, size), mode="bilinear")[0].numpy()  # noqa: E731
    return up(mean), up(std)


def variants(raw: np.ndarray, mean: np.ndarray, std: np.ndarray, sigma: float, per_map: bool, local=None) -> dict:
    """Name -> (N, E, E) map of every fusion evaluated (see the module docstring)."""
    k = raw.shape[1]
    z = (raw - mean[None, :, None, None]) / std[None, :, None, None]

    def smooth(m: np.ndarray) -> np.ndarray:
        return gaussian_blur(torch.from_numpy(m[:, None]), sigma)[:, 0].numpy() if sigma > 0 else m

    out = {"sum_raw": raw.sum(1), "sum_raw_smooth": smooth(raw.sum(1)), "sum_norm": smooth(z.sum(1)),
           "sum_norm_sigma0": z.sum(1)}  # fmt: skip
    if k == 8:
        out["ngm_norm"] = smooth(z[:, :4].sum(1))
        out["aim_norm"] = smooth(z[:, 4:].sum(1))
        out["ngm_raw"] = smooth(raw[:, :4].sum(1))
        out["aim_raw"] = smooth(raw[:, 4:].sum(1))
    if local is not None:
        out["sum_norm_local"] = smooth(((raw - local[0][None]) / local[1][None]).sum(1))
    if k == 8:  # normalised sums over a subset of stages, both branches
        for stages in ((1, 2, 3), (2, 3), (2, 3, 4), (3,)):
            index = [i - 1 for i in stages] + [i + 3 for i in stages]
            out["stages" + "".join(map(str, stages))] = smooth(z[:, index].sum(1))
            out["raw_stages" + "".join(map(str, stages))] = smooth(raw[:, index].sum(1))
    if per_map:
        names = [f"ngm{i}" for i in range(1, 5)] + [f"aim{i}" for i in range(1, 5)] if k == 8 else []
        for i, name in enumerate(names):
            out[name] = smooth(raw[:, i])
    return out


def score(labels, masks, maps, image_scores=None) -> dict:
    image_scores = maps.reshape(len(maps), -1).max(1) if image_scores is None else image_scores
    return {"image_auroc": metrics.auroc(labels, image_scores), "pixel_auroc": metrics.auroc(masks, maps),
            "au_pro": metrics.au_pro(masks, maps)}  # fmt: skip


def evaluate_snapshot(
    path: Path, category, per_map: bool, weights: str = "map", quick: bool = False, device: str = "cpu"
) -> dict:
    model, payload = restore_model(path)
    cfg = config_of(payload, path)
    _, holdout = split_holdout(category.train, cfg.train.holdout_fraction, cfg.train.seed)
    if weights == "training":
        if payload.get("training_student") is None:
            raise SystemExit(f"{path} holds no training weights (the run had no train.ema_decay)")
        model.load_state_dict(payload["training_student"], strict=False)
        if model.cfg.map_normalization:
            fit_map_statistics(model, holdout, cfg, torch.device(device))
    _, _, hold_raw, _, _ = raw_and_default(model, holdout, cfg.model.image_size, cfg.train.eval_size, False, device)
    mean, std = hold_raw.mean(axis=(0, 2, 3)), hold_raw.std(axis=(0, 2, 3)) + 1e-12
    local = local_statistics(hold_raw, 16, hold_raw.shape[-1])
    maps, scores, raw, masks, labels = raw_and_default(
        model, category.test, cfg.model.image_size, cfg.train.eval_size, True, device
    )
    result = {"default": score(labels, masks, maps, scores)}
    for name, m in variants(raw, mean, std, cfg.model.map_sigma, per_map, local).items():
        if not quick or name == "sum_norm":
            result[name] = score(labels, masks, m)
    return {"step": int(payload.get("step", 0)), "epoch": int(payload["epoch"]), "snapshot": path.name, **result}


FUSIONS = ("default", "sum_raw", "sum_norm", "stages123", "ngm_norm", "aim_norm")
MAPS = tuple(f"{b}{i}" for b in ("ngm", "aim") for i in range(1, 5))


def plot(rows: list[dict], out: Path, title: str) -> None:
    """Two rows of three panels (I-AUROC, P-AUROC, AU-PRO against steps): fusions on top, single maps below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["step"])
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5), sharex=True)
    metrics_ = (("image_auroc", "I-AUROC"), ("pixel_auroc", "P-AUROC"), ("au_pro", "AU-PRO"))
    for row, names in zip(axes, (FUSIONS, MAPS)):
        for ax, (key, label) in zip(row, metrics_):
            for name in names:
                pts = [(r["step"], 100 * r[name][key]) for r in rows if name in r]
                if not pts:
                    continue
                style = "--" if name.startswith("aim") and names is MAPS else "-"
                ax.plot(*zip(*pts), style, marker="o", ms=3, label=name, lw=2.5 if name == "default" else 1.2)
            ax.set_title(label)
            ax.grid(alpha=0.3)
        row[0].set_ylabel("% (fusions)" if names is FUSIONS else "% (single maps)")
        if row[-1].lines:
            row[-1].legend(fontsize=8, ncol=2)
    for ax in axes[1]:
        ax.set_xlabel("student steps")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def table(rows: list[dict]) -> str:
    """Markdown: one row per step, I-AUROC / P-AUROC / AU-PRO (%) of every fusion evaluated."""
    rows = sorted(rows, key=lambda r: r["step"])
    names = [k for k in rows[-1] if isinstance(rows[-1][k], dict)]
    head = "| step | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n"

    def cell(r, n):
        v = r.get(n)
        return " / ".join(f"{100 * v[m]:.1f}" for m in ("image_auroc", "pixel_auroc", "au_pro")) if v else "-"

    return head + "".join(f"| {r['step']} | " + " | ".join(cell(r, n) for n in names) + " |\n" for r in rows)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("run", help="run folder with snapshots/")
    add_data_args(p)
    p.add_argument("--per-map", action="store_true", help="also every single map")
    p.add_argument("--only", nargs="*", type=int, help="evaluate only these steps")
    p.add_argument(
        "--weights",
        choices=["map", "training"],
        default="map",
        help="the snapshot's map weights (the average with train.ema_decay) or its raw training weights",
    )
    p.add_argument("--quick", action="store_true", help="score only the default map and sum_norm")
    p.add_argument("--device", default="cpu", help="where the model runs (metrics stay on the CPU)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    name = "curve" if args.weights == "map" else "curve_training"
    log = run / f"{name}.jsonl"
    done = {json.loads(line)["step"] for line in log.read_text().splitlines()} if log.is_file() else set()
    category = load_category(args.data, args.category)
    for path in sorted((run / "snapshots").glob("step_*.pt")):
        step = int(load_checkpoint(path).get("step", 0))
        if step in done or (args.only and step not in args.only):
            continue
        start = time.perf_counter()
        row = evaluate_snapshot(path, category, args.per_map, args.weights, args.quick, args.device)
        row["eval_seconds"] = round(time.perf_counter() - start, 1)
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        short = {k: [round(100 * v[m], 1) for m in ("image_auroc", "pixel_auroc", "au_pro")]
                 for k, v in row.items() if isinstance(v, dict)}  # fmt: skip
        print(step, json.dumps(short), flush=True)
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    if rows:
        plot(rows, run / f"{name}.png", f"{args.category}: {run.name} ({args.weights} weights)")
        (run / f"{name}.md").write_text(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
