"""Deployment runtimes of one trained model: speed against the default eager path, and what each does to the metrics.

Rows: eager PyTorch (fp32 contiguous, and channels-last: `dmdd predict`'s default), ONNX Runtime fp32
(`dmdd export`), OpenVINO fp32 (`dmdd export --format openvino`) and the same at bf16 precision, and an ONNX
Runtime int8 model (static QDQ quantisation of the convolutions, per channel, calibrated on held-out *good
training* images only).

Speed: images/s at batch 8 on random inputs, median (min, max) of ``--reps`` interleaved repetitions in one process.
Quality: every runtime scores the test split of ``--category``; I-AUROC / P-AUROC / AU-PRO and the largest map
difference to eager fp32 (absolute, and relative to the map's scale). Run it alone on the machine:

    python benchmarks/deploy_runtimes.py runs/curve_tire/default.pt --category tire --out runs/deploy_tire
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from common import checkpoint_parser, open_checkpoint
from torch.utils.data import DataLoader

from dmdd.data import load_category
from dmdd.data.datasets import AnomalyDataset
from dmdd.deploy.export import export_onnx, export_openvino
from dmdd.deploy.inference import OnnxInferencer, OpenVinoInferencer
from dmdd.evaluation import metrics
from dmdd.training.loop import split_holdout


def images_of(records, cfg, with_masks: bool):
    data = AnomalyDataset(records, cfg.model.image_size, mask_size=cfg.model.image_size, resize=cfg.model.resize)
    images, masks = [], []
    for batch in DataLoader(data, batch_size=16):
        images.append(batch["image"].numpy())
        if with_masks:
            masks.append(batch["mask"][:, 0].numpy().astype(bool))
    return np.concatenate(images), (np.concatenate(masks) if with_masks else None)


def quantize_int8(fp32: Path, out: Path, calibration: np.ndarray) -> Path:
    """Static int8 (QDQ, per-channel weights, uint8 activations) of the convolutions, calibrated on good images."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"images": calibration[i : i + 4]} for i in range(0, len(calibration), 4)])

        def get_next(self):
            return next(self.batches, None)

    prepared = out.with_name(out.stem + ".prep.onnx")
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["Conv"])  # fmt: skip
    out.with_suffix(".json").write_text(fp32.with_suffix(".json").read_text())
    return out


def main(argv: list[str] | None = None) -> int:
    p = checkpoint_parser(__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    model, payload, cfg = open_checkpoint(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    thresholds = payload.get("thresholds")
    category = load_category(args.data, args.category)
    _, holdout = split_holdout(category.train, cfg.train.holdout_fraction, cfg.train.seed)
    calibration, _ = images_of(holdout, cfg, False)
    onnx_report = export_onnx(model, out / "model.onnx", thresholds)
    ov_report = export_openvino(model, out / "model.xml", thresholds)
    int8 = quantize_int8(out / "model.onnx", out / "model.int8.onnx", calibration)
    cl = torch.channels_last
    model_cl = copy.deepcopy(model).to(memory_format=cl)  # one copy per layout: nothing converts while timed

    def eager(net, fmt):
        def run(x: np.ndarray):
            with torch.inference_mode():
                o = net(torch.from_numpy(x).contiguous(memory_format=fmt))
            return o.pred_score.numpy(), o.anomaly_map.numpy()

        return run

    runtimes = {"eager fp32": eager(model, torch.contiguous_format), "eager fp32 channels-last": eager(model_cl, cl),
                "ONNX Runtime fp32": OnnxInferencer(out / "model.onnx", threads=args.threads).run,
                "OpenVINO fp32": OpenVinoInferencer(out / "model.xml", threads=args.threads).run,
                "OpenVINO bf16": OpenVinoInferencer(out / "model.xml", threads=args.threads, precision="bf16").run,
                "ONNX Runtime int8": OnnxInferencer(int8, threads=args.threads).run}  # fmt: skip
    x = np.random.default_rng(0).random((8, 3, cfg.model.image_size, cfg.model.image_size), dtype=np.float32)
    times: dict[str, list[float]] = {name: [] for name in runtimes}
    for rep in range(args.reps + 1):
        for name, run in runtimes.items():
            start = time.perf_counter()
            run(x)
            if rep:
                times[name].append(time.perf_counter() - start)
    images, masks = images_of(category.test, cfg, True)
    labels = np.array([r.label for r in category.test])
    result: dict = {"checkpoint": args.checkpoint, "category": args.category, "threads": args.threads,
                    "exports": {"onnx": onnx_report, "openvino": ov_report}, "rows": {}}  # fmt: skip
    reference = None
    for name, run in runtimes.items():
        outs = [run(images[i : i + 8]) for i in range(0, len(images), 8)]
        scores, maps = np.concatenate([o[0] for o in outs]), np.concatenate([o[1][:, 0] for o in outs])
        reference = maps if reference is None else reference
        med = statistics.median(times[name])
        result["rows"][name] = {
            "images_per_s": round(8 / med, 2), "min_images_per_s": round(8 / max(times[name]), 2),
            "max_images_per_s": round(8 / min(times[name]), 2),
            "image_auroc": metrics.auroc(labels, scores), "pixel_auroc": metrics.auroc(masks, maps),
            "au_pro": metrics.au_pro(masks, maps), "max_abs_map_diff": float(np.abs(maps - reference).max()),
            "max_rel_map_diff": float(np.abs(maps - reference).max() / max(1.0, np.abs(reference).max())),
        }  # fmt: skip
        print(name, json.dumps({k: round(v, 4) for k, v in result["rows"][name].items()}), flush=True)
    (out / "deploy.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
