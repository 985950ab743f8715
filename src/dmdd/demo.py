"""``dmdd demo``: the whole pipeline on built-in data, offline, in a few minutes on a CPU."""

from __future__ import annotations

from pathlib import Path

import torch

from dmdd.checkpoint import load_checkpoint, restore_model
from dmdd.config import Config
from dmdd.data.datasets import load_category
from dmdd.data.generated import make_demo_dataset
from dmdd.device import select_device
from dmdd.evaluation import evaluate
from dmdd.evaluation.report import write_report
from dmdd.training.loop import fit

DEMO_SIZE = 128


def demo_config(data_root: Path, epochs: int, seed: int, device: str) -> Config:
    """Lite0 with its packaged ImageNet weights at 128 px; procedural textures for synthesis."""
    return Config().replace(
        model={"backbone": "efficientnet_lite0", "image_size": DEMO_SIZE},
        train={"epochs": epochs, "batch_size": 16, "seed": seed, "device": device, "eval_size": DEMO_SIZE},
        data={"root": str(data_root), "category": "metal"},
    )


def set_aside_other_model(out: Path, cfg: Config) -> Path | None:
    """The demo resumes its own run; a ``last.pt`` there with another model configuration (written by an earlier
    dmdd, whose defaults differed) is renamed to ``last.previous.pt`` so that the demo trains again. Returns the
    new name, or None when nothing was set aside."""
    ckpt = out / "last.pt"
    if not ckpt.is_file():
        return None
    stored, wanted = dict(load_checkpoint(ckpt)["config"]["model"]), cfg.to_dict()["model"]
    for model in (stored, wanted):  # chosen after training (dmdd calibrate --choose-map), not training settings
        model.pop("fused_stages", None)
        model.pop("regional_windows", None)
    for key in ("regional_score", "foreground_support"):  # the run stores them resolved by the (same) data
        if wanted[key] == "auto":
            wanted[key] = stored.get(key, "auto")
    if stored == wanted:
        return None
    aside = ckpt.with_name("last.previous.pt")
    ckpt.replace(aside)
    (out / "train_log.jsonl").unlink(missing_ok=True)
    print(f"{ckpt} holds another model configuration (an earlier dmdd?): kept as {aside.name}, training again")
    return aside


def run_demo(out: Path, epochs: int = 15, seed: int = 0, device: str = "auto", threads: int | None = None) -> Path:
    """Generate the built-in dataset, train, evaluate, write ``out/test/report.html``; returns the report path."""
    if threads:
        torch.set_num_threads(threads)
    data_root = out / "data"
    if not (data_root / "metal").is_dir():
        make_demo_dataset(data_root, "metal", size=DEMO_SIZE, train=64, test_good=16, test_per_defect=8, seed=seed)
    print(f"built-in dataset: {data_root / 'metal'} (brushed metal; scratch, spot, contamination)")
    cfg = demo_config(data_root, epochs, seed, device)
    set_aside_other_model(out, cfg)
    ckpt = fit(cfg, out, resume=True)
    model, payload = restore_model(ckpt, select_device(device))
    test = load_category(data_root, "metal").test
    result, predictions = evaluate(model, cfg, test, out / "test", title="DMDD demo — brushed metal")
    details = {"checkpoint": str(ckpt), "epochs": payload["epoch"], "thresholds": payload.get("thresholds")}
    print((out / "test" / "metrics.md").read_text())
    return write_report(out / "test" / "report.html", result, predictions, "DMDD demo — brushed metal", details)
