import math

import pytest
import torch

from dmdd.stability import RunningLevel, SpikeGuard


def test_running_level_flags_outliers_after_warmup_and_rises_slowly_to_a_new_level():
    level = RunningLevel(2.0, decay=0.9, warmup=5)
    assert level.limit == math.inf
    assert not any(level.observe(1.0) for _ in range(5))
    assert level.level == pytest.approx(1.0) and level.limit == pytest.approx(2.0)
    assert level.observe(10.0)  # an outlier, folded in at the limit only
    assert level.level == pytest.approx((0.9 * (1 - 0.9**5) + 0.1 * 2.0) / (1 - 0.9**6))
    assert not level.observe(1.5)
    # A lasting change of regime is followed: the level doubles within tens of steps, not at once.
    steps = 0
    while level.observe(10.0):
        steps += 1
    assert 5 <= steps <= 60


def test_running_level_state_round_trips():
    a, b = RunningLevel(2.0, warmup=2), RunningLevel(2.0, warmup=2)
    for v in (1.0, 2.0, 5.0):
        a.observe(v)
    b.load_state_dict(a.state_dict())
    assert (a.level, a.limit, a.count) == (b.level, b.limit, b.count)


def test_spike_guard_clips_an_outlying_gradient_to_its_limit_and_leaves_usual_ones():
    guard = SpikeGuard(clip_factor=2.0, ema_gate=0.0)
    p = torch.nn.Parameter(torch.zeros(4))
    usual = torch.tensor([0.5, 0.5, 0.5, 0.5])  # norm 1
    for _ in range(guard.grad.warmup):
        p.grad = usual.clone()
        assert guard.clip([p]) == pytest.approx(1.0)
        assert torch.equal(p.grad, usual)
    p.grad = 10 * usual
    assert guard.clip([p]) == pytest.approx(10.0)
    assert p.grad.norm().item() == pytest.approx(2.0, rel=1e-5)  # clipped to 2 x the running level
    assert torch.allclose(p.grad / p.grad.norm(), usual)  # same direction
    assert guard.take_counts() == {"clipped_steps": 1, "gated_steps": 0}
    assert guard.take_counts() == {"clipped_steps": 0, "gated_steps": 0}


def test_spike_guard_keeps_high_loss_steps_out_of_the_average():
    guard = SpikeGuard(clip_factor=0.0, ema_gate=2.0)
    assert all(guard.admit(0.1) for _ in range(guard.loss.warmup))
    assert not guard.admit(0.5)
    assert guard.admit(0.15)
    assert guard.take_counts()["gated_steps"] == 1
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2) * 1e6
    guard.clip([p])  # clipping off: never changes a gradient
    assert torch.equal(p.grad, torch.ones(2) * 1e6)
