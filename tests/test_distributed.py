"""A real 2-process DDP run (gloo on CPU) launched by torchrun."""

import json
import os
import socket
import subprocess
import sys

import torch

from dmdd.checkpoint import restore_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_training_produces_a_loadable_checkpoint(tiny_tree, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), "-m", "dmdd.cli", "train", "--data", str(tiny_tree),
        "--backbone", "efficientnet_lite0", "--image-size", "64", "--epochs", "2", "--batch-size", "2",
        "--no-progress", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("checkpoint:") == 1  # rank 0 only
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1, 2] and all(e["processes"] == 2 for e in log)  # rank-0-only log
    model, payload = restore_model(out / "last.pt")
    assert payload["thresholds"] is not None
    with torch.no_grad():
        result = model(torch.rand(2, 3, 64, 64))
    assert torch.isfinite(result.anomaly_map).all()
