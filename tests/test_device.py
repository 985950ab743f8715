"""The allocator tuning the command line applies (dmdd.device)."""

import ctypes
import sys

import pytest

from dmdd.device import tune_allocator


def test_opt_out_and_other_platforms_leave_the_allocator_alone(monkeypatch):
    monkeypatch.setenv("DMDD_MALLOC_TUNING", "0")
    assert tune_allocator() is False
    monkeypatch.delenv("DMDD_MALLOC_TUNING")
    monkeypatch.setattr(sys, "platform", "darwin")
    assert tune_allocator() is False


def test_glibc_accepts_the_thresholds():
    try:
        ctypes.CDLL("libc.so.6").mallopt  # noqa: B018
    except (OSError, AttributeError):
        pytest.skip("not a glibc system: the tuning is a no-op there")
    assert tune_allocator() is True
