"""Training jobs of the app: one ``dmdd train`` process at a time, its progress read from its ``train_log.jsonl``.

A separate process keeps the API responsive while the job trains and gives a clean stop: SIGTERM makes the engine
stop as Ctrl-C does, keeping the last complete checkpoint (the run can be resumed with ``dmdd train --resume``).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

LOSSES = ("ngm", "aim", "seg")  # the losses train_log.jsonl records per epoch (paper: L_NGM, L_AIM, L_seg)


class JobBusy(RuntimeError):
    """Another training job is still running."""


@dataclass
class TrainingJob:
    id: str
    data: Path
    out: Path
    minutes: float
    backbone: str
    process: subprocess.Popen = field(repr=False)
    started: float = field(default_factory=time.time)
    stop_requested: bool = False
    finished: float | None = None
    model_name: str | None = None
    error: str | None = None

    @property
    def checkpoint(self) -> Path:
        return self.out / "last.pt"

    def state(self) -> str:
        if self.finished is None:  # the process runs, or its model is still being loaded
            return "stopping" if self.stop_requested else "running"
        if self.error:
            return "failed"
        return "stopped" if self.stop_requested else ("finished" if self.process.returncode == 0 else "failed")

    def status(self) -> dict[str, Any]:
        """Steps, losses and a time estimate from the epochs logged so far."""
        log = []
        found = sorted(self.out.rglob("train_log.jsonl"))  # in the run's category sub-folder
        if found:
            log = [json.loads(line) for line in found[0].read_text().splitlines() if line.strip()]
        last = log[-1] if log else {}
        elapsed = (self.finished or time.time()) - self.started
        step, total = last.get("step", 0), last.get("total_steps", 0)
        eta = None
        if self.state() == "running" and step and total:
            eta = max(0.0, elapsed / step * (total - step))
        losses = {k: last[k] for k in LOSSES if isinstance(last.get(k), (int, float))}
        return {"id": self.id, "state": self.state(), "data": str(self.data), "minutes": self.minutes,
                "backbone": self.backbone, "step": step, "total_steps": total, "epoch": last.get("epoch", 0),
                "losses": losses, "elapsed_s": round(elapsed, 1), "eta_s": None if eta is None else round(eta, 1),
                "model": self.model_name, "error": self.error, "log_tail": self.log_tail()}  # fmt: skip

    def log_tail(self, lines: int = 5) -> list[str]:
        path = self.out / "job.log"
        if not path.is_file():
            return []
        return [line for line in path.read_text(errors="replace").splitlines() if line.strip()][-lines:]


class JobRunner:
    """Starts, watches and stops training jobs; calls ``on_done(job, checkpoint)`` when one ends with a checkpoint.

    Args:
        runs_dir: where each job's run folder goes (``<runs_dir>/<job id>``).
        on_done: called with a finished job (e.g. to load its model).
        extra_args: passed to every ``dmdd train`` (e.g. ``--threads 1``).
    """

    def __init__(
        self, runs_dir: Path, on_done: Callable[[TrainingJob, Path], None], extra_args: list[str] | None = None
    ) -> None:
        self.runs_dir = Path(runs_dir)
        self.on_done = on_done
        self.extra_args = list(extra_args or [])
        self.jobs: dict[str, TrainingJob] = {}
        self._lock = threading.Lock()

    def running(self) -> TrainingJob | None:
        return next((j for j in self.jobs.values() if j.finished is None), None)

    def start(self, data: Path, minutes: float, backbone: str, image_size: int | None = None,
              tile: int | None = None) -> TrainingJob:  # fmt: skip
        with self._lock:
            if (busy := self.running()) is not None:
                raise JobBusy(f"training job {busy.id} is still running; stop it or wait")
            job_id = time.strftime("job-%Y%m%d-%H%M%S") + f"-{len(self.jobs) + 1}"
            out = self.runs_dir / job_id
            out.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "dmdd.cli", "train", "--data", str(data), "--minutes", str(minutes),
                   "--backbone", backbone, "--out", str(out), "--no-progress", *self.extra_args]  # fmt: skip
            if image_size:
                cmd += ["--image-size", str(image_size)]
            if tile:
                cmd += ["--tile", str(tile)]
            with (out / "job.log").open("w") as log:
                process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.runs_dir)
            job = TrainingJob(job_id, data, out, minutes, backbone, process)
            self.jobs[job_id] = job
        threading.Thread(target=self._watch, args=(job,), daemon=True).start()
        return job

    def _watch(self, job: TrainingJob) -> None:
        job.process.wait()
        try:
            self._conclude(job)
        finally:
            job.finished = time.time()

    def _conclude(self, job: TrainingJob) -> None:
        found = sorted(job.out.rglob("last.pt"))  # the run folder holds one sub-folder per category
        if job.process.returncode == 0 and found:
            try:
                self.on_done(job, found[0])
            except Exception as exc:  # noqa: BLE001 - reported in the job's status, never kills the server
                job.error = f"trained, but the model did not load: {exc}"
        elif job.process.returncode != 0 and not job.stop_requested:
            tail = job.log_tail(1)
            job.error = tail[0] if tail else f"dmdd train exited with {job.process.returncode}"

    def stop(self, job_id: str) -> TrainingJob:
        job = self.jobs[job_id]
        if job.process.poll() is None:
            job.stop_requested = True
            job.process.send_signal(signal.SIGTERM)
        return job

    def shutdown(self) -> None:
        for job in self.jobs.values():
            if job.process.poll() is None:
                job.stop_requested = True
                job.process.send_signal(signal.SIGTERM)
                try:
                    job.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    job.process.kill()
