"""What a training run keeps besides the model (epoch, step, plan, history) and how it is written to and read back
from ``last.pt``, so a killed run resumes to the same weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dmdd.checkpoint import config_of, load_checkpoint, load_model_state, save_checkpoint
from dmdd.config import Config
from dmdd.errors import CheckpointError
from dmdd.models.dmdd import DMDD
from dmdd.training.averaging import WeightAverage, student_state
from dmdd.training.stability import SpikeGuard


@dataclass
class TrainState:
    """What a run needs besides the model; saved in every checkpoint.

    Attributes:
        epoch: completed epochs.
        step: completed student optimiser steps.
        total_steps: the planned length in student steps (0 while a ``minutes`` budget is not yet converted).
        history: one log entry per epoch.
    """

    epoch: int = 0
    step: int = 0
    total_steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def save_state(path, cfg, model, student_opt, seg_opt, state: TrainState, **extra) -> None:
    save_checkpoint(
        path,
        {
            "config": cfg.to_dict(),
            "model": model.state_dict(),
            "optimizer_student": student_opt.state_dict(),
            "optimizer_segmentation": seg_opt.state_dict() if seg_opt is not None else None,
            "epoch": state.epoch,
            "step": state.step,
            "total_steps": state.total_steps,
            "history": state.history,
            "rng": {"torch": torch.get_rng_state()},
            **extra,
        },
    )


def restore_state(path, cfg, model, student_opt, seg_opt, average: WeightAverage | None = None,
             guard: SpikeGuard | None = None) -> TrainState:  # fmt: skip
    payload = load_checkpoint(path)
    if config_of(payload, path).to_dict()["model"] != cfg.to_dict()["model"]:  # older files: defaults filled in
        raise CheckpointError(
            f"cannot resume from {path}: it was trained with a different model configuration; "
            "use the same config or another --out folder"
        )
    load_model_state(model, payload["model"], path)  # the map weights: the average when one was kept
    if average is not None:
        average.reset()
    if payload.get("training_student") is not None:  # the optimiser continues from the raw weights
        with torch.no_grad():
            for k, v in student_state(model).items():
                v.copy_(payload["training_student"][k])
    student_opt.load_state_dict(_regroup(payload["optimizer_student"], student_opt))
    if seg_opt is not None and payload.get("optimizer_segmentation"):
        seg_opt.load_state_dict(payload["optimizer_segmentation"])
    if guard is not None and payload.get("spike_guard") is not None:
        guard.load_state_dict(payload["spike_guard"])
    torch.set_rng_state(payload["rng"]["torch"])
    return TrainState(int(payload["epoch"]), int(payload.get("step", 0)), int(payload.get("total_steps", 0)),
                      list(payload.get("history") or []))  # fmt: skip


def _regroup(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """An optimiser state saved with another grouping of the same parameters (``train.update_clip`` on: one group
    per tensor; off: two groups), laid onto this optimiser's groups; parameters keep their order and their state."""
    if len(saved["param_groups"]) == len(optimizer.param_groups):
        return saved
    order = [i for group in saved["param_groups"] for i in group["params"]]
    groups, start = [], 0
    for group in optimizer.param_groups:
        size = len(group["params"])
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": order[start : start + size]})
        start += size
    return {"state": saved["state"], "param_groups": groups}


def save_snapshot(path: Path, cfg: Config, model: DMDD, state: TrainState, extra: dict[str, Any]) -> None:
    """A model-only copy (no optimiser state) along the way, loadable with ``restore_model``; with a weight average
    it also keeps the raw training weights (``training_student``) for comparison."""
    save_checkpoint(path, {"config": cfg.to_dict(), "model": model.state_dict(), "epoch": state.epoch,
                           "step": state.step, "history": state.history, **extra})  # fmt: skip
