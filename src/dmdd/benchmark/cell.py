"""One benchmark cell, run in its own process (``python -m dmdd.benchmark CELL_DIR``): train (or resume), test
with dmdd's metric code, and write ``cell.json`` atomically. The process's peak memory is its own, and SIGTERM reaches
the training loop, which keeps its last finished epoch.

``CELL_DIR/spec.json`` holds what the runner resolved (dataset, category, model entry, budget, seed, threads);
the result holds the metrics per the paper's protocol (I-AUROC, P-AUROC, AU-PRO at a 0.3 false-positive limit,
F1-max), the decisions at the stored thresholds, timings, peak memory, device, versions, git commit and the full
resolved configuration. Beside it, ``predictions.npz`` keeps the test split's image scores and anomaly maps (float16)
with labels, masks and paths, so a finished cell can be analysed again (per region, per defect type) without
re-running it (:func:`save_predictions`, :func:`load_predictions`).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmdd import __version__
from dmdd.benchmark.suite import Dataset, ModelSpec, dmdd_config
from dmdd.device import select_device

RESULT = "cell.json"
FAILURE = "error.json"
SPEC = "spec.json"
PREDICTIONS = "predictions.npz"


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file, then rename): a reader sees the old file or the new one, never half."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def save_predictions(path: Path, predictions) -> None:
    """Write a cell's test predictions atomically: scores (float32), maps (float16), masks (bool), labels, names."""
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, scores=np.asarray(predictions.scores, np.float32),
                        maps=np.asarray(predictions.maps, np.float16), masks=np.asarray(predictions.masks) > 0,
                        labels=np.asarray(predictions.labels, np.int8), defect_types=np.asarray(predictions.defect_types),
                        paths=np.asarray(predictions.paths), has_mask=predictions.pixel_labelled())  # fmt: skip
    os.replace(tmp, path)


def load_predictions(path: Path):
    """The :class:`dmdd.evaluation.Predictions` a cell saved (maps back in float32)."""
    from dmdd.evaluation import Predictions

    with np.load(path) as z:
        return Predictions(z["scores"], z["maps"].astype(np.float32), z["masks"].astype(np.uint8), z["labels"],
                           [str(t) for t in z["defect_types"]], [str(p) for p in z["paths"]], z["has_mask"])  # fmt: skip


def environment(device: torch.device) -> dict[str, Any]:
    """Library versions, device and git commit of this run."""
    versions = {"dmdd": __version__, "torch": torch.__version__, "numpy": np.__version__,
                "python": platform.python_version()}  # fmt: skip
    for name in ("torchvision", "anomalib", "timm"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "?")
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).parent).stdout.strip() or None  # fmt: skip
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, timeout=10, cwd=Path(__file__).parent).stdout.strip())  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"versions": versions, "git_commit": commit, "git_dirty": dirty, "device": str(device),
            "device_name": name, "threads": torch.get_num_threads(), "host": platform.node()}  # fmt: skip


def peak_memory_mib(device: torch.device) -> dict[str, float | None]:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"peak_rss_mib": round(rss, 1), "peak_gpu_mib": round(gpu, 1) if gpu is not None else None}


def summarise_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """The cell's metric block: overall, per defect type, and the decisions at the stored image threshold."""
    keys = ("image_auroc", "pixel_auroc", "au_pro", "image_f1_max", "pixel_f1_max", "images", "defective")
    out = {k: result["overall"].get(k) for k in keys}
    out["per_defect_type"] = {t: {k: m.get(k) for k in keys} for t, m in result["per_defect_type"].items()}
    point = result.get("operating_point")
    if point:
        out["decisions"] = {k: point.get(k) for k in ("threshold", "mode", "target_fpr", "false_alarm_rate",
                                                      "detection_rate", "best_detection_rate_at_same_false_alarms",
                                                      "per_defect_type")}  # fmt: skip
    return out


def _train_log(run: Path) -> list[dict[str, Any]]:
    path = run / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def learning_curve(run: Path, records: list, cfg, device: torch.device) -> list[dict[str, Any]]:
    """Test metrics of every snapshot the run kept (``train.snapshot_every``), with the step, the fit's elapsed
    seconds at that step and the student seconds summed up to it (a measurement of the curve, not a choice of step:
    the cell's result is its last checkpoint)."""
    from dmdd.checkpoint import restore_model
    from dmdd.evaluation import compute_metrics, predict_split

    log = _train_log(run)
    curve = []
    for snap in sorted((run / "snapshots").glob("step_*.pt")):
        net, payload = restore_model(snap, device)
        step = int(payload["step"])
        done = [e for e in log if int(e["step"]) <= step]
        m = compute_metrics(predict_split(net, records, cfg, device))["overall"]
        curve.append({"step": step, "elapsed_seconds": done[-1].get("elapsed") if done else None,
                      "student_seconds": round(sum(float(e.get("student_seconds", 0.0)) for e in done), 2),
                      **{k: m[k] for k in ("image_auroc", "pixel_auroc", "au_pro")}})  # fmt: skip
    return curve


def run_dmdd(data: Dataset, category: str, model: ModelSpec, budget: dict, seed: int, cell_dir: Path,
             device_name: str) -> dict[str, Any]:  # fmt: skip
    from dmdd.checkpoint import restore_model
    from dmdd.data.datasets import load_category
    from dmdd.evaluation import compute_metrics, operating_point, predict_split
    from dmdd.training.loop import fit

    cfg = dmdd_config(model, budget, seed)
    cfg = cfg.replace(data={"root": str(data.root), "category": category, "layout": data.layout},
                      train={"device": device_name, "num_threads": torch.get_num_threads()})  # fmt: skip
    cat = load_category(data.root, category, data.layout)
    run = cell_dir / "run"
    fit_start = time.perf_counter()
    ckpt = fit(cfg, run, category=cat, resume=True, progress=False)
    fit_s = time.perf_counter() - fit_start  # setup, epochs and final calibration: what --minutes budgets
    device = select_device(device_name)
    net, payload = restore_model(ckpt, device)
    start = time.perf_counter()
    predictions = predict_split(net, cat.test, cfg, device)
    infer_s = time.perf_counter() - start
    result = compute_metrics(predictions)
    thresholds = payload.get("thresholds") or {}
    if thresholds.get("image") is not None:
        result["operating_point"] = {"mode": thresholds.get("mode"), "target_fpr": cfg.train.target_fpr,
                                     **operating_point(predictions, thresholds["image"])}  # fmt: skip
    log = _train_log(run)
    steps = int(log[-1]["step"]) if log else 0
    student_s = sum(float(e.get("student_seconds", 0.0)) for e in log)
    curve = learning_curve(run, cat.test, cfg, device) if cfg.train.snapshot_every else None
    return {
        "predictions": predictions,
        **({"curve": curve} if curve else {}),
        "metrics": summarise_metrics(result),
        "train": {"seconds": round(sum(float(e["seconds"]) for e in log), 2), "fit_seconds": round(fit_s, 2),
                  "steps": steps, "epochs": len(log),
                  "step_seconds": round(student_s / steps, 4) if steps else None,
                  "foreground_policy": log[-1].get("foreground_policy") if log else None},  # fmt: skip
        "inference": {"images": len(cat.test), "seconds": round(infer_s, 2),
                      "images_per_s": round(len(cat.test) / infer_s, 2)},  # fmt: skip
        "config": payload["config"],
        "thresholds": thresholds or None,
    }


def run_cell(cell_dir: Path) -> dict[str, Any]:
    """Run the cell described by ``cell_dir/spec.json``; returns the record also written to ``cell.json``."""
    spec = json.loads((cell_dir / SPEC).read_text())
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    data = Dataset(spec["dataset"]["name"], Path(spec["dataset"]["root"]), tuple(spec["dataset"]["categories"]),
                   spec["dataset"]["layout"], spec["dataset"].get("paper"))  # fmt: skip
    model = ModelSpec(**spec["model"])
    device_name = spec.get("device", "auto")
    started = time.perf_counter()
    if model.kind == "dmdd":
        body = run_dmdd(data, spec["category"], model, spec["budget"], spec["seed"], cell_dir, device_name)
    else:
        from dmdd.benchmark.peers import run_peer

        body = run_peer(data, spec["category"], model, spec["budget"], spec["seed"], device_name)

    save_predictions(cell_dir / PREDICTIONS, body.pop("predictions"))
    device = select_device(device_name)
    record = {"id": spec["id"], "suite": spec["suite"], "dataset": data.name, "category": spec["category"],
              "model": model.name, "kind": model.kind, "backbone": spec.get("backbone"), "budget": spec["budget"],
              "budget_label": spec["budget_label"], "seed": spec["seed"], "paper": data.paper, **body,
              "wall_seconds": round(time.perf_counter() - started, 2), "memory": peak_memory_mib(device),
              "environment": environment(device),
              "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
    write_json(cell_dir / RESULT, record)
    (cell_dir / FAILURE).unlink(missing_ok=True)
    return record


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cell_dir = Path(argv[0])
    try:
        run_cell(cell_dir)
    except BaseException as exc:  # noqa: BLE001 - every failure is recorded, then the grid goes on
        write_json(cell_dir / FAILURE, {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(),
                                        "when": datetime.now(timezone.utc).isoformat(timespec="seconds")})  # fmt: skip
        print(f"cell failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2 if not isinstance(exc, KeyboardInterrupt) else 130
    return 0


