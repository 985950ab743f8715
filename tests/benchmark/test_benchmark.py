"""dmdd benchmark: suites validated before training, cells run / skipped / resumed / recorded, tables and the
results page regenerated from records."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from dmdd.benchmark import load_suite, render_page, run_suite
from dmdd.benchmark.cell import load_predictions
from dmdd.benchmark.runner import OutputLock, cell_dir
from dmdd.benchmark.tables import csv_text, curve_table, quality_table
from dmdd.cli import main
from dmdd.errors import ConfigError, DmddError
from dmdd.evaluation import compute_metrics

REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = {"name": "tiny", "backbone": "efficientnet_lite0", "image_size": 64,
              "set": {"train.batch_size": 4, "train.seg_steps": 1, "train.eval_size": 64,
                      "train.holdout_fraction": 0.25}}  # fmt: skip


def write_suite(path: Path, root: Path, **overrides) -> Path:
    suite = {"name": "tiny", "datasets": [{"name": "gen", "root": str(root.parent), "categories": [root.name]}],
             "models": [TINY_MODEL], "budgets": [{"steps": 2}], "seeds": [0], "threads": 2,
             "output": str(path.parent / "out"), **overrides}  # fmt: skip
    path.write_text(yaml.safe_dump(suite))
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        ({"datasets": [{"root": "/nowhere", "categories": ["x"]}]}, "dataset root not found: /nowhere"),
        ({"budget": [{"steps": 1}]}, "unknown key(s) ['budget']"),
        ({"models": [{"name": "m", "set": {"train.nonsense": 1}}]}, "nonsense"),
        ({"models": [{"name": "m", "colour": "red"}]}, "unknown key(s) ['colour']"),
        ({"budgets": [{"steps": 1, "minutes": 2}]}, "exactly one of"),
        ({"models": [{"name": "m", "kind": "padim"}]}, "kind must be one of"),
    ],
)
def test_a_bad_suite_stops_before_any_training_with_one_line(tmp_path, tiny_tree, change, message):
    path = write_suite(tmp_path / "suite.yaml", tiny_tree, **change)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_suite(path)
    assert not (tmp_path / "out").exists()


def test_a_missing_category_is_named(tmp_path, tiny_tree):
    path = write_suite(tmp_path / "suite.yaml", tiny_tree,
                       datasets=[{"root": str(tiny_tree.parent), "categories": ["metal", "wood"]}])  # fmt: skip
    with pytest.raises(ConfigError, match=r"\['wood'\] not found"):
        load_suite(path)


def test_a_peer_without_its_extra_is_refused_up_front(tmp_path, tiny_tree, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "anomalib" else real(name, *a))
    path = write_suite(tmp_path / "suite.yaml", tiny_tree,
                       models=[{"name": "pc", "kind": "patchcore", "backbone": "efficientnet_lite0"}])  # fmt: skip
    with pytest.raises(ConfigError, match=r"pip install 'dmdd\[peers\]'"):
        load_suite(path)


def test_the_grid_expands_in_order_and_patchcore_gets_one_cell_per_seed(tmp_path, tiny_tree, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "anomalib" else real(name, *a))
    path = write_suite(tmp_path / "suite.yaml", tiny_tree, budgets=[{"steps": 2}, {"minutes": 1.5}], seeds=[0, 1],
                       models=[TINY_MODEL, {"name": "pc", "kind": "patchcore", "backbone": "efficientnet_lite0"}])
    ids = [c.id for c in load_suite(path).cells()]
    assert ids == ["gen/metal/tiny/2steps/seed0", "gen/metal/tiny/2steps/seed1", "gen/metal/tiny/1.5min/seed0",
                   "gen/metal/tiny/1.5min/seed1", "gen/metal/pc/default/seed0", "gen/metal/pc/default/seed1"]


def test_a_tiny_suite_runs_skips_finished_cells_and_records_failures(tmp_path, tiny_tree):
    results = tmp_path / "published.json"
    path = write_suite(tmp_path / "suite.yaml", tiny_tree, results=str(results),
                       models=[TINY_MODEL, {**TINY_MODEL, "name": "broken", "set": {"model.weights": "/no/such.pt"}}])
    suite = load_suite(path)
    first = run_suite(suite, progress=False)
    assert [r["id"] for r in first["cells"]] == ["gen/metal/tiny/2steps/seed0"]
    assert [f["id"] for f in first["failed"]] == ["gen/metal/broken/2steps/seed0"]
    assert "/no/such.pt" in first["failed"][0]["error"]
    record = first["cells"][0]
    m = record["metrics"]
    assert record["train"]["steps"] == 2 and record["config"]["train"]["steps"] == 2
    assert 0 < m["image_auroc"] <= 1 and m["au_pro"] is not None and m["decisions"]["false_alarm_rate"] is not None
    assert record["environment"]["versions"]["torch"] and record["memory"]["peak_rss_mib"] > 100
    assert record["inference"]["images"] == 9 and record["inference"]["images_per_s"] > 0
    # the saved predictions give back the cell's metrics (maps kept in float16)
    saved = load_predictions(cell_dir(tmp_path / "out", suite.cells()[0]) / "predictions.npz")
    assert len(saved.paths) == 9 and saved.maps.shape[0] == 9 and saved.masks.shape == saved.maps.shape
    again = compute_metrics(saved)["overall"]
    assert abs(again["image_auroc"] - m["image_auroc"]) < 1e-9 and abs(again["pixel_auroc"] - m["pixel_auroc"]) < 1e-3
    # the published file and the summary tables hold what the cell JSON holds
    published = json.loads(results.read_text())["cells"]
    assert [c["id"] for c in published] == [record["id"]]
    summary = (tmp_path / "out" / "summary.csv").read_text().splitlines()
    assert len(summary) == 2 and f"{m['image_auroc']}" in summary[1]
    # a second run skips the finished cell (its file is untouched) and retries the failed one
    done = cell_dir(tmp_path / "out", suite.cells()[0]) / "cell.json"
    stamp = done.stat().st_mtime_ns
    second = run_suite(suite, progress=False)
    assert second["skipped"] == 1 and done.stat().st_mtime_ns == stamp
    assert [f["id"] for f in second["failed"]] == ["gen/metal/broken/2steps/seed0"]


def test_publishing_keeps_the_recorded_cells_whose_run_folders_are_not_here(tmp_path, tiny_tree, capsys):
    # run folders are not committed: a fresh clone running one cell must not drop the cells recorded elsewhere
    from dmdd.benchmark.runner import publish

    results = tmp_path / "published.json"
    path = write_suite(tmp_path / "suite.yaml", tiny_tree, results=str(results), budgets=[{"steps": 2}, {"steps": 3}],
                       models=[TINY_MODEL, {**TINY_MODEL, "name": "other"}])  # fmt: skip
    suite = load_suite(path)
    ids = [c.id for c in suite.cells()]
    assert len(ids) == 4
    old = [{"id": i, "source": "earlier"} for i in (ids[3], ids[0], "gen/metal/gone/2steps/seed0")]
    results.write_text(json.dumps({"suite": "tiny", "cells": old}))
    publish(suite, [{"id": ids[0], "source": "here", "thresholds": {"x": 1}}, {"id": ids[1], "source": "here"}])
    cells = json.loads(results.read_text())["cells"]
    # grid order; the fresh record replaces the earlier one; a cell the suite no longer holds is dropped
    assert [(c["id"], c["source"]) for c in cells] == [(ids[0], "here"), (ids[1], "here"), (ids[3], "earlier")]
    assert "thresholds" not in cells[0]
    # --list tells the cells recorded elsewhere from those never run
    assert main(["benchmark", str(path), "--list"]) == 0
    states = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert states == ["recorded", "recorded", "todo", "recorded"]
    # a reader that stops early (`| head`) ends the listing quietly: here the pipe is closed before anything is written
    env = os.environ | {"PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "dmdd.cli", "benchmark", str(path), "--list"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and "Error" not in stderr, stderr
    results.write_text("{not json")
    with pytest.raises(DmddError, match=r"published\.json is not a results file.*restore it from git"):
        publish(suite, [])


def test_a_cell_with_snapshots_records_its_learning_curve(tmp_path, tiny_tree):
    curve_model = {**TINY_MODEL, "name": "curve", "set": {**TINY_MODEL["set"], "train.snapshot_every": 1}}
    path = write_suite(tmp_path / "suite.yaml", tiny_tree, models=[curve_model], budgets=[{"steps": 3}])
    suite = load_suite(path)
    record = run_suite(suite, progress=False)["cells"][0]
    curve = record["curve"]
    assert [c["step"] for c in curve] == [1, 2, 3]  # tiny_tree: one step per epoch, a snapshot after each
    assert all(c["student_seconds"] > 0 for c in curve) and curve[0]["student_seconds"] < curve[-1]["student_seconds"]
    # the last snapshot holds the weights the cell's result comes from: the same metrics
    assert abs(curve[-1]["pixel_auroc"] - record["metrics"]["pixel_auroc"]) < 1e-9
    assert abs(curve[-1]["image_auroc"] - record["metrics"]["image_auroc"]) < 1e-9
    table = curve_table([record]).splitlines()
    assert table[0] == "| category | model | s/step | step 1 | step 2 | step 3 |" and len(table) == 3
    assert f"{100 * curve[1]['pixel_auroc']:.2f} / {100 * curve[1]['au_pro']:.2f}" in table[2]


def test_two_runs_on_one_output_folder_do_not_both_run(tmp_path):
    lock = OutputLock(tmp_path)
    try:
        with pytest.raises(DmddError, match="in use by another dmdd benchmark run"):
            OutputLock(tmp_path)
    finally:
        lock.release()
    OutputLock(tmp_path).release()  # free again once the first run ends


def test_an_interrupted_cell_resumes_from_its_checkpoint(tmp_path, tiny_tree):
    # a cell of several epochs is stopped with SIGTERM once its first epoch is saved, then the same command resumes it
    path = write_suite(tmp_path / "suite.yaml", tiny_tree, budgets=[{"epochs": 6}])
    suite = load_suite(path)
    run = cell_dir(tmp_path / "out", suite.cells()[0]) / "run"
    env = os.environ | {"PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "dmdd.cli", "benchmark", str(path), "--no-progress"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (run / "train_log.jsonl").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 2, output
    assert "resumes from its last epoch" in output
    epochs_before = len((run / "train_log.jsonl").read_text().splitlines())
    assert 1 <= epochs_before < 6 and not (run.parent / "cell.json").exists()
    result = run_suite(suite, progress=False)
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == list(range(1, 7))  # the finished epochs were kept, not redone
    assert len(result["cells"]) == 1 and result["cells"][0]["train"]["epochs"] == 6


def _record(category, model, seed, auroc, paper=None):
    return {"id": f"d/{category}/{model}/default/seed{seed}", "dataset": "d", "category": category, "model": model,
            "kind": "dmdd", "backbone": "b", "budget_label": "default", "seed": seed, "paper": paper,
            "metrics": {"image_auroc": auroc, "pixel_auroc": 0.9, "au_pro": None, "image_f1_max": 0.5},
            "train": {"seconds": 120, "steps": 10, "step_seconds": 1.0}, "inference": {"images_per_s": 3.0},
            "memory": {"peak_rss_mib": 1000.0, "peak_gpu_mib": None},
            "environment": {"device_name": "cpu", "git_commit": "abc"}}  # fmt: skip


def test_quality_table_means_over_seeds_then_categories_and_shows_the_papers_row():
    records = [_record("bottle", "m", 0, 0.8, "mvtec"), _record("bottle", "m", 1, 0.9, "mvtec"),
               _record("cable", "m", 0, 0.6, "mvtec")]  # fmt: skip
    table = quality_table(records)
    assert "| bottle | m | default | 85.00 ± 5.00 | 90.00 ± 0.00 | - | 50.00 ± 0.00 |" in table
    assert "| bottle | paper (WRN50-2) | - | 100.00 | 98.99 | 97.07 |" in table
    assert "| **mean** | m | default | 72.50 | 90.00 | - | 50.00 |" in table  # (0.85 + 0.6) / 2
    assert "| **mean** | paper (WRN50-2) | - | 99.40 | 98.85 | 96.13 |" in table
    assert csv_text(records).count("\n") == 4


def test_backbones_table_puts_models_with_the_same_backbone_side_by_side():
    from dmdd.benchmark.tables import backbones_table

    ours = [_record("tire", "m", 0, 0.8), _record("tire", "m", 1, 0.6)]
    peer = {**_record("tire", "p", 0, 0.7), "kind": "patchcore", "budget_label": "default"}
    other = {**_record("tire", "m", 0, 0.5), "backbone": "c"}
    table = backbones_table([*ours, peer, other]).splitlines()
    assert table[0] == "| category | backbone | dmdd default | patchcore default |"
    assert table[2] == "| tire | b | 70.00 ± 10.00 / 90.00 ± 0.00 / - | 70.00 / 90.00 / - |"
    assert table[3] == "| tire | c | 50.00 / 90.00 / - | - |" and len(table) == 4


def test_budgets_table_sets_the_minutes_a_fit_took_against_its_budget():
    from dmdd.benchmark.tables import budgets_table

    timed = {**_record("tire", "m", 0, 0.8), "budget": {"minutes": 10}}
    timed["train"] = {**timed["train"], "fit_seconds": 630.0}
    stepped = {**_record("tire", "s", 0, 0.8), "budget": {"steps": 250}}  # no minutes budget: no row
    table = budgets_table([timed, stepped]).splitlines()
    assert table[2] == "| tire | m | 10 | 10.50 | 105.0 % | 10 | 1.0 | abc |" and len(table) == 3


def test_time_to_peer_table_finds_the_first_snapshot_at_the_peers_level_and_times_it_at_the_speed_suites_pace():
    from dmdd.benchmark.tables import to_peer_table

    peer = {**_record("tire", "p", 0, 0.7), "kind": "patchcore"}
    peer["metrics"] = {**peer["metrics"], "pixel_auroc": 0.95, "au_pro": 0.80}
    ours = _record("tire", "m", 0, 0.8)
    ours["curve"] = [{"step": 50, "pixel_auroc": 0.96, "au_pro": 0.70, "image_auroc": 0.8},
                     {"step": 100, "pixel_auroc": 0.94, "au_pro": 0.81, "image_auroc": 0.8},
                     {"step": 150, "pixel_auroc": 0.95, "au_pro": 0.85, "image_auroc": 0.8}]  # fmt: skip
    other = {**ours, "category": "tile"}  # no peer on that category: no row
    table = to_peer_table([ours, peer, other]).splitlines()
    # the cell's own 1.0 s a step: P-AUROC at step 50, AU-PRO at 100, both only at 150
    assert table[2:] == ["| tire | b | 95.00 / 80.00 | 95.00 / 85.00 @150 | 0.8 min @50 | 1.7 min @100 | 2.5 min @150 |"]
    speed = {**_record("tire", "s", 0, 0.8), "suite": "speed"}
    speed["train"] = {**speed["train"], "step_seconds": 6.0}
    slow_peer = {**peer, "metrics": {**peer["metrics"], "au_pro": 0.9}}
    table = to_peer_table([ours, slow_peer, speed]).splitlines()
    assert table[2].endswith("| 5.0 min @50 | not in 150 steps | not in 150 steps |")


def test_ablation_table_puts_each_switch_beside_the_default_per_category_and_backbone():
    from dmdd.benchmark.tables import ablation_table

    def cell(category, model, backbone, auroc):
        return {**_record(category, model, 0, auroc), "backbone": backbone}

    records = [cell("tire", "dmdd-lite0", "l0", 0.8), cell("tire", "dmdd-lite0-msn", "l0", 0.7),
               cell("tire", "dmdd-lite2", "l2", 0.9), cell("tire", "dmdd-lite2-msn", "l2", 0.6),
               cell("tire", "dmdd-lite1", "l1", 0.5),  # no switch ran with this backbone: no column
               {**cell("tire", "patchcore-lite0", "l0", 1.0), "kind": "patchcore"},  # a peer: no row
               cell("tile", "dmdd-lite0-no-pmn", "l0", 0.4)]  # fmt: skip
    assert ablation_table(records).splitlines() == [
        "| switch | tire l0 | tire l2 | tile l0 |", "|---|---|---|---|",
        "| default | 80.00 / 90.00 / - | 90.00 / 90.00 / - | - |",
        "| msn | 70.00 / 90.00 / - | 60.00 / 90.00 / - | - |",
        "| no-pmn | - | - | 40.00 / 90.00 / - |"]


def test_time_to_quality_figure_plots_each_curve_against_minutes_at_the_speed_suites_pace(tmp_path):
    from PIL import Image

    from dmdd.benchmark.figures import quality_against_minutes

    peer = {**_record("tire", "p", 0, 0.7), "kind": "patchcore"}
    peer["metrics"] = {**peer["metrics"], "pixel_auroc": 0.95, "au_pro": 0.80}
    ours = _record("tire", "m", 0, 0.8)
    ours["curve"] = [{"step": 50, "pixel_auroc": 0.96, "au_pro": 0.70, "image_auroc": 0.8},
                     {"step": 100, "pixel_auroc": 0.94, "au_pro": 0.81, "image_auroc": 0.8}]  # fmt: skip
    speed = {**_record("tire", "s", 0, 0.8), "suite": "speed"}
    speed["train"] = {**speed["train"], "step_seconds": 6.0}
    other = {**ours, "category": "tile", "backbone": "c"}  # no peer, no speed cell: its own 1.0 s a step
    series = quality_against_minutes([ours, peer, speed, other])
    assert series["tire"] == [{"model": "m", "backbone": "b", "minutes": [5.0, 10.0], "pixel_auroc": [96.0, 94.0],
                               "au_pro": [70.0, 81.0], "peer": {"pixel_auroc": 95.0, "au_pro": 80.0}}]  # fmt: skip
    assert series["tile"][0]["minutes"] == [50 / 60, 100 / 60] and series["tile"][0]["peer"] is None

    (tmp_path / "r.json").write_text(json.dumps({"cells": [ours, peer, speed, other]}))
    page = tmp_path / "results.md"
    page.write_text("<!-- benchmark: r.json figure=time_to_quality -->\n<!-- /benchmark -->\n")
    assert render_page(page, check=True) == ["r.json figure=time_to_quality (missing "
                                             f"{tmp_path / 'figures' / 'time_to_quality_tire.png'}) (missing "
                                             f"{tmp_path / 'figures' / 'time_to_quality_tile.png'})"]  # fmt: skip
    assert main(["benchmark", "--render", str(page)]) == 0
    assert "(figures/time_to_quality_tire.png)" in page.read_text()
    assert "(figures/time_to_quality_tile.png)" in page.read_text()
    with Image.open(tmp_path / "figures" / "time_to_quality_tire.png") as image:
        assert image.format == "PNG" and image.width > 400
    assert render_page(page, check=True) == []
    (tmp_path / "figures" / "time_to_quality_tile.png").unlink()  # a lost figure is caught like a stale table
    assert render_page(page, check=True) == [f"r.json figure=time_to_quality (missing {tmp_path / 'figures' / 'time_to_quality_tile.png'})"]


def test_the_results_page_is_regenerated_from_its_records_and_a_stale_page_is_caught(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"cells": [_record("bottle", "m", 0, 0.8)]}))
    page = tmp_path / "results.md"
    page.write_text("# R\n<!-- benchmark: r.json table=quality -->\nold\n<!-- /benchmark -->\nafter\n")
    assert main(["benchmark", "--render", str(page), "--check"]) == 1
    assert "old" in page.read_text()  # --check writes nothing
    assert main(["benchmark", "--render", str(page)]) == 0
    assert "| bottle | m | default | 80.00 |" in page.read_text() and page.read_text().endswith("after\n")
    assert main(["benchmark", "--render", str(page), "--check"]) == 0
    assert render_page(page, check=True) == []


def test_a_block_over_several_files_pools_records_and_stacks_driver_tables(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"cells": [_record("bottle", "m", 0, 0.8)]}))
    (tmp_path / "b.json").write_text(json.dumps({"cells": [_record("cable", "m", 0, 0.6)]}))
    load = {"clients": 1, "server_threads": 2, "requests": 10, "errors": 0, "p50_ms": 5.0, "p99_ms": 9.0,
            "throughput_per_s": 3.0, "server_rss_mib_after_warmup": 100.0, "server_rss_mib_end": 101.0}  # fmt: skip
    (tmp_path / "x.json").write_text(json.dumps({**load, "category": "tire"}))
    (tmp_path / "y.json").write_text(json.dumps({**load, "requests": 20}))
    page = tmp_path / "results.md"
    page.write_text("<!-- benchmark: a.json,b.json table=quality -->\n<!-- /benchmark -->\n"
                    "<!-- benchmark: x.json,y.json table=serve_load -->\n<!-- /benchmark -->\n")
    render_page(page)
    text = page.read_text()
    # records pooled: one table with both categories and their mean (80 and 60 -> 70)
    assert "| bottle | m | default | 80.00 |" in text and "| cable | m | default | 60.00 |" in text
    assert "| **mean** | m | default | 70.00 |" in text
    # driver tables stacked under one header, each row named by its file's category (else the file name)
    assert "| set | clients | server threads | requests |" in text
    assert "| tire | 1 | 2 | 10 |" in text and "| y | 1 | 2 | 20 |" in text


def test_the_committed_results_pages_match_their_records():
    # every generated table of README.md and the docs pages equals what its committed records give today
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    rendered = [p for p in pages if re.search(r"^<!-- benchmark: ", p.read_text(), re.M)]  # not the indented example
    assert {"README.md", "results.md", "decisions.md", "small-defects.md", "diagnosis.md"} <= {p.name for p in rendered}
    for page in rendered:
        assert render_page(page, check=True) == [], page


def test_every_shipped_suite_loads_and_expands(monkeypatch, tmp_path):
    # the suites' data roots come from the environment: point them at generated trees with the expected categories
    import importlib.util

    from dmdd.data.generated import make_demo_dataset

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "anomalib" else real(name, *a))
    made = make_demo_dataset(tmp_path / "gen", "metal", size=32, train=2, test_good=1, test_per_defect=1, seed=0)
    for name in ("tire", "magnetic_tile", "bottle", "tire_x4"):
        made.rename(tmp_path / name) if name == "tire" else shutil.copytree(tmp_path / "tire", tmp_path / name)
    for var in ("DMDD_DATA", "MVTEC_ROOT", "MPDD_ROOT", "DMDD_SMALL"):
        monkeypatch.setenv(var, str(tmp_path))
    suites = sorted((REPO / "benchmarks" / "suites").glob("*.yaml"))
    shipped = {"dev", "speed", "paper_mvtec", "paper_mpdd", "gpu_smoke", "ladder", "small_defects", "curves", "ablation"}
    assert {s.stem for s in suites} >= shipped
    for path in suites:
        suite = load_suite(path)
        assert suite.cells(), path.name
        if path.stem == "dev":
            assert {c.model.kind for c in suite.cells()} == {"dmdd", "patchcore", "stfpm"}
            assert suite.results == Path("docs/results/dev.json")


def test_the_deployment_runtime_driver_runs_on_a_tiny_model(tiny_tree, tmp_path):
    # in its own process, as it is run: OpenVINO and ONNX Runtime start thread pools that a later fork (DataLoader
    # workers of another test) must not inherit
    from conftest import tiny_config

    from dmdd.training.loop import fit

    ckpt = fit(tiny_config(tiny_tree, steps=1), tmp_path / "run", progress=False)
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "deploy_runtimes.py"), str(ckpt), "--data",
                           str(tiny_tree.parent), "--category", "metal", "--out", str(tmp_path / "deploy"), "--reps",
                           "1", "--threads", "1"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "deploy" / "deploy.json").read_text())["rows"]
    assert rows["eager fp32"]["max_abs_map_diff"] == 0.0
    assert rows["ONNX Runtime fp32"]["max_rel_map_diff"] < 1e-4  # an exported fp32 graph computes the same maps


@pytest.mark.skipif(importlib.util.find_spec("anomalib") is None,
                    reason="peers: anomalib is not installed (pip install 'dmdd[peers]')")  # fmt: skip
def test_peers_run_as_cells_and_are_scored_by_dmdds_metric_code(tmp_path, tiny_tree):
    path = write_suite(tmp_path / "suite.yaml", tiny_tree, budgets=[{"steps": 2}], models=[
        {"name": "pc", "kind": "patchcore", "backbone": "efficientnet_lite0", "image_size": 64},
        {"name": "st", "kind": "stfpm", "backbone": "efficientnet_lite0", "image_size": 64}])  # fmt: skip
    result = run_suite(load_suite(path), progress=False)
    assert not result["failed"], result["failed"]
    by_model = {r["model"]: r for r in result["cells"]}
    assert by_model["st"]["train"]["steps"] == 2 and by_model["pc"]["train"]["memory_bank"] > 0
    for r in by_model.values():  # every test image scored, pixel metrics from the same masks as dmdd's
        assert r["metrics"]["images"] == 9 and r["metrics"]["au_pro"] is not None
        assert r["environment"]["versions"]["anomalib"]
        saved = load_predictions(cell_dir(tmp_path / "out", next(c for c in load_suite(path).cells()
                                                                if c.model.name == r["model"])) / "predictions.npz")
        assert abs(compute_metrics(saved)["overall"]["image_auroc"] - r["metrics"]["image_auroc"]) < 1e-9


def test_the_threshold_driver_runs_on_a_tiny_model_and_its_tables_render(tiny_tree, tmp_path):
    from conftest import tiny_config

    from dmdd.benchmark.tables import labelled_table, normal_only_table, stage_rules_table, stages_table
    from dmdd.training.loop import fit

    ckpt = fit(tiny_config(tiny_tree, steps=1), tmp_path / "run", progress=False)
    out = tmp_path / "thresholds.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "thresholds.py"), str(ckpt), "--data",
                           str(tiny_tree.parent), "--category", "metal", "--out", str(out), "--labelled", "2",
                           "--draws", "3", "--rules", "f1,fpr=0.5", "--holdout-sizes", "1,2", "--threads", "1",
                           "--choose-map"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(out.read_text())
    assert (data["test_good"], data["test_defective"], data["held_out_good"]) == (3, 6, 2)
    assert set(data["best_recall_at_false_alarms"]) == {"0.01", "0.05", "0.1"}
    # the false-alarm rule twice: as dmdd calibrate sets it (held-out good images pooled where the labelled good
    # ones do not score higher) and from the labelled good images alone
    assert [(r["rule"], r["goods"]) for r in data["labelled"]] == [
        ("f1", "labelled"), ("fpr=0.5", "labelled"), ("fpr=0.5", "labelled only")]
    assert data["labelled"][0]["draws"] == 3 and data["labelled"][2]["pooled"] == 0 <= data["labelled"][1]["pooled"] <= 3
    for r in data["labelled"]:  # no threshold beats the best the ranking allows at the same false-alarm rate
        assert 0 <= r["recall"]["mean"] <= r["best"]["mean"] + 1e-12 <= 1 + 1e-12
    assert {(r["held_out"], r["method"]) for r in data["normal_only"]} == {
        (1, "dmdd: max"), (1, "before: maximum"), (2, "dmdd: max"), (2, "before: maximum")}
    assert labelled_table(data).count("\n") == 5 and normal_only_table(data).count("\n") == 4
    stages = data["stages"]  # part 3: every draw chose one of the six candidates (a texture: the wider regional
    # window too); "all" is the trained map
    assert sum(stages["chosen"].values()) == 3
    assert set(stages["chosen"]) == {"all", *(f"without stage {s}" for s in "1234"), "stage-3 window 9"}
    for key in ("pixel_auroc", "au_pro", "image_auroc"):
        assert 0 <= stages["rest"]["chosen"][key]["mean"] <= 1 and 0 <= stages["rest"]["all"][key]["mean"] <= 1
    if stages["chosen"]["all"] == 3:
        assert stages["rest"]["chosen"] == stages["rest"]["all"]
    assert [r["rule"] for r in stages["rules"]] == ["f1", "fpr=0.5"]
    assert stages_table(data).count("\n") == 3 and stage_rules_table(data).count("\n") == 4


def test_the_small_defect_driver_builds_its_category_and_times_a_tiled_model(tiny_tree, tmp_path):
    from conftest import tiny_config
    from PIL import Image

    from dmdd.data import load_category
    from dmdd.training.loop import fit

    out = tmp_path / "small"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "small_defects.py"), "make", "--data",
                           str(tiny_tree.parent), "--category", "metal", "--upscale", "2", "--sizes", "8,16",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    cat = load_category(out, "metal_x2")
    assert len(cat.train) == 8 and sorted({r.defect_type for r in cat.test}) == ["good", "size08", "size16"]
    for r in cat.test:
        assert Image.open(r.image).size == (128, 128)  # 64 px images upscaled twice
        if r.label:  # the pasted defect's mask spans at most its size along each axis
            mask = np.asarray(Image.open(r.mask)) > 0
            ys, xs = np.nonzero(mask)
            size = int(r.defect_type[4:])
            assert 0 < np.ptp(ys) + 1 <= size and 0 < np.ptp(xs) + 1 <= size

    ckpt = fit(tiny_config(tiny_tree, steps=1).replace(model={"tile": 32}), tmp_path / "run", progress=False)
    speed = tmp_path / "speed.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "small_defects.py"), "speed", str(ckpt),
                           "--megapixels", "0.02", "--repeats", "1", "--threads", "1", "--out", str(speed)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = json.loads(speed.read_text())["rows"]
    assert row["tile"] == 32 and row["seconds_per_image"] > 0 and row["peak_rss_mib"] > 100
    from dmdd.benchmark.tables import tiles_speed_table

    assert f"| {ckpt.parent.parent.name} | 32 |" in tiles_speed_table({"rows": [row]})  # named after the cell


def test_the_diagnosis_driver_splits_maps_and_regions_and_matches_the_cell(tmp_path, tiny_tree):
    from dmdd.benchmark.tables import map_types_table, maps_table, regions_table

    path = write_suite(tmp_path / "suite.yaml", tiny_tree)
    record = run_suite(load_suite(path), progress=False)["cells"][0]
    cell = cell_dir(tmp_path / "out", load_suite(path).cells()[0])
    out = tmp_path / "diagnose.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "diagnose.py"), str(cell), "--peer",
                           f"again={cell}", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    (result,) = json.loads(out.read_text())["sets"]
    maps = {r["variant"]: r for r in result["maps"]}
    # the fusion rebuilt from the captured maps scores what the cell scored
    assert abs(maps["default (all maps)"]["pixel_auroc"] - record["metrics"]["pixel_auroc"]) < 1e-3
    assert {"stage 1 alone", "stage 4 alone", "without stage 4", "NGM only", "smoothing sigma 0"} <= set(maps)
    # per defect type too, as the cell's own per-type metrics (each type's images with the good ones)
    per_type = maps["default (all maps)"]["per_type"]
    assert set(per_type) == set(record["metrics"]["per_defect_type"]) and len(per_type) == 3
    for kind, m in per_type.items():
        assert abs(m["pixel_auroc"] - record["metrics"]["per_defect_type"][kind]["pixel_auroc"]) < 1e-3
    assert abs(sum(result["defect_pixel_share"].values()) - 1) < 1e-9
    table = map_types_table({"sets": [result]}).splitlines()
    shown = [v for v in maps if v.startswith("default") or v.endswith((" alone", " only", "the regional map"))]
    assert table[0].startswith("| metal: maps fused |") and [row.split(" | ")[0][2:] for row in table[2:]] == shown
    rows = result["regions"]
    ours = [r for r in rows if r["model"] != "again"]
    theirs = [r for r in rows if r["model"] == "again"]
    # the three regions partition the pixels and the false alarms; the saved float16 maps give the same split
    assert [r["region"] for r in ours] == ["background", "edge", "interior"]
    assert abs(sum(r["good_pixel_share"] for r in ours) - 1) < 1e-9
    assert abs(sum(r["defect_pixel_share"] for r in ours) - 1) < 1e-9
    assert abs(sum(r["false_alarm_share"] for r in ours) - 1) < 1e-9
    for a, b in zip(ours, theirs):
        assert a["good_pixel_share"] == b["good_pixel_share"] and abs(a["false_alarm_share"] - b["false_alarm_share"]) < 0.05
    assert maps_table({"sets": [result]}).splitlines()[0] == "| maps fused | metal |"
    assert len(regions_table({"sets": [result]}).splitlines()) == 2 + sum(
        1 for r in rows if r["good_pixel_share"] or r["defect_pixel_share"])
