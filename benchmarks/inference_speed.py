"""Eval-forward speed of DMDD variants on CPU: eager fp32, channels-last, bf16 autocast, torch.compile, ONNX Runtime.

    python benchmarks/inference_speed.py --backbone efficientnet_lite0 --threads 2 --batch 8
Checks that every variant's maps stay close to eager fp32 and prints images/s.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dmdd.checkpoint import restore_model
from dmdd.config import ModelConfig
from dmdd.models import DMDD
from dmdd.predict import optimise_for_inference


def timed(fn, x, repeats: int) -> float:
    fn(x)  # warm-up (and compilation)
    start = time.perf_counter()
    for _ in range(repeats):
        fn(x)
    return x.shape[0] * repeats / (time.perf_counter() - start)


def real_batch(batch: int, size: int) -> torch.Tensor:
    """Test images of ../shared/data/tire (good and defective) when present, else seeded noise."""
    from dmdd.data import AnomalyDataset, load_category

    root = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tire"
    if not root.is_dir():
        return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    test = load_category(root).test
    records = [test[i] for i in np.linspace(0, len(test) - 1, batch).round().astype(int)]
    data = AnomalyDataset(records, size)
    return torch.stack([data[i]["image"] for i in range(batch)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--checkpoint", help="a trained last.pt (maps of an untrained head say little about precision)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.checkpoint:
        model, _ = restore_model(args.checkpoint)
        args.backbone, args.size = model.cfg.backbone, model.cfg.image_size
    else:
        cfg = ModelConfig(backbone=args.backbone, pretrained=args.backbone.startswith("eff"), image_size=args.size)
        model = DMDD(cfg)
    model.eval()
    if args.checkpoint:
        x = real_batch(args.batch, args.size)
    else:
        x = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = model(x).anomaly_map.numpy()
    rows = []

    def record(name: str, fn, channels_last: bool = False) -> None:
        inp = x.to(memory_format=torch.channels_last) if channels_last else x
        with torch.inference_mode():
            speed = timed(fn, inp, args.repeats)
            diff = float(np.abs(torch.as_tensor(fn(inp).anomaly_map).float().numpy() - reference).max())
        rows.append({"variant": name, "images_per_s": round(speed, 2), "max_abs_diff_vs_eager": diff})
        print(json.dumps(rows[-1]), flush=True)

    record("eager fp32", model)
    cl = optimise_for_inference(model, channels_last=True, compile=False)
    record("eager fp32 channels-last", cl, channels_last=True)

    def bf16(inp):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return cl(inp)

    record("eager bf16 autocast channels-last", bf16, channels_last=True)
    if not args.skip_compile:
        compiled = optimise_for_inference(model, channels_last=True, compile=True)
        record("torch.compile channels-last", compiled, channels_last=True)

    from dmdd.export import export_onnx
    from dmdd.inference import OnnxInferencer

    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(model, Path(tmp) / "m.onnx")
        session = OnnxInferencer(Path(tmp) / "m.onnx", threads=args.threads)

        class Out:
            def __init__(self, maps):
                self.anomaly_map = maps

        record("ONNX Runtime fp32", lambda inp: Out(session.run(inp.numpy())[1]))
    print(json.dumps({"backbone": args.backbone, "threads": args.threads, "batch": args.batch, "size": args.size,
                      "results": rows}))  # fmt: skip


if __name__ == "__main__":
    main()
