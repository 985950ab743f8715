"""CUDA correctness and training/inference speed of DMDD on one GPU (run by benchmarks/gpu_check.sh).

Correctness: the same weights and batch on CPU (fp32) and on CUDA (fp32 with TF32 off, then bf16 autocast as
``train.amp``): the student loss, the gradient of every trained tensor (relative L2 error) and the eval anomaly
map and score. Speed: one student step (teacher forward, student + PMN forward, losses, backward, Adam) and the eval
forward at 256 px, per backbone and precision, median of ``--reps`` after warm-up, with peak GPU memory.

WideResNet-50-2 is built with random weights (the machine is offline; speed does not depend on the weights).

    python benchmarks/gpu_check.py --out gpu_check.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from dmdd.config import Config
from dmdd.distributed import student_loss
from dmdd.models import DMDD


def build(backbone: str, size: int) -> tuple[DMDD, Config]:
    cfg = Config().replace(model={"backbone": backbone, "image_size": size,
                                  "pretrained": backbone.startswith("efficientnet")})  # fmt: skip
    torch.manual_seed(0)  # the random init of the PMN (and of WideResNet when not pretrained)
    return DMDD(cfg.model), cfg


def batch(n: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    normal = torch.rand(n, 3, size, size, generator=gen)
    anomalous = normal.clone()
    mask = torch.zeros(n, 1, size, size)
    mask[:, :, size // 4 : size // 2, size // 4 : size // 2] = 1
    anomalous = torch.where(mask.bool(), torch.rand(n, 3, size, size, generator=gen), anomalous)
    return normal.to(device), anomalous.to(device), mask.to(device)


def autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()


def loss_and_grads(model: DMDD, cfg: Config, device: torch.device, amp: bool, size: int):
    model = model.to(device).train()
    normal, anomalous, mask = batch(4, size, device)
    with autocast(device, amp):
        loss = student_loss(model, normal, anomalous, mask, cfg)[0]
    params = [p for group in model.student_parameters() for p in group]
    grads = torch.autograd.grad(loss, params)
    model.eval()
    with torch.inference_mode():
        out = model(normal)
    return loss.item(), [g.float().cpu() for g in grads], out.anomaly_map.float().cpu(), out.pred_score.float().cpu()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def parity(backbone: str, size: int) -> dict:
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    model, cfg = build(backbone, size)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # the student starts as the teacher (maps ~0): move it off so the maps carry signal
        for p in model.student.parameters():
            p.add_(0.05 * p.std().nan_to_num() * torch.randn(p.shape, generator=gen))
    ref = loss_and_grads(copy.deepcopy(model), cfg, torch.device("cpu"), False, size)
    out = {}
    for name, amp in (("cuda_fp32", False), ("cuda_bf16_amp", True)):
        got = loss_and_grads(copy.deepcopy(model), cfg, torch.device("cuda"), amp, size)
        grad_errors = [rel(g, r) for g, r in zip(got[1], ref[1], strict=True) if r.norm() > 0]
        out[name] = {
            "loss_cpu": ref[0], "loss_cuda": got[0], "loss_rel_error": abs(got[0] - ref[0]) / abs(ref[0]),
            "grad_rel_error_median": statistics.median(grad_errors), "grad_rel_error_max": max(grad_errors),
            "map_rel_error": rel(got[2], ref[2]), "score_rel_error": rel(got[3], ref[3]),
        }  # fmt: skip
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    return out


def cuda_time(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed_row(backbone: str, size: int, pairs: int, infer_batch: int, reps: int, amp: bool) -> dict:
    """One training step's and one inference batch's time and peak memory, channels-last."""
    device = torch.device("cuda")
    model, cfg = build(backbone, size)
    model = model.to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.Adam([{"params": g} for g in model.student_parameters()], lr=1e-4, betas=(0.5, 0.999))
    normal, anomalous, mask = batch(pairs, size, device)
    normal = normal.contiguous(memory_format=torch.channels_last)
    anomalous = anomalous.contiguous(memory_format=torch.channels_last)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(device, amp):
            loss = student_loss(model, normal, anomalous, mask, cfg)[0]
        loss.backward()
        opt.step()

    torch.cuda.reset_peak_memory_stats()
    train_s = cuda_time(step, reps)
    train_mem = torch.cuda.max_memory_allocated() / 2**30
    model.eval()
    images = torch.rand(infer_batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def infer():
        with autocast(device, amp):
            model(images)

    torch.cuda.reset_peak_memory_stats()
    infer_s = cuda_time(infer, reps)
    return {
        "backbone": backbone, "precision": "bf16 amp" if amp else "fp32 (TF32)", "size": size,
        "train_step_ms": round(1000 * train_s, 1), "train_pairs_per_step": pairs,
        "train_images_per_s": round(2 * pairs / train_s, 1), "train_peak_gib": round(train_mem, 2),
        "infer_batch": infer_batch, "infer_images_per_s": round(infer_batch / infer_s, 1),
        "infer_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }  # fmt: skip


def speed(backbone: str, size: int, pairs: int, infer_batch: int, reps: int) -> list[dict]:
    rows = []
    for amp in (False, True):
        rows.append(speed_row(backbone, size, pairs, infer_batch, reps, amp))
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "wide_resnet50_2"])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check needs a GPU")
    result = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(), "parity_128px_4_pairs": {}, "speed": [],
    }  # fmt: skip
    for backbone in args.backbones:
        result["parity_128px_4_pairs"][backbone] = parity(backbone, 128)
        print(backbone, json.dumps(result["parity_128px_4_pairs"][backbone]), flush=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    for backbone in args.backbones:
        result["speed"] += speed(backbone, 256, 16, 32, args.reps)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
