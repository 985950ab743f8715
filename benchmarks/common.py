"""Pieces the benchmark scripts share: where the real data lives, the usual arguments, opening a checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from dmdd.checkpoint import config_of, restore_model
from dmdd.config import Config
from dmdd.device import tune_allocator
from dmdd.models import DMDD

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
# Every benchmark measures what the dmdd command line runs: its allocator tuning included (DMDD_MALLOC_TUNING=0 off).
tune_allocator()


def parser(doc: str | None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_data_args(p: argparse.ArgumentParser, threads: int = 2) -> None:
    """``--category`` (required), ``--data`` (default ../shared/data) and ``--threads``."""
    p.add_argument("--category", required=True)
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--threads", type=int, default=threads)


def add_speed_args(p: argparse.ArgumentParser) -> None:
    """``--threads``, ``--reps`` (timed repetitions), ``--backbone`` and ``--size`` of the speed benchmarks."""
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--size", type=int, default=256)


def speed_config(args: argparse.Namespace) -> Config:
    """Set the thread count; the default config with ``args.backbone`` at ``args.size``."""
    torch.set_num_threads(args.threads)
    return Config().replace(model={"backbone": args.backbone, "image_size": args.size})


def checkpoint_parser(doc: str | None, threads: int = 2) -> argparse.ArgumentParser:
    """A parser taking a checkpoint and the data arguments."""
    p = parser(doc)
    p.add_argument("checkpoint")
    add_data_args(p, threads)
    return p


def open_checkpoint(args: argparse.Namespace) -> tuple[DMDD, dict, Config]:
    """Set the thread count and restore ``args.checkpoint``: (model in eval mode, payload, config)."""
    torch.set_num_threads(args.threads)
    model, payload = restore_model(args.checkpoint)
    return model, payload, config_of(payload, args.checkpoint)


def parse_overrides(pairs: list[str]) -> dict[str, dict]:
    """``["model.msn=false", ...]`` -> ``{"model": {"msn": False}}`` (values read as YAML)."""
    out: dict[str, dict] = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        section, name = key.split(".", 1)
        out.setdefault(section, {})[name] = yaml.safe_load(value)
    return out
