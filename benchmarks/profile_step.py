"""Where a training step and an inference call spend their time, against this CPU's fp32 matmul rate.

For one Lite0 model at 256 px, batch 16 pairs (training) and 8 images (inference), it reports:

- the wall time of each part, measured in one process as the median of ``--reps`` interleaved repetitions:
  training = teacher forward (both halves of the batch), student + PMN forward, losses, backward, optimiser step;
  inference = teacher, student + PMN, the eight cosine maps, their upsampling + standardised sum + smoothing;
- the FLOPs of each part (``torch.utils.flop_counter``; the backward as 2x the trained forward) and the
  achieved GFLOP/s;
- the FLOPs of each of the four backbone stages (STFPM's Lite0 layers stop after stage 3);
- the machine's fp32 matmul rate (a 2048 x 2048 GEMM), the physical limit of convolution throughput here;
- the top operators of ``torch.profiler`` for one training step and one inference call.

Run it alone on the machine (no other job on the cores):

    python benchmarks/profile_step.py --threads 2 --out benchmarks/profile.json
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from common import add_speed_args, parser, speed_config
from torch.utils.flop_counter import FlopCounterMode

from dmdd.config import Config
from dmdd.distributed import pair_loss
from dmdd.models import DMDD
from dmdd.models.dmdd import Features, split_pairs


def matmul_gflops(reps: int) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * 2048**3 / statistics.median(times) / 1e9


def training_parts(model: DMDD, cfg: Config, normal, anomalous, mask, opt) -> dict:
    """The callables of one student step, run in order; each returns nothing and keeps its state in ``box``."""
    box: dict = {}
    x = model.normalize(torch.cat([normal, anomalous]))

    def teacher():
        box["teacher"] = model.teacher_features(x)

    def student():
        n, a = model.student(x)
        box["normality"], box["abnormality"] = model.pmn_normality(n), model.pmn_abnormality(a)

    def losses():
        feats = Features(box["teacher"], box["normality"], box["abnormality"])
        box["loss"] = pair_loss(*split_pairs(feats, normal.shape[0]), mask, cfg)[0]

    def backward():
        opt.zero_grad(set_to_none=True)
        box["loss"].backward()

    def step():
        opt.step()

    return {"teacher forward": teacher, "student + PMN forward": student, "losses": losses,
            "backward": backward, "optimiser step": step}  # fmt: skip


def inference_parts(model: DMDD, images) -> dict:
    box: dict = {}

    def teacher():
        box["x"] = model.normalize(images)
        box["teacher"] = model.teacher_features(box["x"])

    def student():
        n, a = model.student(box["x"])
        box["feats"] = Features(box["teacher"], model.pmn_normality(n), model.pmn_abnormality(a))

    def maps():
        box["maps"] = model.stage_maps(box["feats"])

    def fusion():
        model.fuse(model.stack(*box["maps"], images.shape[-2:]))

    return {"teacher": teacher, "student + PMN": student, "cosine maps": maps, "upsample + sum + smooth": fusion}


def timed(parts: dict, reps: int, grad: bool) -> dict[str, list[float]]:
    """Run the parts in order ``reps`` times (after one warm-up); seconds per part and repetition."""
    times: dict[str, list[float]] = {name: [] for name in parts}
    context = torch.enable_grad if grad else torch.inference_mode
    with context():
        for rep in range(reps + 1):
            for name, fn in parts.items():
                start = time.perf_counter()
                fn()
                if rep:
                    times[name].append(time.perf_counter() - start)
    return times


def flops(parts: dict, grad: bool) -> dict[str, int]:
    counts = {}
    context = torch.enable_grad if grad else torch.inference_mode
    with context():
        for name, fn in parts.items():
            with FlopCounterMode(display=False) as counter:
                fn()
            counts[name] = counter.get_total_flops()
    return counts


def summary(times: dict[str, list[float]], counts: dict[str, int], images: int) -> list[dict]:
    total = sum(statistics.median(t) for t in times.values())
    rows = []
    for name, t in times.items():
        med = statistics.median(t)
        gflop = counts[name] / 1e9
        rows.append({"part": name, "median_ms": round(1000 * med, 1), "min_ms": round(1000 * min(t), 1),
                     "max_ms": round(1000 * max(t), 1), "share": round(med / total, 3),
                     "gflop": round(gflop, 2), "gflop_per_s": round(gflop / med, 1)})  # fmt: skip
    rows.append({"part": "total", "median_ms": round(1000 * total, 1), "per_image_ms": round(1000 * total / images, 1),
                 "gflop": round(sum(counts.values()) / 1e9, 2),
                 "gflop_per_s": round(sum(counts.values()) / total / 1e9, 1)})  # fmt: skip
    return rows


@torch.inference_mode()
def stage_flops(model: DMDD, images: torch.Tensor) -> list[float]:
    """GFLOP of each backbone stage of one forward (the teacher; the student's stages are the same convolutions)."""
    out, t = [], model.normalize(images)
    for stage in model.teacher:
        with FlopCounterMode(display=False) as counter:
            t = stage(t)
        out.append(round(counter.get_total_flops() / 1e9, 3))
    return out


def top_ops(parts: dict, grad: bool, n: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    context = torch.enable_grad if grad else torch.inference_mode
    with context(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for fn in parts.values():
            fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=n)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    add_speed_args(p)
    p.add_argument("--batch", type=int, default=16, help="pairs per training step (2x images)")
    p.add_argument("--infer-batch", type=int, default=8)
    p.add_argument("--channels-last", action="store_true", help="model and inputs in channels-last")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    cfg = speed_config(args)
    model = DMDD(cfg.model)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    size = cfg.model.image_size
    normal = torch.rand(args.batch, 3, size, size, generator=gen).contiguous(memory_format=fmt)
    anomalous = torch.rand(args.batch, 3, size, size, generator=gen).contiguous(memory_format=fmt)
    mask = (torch.rand(args.batch, 1, size, size, generator=gen) > 0.9).float()
    pretrained, new = model.student_parameters()
    opt = torch.optim.Adam([{"params": pretrained}, {"params": new}], lr=1e-4)
    model.train()
    train = training_parts(model, cfg, normal, anomalous, mask, opt)
    train_counts = flops(train, True)
    # The flop counter's convolution backward ignores groups (it counts Lite0's depthwise convs as dense ones), so
    # the backward is estimated by the usual rule: gradients of inputs and weights, 2x the trained forward.
    train_counts["backward"] = 2 * train_counts["student + PMN forward"]
    train_times = timed(train, args.reps, True)
    model.eval()
    images = torch.rand(args.infer_batch, 3, size, size, generator=gen).contiguous(memory_format=fmt)
    infer = inference_parts(model, images)
    infer_counts = flops(infer, False)
    infer_times = timed(infer, args.reps, False)
    result = {
        "threads": args.threads, "channels_last": args.channels_last, "reps": args.reps,
        "matmul_fp32_gflop_per_s": round(matmul_gflops(args.reps), 1),
        "training_step": summary(train_times, train_counts, 2 * args.batch),
        "inference": summary(infer_times, infer_counts, args.infer_batch),
        "backbone_gflop_per_stage_batch": stage_flops(model, images),
    }  # fmt: skip
    print(json.dumps(result, indent=1))
    model.train()
    print(top_ops(train, True, 15))
    model.eval()
    print(top_ops(infer, False, 15))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
