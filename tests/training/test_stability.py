import math

import pytest
import torch

from dmdd.training.stability import RunningLevel, SpikeGuard, clip_updates


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


def _adam_step(params, opt, grads, lr, clip):
    for group in opt.param_groups:
        group["lr"] = lr
    for p, g in zip(params, grads):
        p.grad = g.clone()
    out = clip_updates(opt) if clip else None
    opt.step()
    return out


def test_update_clipping_is_adam_with_the_rate_divided_by_the_out_of_date_ratio():
    gen = torch.Generator().manual_seed(0)
    betas, lr = (0.5, 0.999), 0.01
    # Gradients that shrink for 30 steps, then one 20x larger on the first tensor only.
    base = [torch.randn(6, generator=gen), torch.randn(3, generator=gen)]
    history = [[b * 0.9**t for b in base] for t in range(30)]
    spike = [torch.randn(6, generator=gen) * 20, base[1] * 0.9**30]
    clipped = [torch.nn.Parameter(torch.zeros(6)), torch.nn.Parameter(torch.zeros(3))]
    plain = [torch.nn.Parameter(torch.zeros(6)), torch.nn.Parameter(torch.zeros(3))]
    opt_c = torch.optim.Adam([{"params": [p]} for p in clipped], lr=lr, betas=betas)
    opt_p = torch.optim.Adam([{"params": [p]} for p in plain], lr=lr, betas=betas)
    for grads in history:  # shrinking gradients: g^2 below the average of past ones, nothing is clipped
        assert _adam_step(clipped, opt_c, grads, lr, clip=True)[1] == 0
        _adam_step(plain, opt_p, grads, lr, clip=False)
    for a, b in zip(clipped, plain):
        assert torch.equal(a, b)
    # Brute-force reference of the first tensor's ratio from the gradient history (Adam's second moment by hand).
    v = torch.zeros(6, dtype=torch.float64)
    for grads in [*history, spike]:
        v = betas[1] * v + (1 - betas[1]) * grads[0].double() ** 2
    ratio = float((spike[0].double() ** 2 / (v / (1 - betas[1] ** (len(history) + 1)))).mean().sqrt())
    assert ratio > 5
    before = [p.detach().clone() for p in clipped]
    largest, count = _adam_step(clipped, opt_c, spike, lr, clip=True)
    assert count == 1 and largest == pytest.approx(ratio, rel=1e-5)
    # The clipped tensor moved as Adam at lr / ratio would move it; the other one as plain Adam.
    opt_p.param_groups[0]["lr"] = lr / ratio
    for p, g in zip(plain, spike):
        p.grad = g.clone()
    opt_p.step()
    for a, b in zip(clipped, plain):
        assert torch.allclose(a, b, atol=1e-7)
    assert (plain[0] - before[0]).abs().max() < lr  # without the clip it would have moved ~lr * 16 at most


def test_spike_guard_keeps_high_loss_steps_out_of_the_average_and_counts_clipping():
    guard = SpikeGuard(update_clip=False, ema_gate=2.0)
    assert all(guard.admit(0.1) for _ in range(guard.loss.warmup))
    assert not guard.admit(0.5)
    assert guard.admit(0.15)
    assert guard.take_counts()["gated_steps"] == 1
    assert guard.take_counts()["gated_steps"] == 0
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([p], lr=0.1)
    for scale in (1.0, 1.0, 100.0):
        opt.param_groups[0]["lr"] = 0.1
        p.grad = torch.ones(2) * scale
        guard.clip(opt)  # update clipping off: the rate is never touched
        assert opt.param_groups[0]["lr"] == 0.1
        opt.step()
    assert guard.take_counts()["clipped_tensors_per_step"] == 0


def test_spike_guard_asks_for_a_roll_back_only_after_enough_gated_steps_in_a_row():
    guard = SpikeGuard(update_clip=False, ema_gate=2.0, rollback_after=3)
    for _ in range(guard.loss.warmup):
        guard.admit(0.1)
    decisions = []
    for loss in (0.5, 0.5, 0.1, 0.5, 0.5, 0.5, 0.5):  # a calm step in between starts the count again
        guard.admit(loss)
        decisions.append(guard.roll_back_due())
    assert decisions == [False, False, False, False, False, True, False]
    restored = SpikeGuard(update_clip=False, ema_gate=2.0, rollback_after=3)
    restored.load_state_dict(guard.state_dict())
    assert restored.in_a_row == guard.in_a_row == 1
    assert guard.take_counts()["rollbacks"] == 1
    assert not SpikeGuard(update_clip=False, ema_gate=2.0).roll_back_due()  # rollback_after 0: never
