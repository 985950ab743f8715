"""Shared fixtures: tiny generated MVTec trees, the real data folder, RNG hygiene, independent metric references,
and the opt-in ``benchmark`` marker."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dmdd.config import Config
from dmdd.data.generated import make_demo_dataset

SHARED_DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()

torch.set_num_threads(2)

BENCH_ENV = "DMDD_BENCH"
BENCH_SKIP = f"benchmark: timing- and memory-dependent, opt-in (set {BENCH_ENV}=1 to run it)"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", f"benchmark: measures speed or memory on this machine; skipped unless {BENCH_ENV}=1"
    )


def pytest_collection_modifyitems(config, items):
    """`make test` runs no benchmark: each marked test skips with the reason (listed by -ra), unless DMDD_BENCH=1."""
    if os.environ.get(BENCH_ENV) == "1":
        return
    for item in items:
        if item.get_closest_marker("benchmark") is not None:  # the marker, not a folder named benchmark
            item.add_marker(pytest.mark.skip(reason=BENCH_SKIP))


@pytest.fixture(autouse=True)
def _restore_rng():
    """Tests never leak global RNG state into each other."""
    state = torch.get_rng_state()
    np_state = np.random.get_state()
    yield
    torch.set_rng_state(state)
    np.random.set_state(np_state)


@pytest.fixture(scope="session")
def tiny_tree(tmp_path_factory) -> Path:
    """A 64 px MVTec-layout category: 8 train, 3 good + 3x2 defective test images."""
    root = tmp_path_factory.mktemp("mvtec")
    return make_demo_dataset(root, "metal", size=64, train=8, test_good=3, test_per_defect=2, seed=1)


def tiny_config(root: Path, **train) -> Config:
    """Lite0 at 64 px, a couple of small steps: fast on two CPU cores."""
    return Config().replace(
        model={"backbone": "efficientnet_lite0", "image_size": 64},
        train={"epochs": 1, "batch_size": 4, "seg_steps": 1, "eval_size": 64, "holdout_fraction": 0.25, **train},
        data={"root": str(root)},
    )


def real_category(name: str) -> Path:
    folder = SHARED_DATA / name
    if not folder.is_dir():
        pytest.skip(f"real dataset not present at {folder} (the shared data folder is absent on this machine)")
    return folder


def read_labelled_test_set(category: Path) -> tuple[torch.Tensor, np.ndarray, np.ndarray, list[str]]:
    """A generated MVTec category's test split read with Pillow alone (not dmdd's readers), images at their own
    size: ((N, 3, S, S) float in [0, 1], labels (N,), masks (N, S, S) bool (pixels >= 128), defect types)."""
    from PIL import Image

    images, labels, masks, types = [], [], [], []
    for folder in sorted((category / "test").iterdir()):
        for path in sorted(folder.glob("*.png")):
            rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
            images.append(torch.from_numpy(rgb).permute(2, 0, 1))
            types.append(folder.name)
            if folder.name == "good":
                labels.append(0)
                masks.append(np.zeros(rgb.shape[:2], bool))
            else:
                labels.append(1)
                mask = category / "ground_truth" / folder.name / f"{path.stem}_mask.png"
                masks.append(np.asarray(Image.open(mask).convert("L")) >= 128)
    return torch.stack(images), np.array(labels), np.stack(masks), types


def reference_metrics(scores: np.ndarray, maps: np.ndarray, labels: np.ndarray, masks: np.ndarray) -> dict:
    """I-AUROC, P-AUROC (scikit-learn), image and pixel F1-max (scikit-learn's precision-recall curve) and AU-PRO
    (dmdd.evaluation.metrics.au_pro, itself checked against a brute-force sweep in test_metrics) of given model outputs."""
    from sklearn.metrics import precision_recall_curve, roc_auc_score

    from dmdd.evaluation.metrics import au_pro

    def f1_max(y, s):
        precision, recall, _ = precision_recall_curve(y, s)
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        return float(f1.max())

    return {"image_auroc": roc_auc_score(labels, scores), "pixel_auroc": roc_auc_score(masks.ravel(), maps.ravel()),
            "image_f1_max": f1_max(labels, scores), "pixel_f1_max": f1_max(masks.ravel(), maps.ravel()),
            "au_pro": au_pro(masks, maps)}  # fmt: skip
