"""Training and inference speed levers, each a row, timed interleaved in one process (median, min, max).

Training (one student step on 16 pairs, Lite0, 256 px, the real objective and optimiser):
  ``fp32``, ``channels-last``, ``channels-last + bf16`` (CPU autocast of the whole step, as ``train.amp`` does),
  ``channels-last + cached teacher features`` of the normal images (the teacher runs on the anomalous half only).
  With ``--compile``: channels-last eager against ``torch.compile`` (training step and inference).
Inference (a batch of 8 images through the default model, ``inference_mode``):
  ``fp32``, ``channels-last``, ``channels-last + bf16 backbones`` (teacher, student and PMN under autocast; maps,
  standardisation and smoothing in fp32), with the largest map difference to fp32 on the same inputs.

The repetitions of all variants are interleaved (A B C A B C ...) so that slow phases of a shared machine hit every
variant alike. Run it alone on the machine:

    python benchmarks/speed_levers.py --threads 2 --reps 5 --out benchmarks/speed_levers.json
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
from common import add_speed_args, parser, speed_config

from dmdd.checkpoint import restore_model
from dmdd.config import Config
from dmdd.distributed import StudentObjective, pair_loss
from dmdd.engine import build_optimizers
from dmdd.models import DMDD
from dmdd.models.dmdd import Features, split_pairs


def stats(times: list[float], per: int) -> dict:
    med = statistics.median(times)
    return {"median_s": round(med, 4), "min_s": round(min(times), 4), "max_s": round(max(times), 4),
            "per_image_ms": round(1000 * med / per, 2), "images_per_s": round(per / med, 2)}  # fmt: skip


def bf16() -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def cached_teacher_objective(model: DMDD, cfg: Config, normal: torch.Tensor):
    """The student loss with the teacher's features of the normal images taken from a cache (the teacher is frozen
    and a normal image is the same every epoch): the teacher runs on the anomalous half only. Same loss value."""
    cached = model.teacher_features(model.normalize(normal.contiguous(memory_format=torch.channels_last)))

    def step(n: torch.Tensor, a: torch.Tensor, mask: torch.Tensor):
        x = model.normalize(torch.cat([n, a]))
        teacher = [torch.cat([c, t]) for c, t in zip(cached, model.teacher_features(x[n.shape[0] :]))]
        s_normality, s_abnormality = model.student(x)
        feats = Features(teacher, model.pmn_normality(s_normality), model.pmn_abnormality(s_abnormality))
        return pair_loss(*split_pairs(feats, n.shape[0]), mask, cfg)

    return step


def training(cfg: Config, reps: int, batch: int, gen: torch.Generator, compile_: bool = False) -> dict:
    size = cfg.model.image_size
    model = DMDD(cfg.model)
    objective = StudentObjective(model, cfg)
    opt, _ = build_optimizers(model, cfg)
    normal, anomalous = (torch.rand(batch, 3, size, size, generator=gen) for _ in range(2))
    mask = (torch.rand(batch, 1, size, size, generator=gen) > 0.9).float()
    cl, null = torch.channels_last, contextlib.nullcontext
    if compile_:  # one layout only: switching it would recompile
        compiled = torch.compile(objective)
        variants = {"channels-last": (cl, null, objective), "channels-last + torch.compile": (cl, null, compiled)}
    else:
        model.to(memory_format=cl)
        cached = cached_teacher_objective(model, cfg, normal)
        variants = {"fp32": (torch.contiguous_format, null, objective), "channels-last": (cl, null, objective),
                    "channels-last + bf16": (cl, bf16, objective),
                    "channels-last + cached teacher features of the normal images": (cl, null, cached)}  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in variants}
    warmup: dict[str, float] = {}
    model.train()
    for rep in range(reps + 1):
        for name, (fmt, autocast, step) in variants.items():
            model.to(memory_format=fmt)
            n, a = normal.contiguous(memory_format=fmt), anomalous.contiguous(memory_format=fmt)
            start = time.perf_counter()
            with autocast():
                loss, _, _ = step(n, a, mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if rep:
                times[name].append(time.perf_counter() - start)
            else:  # the first round warms up (and compiles) every variant
                warmup[name] = round(time.perf_counter() - start, 1)
    return {name: {**stats(t, 2 * batch), "first_step_s": warmup[name]} for name, t in times.items()}


@torch.inference_mode()
def inference(
    cfg: Config, reps: int, batch: int, gen: torch.Generator, checkpoint: str | None, compile_: bool = False
) -> dict:
    size = cfg.model.image_size
    if checkpoint:  # a trained model: its maps are what a user gets
        model, _ = restore_model(checkpoint)
    else:  # an untrained student equals its teacher (all maps 0): move it off so that differences mean something
        model = DMDD(cfg.model).eval()
        for param in model.student.parameters():
            param.add_(0.05 * param.std().nan_to_num(0.0) * torch.randn(param.shape, generator=gen))
    images = torch.rand(batch, 3, size, size, generator=gen)

    def backbones_bf16(x):
        with bf16():
            feats = model.features(x)
        cast = lambda xs: [f.float() for f in xs] if xs is not None else None  # noqa: E731
        feats = type(feats)(cast(feats.teacher), cast(feats.normality), cast(feats.abnormality))
        return model.fuse(model.stack(*model.stage_maps(feats), x.shape[-2:]))

    if compile_:
        model.to(memory_format=torch.channels_last)
        variants = {"channels-last": (torch.channels_last, model),
                    "channels-last + torch.compile": (torch.channels_last, torch.compile(model))}  # fmt: skip
    else:
        variants = {"fp32": (torch.contiguous_format, model), "channels-last": (torch.channels_last, model),
                    "channels-last + bf16 backbones": (torch.channels_last, backbones_bf16)}  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in variants}
    maps = {}
    for rep in range(reps + 1):
        for name, (fmt, forward) in variants.items():
            model.to(memory_format=fmt)
            x = images.contiguous(memory_format=fmt)
            start = time.perf_counter()
            out = forward(x)
            if rep:
                times[name].append(time.perf_counter() - start)
            maps[name] = out.anomaly_map
    result = {name: stats(t, batch) for name, t in times.items()}
    for name in variants:
        base = maps[next(iter(variants))]  # the first row is the reference
        result[name]["max_abs_map_diff"] = float((maps[name] - base).abs().max())
        result[name]["map_scale"] = float(base.abs().max())
    return result


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    add_speed_args(p)
    p.add_argument("--compile", action="store_true", help="rows: channels-last eager against torch.compile")
    p.add_argument("--checkpoint", help="a trained model for the inference rows (default: a perturbed fresh one)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    cfg = speed_config(args)
    gen = torch.Generator().manual_seed(0)
    result = {"threads": args.threads, "reps": args.reps, "backbone": args.backbone, "size": args.size,
              "training_step_16_pairs": training(cfg, args.reps, 16, gen, args.compile),
              "inference_batch_8": inference(cfg, args.reps, 8, gen, args.checkpoint, args.compile)}  # fmt: skip
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
