"""Guards against the student's loss spikes (``train.clip_factor``, ``train.ema_gate``; dmdd additions, DESIGN §5).

At the paper's constant learning rate 0.005 with Adam (0.5, 0.999) the student loss sometimes jumps back towards its
untrained value within one epoch (benchmarks/results.md §10: 0.069 -> 0.602 at step 715 of a tire run) and the maps
collapse with it. With beta1 = 0.5 Adam's first moment follows the latest gradient closely while the second moment
averages ~1000 steps, so one gradient several times its usual norm moves the weights several times further than a
usual step. Two guards, both relative to the run's own recent history so they need no per-dataset tuning:

* the student gradient's norm is clipped at ``clip_factor`` times its running level before the optimiser step;
* a step whose loss exceeds ``ema_gate`` times the running loss level is left out of the weight average.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

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


class SpikeGuard:
    """The two guards of one run; its state travels in the checkpoint so a resumed run continues exactly.

    Args:
        clip_factor: clip the gradient norm at this multiple of its running level (0: no clipping).
        ema_gate: leave a step out of the weight average when its loss exceeds this multiple of the running loss
            level (0: every step goes in).
    """

    def __init__(self, clip_factor: float, ema_gate: float) -> None:
        self.grad = RunningLevel(clip_factor)
        self.loss = RunningLevel(ema_gate)
        self.clipped = self.gated = 0  # counts since the last ``take_counts``

    def clip(self, parameters: Iterable[torch.Tensor]) -> float:
        """Clip the gradients of ``parameters`` in place if their total norm is an outlier; returns the norm before
        clipping. Under DDP the gradients are already all-reduced, so every rank clips the same way."""
        params = [p for p in parameters if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        value = float(norm)
        limit = self.grad.limit
        if self.grad.observe(value):
            torch.nn.utils.clip_grads_with_norm_(params, limit, norm)
            self.clipped += 1
        return value

    def admit(self, loss: float) -> bool:
        """Whether the weights after a step with this loss may go into the weight average."""
        outlier = self.loss.observe(loss)
        self.gated += outlier
        return not outlier

    def take_counts(self) -> dict[str, int]:
        """Clipped and gated steps since the last call (for the epoch log)."""
        counts = {"clipped_steps": self.clipped, "gated_steps": self.gated}
        self.clipped = self.gated = 0
        return counts

    def state_dict(self) -> dict[str, dict[str, float]]:
        return {"grad": self.grad.state_dict(), "loss": self.loss.state_dict()}

    def load_state_dict(self, state: dict[str, dict[str, float]]) -> None:
        self.grad.load_state_dict(state["grad"])
        self.loss.load_state_dict(state["loss"])
