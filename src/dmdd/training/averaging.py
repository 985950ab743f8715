"""Exponential moving average of the student side's weights (``train.ema_decay``; a dmdd addition, docs/design.md §5).

The student's maps come from its drift away from the teacher. At the paper's constant learning rate that drift
oscillates from step to step (docs/results.md: a tire run's maps collapsed at step 308 and recovered by
605), so the weights at the last step are a noisy draw. The average of recent weights is a steadier model; it is
used for the maps, the statistics and the thresholds, while the optimiser keeps training the raw weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

#: Module prefixes of the trained student side (stages, 1x1 splits, the two PMNs); the teacher never changes.
STUDENT_PREFIXES = ("student.", "pmn_normality.", "pmn_abnormality.")


def student_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The student side's parameters and buffers, as tensors sharing storage with ``model``."""
    return {k: v for k, v in model.state_dict().items() if k.startswith(STUDENT_PREFIXES)}


class WeightAverage:
    """EMA of the student side: ``avg = d_t * avg + (1 - d_t) * w`` after every optimiser step, with
    ``d_t = min(decay, (1 + t) / (10 + t))`` so the first steps follow the weights closely (the early drift carries
    the signal). Integer buffers (BatchNorm's batch counters) are copied, not averaged.

    Args:
        model: the DMDD model being trained (the average follows its student side).
        decay: the long-run decay (0.99: a time constant of about 100 steps).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        # Views of the live weights, taken once: the optimiser updates them in place, so they stay current.
        self.live = student_state(model)
        self.average = {k: v.detach().clone() for k, v in self.live.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the model's weights after optimiser step ``step`` (0-based)."""
        d = min(self.decay, (1.0 + step) / (10.0 + step))
        for k, v in self.live.items():
            avg = self.average[k]
            if avg.is_floating_point():
                avg.lerp_(v.detach(), 1.0 - d)
            else:
                avg.copy_(v)

    @torch.no_grad()
    def reset(self) -> None:
        """Set the average to the model's current weights (a resumed run: the checkpoint's map weights)."""
        for k, v in self.live.items():
            self.average[k].copy_(v)

    @torch.no_grad()
    def roll_back(self) -> None:
        """Set the model's training weights to the average (the inverse of ``reset``): after a loss spike the run
        continues from the state the average kept."""
        for k, v in self.live.items():
            v.copy_(self.average[k])

    @contextlib.contextmanager
    def applied(self) -> Iterator[dict[str, torch.Tensor]]:
        """Within the block the model holds the averaged weights; yields a copy of its training weights, which are
        put back on exit."""
        live = self.live
        training = {k: v.detach().clone() for k, v in live.items()}
        self.roll_back()
        try:
            yield training
        finally:
            with torch.no_grad():
                for k, v in live.items():
                    v.copy_(training[k])
