"""Training loop: per category, each epoch trains the student side then the segmentation head (docs/design.md §4-5).

No model code lives here. Checkpoints are written atomically after every epoch; ``resume`` continues a killed run
and reaches the same weights as an uninterrupted one (pairs and batch order derive from ``(seed, epoch)``).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from dmdd.config import Config, save_config
from dmdd.data.datasets import Category, PairDataset, Record, load_category
from dmdd.data.foreground import ForegroundCache
from dmdd.data.order import EpochBatches
from dmdd.data.synthesis import AnomalySynthesizer
from dmdd.data.tiles import TileSpec
from dmdd.device import select_device
from dmdd.errors import ConfigError, DmddError, TrainingDivergedError
from dmdd.evaluation import calibrate, fit_map_statistics, fit_teacher_gaussians
from dmdd.evaluation.predictions import preload_tiles
from dmdd.evaluation.stages import statistics_inputs
from dmdd.evaluation.thresholds import calibration_forwards, calibration_pairs
from dmdd.models.dmdd import DMDD
from dmdd.training.averaging import WeightAverage
from dmdd.training.distributed import (
    DistContext,
    close_distributed,
    init_distributed,
    wrap,
)
from dmdd.training.objective import SegmentationObjective, StudentObjective
from dmdd.training.stability import SpikeGuard, step_record
from dmdd.training.state import TrainState, restore_state, save_snapshot, save_state

PRELOAD_MAX = 1024  # held-out images kept decoded in memory (~0.2 MB each at 256 px) rather than read every epoch




def split_holdout(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Hold out a seeded random share of the training images for threshold calibration (never the test set)."""
    count = int(math.floor(len(records) * fraction))
    if count == 0 or len(records) - count < 1:
        return list(records), []
    order = np.random.default_rng([seed, 7]).permutation(len(records))
    held = set(order[:count].tolist())
    train = [r for i, r in enumerate(records) if i not in held]
    return train, [r for i, r in enumerate(records) if i in held]


def planned_steps(cfg: Config, steps_per_epoch: int) -> int:
    """Total student steps of a run: ``train.steps``, else ``epochs`` x steps per epoch; 0 for a minutes budget."""
    if cfg.train.steps:
        return cfg.train.steps
    if cfg.train.minutes:
        return 0
    return cfg.train.epochs * steps_per_epoch


def steps_for_budget(budget: float, elapsed: float, step_seconds: float, epoch_overhead: float,
                     steps_per_epoch: int, done: int, reserve: float, left_in_epoch: int | None = None) -> int:  # fmt: skip
    """The total student steps that end a ``train.minutes`` run within its budget.

    Args:
        budget: the run's seconds; elapsed: seconds spent so far (setup, epochs, earlier sessions).
        step_seconds: one student step, as measured so far.
        epoch_overhead: what each started epoch adds besides its steps (map statistics, MSN phase, checkpoint).
        steps_per_epoch, done: the epoch's length and the steps already taken.
        reserve: seconds kept for the end of the run (the final calibration and its checkpoint).
        left_in_epoch: ``None`` at an epoch's end; inside an epoch, the steps it has left: the epoch's own
            overhead is still to come, and only steps beyond it start new epochs.
    """
    left = budget - elapsed - reserve

    def cost(n: int) -> float:
        if left_in_epoch is None:
            return n * step_seconds + math.ceil(n / steps_per_epoch) * epoch_overhead
        later = max(0, n - left_in_epoch)
        return n * step_seconds + epoch_overhead + math.ceil(later / steps_per_epoch) * epoch_overhead

    n = max(0, int(left / max(step_seconds + epoch_overhead / steps_per_epoch, 1e-9)))
    while n > 0 and cost(n) > left:
        n -= 1
    while cost(n + 1) <= left:
        n += 1
    return done + n


def lr_factor(cfg: Config, step: int, total: int) -> float:
    """Learning-rate multiplier of the student side at ``step``: linear warm-up, then constant or cosine decay."""
    t = cfg.train
    warm = min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else 1.0
    if t.lr_schedule == "cosine" and total:
        return warm * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    return warm


def build_optimizers(model: DMDD, cfg: Config) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer | None]:
    """Adam for the student side (pretrained stages and new parts take separate rates) and for the MSN."""
    pretrained, new = model.student_parameters()
    t = cfg.train
    parts = [(pretrained, t.lr_pretrained), (new, t.lr)]
    if t.update_clip:  # one group per tensor: update clipping sets each tensor's rate (dmdd.training.stability)
        parts = [([p], lr) for params, lr in parts for p in params]
    student = torch.optim.Adam([{"params": params, "lr": lr, "initial_lr": lr} for params, lr in parts],
                               betas=t.betas)  # fmt: skip
    seg = torch.optim.Adam(model.segmentation.parameters(), lr=t.seg_lr) if model.segmentation is not None else None
    return student, seg


def _loader(pairs: PairDataset, cfg: Config, first_epoch: int, stream: int, ctx: DistContext, device: torch.device,
            epochs: int | None = 1) -> DataLoader:  # fmt: skip
    """Batches of ``epochs`` epochs (``None``: without end, so workers build the next epoch's batches while this one
    trains); order and pairs derive from (seed, epoch, stream) only, so a resumed run matches."""
    return DataLoader(
        pairs,
        batch_sampler=EpochBatches(
            len(pairs), cfg.train.batch_size, cfg.train.seed, stream, first_epoch, epochs, ctx.world, ctx.rank
        ),  # fmt: skip
        num_workers=cfg.train.num_workers,
        pin_memory=device.type == "cuda",
    )


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast of the training forward (``train.amp``) on CUDA or CPU; losses reduce in fp32 (the cosine
    distances cast their inputs to float)."""
    if enabled and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _memory_format(cfg: Config) -> torch.memory_format:
    return torch.channels_last if cfg.train.channels_last else torch.contiguous_format


def _check_finite(loss: torch.Tensor, epoch: int, what: str) -> None:
    if not torch.isfinite(loss):
        raise TrainingDivergedError(
            f"{what} loss became {loss.item()} in epoch {epoch + 1}; the last good checkpoint is kept. "
            "Lower train.lr / train.lr_pretrained or check the data"
        )


class StepLog(list):
    """Per-step records of one epoch (``train.step_log``), and the names of the model's parameters."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.names = {id(p): name for name, p in model.named_parameters()}


def train_student_epoch(objective, batches, steps_per_epoch, optimizer, cfg, device, epoch, bar, ctx, state,
                        average=None, guard=None, step_log=None, replan=None) -> dict:  # fmt: skip
    """One epoch (``steps_per_epoch`` batches from the iterator ``batches``, or what is left of the step budget)
    training student, 1x1 convs and PMN with L_NGM + L_AIM; advances ``state.step`` and folds every step into
    ``average`` (a ``WeightAverage``) if given. ``guard`` (a ``SpikeGuard``) clips out-of-date updates and keeps
    outlying-loss steps out of the average. ``step_log`` (a list, with a ``names`` attribute: parameter id -> name)
    receives one record per step (``train.step_log``). ``replan(steps)``, called after each step with the steps
    taken in this epoch, may move ``state.total_steps`` (a minutes budget)."""
    sums = {"ngm": 0.0, "aim": 0.0}
    steps = 0
    base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    fmt = _memory_format(cfg)
    for _ in range(steps_per_epoch):
        if state.total_steps and state.step >= state.total_steps:
            break
        normal, anomalous, mask = next(batches)
        factor = lr_factor(cfg, state.step, state.total_steps)
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * factor
        normal = normal.to(device, memory_format=fmt, non_blocking=True)
        anomalous = anomalous.to(device, memory_format=fmt, non_blocking=True)
        mask = mask.to(device, non_blocking=True)
        with _autocast(device, cfg.train.amp):
            loss, ngm, aim = objective(normal, anomalous, mask)
        _check_finite(loss, epoch, "student")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step_log is not None:  # before clipping and the step: the gradient against Adam's current moments
            step_log.append({"step": state.step, "lr_factor": round(factor, 5), "loss": round(float(loss.detach()), 5),
                             "ngm": round(float(ngm.detach()), 5), "aim": round(float(aim.detach()), 5),
                             "anomaly_area": round(float(mask.float().mean()), 5),
                             **step_record(optimizer, step_log.names)})  # fmt: skip
        if guard is not None:
            guard.clip(optimizer)
        optimizer.step()
        if average is not None and (guard is None or guard.admit(float(loss.detach()))):
            average.update(state.step)
        elif guard is not None and guard.roll_back_due():  # a spike, not a stray batch: restart from before it
            average.roll_back()
            optimizer.state.clear()  # Adam's moments are out of date after a spike; they restart with the weights
        steps += 1
        state.step += 1
        if replan is not None:
            replan(steps)
        sums["ngm"] += float(ngm.detach())
        sums["aim"] += float(aim.detach())
        bar.update(1)
        bar.set_postfix(epoch=epoch + 1, ngm=f"{sums['ngm'] / steps:.4f}", aim=f"{sums['aim'] / steps:.4f}")
    return {k: v / max(steps, 1) for k, v in sums.items()} | (guard.take_counts() if guard is not None else {})


def _segmentation_steps(pairs, cfg, ctx) -> int:
    student_steps = math.ceil(len(pairs) / (cfg.train.batch_size * ctx.world))
    return cfg.train.seg_steps or math.ceil(cfg.train.seg_fraction * student_steps)


def _segmentation_batches(pairs, cfg, epoch, ctx, device) -> Iterator:
    """``cfg.train.seg_steps`` batches of fresh pairs (stream 1, 2, ... once a pass is used up)."""
    steps = _segmentation_steps(pairs, cfg, ctx)
    done, stream = 0, 1
    while True:
        for batch in _loader(pairs, cfg, epoch, stream, ctx, device):
            if done >= steps:
                return
            yield batch
            done += 1
        stream += 1


def train_segmentation_epoch(model, objective, pairs, optimizer, cfg, device, epoch, bar, ctx) -> dict[str, float]:
    """Teacher and student frozen; the segmentation head learns from fresh pairs (normal images in every batch)."""
    model.eval()
    model.segmentation.train()
    total, steps = 0.0, 0
    for normal, anomalous, mask in _segmentation_batches(pairs, cfg, epoch, ctx, device):
        images = torch.cat([normal, anomalous]).to(device, memory_format=_memory_format(cfg))
        masks = torch.cat([torch.zeros_like(mask), mask]).to(device)
        with _autocast(device, cfg.train.amp):
            loss = objective(images, masks)
        _check_finite(loss, epoch, "segmentation")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
        steps += 1
        bar.update(1)
        bar.set_postfix(epoch=epoch + 1, seg=f"{total / steps:.4f}")
    model.train()
    return {"seg": total / max(steps, 1)}


@contextlib.contextmanager
def _weights_for_maps(average: WeightAverage | None, guard: SpikeGuard | None = None) -> Iterator[dict[str, Any]]:
    """The block sees the weights the maps come from (the average when ``train.ema_decay`` is on); yields what a
    checkpoint needs besides them: the raw weights (``training_student``) with an average and the spike guard's
    running levels (``spike_guard``) with a guard."""
    extra = {"spike_guard": guard.state_dict()} if guard is not None else {}
    if average is None:
        yield extra
        return
    with average.applied() as training:
        yield {"training_student": training, **extra}


class _StopRequested(Exception):
    pass


@contextlib.contextmanager
def _graceful_signals() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C: the run stops and the last complete checkpoint stays usable."""

    def handler(signum, frame):  # noqa: ANN001
        raise _StopRequested(signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():  # signals can only be handled there
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def fit(
    cfg: Config,
    out_dir: str | Path,
    category: Category | None = None,
    resume: bool = False,
    progress: bool = True,
    clock: Callable[[], float] = time.perf_counter,
) -> Path:
    """Train DMDD on one category and return the path of the final checkpoint (``out_dir/last.pt``).

    Args:
        cfg: full configuration (``cfg.data`` locates the category unless ``category`` is given).
        out_dir: run folder: ``last.pt``, ``config.yaml``, ``train_log.jsonl``.
        category: preloaded records (optional).
        resume: continue from ``out_dir/last.pt`` if present.
        progress: show a progress bar.
        clock: seconds from a monotonic clock; times the epochs for the log and for the ``train.minutes`` plan
            (tests pass a fake one).
    """
    ctx = init_distributed()
    try:
        return _fit(cfg, Path(out_dir), category, resume, progress, ctx, clock)
    finally:
        close_distributed(ctx)


def statistics_seconds_per_image(model: DMDD, stats_images: list[Record] | torch.Tensor, cfg: Config,
                                 device: torch.device, clock: Callable[[], float], probe: int = 8) -> float:  # fmt: skip
    """Seconds the epoch-end statistics take per held-out image, timed on ``probe`` of them before training. A
    minutes budget reserves the first epoch's statistics and the final calibration from it: without it, a budget
    that ends inside the first epoch (a large training set, a short budget, a long setup) had nothing set aside for
    them and overran. Measured values replace the guess after the first epoch. It includes the first forward's
    warm-up, so it errs long. The model's buffers are restored (a resumed run keeps its fitted statistics)."""
    subset = stats_images[:probe]
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    start = clock()
    fit_map_statistics(model, subset, cfg, device)
    seconds = (clock() - start) / max(1, len(subset))
    model.load_state_dict(kept)
    return seconds


def resolve_regional_score(cfg: Config, policy: str) -> Config:
    """The ``auto`` parts that follow the synthesis' foreground ``policy``: ``model.regional_score`` becomes ``on``
    for a texture and ``off`` for an object, ``model.foreground_support`` ``on`` for an object on whole images and
    ``off`` otherwise; the checkpoint stores the resolved values, so a resumed run matches them."""
    if cfg.model.foreground_support == "on" and policy != "object":
        raise ConfigError(f"model.foreground_support: on needs an object, but the foreground policy is {policy!r} "
                          "(set synthesis.foreground: object, or model.foreground_support: auto)")  # fmt: skip
    resolved = {}
    if cfg.model.regional_score == "auto":
        resolved["regional_score"] = "on" if policy == "texture" else "off"
    if cfg.model.foreground_support == "auto":
        resolved["foreground_support"] = "on" if policy == "object" and not cfg.model.tile else "off"
    return cfg.replace(model=resolved) if resolved else cfg


def _fit(cfg: Config, out: Path, category: Category | None, resume: bool, progress: bool, ctx: DistContext,
         clock: Callable[[], float] = time.perf_counter) -> Path:  # fmt: skip
    run_start = clock()  # a minutes budget counts from here: setup, epochs and the final calibration
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "last.pt"
    if category is None:
        category = load_category(cfg.data.root, cfg.data.category, cfg.data.layout)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    device = select_device(cfg.train.device)
    if ctx.active and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    torch.manual_seed(cfg.train.seed)
    train_records, holdout = split_holdout(category.train, cfg.train.holdout_fraction, cfg.train.seed)
    synthesizer = AnomalySynthesizer(cfg.synthesis)
    tiles = TileSpec.of(cfg.model)
    pairs = PairDataset(train_records, cfg.model.image_size, synthesizer, cfg.train.seed,
                        ForegroundCache(cfg.synthesis), cfg.model.resize, tiles)  # fmt: skip
    cfg = resolve_regional_score(cfg, pairs.policy)
    model = DMDD(cfg.model).to(device, memory_format=_memory_format(cfg))
    student_opt, seg_opt = build_optimizers(model, cfg)
    state = TrainState()
    average = WeightAverage(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
    t = cfg.train
    gate = t.ema_gate if average else 0.0
    guard = SpikeGuard(t.update_clip, gate, t.spike_rollback if gate else 0) if t.update_clip or gate else None
    if resume and ckpt_path.is_file():
        state = restore_state(ckpt_path, cfg, model, student_opt, seg_opt, average, guard)
    student_obj = wrap(StudentObjective(model, cfg), ctx, device)
    seg_obj = wrap(SegmentationObjective(model), ctx, device) if model.segmentation is not None else None
    model.train()
    if ctx.is_main:
        save_config(cfg, out / "config.yaml")
    seg_steps = _segmentation_steps(pairs, cfg, ctx) if seg_obj is not None else 0
    loader = _loader(pairs, cfg, state.epoch, 0, ctx, device, epochs=None)  # one stream for every epoch
    student_steps = loader.batch_sampler.steps_per_epoch
    state.total_steps = planned_steps(cfg, student_steps) or state.total_steps  # minutes: the stored plan
    epochs_left = math.ceil(max(state.total_steps - state.step, 0) / student_steps) if state.total_steps else 1
    bar = tqdm(total=(student_steps + seg_steps) * epochs_left, disable=not (progress and ctx.is_main),
               unit="step", desc=f"train {category.name}", dynamic_ncols=True)  # fmt: skip
    # their map statistics are refitted every epoch: decoded once (with tiles, a few tiles of each image)
    stats_images = statistics_inputs(holdout or train_records, cfg, PRELOAD_MAX)
    fitted_on = train_records
    if tiles is not None:  # the Gaussians of tiles, as the model will see them
        fitted_on = preload_tiles(train_records, cfg)
    # the frozen teacher's Gaussians, once (kept by a resumed run), in one pass over the training images
    fit_teacher_gaussians(model, fitted_on, cfg, device,
                          global_score=model.global_score is not None and not model.global_score.gaussian_fitted,
                          regional=model.regional is not None and not model.regional.gaussian_fitted)  # fmt: skip
    if model.support is not None and not model.support.fitted:  # where the training parts' foregrounds lie
        model.support.fit(np.stack(pairs.masks))
    calibration, forwards = None, 0
    if ctx.is_main:  # decoded and foregrounds found now, so a --minutes budget can reserve just the model's time
        calibration = calibration_pairs(holdout or train_records, cfg)
        forwards = calibration_forwards(holdout or train_records, cfg)
    measured: dict[str, float] = {}  # a minutes run's epoch overhead and final reserve: guessed, then measured
    if cfg.train.minutes and not ctx.active:
        per_image = statistics_seconds_per_image(model, stats_images, cfg, device, clock)
        measured = {"overhead": per_image * len(stats_images), "reserve": per_image * forwards}
    batches = iter(loader)
    spent_before = state.history[-1].get("elapsed", 0.0) if state.history else 0.0  # earlier sessions (--resume)
    save_seconds = 0.0
    try:
        with _graceful_signals():
            epoch = state.epoch

            def replan(taken: int) -> None:
                """Inside an epoch, re-plan from this epoch's step time (one process only: every DDP rank must stop
                at the same step, which the epoch-end plan gives them); before the first epoch has measured its
                overhead and the final reserve, with those guessed before training."""
                now = clock()
                state.total_steps = steps_for_budget(
                    cfg.train.minutes * 60, spent_before + now - run_start, (now - start) / taken,
                    measured.get("overhead", 0.0), student_steps, state.step, measured.get("reserve", 0.0),
                    left_in_epoch=student_steps - taken)  # fmt: skip

            while not state.total_steps or state.step < state.total_steps:
                start, first_step = clock(), state.step
                steps_logged = StepLog(model) if cfg.train.step_log and ctx.is_main else None
                log = train_student_epoch(student_obj, batches, student_steps, student_opt, cfg, device, epoch, bar,
                                          ctx, state, average, guard, steps_logged,
                                          replan if cfg.train.minutes and not ctx.active else None)  # fmt: skip
                log["student_seconds"] = round(clock() - start, 2)
                with _weights_for_maps(average, guard) as extra:  # statistics, head and files: the map weights
                    stats_start = clock()
                    if model.cfg.map_normalization or model.global_score is not None or model.regional is not None:
                        fit_map_statistics(model, stats_images, cfg, device)
                    stats_seconds = clock() - stats_start
                    if seg_obj is not None:
                        seg_start = clock()
                        log |= train_segmentation_epoch(model, seg_obj, pairs, seg_opt, cfg, device, epoch, bar, ctx)
                        log["seg_seconds"] = round(clock() - seg_start, 2)
                    seconds = clock() - start
                    elapsed = spent_before + clock() - run_start
                    if cfg.train.minutes and state.step > first_step:  # re-planned after every epoch, as speed settles
                        measured["overhead"] = seconds - log["student_seconds"] + save_seconds
                        measured["reserve"] = stats_seconds / max(1, len(stats_images)) * forwards + save_seconds
                        state.total_steps = ctx.from_main(steps_for_budget(
                            cfg.train.minutes * 60, elapsed, log["student_seconds"] / (state.step - first_step),
                            measured["overhead"], student_steps, state.step, reserve=measured["reserve"]), device)
                        bar.total = bar.n + (student_steps + seg_steps) * math.ceil(
                            (state.total_steps - state.step) / student_steps
                        )
                    epoch += 1
                    log = {"epoch": epoch, "step": state.step, "total_steps": state.total_steps, **log,
                           "seconds": round(seconds, 2), "elapsed": round(elapsed, 2),
                           "foreground_policy": pairs.policy, "processes": ctx.world}  # fmt: skip
                    state.epoch, state.history = epoch, [*state.history, log]
                    if ctx.is_main:  # rank 0 alone writes; the others wait so every rank sees the same files
                        save_start = clock()
                        save_state(ckpt_path, cfg, model, student_opt, seg_opt, state, **extra)
                        save_seconds = clock() - save_start
                        with (out / "train_log.jsonl").open("a") as f:
                            f.write(json.dumps(log) + "\n")
                        if steps_logged is not None:
                            with (out / "step_log.jsonl").open("a") as f:
                                f.writelines(json.dumps(r) + "\n" for r in steps_logged)
                        every = cfg.train.snapshot_every
                        if every and (state.step // every > first_step // every or state.step >= state.total_steps):
                            save_snapshot(out / "snapshots" / f"step_{state.step:06d}.pt", cfg, model, state, extra)
                    ctx.barrier()
    except (KeyboardInterrupt, _StopRequested) as exc:
        bar.close()
        raise DmddError(
            f"training interrupted ({exc or 'SIGINT'}) after {state.epoch} complete epoch(s); "
            f"{ckpt_path if state.epoch else 'no checkpoint yet'} is usable, rerun with --resume to continue"
        ) from None
    finally:
        del batches  # the last reference: the loader's workers stop
    bar.close()
    if ctx.is_main:
        with _weights_for_maps(average, guard) as extra:
            # Thresholds from held-out normal training images (all training images when none are held out).
            thresholds = calibrate(model, holdout or train_records, cfg, device, calibration, held_out=bool(holdout))
            if thresholds["normal"].get("note"):
                print(f"dmdd: {thresholds['normal']['note']}", file=sys.stderr)
            save_state(ckpt_path, cfg, model, student_opt, seg_opt, state, thresholds=thresholds, **extra)
    ctx.barrier()
    return ckpt_path
