"""Benchmark suites: a YAML grid of datasets x categories x models x budgets x seeds, validated before any training
and expanded into cells (one job each). The format is documented in docs/benchmark.md.

Every problem a suite can have (an unknown key, a missing dataset root, a category that does not exist, a peer whose
extra is not installed) is found here and raised as one :class:`~dmdd.errors.ConfigError` naming it, so a grid never
stops half-way for a typo.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dmdd.config import Config, load_config
from dmdd.errors import ConfigError

KINDS = ("dmdd", "patchcore", "stfpm")
PEER_BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet18", "wide_resnet50_2")
PAPER_TABLES = ("mvtec", "btad", "mpdd")
BUDGET_KEYS = ("minutes", "steps", "epochs")
BUDGET_UNITS = {"minutes": "min", "steps": "steps", "epochs": "ep"}  # in cell ids: 10min, 250steps, 5ep
_SUITE_KEYS = {"name", "description", "output", "results", "datasets", "models", "budgets", "seeds", "threads"}
_DATASET_KEYS = {"name", "root", "categories", "layout", "paper"}
_MODEL_KEYS = {"name", "kind", "config", "backbone", "image_size", "set", "options"}


@dataclass(frozen=True)
class Dataset:
    name: str
    root: Path
    categories: tuple[str, ...]
    layout: str = "auto"
    paper: str | None = None  # the paper's table whose row is shown beside ours


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str = "dmdd"
    config: str | None = None
    backbone: str | None = None
    image_size: int | None = None
    set: dict[str, Any] = field(default_factory=dict)  # dotted config overrides, e.g. {"train.ema_decay": 0.99}
    options: dict[str, Any] = field(default_factory=dict)  # peer options, e.g. {"coreset_ratio": 0.01}


@dataclass(frozen=True)
class Cell:
    """One job: a model trained and tested on one category with one budget and seed."""

    dataset: Dataset
    category: str
    model: ModelSpec
    budget: dict[str, float]  # {"minutes": 10}, {"steps": 300}, {"epochs": 5} or {} (the model's own default)
    seed: int

    @property
    def budget_label(self) -> str:
        if not self.budget:
            return "default"
        (key, value), = self.budget.items()
        return f"{value:g}{BUDGET_UNITS[key]}"

    @property
    def id(self) -> str:
        return f"{self.dataset.name}/{self.category}/{self.model.name}/{self.budget_label}/seed{self.seed}"


@dataclass(frozen=True)
class Suite:
    name: str
    path: Path
    datasets: tuple[Dataset, ...]
    models: tuple[ModelSpec, ...]
    budgets: tuple[dict[str, float], ...]
    seeds: tuple[int, ...]
    threads: int | None
    output: Path
    results: Path | None
    description: str = ""

    def cells(self) -> list[Cell]:
        """The grid in a fixed order: dataset, category, model, budget, seed. PatchCore has no training budget: it
        gets one cell per category and seed."""
        out = []
        for data in self.datasets:
            for category in data.categories:
                for model in self.models:
                    budgets = [{}] if model.kind == "patchcore" else self.budgets
                    for budget in budgets:
                        out += [Cell(data, category, model, dict(budget), seed) for seed in self.seeds]
        return out


def _expand(value: str, where: str) -> str:
    """``${VAR}`` and ``${VAR:-default}`` from the environment; an unset variable without a default is an error."""

    def sub(match: re.Match) -> str:
        name, default = match.group(1), match.group(3)
        if name in os.environ:
            return os.environ[name]
        if default is None:
            raise ConfigError(f"{where}: environment variable {name} is not set (the suite reads ${{{name}}})")
        return default

    return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", sub, value)


def _keys(raw: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    return raw


def _dataset(raw: Any, where: str) -> Dataset:
    from dmdd.data.datasets import list_categories, load_category

    raw = _keys(raw, _DATASET_KEYS, where)
    if "root" not in raw:
        raise ConfigError(f"{where}: 'root' is required (the dataset root folder)")
    root = Path(_expand(str(raw["root"]), where))
    if not root.is_dir():
        raise ConfigError(f"{where}: dataset root not found: {root}")
    found = list_categories(root)
    wanted = raw.get("categories", "all")
    if wanted == "all":
        if not found:
            raise ConfigError(f"{where}: no categories found under {root}")
        categories = tuple(found)
    else:
        categories = tuple(str(c) for c in (wanted if isinstance(wanted, list) else [wanted]))
        missing = [c for c in categories if c not in found and not (root / c).is_dir()]
        if missing:
            raise ConfigError(f"{where}: categor{'y' if len(missing) == 1 else 'ies'} {missing} not found under "
                              f"{root}; found {found}")  # fmt: skip
    layout = str(raw.get("layout", "auto"))
    for c in categories:  # a folder that exists but holds no test split is found here, not after hours of training
        if not load_category(root, c, layout).test:
            raise ConfigError(f"{where}: category {c!r} under {root} has no test images")
    paper = raw.get("paper")
    if paper is not None and paper not in PAPER_TABLES:
        raise ConfigError(f"{where}: paper must be one of {PAPER_TABLES}, got {paper!r}")
    return Dataset(str(raw.get("name", root.name)), root, categories, layout, paper)


def _model(raw: Any, where: str) -> ModelSpec:
    raw = _keys(raw, _MODEL_KEYS, where)
    raw = {**raw, "set": {k: _expand(v, where) if isinstance(v, str) else v for k, v in (raw.get("set") or {}).items()},
           "config": _expand(raw["config"], where) if raw.get("config") else None}  # fmt: skip
    kind = raw.get("kind", "dmdd")
    if kind not in KINDS:
        raise ConfigError(f"{where}: kind must be one of {KINDS}, got {kind!r}")
    spec = ModelSpec(name=str(raw.get("name", kind)), kind=kind, config=raw.get("config"),
                     backbone=raw.get("backbone"), image_size=raw.get("image_size"), set=dict(raw.get("set") or {}),
                     options=dict(raw.get("options") or {}))  # fmt: skip
    if kind == "dmdd":
        dmdd_config(spec, {}, 0)  # unknown options, a missing config file: now, not in the middle of a grid
        if spec.options:
            raise ConfigError(f"{where}: 'options' is for peers; set dmdd's options with 'set'")
    else:
        if importlib.util.find_spec("anomalib") is None:
            raise ConfigError(f"{where}: peer {kind!r} needs anomalib, which is not installed: "
                              "pip install 'dmdd[peers]'")  # fmt: skip
        if spec.backbone not in PEER_BACKBONES:
            raise ConfigError(f"{where}: peer backbone must be one of {PEER_BACKBONES}, got {spec.backbone!r}")
        if spec.config or spec.set:
            raise ConfigError(f"{where}: 'config' and 'set' are dmdd's; a peer takes 'options'")
    return spec


def dmdd_config(spec: ModelSpec, budget: dict[str, float], seed: int) -> Config:
    """The resolved dmdd configuration of a model entry, with a budget and a seed (no dataset yet)."""
    cfg = load_config(spec.config) if spec.config else Config()
    changes: dict[str, dict[str, Any]] = {}
    for dotted, value in spec.set.items():
        section, _, key = str(dotted).partition(".")
        if not key:
            raise ConfigError(f"model {spec.name!r}: 'set' keys are section.option, got {dotted!r}")
        changes.setdefault(section, {})[key] = value
    if spec.backbone:
        changes.setdefault("model", {})["backbone"] = spec.backbone
    if spec.image_size:
        changes.setdefault("model", {})["image_size"] = spec.image_size
    train = changes.setdefault("train", {})
    train["seed"] = seed
    if budget:  # one budget replaces the config's length entirely
        train |= {"minutes": 0.0, "steps": 0, **budget}
    try:
        merged = cfg.to_dict()
        for section, values in changes.items():
            if section not in merged:
                raise ConfigError(f"model {spec.name!r}: unknown config section {section!r}")
            merged[section] |= values
        return Config.from_dict(merged)
    except TypeError as exc:
        raise ConfigError(f"model {spec.name!r}: {exc}") from None


def _budget(raw: Any, where: str) -> dict[str, float]:
    raw = _keys(raw, set(BUDGET_KEYS), where)
    if len(raw) != 1:
        raise ConfigError(f"{where}: a budget is exactly one of {BUDGET_KEYS}, got {sorted(raw)}")
    (key, value), = raw.items()
    if not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{where}: {key} must be a positive number, got {value!r}")
    return {key: int(value) if key != "minutes" else float(value)}


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite file; raises ConfigError naming the first problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"suite file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"suite {path} is not valid YAML: {exc}") from None
    raw = _keys(raw, _SUITE_KEYS, f"suite {path}")
    for key in ("datasets", "models"):
        if not raw.get(key) or not isinstance(raw[key], list):
            raise ConfigError(f"suite {path}: '{key}' must be a non-empty list")
    datasets = tuple(_dataset(d, f"suite {path}: datasets[{i}]") for i, d in enumerate(raw["datasets"]))
    models = tuple(_model(m, f"suite {path}: models[{i}]") for i, m in enumerate(raw["models"]))
    for what, names in (("dataset", [d.name for d in datasets]), ("model", [m.name for m in models])):
        if len(set(names)) != len(names):
            raise ConfigError(f"suite {path}: {what} names must be unique, got {names}")
    budgets = tuple(_budget(b, f"suite {path}: budgets[{i}]") for i, b in enumerate(raw.get("budgets") or [])) or ({},)
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"suite {path}: seeds must be a non-empty list of integers, got {seeds!r}")
    threads = raw.get("threads")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"suite {path}: threads must be a positive integer, got {threads!r}")
    name = str(raw.get("name", path.stem))
    results = raw.get("results")
    return Suite(name=name, path=path, datasets=datasets, models=models, budgets=budgets, seeds=tuple(seeds),
                 threads=threads, output=Path(raw.get("output", f"runs/benchmark/{name}")),
                 results=Path(results) if results else None, description=str(raw.get("description", "")))  # fmt: skip
