"""Run a suite: every cell in its own process, finished cells skipped, interrupted ones resumed, failures recorded
while the grid goes on; then the summary CSV and markdown tables.

Parallelism: with visible GPUs one cell runs per GPU (``CUDA_VISIBLE_DEVICES`` set per process, so cells never share
one); on the CPU ``jobs`` cells run at once and split the cores between them (``threads`` per cell). A lock file keeps
two runs from writing the same output folder.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dmdd.benchmark.cell import FAILURE, RESULT, SPEC, write_json
from dmdd.benchmark.suite import Cell, Suite, dmdd_config
from dmdd.errors import DmddError


@dataclass(frozen=True)
class Slot:
    """Where one cell runs: a device name for the cell and the environment of its process."""

    device: str
    threads: int
    env: dict[str, str]


def cell_dir(out: Path, cell: Cell) -> Path:
    return out / cell.dataset.name / cell.category / f"{cell.model.name}-{cell.budget_label}-seed{cell.seed}"


def slots(jobs: int, threads: int | None, device: str) -> list[Slot]:
    """One slot per GPU when GPUs are visible (and ``device`` is not cpu), else ``jobs`` CPU slots."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        return [Slot("cuda", threads or 4, {"CUDA_VISIBLE_DEVICES": i}) for i in ids]
    per = threads or max(1, (os.cpu_count() or 1) // jobs)
    return [Slot("cpu", per, {"CUDA_VISIBLE_DEVICES": ""}) for _ in range(jobs)]


def _spec(suite: Suite, cell: Cell, slot: Slot) -> dict[str, Any]:
    backbone = dmdd_config(cell.model, cell.budget, cell.seed).model.backbone if cell.model.kind == "dmdd" else (
        cell.model.backbone)  # fmt: skip
    return {"id": cell.id, "suite": suite.name, "dataset": dataclasses.asdict(cell.dataset) | {
            "root": str(cell.dataset.root)}, "category": cell.category, "model": dataclasses.asdict(cell.model),
            "backbone": backbone, "budget": cell.budget, "budget_label": cell.budget_label, "seed": cell.seed,
            "device": slot.device, "threads": slot.threads}  # fmt: skip


class OutputLock:
    """An exclusive lock on ``out/.lock`` for the life of a run; a second run on the same folder is refused."""

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / ".lock"
        self.file = self.path.open("a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise DmddError(f"{out} is in use by another dmdd benchmark run ({holder}); wait for it to finish or "
                            "choose another --out") from None  # fmt: skip
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()}")
        self.file.flush()

    def release(self) -> None:
        self.file.close()


def finished(out: Path, cell: Cell) -> bool:
    return (cell_dir(out, cell) / RESULT).is_file()


def run_suite(suite: Suite, out: Path | None = None, jobs: int = 1, device: str = "auto", progress: bool = True,
              only: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Run every unfinished cell of ``suite``; returns {"cells": [...records], "failed": [...], "skipped": n}.

    Ctrl-C or SIGTERM stops the running cells (each keeps its last finished epoch and resumes on the next run) and
    raises :class:`DmddError` after the summary of what finished is written.
    """
    out = Path(out or suite.output)
    lock = OutputLock(out)
    try:
        cells = [c for c in suite.cells() if only is None or only in c.id]
        todo = [c for c in cells if not finished(out, c)]
        pool = slots(max(1, jobs), suite.threads, device)
        failed, stopped = _run_cells(suite, out, todo, pool, progress)
        records = collect(out, cells)
        write_summary(out, records)
        if suite.results is not None:  # every finished cell of the suite, also after a run limited by --only
            publish(suite, records if only is None else collect(out, suite.cells()))
        if stopped:
            raise DmddError(f"benchmark stopped ({stopped}); finished cells are kept in {out}, an interrupted cell "
                            "resumes from its last epoch: run the same command again")  # fmt: skip
        return {"cells": records, "failed": failed, "skipped": len(cells) - len(todo)}
    finally:
        lock.release()


def _run_cells(suite: Suite, out: Path, todo: list[Cell], pool: list[Slot], progress: bool):
    running: dict[int, tuple[subprocess.Popen, Cell, Slot]] = {}
    free, queue, failed, stopped = list(pool), list(todo), [], None

    def stop(signum, frame):  # noqa: ANN001
        nonlocal stopped
        stopped = signal.Signals(signum).name
        for proc, _, _ in running.values():
            proc.send_signal(signal.SIGTERM)  # the training loop saves nothing half: its last epoch stays

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    bar = tqdm(total=len(todo), disable=not progress, unit="cell", desc=f"benchmark {suite.name}",
               dynamic_ncols=True)  # fmt: skip
    try:
        while (queue and not stopped) or running:
            while queue and free and not stopped:
                cell, slot = queue.pop(0), free.pop(0)
                folder = cell_dir(out, cell)
                folder.mkdir(parents=True, exist_ok=True)
                write_json(folder / SPEC, _spec(suite, cell, slot))
                env = os.environ | slot.env | {"OMP_NUM_THREADS": str(slot.threads)}
                with (folder / "cell.log").open("a") as log:
                    proc = subprocess.Popen([sys.executable, "-m", "dmdd.benchmark", str(folder)], env=env,
                                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
                running[proc.pid] = (proc, cell, slot)
                bar.set_postfix_str(cell.id, refresh=True)
            time.sleep(0.2)
            for pid, (proc, cell, slot) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[pid]
                free.append(slot)
                if not finished(out, cell):
                    error = cell_dir(out, cell) / FAILURE
                    reason = json.loads(error.read_text())["error"] if error.is_file() else f"exit {proc.returncode}"
                    failed.append({"id": cell.id, "error": reason})
                    if not stopped:
                        tqdm.write(f"cell failed: {cell.id}: {reason} (log: {cell_dir(out, cell) / 'cell.log'})")
                bar.update(1)
    finally:
        bar.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return failed, stopped


def collect(out: Path, cells: list[Cell]) -> list[dict[str, Any]]:
    """The records of the finished cells among ``cells``, in grid order."""
    return [json.loads((cell_dir(out, c) / RESULT).read_text()) for c in cells if finished(out, c)]


def write_summary(out: Path, records: list[dict[str, Any]]) -> None:
    from dmdd.benchmark.tables import csv_text, suite_markdown

    (out / "summary.csv").write_text(csv_text(records))
    (out / "summary.md").write_text(suite_markdown(records))


def published(suite: Suite) -> dict[str, dict[str, Any]]:
    """The records in the suite's ``results`` file by cell id (empty without one)."""
    if suite.results is None or not suite.results.is_file():
        return {}
    try:
        return {r["id"]: r for r in json.loads(suite.results.read_text())["cells"]}
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise DmddError(f"{suite.results} is not a results file of dmdd benchmark ({error}); restore it from git "
                        "or delete it to publish only the cells finished here") from None  # fmt: skip


def publish(suite: Suite, records: list[dict[str, Any]]) -> None:
    """Write the suite's records to its ``results`` file (committed; the results page is rendered from it).

    Run folders are not committed, so a cell recorded earlier whose folder is absent here (a fresh clone, another
    machine, another ``--out``) keeps its published record; a cell finished here replaces it. Records of cells the
    suite no longer holds are dropped. The file lists the cells in grid order.
    """
    fresh = {r["id"]: {k: v for k, v in r.items() if k != "thresholds"} for r in records}
    kept = published(suite) | fresh
    suite.results.parent.mkdir(parents=True, exist_ok=True)
    cells = [kept[c.id] for c in suite.cells() if c.id in kept]  # grid order; ids the suite no longer has drop out
    write_json(suite.results, {"suite": suite.name, "suite_file": str(suite.path), "cells": cells})
