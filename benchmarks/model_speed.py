"""Parameter counts and eval-forward speed (images/s) at 256x256, batch 8, on CPU threads.

    python benchmarks/model_speed.py --backbones efficientnet_lite0 wide_resnet50_2 --threads 2
WideResNet-50-2 is built with random weights here (speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dmdd.config import ModelConfig
from dmdd.models import DMDD


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.inference_mode()
def images_per_second(model: DMDD, batch: int, size: int, repeats: int) -> float:
    x = torch.rand(batch, 3, size, size)
    model(x)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        model(x)
    return batch * repeats / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "wide_resnet50_2"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.backbones:
        model = DMDD(ModelConfig(backbone=name, pretrained=name.startswith("efficientnet"), image_size=args.size))
        model.eval()
        pmn = sum(count(m) for m in (model.pmn_normality, model.pmn_abnormality) if m is not None)
        print(
            json.dumps(
                {
                    "backbone": name,
                    "threads": args.threads,
                    "batch": args.batch,
                    "size": args.size,
                    "params_total_M": round(count(model) / 1e6, 2),
                    "params_teacher_M": round(count(model.teacher) / 1e6, 2),
                    "params_student_M": round(count(model.student) / 1e6, 2),
                    "params_pmn_M": round(pmn / 1e6, 2),
                    "params_msn_k": round(count(model.segmentation) / 1e3, 1),
                    "eval_images_per_s": round(images_per_second(model, args.batch, args.size, args.repeats), 2),
                }
            )
        )


if __name__ == "__main__":
    main()
