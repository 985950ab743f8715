"""Run under ``torchrun --nproc_per_node 2`` by test_distributed: one DDP gradient step of each training objective
(gloo, CPU), each process on its half of a batch of 6 pairs, next to one-process references computed in the same
process with the same kernels. Writes ``rank<r>.pt`` into the folder given as the only argument."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from dmdd.config import Config
from dmdd.models import DMDD
from dmdd.training.distributed import close_distributed, init_distributed, wrap
from dmdd.training.objective import SegmentationObjective, StudentObjective

PAIRS = 6
CASES = {
    # the default model: the PMN's BatchNorms normalise each process's batch by its own statistics
    "student": ({}, "student"),
    # without the PMN no layer sees batch statistics (the student's BatchNorms keep their pretrained ones)
    "student_without_batch_statistics": ({"pmn_inner": False, "pmn_outer": False}, "student"),
    "segmentation": ({"msn": True}, "segmentation"),
}


def build(model_cfg: dict) -> tuple[Config, DMDD]:
    cfg = Config().replace(model={"backbone": "efficientnet_lite0", "image_size": 64, **model_cfg})
    torch.manual_seed(0)
    model = DMDD(cfg.model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the teacher, so that the gradients are not ~0
        for param in model.student.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
    return cfg, model


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    normal, anomalous = torch.rand(PAIRS, 3, 64, 64, generator=gen), torch.rand(PAIRS, 3, 64, 64, generator=gen)
    return normal, anomalous, (torch.rand(PAIRS, 1, 64, 64, generator=gen) > 0.8).float()


def objective(kind: str, cfg: Config, model: DMDD) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """The phase's objective and the parameters its optimiser trains (as dmdd.training.loop.build_optimizers)."""
    if kind == "student":
        model.train()
        pretrained, new = model.student_parameters()
        return StudentObjective(model, cfg), pretrained + new
    model.eval()
    model.segmentation.train()
    return SegmentationObjective(model), list(model.segmentation.parameters())


def gradient(kind: str, module: torch.nn.Module, params: list[torch.nn.Parameter], part: slice):
    """Loss and flat gradient of the trained parameters on the pairs ``part`` (one backward)."""
    normal, anomalous, mask = (t[part] for t in batch())
    if kind == "student":
        loss = module(normal, anomalous, mask)[0]
    else:
        loss = module(torch.cat([normal, anomalous]), torch.cat([torch.zeros_like(mask), mask]))
    loss.backward()
    return float(loss.detach()), torch.cat([p.grad.flatten() for p in params]).clone()


def plain(kind: str, model_cfg: dict, part: slice) -> tuple[float, torch.Tensor]:
    """One process, no DDP, a fresh model."""
    module, params = objective(kind, *build(model_cfg))
    return gradient(kind, module, params, part)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    ctx = init_distributed()
    assert ctx.world == 2, ctx
    half = PAIRS // ctx.world
    mine = slice(ctx.rank * half, (ctx.rank + 1) * half)
    results = {}
    for name, (model_cfg, kind) in CASES.items():
        module, params = objective(kind, *build(model_cfg))
        ddp = wrap(module, ctx, torch.device("cpu"))
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        loss, grad = gradient(kind, ddp, params, mine)
        entry = {"loss": loss, "ddp": grad}
        if ctx.rank == 0:
            halves = [plain(kind, model_cfg, slice(r * half, (r + 1) * half)) for r in range(ctx.world)]
            entry["halves"] = [g for _, g in halves]
            entry["half_losses"] = [v for v, _ in halves]
            entry["full"] = plain(kind, model_cfg, slice(0, PAIRS))[1]
        results[name] = entry
    torch.save(results, out / f"rank{ctx.rank}.pt")
    close_distributed(ctx)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
