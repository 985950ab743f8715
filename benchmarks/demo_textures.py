"""The built-in demo's textures (generated brushed metal and woven fabric, synthetic defects) with a model option on
and off: the same training as `dmdd demo` (Lite0, 128 px, 15 epochs), then `dmdd test`'s metrics.

Example:
    python benchmarks/demo_textures.py --option model.regional_score --values on off --out runs/demo_textures
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml

from dmdd.checkpoint import restore_model
from dmdd.data.datasets import load_category
from dmdd.demo import DEMO_SIZE, demo_config
from dmdd.demo_data import make_demo_dataset
from dmdd.engine import fit
from dmdd.evaluation import evaluate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--option", required=True, help="SECTION.FIELD, e.g. model.regional_score")
    p.add_argument("--values", nargs="+", required=True, help="YAML values, e.g. on off")
    p.add_argument("--categories", nargs="+", default=["metal", "fabric"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    section, field = args.option.split(".")
    rows = []
    for category in args.categories:
        root = args.out / "data"
        if not (root / category).is_dir():
            make_demo_dataset(root, category, size=DEMO_SIZE, train=64, test_good=16, test_per_defect=8, seed=0)
        for value in args.values:
            cfg = demo_config(root, 15, 0, "cpu").replace(data={"category": category},
                                                          **{section: {field: yaml.safe_load(value)}})  # fmt: skip
            run = args.out / f"{category}_{value}"
            model, _ = restore_model(fit(cfg, run, resume=True, progress=False))
            result, _ = evaluate(model, cfg, load_category(root, category).test, run / "test", title=category)
            o = result["overall"]
            row = {
                "category": category,
                args.option: value,
                **{k: round(100 * o[k], 2) for k in ("image_auroc", "pixel_auroc", "au_pro", "pixel_f1_max")},
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
