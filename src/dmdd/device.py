"""Where a run computes: the device (:func:`select_device`) and the allocator tuning (:func:`tune_allocator`).

Allocator: keep large tensor buffers in the process heap instead of fresh zeroed pages (glibc ``mallopt``).

glibc serves every allocation above its mmap threshold (dynamic, at most 32 MiB) with a new ``mmap`` and returns it
with ``munmap`` when freed, so each batch's large activations are page-faulted and zeroed again by the kernel. A
Lite0 model at 256 px and batch 8-32 allocates tensors of 10-200 MiB per layer; on this project's 2-core CPU the
page faults took more time than the convolutions (eager inference 13.8 -> 30.9 images/s, a channels-last student
step 3.54 -> 2.33 s, docs/results.md). Raising the mmap and trim thresholds keeps those buffers for reuse.

The ``dmdd`` command line applies it at start; Python API users call :func:`tune_allocator` themselves. Opt out with
``DMDD_MALLOC_TUNING=0``. Other C libraries (musl, macOS, Windows) are left alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch

from dmdd.errors import DmddError

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
DEFAULT_THRESHOLD = 1 << 30  # 1 GiB: allocations below it come from the heap; up to this much free heap is kept


def tune_allocator(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Raise glibc's mmap and trim thresholds to ``threshold`` bytes; returns whether it was applied."""
    if os.environ.get("DMDD_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, threshold)) and bool(mallopt(M_TRIM_THRESHOLD, threshold))

def select_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DmddError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device
