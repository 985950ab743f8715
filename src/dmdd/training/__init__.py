"""Training: the fit loop, its objectives, weight averaging, the spike guard and multi-process (DDP) plumbing."""

from dmdd.training.loop import fit

__all__ = ["fit"]
