"""Checkpoints: atomic writes, ``weights_only`` loading, and clear errors for foreign or damaged files."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from dmdd import __version__
from dmdd.config import Config
from dmdd.errors import CheckpointError, ConfigError
from dmdd.models.dmdd import DMDD

FORMAT = "dmdd-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically: a temp file in the same folder, fsync, then rename.

    A crash mid-save leaves the previous file at ``path`` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "dmdd_version": __version__, **payload}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # a full disk reaches torch.save as "RuntimeError: ... file write failed"
        Path(tmp).unlink(missing_ok=True)
        free_mib = shutil.disk_usage(path.parent).free // 2**20
        raise CheckpointError(
            f"could not write checkpoint {path} ({type(exc).__name__}: {exc}); {free_mib} MiB free in {path.parent}. "
            "The previous checkpoint there is untouched: free disk space, then resume from it"
        ) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a dmdd checkpoint with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: missing, truncated or corrupt file, not a dmdd checkpoint, or an unsupported format version.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zip, bad pickle, foreign objects all land here
        raise CheckpointError(
            f"checkpoint {path} is damaged or not a dmdd checkpoint ({type(exc).__name__}); "
            "use another checkpoint (training keeps the last complete one as last.pt)"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dmdd checkpoint (no '{FORMAT}' marker); pass a file written by dmdd")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {payload.get('format_version')} (written by dmdd "
            f"{payload.get('dmdd_version')}); this dmdd {__version__} reads version {FORMAT_VERSION}: retrain or "
            "use the matching dmdd version"
        )
    for key in ("config", "model"):
        if key not in payload:
            raise CheckpointError(f"checkpoint {path} lacks '{key}'; it is incomplete")
    return payload


def config_of(payload: dict[str, Any], path: str | Path = "checkpoint") -> Config:
    raw = payload["config"]
    model = raw.get("model") if isinstance(raw, dict) else None
    if isinstance(model, dict) and "image_score" not in model and not model.get("msn", False):
        # Written before model.image_score existed: the plain sum was scored by its maximum (thresholds too).
        raw = {**raw, "model": {**model, "image_score": "max"}}
    if isinstance(model, dict) and "global_score" not in model:  # written before the global score existed
        raw = {**raw, "model": {**raw["model"], "global_score": "off"}}
    if isinstance(model, dict) and "global_stages" not in model:  # before the stages were chosen: all four
        raw = {**raw, "model": {**raw["model"], "global_stages": [1, 2, 3, 4]}}
    if isinstance(model, dict) and "regional_score" not in model:  # written before the regional map existed
        raw = {**raw, "model": {**raw["model"], "regional_score": "off"}}
    if isinstance(model, dict) and "regional_bank" not in model:  # before the bank: the distance to the mean
        raw = {**raw, "model": {**raw["model"], "regional_bank": 0}}
    if isinstance(model, dict) and "foreground_support" not in model:  # written before the support existed
        raw = {**raw, "model": {**raw["model"], "foreground_support": "off"}}
    train = raw.get("train") if isinstance(raw, dict) else None
    if isinstance(train, dict):  # written before these options existed: the last weights, no guards
        raw = {**raw, "train": {"ema_decay": 0.0, "update_clip": False, "ema_gate": 0.0, "spike_rollback": 0, **train}}
    try:
        return Config.from_dict(raw)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{path} holds an unreadable config ({exc})") from exc


def load_model_state(model: DMDD, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load weights strictly; a state from another backbone or architecture gives a clear error."""
    if "segmentation.sum_weights" not in state and model.segmentation is not None and model.segmentation.residual:
        # Written before the residual head's base weights existed: the head was trained on the mean of its inputs.
        state = {**state, "segmentation.sum_weights": torch.full((model.num_maps,), 1.0 / model.num_maps)}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(
            f"checkpoint {path} does not match a DMDD model with backbone {model.cfg.backbone!r} ({first}); "
            "it was written for another model configuration"
        ) from exc


def restore_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[DMDD, dict[str, Any]]:
    """Rebuild the model stored in a checkpoint (no weights download needed) in eval mode.

    Returns:
        (model, checkpoint payload).
    """
    payload = load_checkpoint(path)
    cfg = config_of(payload, path)
    model = DMDD(dataclasses.replace(cfg.model, pretrained=False, weights=None))
    load_model_state(model, payload["model"], path)
    return model.to(device).eval(), payload
