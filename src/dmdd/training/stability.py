"""Guards against the student's loss spikes (``train.update_clip``, ``train.ema_gate``; dmdd additions, docs/design.md §5).

At the paper's constant learning rate 0.005 with Adam (0.5, 0.999) the student loss sometimes jumps back towards its
untrained value within one epoch (docs/results.md: 0.069 -> 0.602 at step 715 of a tire run) and the maps
collapse with it. Clipping the gradient's total norm at twice its running level did not stop such a spike (§10): the
norm was not unusual when it came. What Adam makes of a gradient is: its second moment averages ~1000 steps, so a
tensor whose gradients grow faster than that average follows moves up to ``(1 - beta1) / sqrt(1 - beta2)`` (16x)
further than usual. Two guards, both relative to the run's own history so they need no per-dataset tuning:

* update clipping (Adafactor; StableAdamW, Wortsman et al. 2023): per tensor, the step's learning rate is divided by
  ``max(1, RMS(g^2 / v_hat))``, ``v_hat`` being Adam's bias-corrected second moment including this gradient, so no
  tensor moves much further than a usual step when its second moment is out of date;
* a step whose loss exceeds ``ema_gate`` times the running loss level is left out of the weight average.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch


class RunningLevel:
    """Bias-corrected exponential moving average of a positive quantity, fed with values capped at ``factor``
    times the current level so that one outlier cannot raise it much (a level that must rise does so by at most
    ``(factor - 1) * (1 - decay)`` per step: about 2 % with the defaults, doubling in ~35 steps).

    Args:
        factor: the multiple of the level above which a value counts as an outlier (0: never).
        decay: EMA decay of the level.
        warmup: values seen before outliers are judged (the level of the first steps is still settling).
    """

    def __init__(self, factor: float, decay: float = 0.98, warmup: int = 20) -> None:
        self.factor, self.decay, self.warmup = factor, decay, warmup
        self.total, self.weight, self.count = 0.0, 0.0, 0

    @property
    def level(self) -> float:
        return self.total / self.weight if self.weight else math.inf

    @property
    def limit(self) -> float:
        """Values above this are outliers (infinite while warming up or when off)."""
        return self.factor * self.level if self.factor and self.count >= self.warmup else math.inf

    def observe(self, value: float) -> bool:
        """Fold ``value`` in and say whether it was an outlier (judged against the level before it)."""
        limit = self.limit
        self.total = self.decay * self.total + (1 - self.decay) * min(value, limit)
        self.weight = self.decay * self.weight + (1 - self.decay)
        self.count += 1
        return value > limit

    def state_dict(self) -> dict[str, float]:
        return {"total": self.total, "weight": self.weight, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.total, self.weight, self.count = float(state["total"]), float(state["weight"]), int(state["count"])


@torch.no_grad()
def update_ratios(optimizer: torch.optim.Adam) -> Iterator[tuple[dict, torch.nn.Parameter, float]]:
    """(group, parameter, RMS(g^2 / v_hat)) of every tensor with a gradient and Adam history, for the coming
    ``step()``: how far this step's gradient lies above what Adam's second moments expect (1 when it is typical)."""
    for group in optimizer.param_groups:
        beta2, eps = group["betas"][1], group["eps"]
        for p in group["params"]:
            state = optimizer.state.get(p)
            if p.grad is None or not state:  # no history yet: Adam's first step has g^2 / v_hat = 1
                continue
            t = float(state["step"]) + 1
            g2 = p.grad.float().square()
            v_hat = (state["exp_avg_sq"] * beta2 + g2 * (1 - beta2)) / (1 - beta2**t)
            yield group, p, float((g2 / v_hat.clamp(min=eps * eps)).mean().sqrt())


def clip_updates(optimizer: torch.optim.Adam) -> tuple[float, int]:
    """Scale the learning rate of each parameter group of ``optimizer`` (one tensor per group, as
    ``engine.build_optimizers`` makes them with ``train.update_clip``) by ``1 / max(1, RMS(g^2 / v_hat))`` for the
    coming ``step()``; call it after the group rates are set for this step. Returns the largest ratio and the number
    of tensors whose rate was lowered. Under DDP the gradients are already all-reduced, so every rank agrees."""
    largest, clipped = 0.0, 0
    for group, _, rms in list(update_ratios(optimizer)):
        largest = max(largest, rms)
        if rms > 1:
            group["lr"] /= rms
            clipped += 1
    return largest, clipped


def step_record(optimizer: torch.optim.Adam, names: dict[int, str]) -> dict[str, Any]:
    """Before ``step()``: the gradient norm over all tensors, and the tensor whose gradient lies farthest above
    Adam's second moments (``update_ratios``), by name (``names``: id of a parameter -> its name)."""
    grads = [p.grad.float() for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norm = float(torch.sqrt(sum((g * g).sum() for g in grads))) if grads else 0.0
    ratio, name = 0.0, None
    for _, p, rms in update_ratios(optimizer):
        if rms > ratio:
            ratio, name = rms, names.get(id(p), "?")
    return {"grad_norm": round(norm, 5), "ratio_max": round(ratio, 3), "ratio_tensor": name}


class SpikeGuard:
    """The loss gate of the weight average and the update clipping's counters; its state travels in the checkpoint
    so a resumed run continues exactly.

    Args:
        update_clip: clip each tensor's update (``clip_updates``) before every optimiser step.
        ema_gate: leave a step out of the weight average when its loss exceeds this multiple of the running loss
            level (0: every step goes in).
        rollback_after: after this many gated steps in a row, ``roll_back_due`` asks for a roll-back of the
            training to the average (0: never).
    """

    def __init__(self, update_clip: bool, ema_gate: float, rollback_after: int = 0) -> None:
        self.update_clip = update_clip
        self.loss = RunningLevel(ema_gate)
        self.rollback_after = rollback_after
        self.in_a_row = 0
        self.clipped = self.gated = self.steps = self.rollbacks = 0  # since the last ``take_counts``
        self.largest = 0.0

    def clip(self, optimizer: torch.optim.Adam) -> None:
        """Clip this step's updates if ``update_clip`` is on (see ``clip_updates``)."""
        if self.update_clip:
            largest, clipped = clip_updates(optimizer)
            self.largest = max(self.largest, largest)
            self.clipped += clipped
        self.steps += 1

    def admit(self, loss: float) -> bool:
        """Whether the weights after a step with this loss may go into the weight average."""
        outlier = self.loss.observe(loss)
        self.gated += outlier
        self.in_a_row = self.in_a_row + 1 if outlier else 0
        return not outlier

    def roll_back_due(self) -> bool:
        """True once ``rollback_after`` steps in a row were gated; counts the roll-back and starts a new count."""
        if not self.rollback_after or self.in_a_row < self.rollback_after:
            return False
        self.in_a_row = 0
        self.rollbacks += 1
        return True

    def take_counts(self) -> dict[str, float]:
        """For the epoch log, since the last call: the largest update ratio, the clipped tensors per step, the
        steps kept out of the average and the roll-backs."""
        counts = {"update_rms_max": round(self.largest, 3),
                  "clipped_tensors_per_step": round(self.clipped / max(self.steps, 1), 2),
                  "gated_steps": self.gated, "rollbacks": self.rollbacks}  # fmt: skip
        self.clipped = self.gated = self.steps = self.rollbacks = 0
        self.largest = 0.0
        return counts

    def state_dict(self) -> dict[str, Any]:
        return {"loss": self.loss.state_dict(), "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss.load_state_dict(state["loss"])
        self.in_a_row = int(state.get("in_a_row", 0))
