"""``dmdd`` command line: train, test, calibrate, predict, export, serve, benchmark, demo. Thin over the Python API.

Errors a user can cause print one line (what, which file, what to do) and exit with status 2; ``--debug`` shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from dmdd import __version__
from dmdd.config import Config, load_config
from dmdd.device import tune_allocator
from dmdd.errors import DmddError

EPILOG = "Every option also lives in the YAML config (--config); command-line values win. See README.md."


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="auto (CUDA when present), cpu, cuda, cuda:N (default: config, auto)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def _data_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--data", required=required,
                   help="dataset root (with --category), category folder, or plain folder of good images")  # fmt: skip
    p.add_argument("--category", help="category under --data; omit when --data is the category folder")
    p.add_argument("--layout", choices=["auto", "mvtec", "btad", "visa", "mvtec3d", "classes", "folder"],
                   help="dataset layout (auto)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmdd", description=__doc__.splitlines()[0], epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"dmdd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train DMDD on one category (or every category of a root)", epilog=EPILOG)
    _data_args(p, required=False)
    p.add_argument("--normal-dir", help="a plain folder of good training images (searched recursively)")
    p.add_argument("--backbone", help="wide_resnet50_2 (paper), resnet18/34/50, efficientnet_lite0/1/2")
    p.add_argument("--weights", help="local backbone weights file instead of the ImageNet download")
    p.add_argument("--epochs", type=int, help="number of epochs (default 100) unless --steps or --minutes is given")
    p.add_argument("--steps", type=int, help="training length in student optimiser steps (last epoch may be partial)")
    p.add_argument("--minutes", type=float,
                   help="training length as a wall-clock budget (setup and final calibration included); the steps "
                        "are re-planned after every epoch (and every step) from the measured speed")  # fmt: skip
    p.add_argument("--snapshot-every", type=int, help="keep a model copy every N steps in <out>/snapshots")
    p.add_argument("--ema-decay", type=float,
                   help="maps from an exponential moving average of the student weights (default 0.99; 0: the "
                        "last weights, as the paper)")  # fmt: skip
    p.add_argument("--batch-size", type=int, help="normal/anomalous pairs per step (default 16)")
    p.add_argument("--image-size", type=int, help="input size, a multiple of 32 (default 256)")
    p.add_argument("--tile", type=int,
                   help="high-resolution images: train and infer on square tiles of this many pixels (each "
                        "brought to --image-size); stored in the checkpoint, so test, predict, export and serve "
                        "tile too")  # fmt: skip
    p.add_argument("--tile-overlap", type=float, help="share of a tile overlapping its neighbour at inference (0.25)")
    p.add_argument("--tile-scale", type=float, help="scale the image by this factor before tiling (default 1)")
    p.add_argument("--resize", choices=["squash", "pad", "crop"],
                   help="non-square images: stretch, pad (keep aspect, black borders) or centre-crop (default "
                        "squash); stored in the checkpoint and used by test, predict and export")  # fmt: skip
    p.add_argument("--texture-dir", help="texture images for anomaly synthesis, e.g. DTD (default: procedural)")
    p.add_argument("--seed", type=int, help="one seed reproduces a run on CPU (default 0)")
    p.add_argument(
        "--amp",
        action="store_true",
        default=None,
        help="bfloat16 autocast of the training forward (CUDA or CPU; faster, not bit-exact)",
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels-last memory layout while training (default: train.channels_last)",
    )
    p.add_argument("--config", help="YAML config file; see `dmdd train --help` options for its fields")
    p.add_argument("--out", default="runs/dmdd", help="output folder (default runs/dmdd); one sub-folder per category")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt when present")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _common(p)

    p = sub.add_parser("test", help="evaluate a checkpoint on a labelled test split; writes metrics and report.html")
    p.add_argument("checkpoint", help="last.pt written by dmdd train")
    _data_args(p, required=False)
    p.add_argument("--normal-dir", help="a plain folder of good test images (instead of --data)")
    p.add_argument("--abnormal-dir", action="append", default=[], metavar="[NAME=]DIR",
                   help="a plain folder of defective test images; repeat for several defect types (name: the "
                        "folder's name unless NAME= is given)")  # fmt: skip
    p.add_argument(
        "--mask-dir",
        help="masks of the defective images, by file stem (<stem>.png or <stem>_mask.png), "
        "also in a sub-folder per defect type; masks may cover only some images",
    )
    p.add_argument("--out", help="output folder (default: <checkpoint folder>/test)")
    p.add_argument("--eval-size", type=int, help="size of the pixel metrics (default: config, 256)")
    _common(p)

    p = sub.add_parser("calibrate", epilog=EPILOG,
                       help="set the thresholds from a few labelled good and defective images; stores them in the "
                            "checkpoint with an estimate of recall and false alarms on new parts")  # fmt: skip
    p.add_argument("checkpoint", help="last.pt written by dmdd train")
    p.add_argument("--normal-dir", help="known good parts (searched recursively)")
    p.add_argument("--abnormal-dir", action="append", default=[], metavar="[NAME=]DIR",
                   help="known rejects; repeat for several defect types")  # fmt: skip
    p.add_argument("--mask-dir", help="masks of the rejects by file stem (optional; sets the pixel threshold too)")
    p.add_argument("--rule", default="f1",
                   help="f1 (best F1 on the labelled images, default), fpr=X (expected false-alarm rate X on new "
                        "good parts, from the good images alone) or recall-at-fpr=X (the same limit, placed "
                        "half-way to the next reject)")  # fmt: skip
    p.add_argument("--choose-map", "--choose-stages", dest="choose_map", action="store_true",
                   help="let the rejects' masks choose the anomaly map: which stages' maps it adds up (all, or all "
                        "but one) and, on textures, the regional map's stage-3 window (trained, or wider); refits "
                        "the map's statistics on the run's held-out good training images (--choose-stages: the "
                        "earlier name)")  # fmt: skip
    p.add_argument("--data-root", help="where the training data is now, for --choose-map (default: the "
                                       "checkpoint's data.root)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="print what would be stored; leave the checkpoint as is")
    p.add_argument("--reset", action="store_true",
                   help="remove labelled thresholds (and a chosen map): training's decide again")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    _common(p)

    p = sub.add_parser("predict", help="score images; writes overlays, masks, results.csv and results.json")
    p.add_argument("checkpoint", help="last.pt written by dmdd train")
    p.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--out", default="predictions", help="output folder (default predictions)")
    p.add_argument("--threshold", type=float, help="image threshold (default: calibrated, in the checkpoint)")
    p.add_argument("--pixel-threshold", type=float, help="pixel threshold for masks (default: calibrated)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast: faster, maps less exact")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (slow first batch)")
    _common(p)

    p = sub.add_parser("export", help="export the eval forward to ONNX, OpenVINO or TorchScript, with a parity check")
    p.add_argument("checkpoint", help="last.pt written by dmdd train")
    p.add_argument(
        "--format",
        choices=["onnx", "openvino", "torchscript"],
        default="onnx",
        help="(default onnx; openvino needs pip install 'dmdd[openvino]' and writes model.onnx too)",
    )
    p.add_argument("--out", help="output folder (default: the checkpoint's folder)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")

    p = sub.add_parser("serve", help="inspection web app and HTTP API (needs pip install 'dmdd[serve]')",
                       description="Serve models over HTTP with a browser app: drop images, see heat maps, move the "
                       "threshold, train on a folder of good images. API docs at http://HOST:PORT/docs.")  # fmt: skip
    p.add_argument(
        "models",
        nargs="*",
        help="checkpoints (last.pt) or exported .onnx files, each PATH or NAME=PATH; the first is active",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--data-root", help="the only server-side folder tree the app may read (inspection, training)")
    p.add_argument("--runs-dir", default="runs/serve", help="run folders of training jobs (default runs/serve)")
    p.add_argument("--token", default=os.environ.get("DMDD_SERVE_TOKEN"),
                   help="require a bearer token on every API request (default: $DMDD_SERVE_TOKEN)")  # fmt: skip
    p.add_argument("--max-upload-mb", type=float, default=25.0, help="largest accepted upload in MiB (default 25)")
    p.add_argument("--max-megapixels", type=float, default=50.0, help="largest accepted image (default 50 MP)")
    p.add_argument("--train-threads", type=int, help="torch threads of training jobs (default: torch's choice)")
    _common(p)

    p = sub.add_parser("benchmark", help="run a benchmark suite (YAML grid of cells) or render a results page",
                       description="Run every unfinished cell of a suite (dataset x category x model x budget x "
                       "seed), each in its own process writing one JSON, then the summary CSV and tables. A finished "
                       "cell is skipped, an interrupted one resumes. See docs/benchmark.md.")  # fmt: skip
    p.add_argument("suite", nargs="?", help="suite file, e.g. benchmarks/suites/dev.yaml")
    p.add_argument("--out", help="output folder (default: the suite's 'output', runs/benchmark/<name>)")
    p.add_argument("--jobs", type=int, default=1,
                   help="cells at once on the CPU, cores split between them (with GPUs: one cell per GPU)")  # fmt: skip
    p.add_argument("--only", help="run only the cells whose id (dataset/category/model/budget/seedN) contains this")
    p.add_argument("--list", action="store_true",
                   help="print the cells: done here, recorded in the results file only, or todo; run nothing")
    p.add_argument("--render", metavar="PAGE", help="regenerate the benchmark tables and figures of a markdown page")
    p.add_argument("--check", action="store_true", help="with --render: exit 1 if the page differs; write nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _common(p)

    p = sub.add_parser("demo", help="built-in data, offline: generate, train, evaluate, write the report")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--epochs", type=int, default=15, help="epochs (default 15: a few minutes on 2 CPU cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the training (default 0)")
    _common(p)
    return parser


def _set(values: dict[str, dict[str, Any]], section: str, key: str, value: Any) -> None:
    if value is not None:
        values.setdefault(section, {})[key] = value


def resolve_config(args: argparse.Namespace) -> Config:
    """Config file (or defaults) overridden by the command-line options that were given."""
    cfg = load_config(args.config) if args.config else Config()
    v: dict[str, dict[str, Any]] = {}
    for section, key, value in [
        ("data", "root", args.data), ("data", "category", args.category), ("data", "layout", args.layout),
        ("model", "backbone", args.backbone), ("model", "weights", args.weights),
        ("model", "image_size", args.image_size), ("model", "resize", args.resize), ("train", "epochs", args.epochs),
        ("model", "tile", args.tile), ("model", "tile_overlap", args.tile_overlap),
        ("model", "tile_scale", args.tile_scale),
        ("train", "steps", args.steps), ("train", "minutes", args.minutes),
        ("train", "snapshot_every", args.snapshot_every), ("train", "ema_decay", args.ema_decay),
        ("train", "batch_size", args.batch_size), ("train", "seed", args.seed), ("train", "amp", args.amp),
        ("train", "channels_last", args.channels_last),
        ("train", "device", args.device), ("train", "num_threads", args.threads),
        ("synthesis", "texture_dir", args.texture_dir),
    ]:  # fmt: skip
        _set(v, section, key, value)
    return cfg.replace(**v)


def cmd_train(args: argparse.Namespace) -> int:
    from dmdd.data.datasets import detect_layout, list_categories
    from dmdd.training.loop import fit

    cfg = resolve_config(args)
    if args.normal_dir:
        if args.data:
            raise DmddError("pass either --data or --normal-dir, not both")
        cfg = cfg.replace(data={"root": args.normal_dir, "category": None, "layout": "folder"})
    if cfg.data.root is None:
        raise DmddError("no data given: pass --data PATH (and --category), --normal-dir DIR, or set data.root")
    root = Path(cfg.data.root)
    jobs = [(cfg.data.category, Path(args.out))]
    if cfg.data.category is None and root.is_dir():
        try:
            detect_layout(root)
        except DmddError:
            categories = list_categories(root)
            if not categories:
                raise
            # A dataset root: every category is an independent job, one after the other.
            jobs = [(name, Path(args.out) / name) for name in categories]
    for category, out in jobs:
        job_cfg = cfg.replace(data={"category": category})
        ckpt = fit(job_cfg, out, resume=args.resume, progress=not args.no_progress)
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
            print(f"checkpoint: {ckpt}")
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    from dmdd.checkpoint import config_of, restore_model
    from dmdd.device import select_device
    from dmdd.evaluation import evaluate
    from dmdd.evaluation.report import write_report

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    device = select_device(args.device or "auto")
    model, payload = restore_model(args.checkpoint, device)
    cfg = config_of(payload, args.checkpoint)
    v: dict[str, dict[str, Any]] = {}
    _set(v, "train", "eval_size", args.eval_size)
    cfg = cfg.replace(**v)
    cat = _test_category(args, cfg)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "test"
    title = f"DMDD — {cat.name}"
    result, predictions = evaluate(model, cfg, cat.test, out, title=title, device=device,
                                   thresholds=payload.get("thresholds"))  # fmt: skip
    details = {"checkpoint": args.checkpoint, "data": str(cat.root), "backbone": cfg.model.backbone,
               "image size": cfg.model.image_size, "epochs trained": payload.get("epoch"),
               "thresholds": payload.get("thresholds"), "dmdd": __version__}  # fmt: skip
    figures = []
    if cfg.model.tile:  # the grid the model scored, on the first test image
        from dmdd.data.io import read_image
        from dmdd.data.tiles import TileSpec, draw_grid, grid, scaled_shape

        spec, first = TileSpec.of(cfg.model), read_image(cat.test[0].image)
        hw = scaled_shape(first.shape[:2], spec)
        count = len(grid((max(hw[0], spec.size), max(hw[1], spec.size)), spec))
        details["tiles"] = f"{spec.size} px, overlap {spec.overlap:g}, scale {spec.scale:g}"
        figures.append((f"tile grid of {cat.test[0].image.name}: {count} tiles", draw_grid(first, spec)))
    report = write_report(out / "report.html", result, predictions, title, details, figures=figures)
    print((out / "metrics.md").read_text())
    print(f"report: {report}")
    return 0


def _named_dirs(values: list[str]) -> dict[str, Path]:
    """``NAME=DIR`` or ``DIR`` (named after the folder) -> {name: folder}; a repeated name is an error."""
    out: dict[str, Path] = {}
    for value in values:
        name, _, folder = value.rpartition("=") if "=" in value else ("", "", value)
        path = Path(folder)
        name = name or path.name
        if name in out or name == "good":
            raise DmddError(f"--abnormal-dir name {name!r} is used twice or is 'good'; give NAME=DIR")
        out[name] = path
    return out


def _test_category(args: argparse.Namespace, cfg: Config):
    """The labelled test images: plain folders (--normal-dir / --abnormal-dir / --mask-dir) or a dataset layout."""
    from dmdd.data.datasets import Category, folder_test_records, load_category

    if args.normal_dir or args.abnormal_dir:
        if args.data:
            raise DmddError("pass either --data or --normal-dir / --abnormal-dir, not both")
        dirs = _named_dirs(args.abnormal_dir)
        if args.normal_dir:
            dirs["good"] = Path(args.normal_dir)
        if args.mask_dir and not Path(args.mask_dir).is_dir():
            raise DmddError(f"mask folder not found: {args.mask_dir}")
        test = folder_test_records(dirs, Path(args.mask_dir) if args.mask_dir else None)
        first = next(iter(dirs.values()))
        return Category(first.name, first.parent, [], test)
    root = args.data or cfg.data.root
    category = args.category if args.data else cfg.data.category
    if root is None:
        raise DmddError("no test data given: pass --data PATH (and --category), or --normal-dir / --abnormal-dir")
    cat = load_category(root, category, args.layout or cfg.data.layout)
    if not cat.test:
        raise DmddError(f"no test images found for {cat.root}; expected a test/ folder or defect folders beside good/, "
                        "or pass --normal-dir / --abnormal-dir")  # fmt: skip
    return cat


def cmd_predict(args: argparse.Namespace) -> int:
    from dmdd.deploy.predict import Predictor, expand_inputs

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    paths, problems = expand_inputs(args.images)
    if not paths and problems:
        raise DmddError(f"no images to predict: {problems[0]['path']}: {problems[0]['error']}")
    predictor = Predictor(args.checkpoint, args.device or "auto", args.threshold, args.pixel_threshold,
                          bf16=args.bf16, compile=args.compile)  # fmt: skip
    results, failures = predictor.predict_files(paths, args.out, args.batch_size, failures=problems)
    flagged = sum(r.anomalous for r in results)
    print(f"{len(results)} image(s) scored, {flagged} anomalous (image threshold {predictor.image_threshold:.6g}, "
          f"{predictor.threshold_source}); results: {Path(args.out) / 'results.csv'}")
    for fail in failures:
        print(f"skipped {fail['path']}: {fail['error']}", file=sys.stderr)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from dmdd.evaluation.labelled import calibrate_checkpoint, reset_checkpoint, summary

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.reset:
        if args.normal_dir or args.abnormal_dir or args.dry_run or args.choose_map:
            raise DmddError("--reset takes no images, no --dry-run and no --choose-map: it only removes the "
                            "labelled thresholds (and a chosen map)")  # fmt: skip
        report = reset_checkpoint(args.checkpoint)
        print(json.dumps(report, indent=1) if args.json else f"thresholds now: {report['describe']}")
        return 0
    report = calibrate_checkpoint(args.checkpoint, args.normal_dir, _named_dirs(args.abnormal_dir), args.mask_dir,
                                  args.rule, args.device or "auto", dry_run=args.dry_run,
                                  choose_map=args.choose_map, data_root=args.data_root)  # fmt: skip
    print(json.dumps(report, indent=1) if args.json else summary(report))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from dmdd.checkpoint import restore_model
    from dmdd.deploy.export import export_onnx, export_openvino, export_torchscript

    if args.format != "torchscript":
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as exc:
            raise DmddError(f"--format {args.format} needs the export extra ({exc.name} is missing): "
                            "pip install 'dmdd[export]'") from None  # fmt: skip
    model, payload = restore_model(args.checkpoint)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent
    if args.format == "onnx":
        report = export_onnx(model, out / "model.onnx", payload.get("thresholds"))
    elif args.format == "openvino":
        report = export_openvino(model, out / "model.xml", payload.get("thresholds"))
    else:
        report = export_torchscript(model, out / "model.torchscript.pt", payload.get("thresholds"))
    print(json.dumps(report))
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from dmdd.benchmark import load_suite, render_page, run_suite
    from dmdd.benchmark.runner import cell_dir, finished, published

    if args.render:
        changed = render_page(Path(args.render), check=args.check)
        verb = "differ" if args.check else "regenerated"
        print(f"{args.render}: {len(changed)} table(s) {verb}" + "".join(f"\n  {c}" for c in changed))
        return 1 if args.check and changed else 0
    if not args.suite:
        raise DmddError("pass a suite file (e.g. benchmarks/suites/dev.yaml) or --render PAGE")
    suite = load_suite(args.suite)
    out = Path(args.out or suite.output)
    if args.list:  # "recorded": in the results file only (run elsewhere); running the suite here redoes it
        recorded = published(suite)
        for cell in suite.cells():
            state = "done" if finished(out, cell) else "recorded" if cell.id in recorded else "todo"
            print(f"{state:8}  {cell.id}  {cell_dir(out, cell)}")
        return 0
    if args.threads:
        suite = dataclasses.replace(suite, threads=args.threads)
    result = run_suite(suite, out, jobs=args.jobs, device=args.device or "auto", progress=not args.no_progress,
                       only=args.only)  # fmt: skip
    print(f"{len(result['cells'])} cell(s) finished ({result['skipped']} skipped as already done), "
          f"{len(result['failed'])} failed; tables: {out / 'summary.md'}, {out / 'summary.csv'}")  # fmt: skip
    for fail in result["failed"]:
        print(f"failed {fail['id']}: {fail['error']}", file=sys.stderr)
    return 1 if result["failed"] else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dmdd.demo import run_demo

    report = run_demo(Path(args.out), epochs=args.epochs, seed=args.seed, device=args.device or "auto",
                      threads=args.threads)  # fmt: skip
    print(f"report: {report}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from dmdd.deploy.serve import ServeSettings, create_app
    except ImportError as exc:
        missing = exc.name
        raise DmddError(f"dmdd serve needs the serve extra ({missing} is missing): pip install 'dmdd[serve]'") from None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    train_args = ["--threads", str(args.train_threads)] if args.train_threads else []
    settings = ServeSettings(models=args.models, data_root=args.data_root, runs_dir=args.runs_dir, token=args.token,
                             max_upload_bytes=int(args.max_upload_mb * 2**20),
                             max_pixels=int(args.max_megapixels * 1e6), device=args.device or "auto",
                             train_args=train_args)  # fmt: skip
    if args.host not in ("127.0.0.1", "localhost", "::1") and not settings.token:
        print(f"dmdd serve: warning: listening on {args.host} without --token: anyone who reaches this port can "
              "use the API", file=sys.stderr)  # fmt: skip
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")
    return 0


COMMANDS = {"train": cmd_train, "test": cmd_test, "calibrate": cmd_calibrate, "predict": cmd_predict,
            "export": cmd_export, "serve": cmd_serve, "benchmark": cmd_benchmark, "demo": cmd_demo}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tune_allocator()  # large tensors from the heap, not fresh pages: ~1.5-2x on CPU (dmdd.device)
    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe fails here, where it is handled, not at interpreter exit
        return code
    except DmddError as exc:
        if args.debug:
            raise
        print(f"dmdd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dmdd: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of piped output stopped (`dmdd benchmark S --list | head`): no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    raise SystemExit(main())
