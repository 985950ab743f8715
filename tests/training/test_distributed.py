"""Real 2-process DDP (gloo on CPU) launched by torchrun: a training run, and one gradient step of each objective
against one process on the same data."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from dmdd.checkpoint import restore_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_train(data: Path, out: Path, *length: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """``dmdd train`` on ``data`` in two gloo processes under torchrun (Lite0, 64 px, batch 2, one thread each);
    returns the finished process and the rank-0 training log."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), "-m", "dmdd.cli", "train", "--data", str(data),
        "--backbone", "efficientnet_lite0", "--image-size", "64", *length, "--batch-size", "2",
        "--no-progress", "--out", str(out),
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    return run, [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_two_process_gloo_training_produces_a_loadable_checkpoint(tiny_tree, tmp_path):
    out = tmp_path / "ddp"
    run, log = torchrun_train(tiny_tree, out, "--epochs", "2")
    assert run.stdout.count("checkpoint:") == 1  # rank 0 only
    assert [e["epoch"] for e in log] == [1, 2] and all(e["processes"] == 2 for e in log)  # rank-0-only log
    model, payload = restore_model(out / "last.pt")
    assert {"image", "pixel"} <= set(payload["thresholds"])  # calibrated on rank 0
    with torch.no_grad():
        result = model(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    assert torch.isfinite(result.anomaly_map).all()


def test_a_two_process_minutes_budget_ends_on_the_same_step_everywhere(tiny_tree, tmp_path):
    # each rank times its own steps; rank 0's plan is broadcast, so both stop at the same step and the run ends
    out = tmp_path / "ddp"
    _, log = torchrun_train(tiny_tree, out, "--minutes", "0.4")
    assert len(log) >= 2 and log[-1]["step"] == log[-1]["total_steps"] and log[-1]["elapsed"] <= 0.4 * 60
    assert restore_model(out / "last.pt")[1]["step"] == log[-1]["step"]


def test_a_two_process_gradient_step_equals_one_process_on_the_same_pairs(tmp_path):
    """Each process takes 3 of 6 pairs (tests/training/ddp_worker.py); DDP averages the gradients of exactly the parameters
    each objective trains. One process reproduces that bit for bit from the two halves (the mean of two float32
    numbers is exact); against one process on all 6 pairs at once the only differences are float summation order
    and, where a layer normalises by batch statistics, the statistics of 3 pairs instead of 6."""
    worker = Path(__file__).with_name("ddp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(worker), str(tmp_path)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert set(ranks[0]) == {"student", "student_without_batch_statistics", "segmentation"}
    for name, one in ranks[0].items():
        other = ranks[1][name]
        # each process computed the loss of its own half (so the halves differ) ...
        assert [one["loss"], other["loss"]] == one["half_losses"] and one["loss"] != other["loss"], name
        assert not torch.equal(one["halves"][0], one["halves"][1]), name
        # ... and both end the step with the same gradient: the mean of the halves' gradients, exactly
        assert torch.equal(one["ddp"], other["ddp"]), name
        assert torch.equal(one["ddp"], (one["halves"][0] + one["halves"][1]) / 2), name
        assert one["ddp"].abs().max() > 0, name
    # No layer using batch statistics: the same gradient as one process on all 6 pairs, up to float32 summation
    # order (measured: 2.8e-7 relative).
    plain = ranks[0]["student_without_batch_statistics"]
    assert (plain["ddp"] - plain["full"]).norm() <= 1e-5 * plain["full"].norm()
