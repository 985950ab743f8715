"""Shared fixtures: tiny generated MVTec trees, the real data folder, RNG hygiene."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dmdd.config import Config
from dmdd.demo_data import make_demo_dataset

SHARED_DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()

torch.set_num_threads(2)


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
