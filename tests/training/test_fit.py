"""End-to-end training and evaluation on a generated 64 px tree; checkpoints, resume, divergence."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import read_labelled_test_set, reference_metrics, tiny_config

from dmdd.checkpoint import load_checkpoint, restore_model, save_checkpoint
from dmdd.data import load_category, read_image
from dmdd.errors import CheckpointError, TrainingDivergedError
from dmdd.evaluation import evaluate
from dmdd.models import DMDD
from dmdd.training import objective
from dmdd.training.loop import fit, split_holdout


def run(tiny_tree, out, **train):
    cfg = tiny_config(tiny_tree, **train)
    ckpt = fit(cfg, out, progress=False)
    model, payload = restore_model(ckpt)
    result, _ = evaluate(model, cfg, load_category(tiny_tree).test, out / "eval", overlays_per_type=1)
    return ckpt, payload, result


def test_fit_and_evaluate_end_to_end_is_reproducible(tiny_tree, tmp_path):
    ckpt, payload, result = run(tiny_tree, tmp_path / "a", epochs=2)
    # The metrics are those of the trained model's own outputs on the test split, read here without dmdd's readers
    # and scored with scikit-learn (tolerance: evaluate batches the images differently, which moves float rounding).
    model, _ = restore_model(ckpt)
    images, labels, masks, types = read_labelled_test_set(tiny_tree)
    with torch.no_grad():
        out = model(images)
    scores, maps = out.pred_score.numpy(), out.anomaly_map[:, 0].numpy()
    expected = reference_metrics(scores, maps, labels, masks)
    for key, value in expected.items():
        assert result["overall"][key] == pytest.approx(value, abs=1e-4), key
    assert set(result["per_defect_type"]) == {"scratch", "spot", "contamination"}
    for name, split in result["per_defect_type"].items():  # each defect type together with the good images
        pick = np.isin(types, ["good", name])
        expected = reference_metrics(scores[pick], maps[pick], labels[pick], masks[pick])
        assert split["image_auroc"] == pytest.approx(expected["image_auroc"], abs=1e-4), name
        assert split["au_pro"] == pytest.approx(expected["au_pro"], abs=1e-4), name
    assert payload["epoch"] == 2 and len(payload["history"]) == 2
    thresholds = payload["thresholds"]
    assert {"image", "pixel"} <= set(thresholds) and thresholds["mode"] == "normal"
    assert thresholds["image"] == thresholds["normal"]["image"] and set(thresholds["synthetic"]) == {"image", "pixel"}
    assert (tmp_path / "a/eval/metrics.json").is_file() and (tmp_path / "a/eval/metrics.md").is_file()
    assert len(list((tmp_path / "a/eval/overlays").glob("*.png"))) == 4
    log = [json.loads(line) for line in (tmp_path / "a/train_log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1, 2] and all(e["ngm"] > 0 for e in log)
    _, payload_b, result_b = run(tiny_tree, tmp_path / "b", epochs=2)
    assert result_b == result
    for k, v in payload["model"].items():
        assert torch.equal(v, payload_b["model"][k]), k


def test_loader_workers_train_on_the_same_pairs_as_the_main_process(tiny_tree, tmp_path):
    # One loader runs across the epochs; its workers draw each pair from the (epoch, stream, index) key it carries.
    main = load_checkpoint(fit(tiny_config(tiny_tree, epochs=3, batch_size=2), tmp_path / "main", progress=False))
    cfg = tiny_config(tiny_tree, epochs=3, batch_size=2, num_workers=2)
    workers = load_checkpoint(fit(cfg, tmp_path / "workers", progress=False))
    assert workers["step"] == main["step"] == 9  # 3 epochs of 3 batches (6 training images, 2 held out)
    for k, v in main["model"].items():
        assert torch.equal(v, workers["model"][k]), k


def test_kill_after_epoch_one_and_resume_reaches_the_same_weights(tiny_tree, tmp_path):
    straight = fit(tiny_config(tiny_tree, epochs=2), tmp_path / "straight", progress=False)
    fit(tiny_config(tiny_tree, epochs=1), tmp_path / "resumed", progress=False)  # "killed" after epoch 1
    resumed = fit(tiny_config(tiny_tree, epochs=2), tmp_path / "resumed", resume=True, progress=False)
    a, b = load_checkpoint(straight), load_checkpoint(resumed)
    assert b["epoch"] == 2
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_resume_across_the_update_clip_setting_keeps_every_tensors_optimiser_state(tiny_tree, tmp_path):
    fit(tiny_config(tiny_tree, update_clip=False), tmp_path / "r", progress=False)  # two Adam groups
    saved = load_checkpoint(tmp_path / "r/last.pt")["optimizer_student"]
    assert len(saved["param_groups"]) == 2
    again = tiny_config(tiny_tree, epochs=2, update_clip=True)
    resumed = load_checkpoint(fit(again, tmp_path / "r", resume=True, progress=False))
    groups = resumed["optimizer_student"]["param_groups"]  # one group per tensor, same tensors in the same order
    assert len(groups) == len(saved["state"]) and [g["params"] for g in groups] == [[i] for i in saved["state"]]
    first = int(saved["state"][0]["step"])
    assert 0 < first < resumed["step"]  # every tensor's Adam count continued from epoch 1, not restarted
    assert {int(state["step"]) for state in resumed["optimizer_student"]["state"].values()} == {resumed["step"]}


def test_resume_refuses_another_model_configuration(tiny_tree, tmp_path):
    fit(tiny_config(tiny_tree), tmp_path / "r", progress=False)
    cfg = tiny_config(tiny_tree, epochs=2).replace(model={"msn": True})
    with pytest.raises(CheckpointError, match="different model configuration"):
        fit(cfg, tmp_path / "r", resume=True, progress=False)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tiny_tree, tmp_path, monkeypatch):
    fit(tiny_config(tiny_tree), tmp_path / "n", progress=False)
    good = (tmp_path / "n/last.pt").read_bytes()
    real = objective.ngm_loss
    monkeypatch.setattr(objective, "ngm_loss", lambda *a: real(*a) * float("nan"))
    with pytest.raises(TrainingDivergedError, match="loss became nan in epoch 2"):
        fit(tiny_config(tiny_tree, epochs=2), tmp_path / "n", resume=True, progress=False)
    assert (tmp_path / "n/last.pt").read_bytes() == good


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="damaged or not a dmdd checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a dmdd checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    save_checkpoint(tmp_path / "future.pt", {"config": {}, "model": {}})
    payload = torch.load(tmp_path / "future.pt", weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(tmp_path / "future.pt")


def test_truncated_and_foreign_backbone_checkpoints(tiny_tree, tmp_path):
    ckpt = fit(tiny_config(tiny_tree), tmp_path / "t", progress=False)
    data = ckpt.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(tmp_path / "cut.pt")
    payload = load_checkpoint(ckpt)
    payload["config"]["model"]["backbone"] = "efficientnet_lite1"
    save_checkpoint(tmp_path / "swapped.pt", {k: v for k, v in payload.items() if not k.startswith("format")})
    with pytest.raises(CheckpointError, match="does not match a DMDD model with backbone 'efficientnet_lite1'"):
        restore_model(tmp_path / "swapped.pt")


def test_holdout_is_seeded_and_disjoint(tiny_tree):
    records = load_category(tiny_tree).train
    train, held = split_holdout(records, 0.25, seed=3)
    assert len(held) == 2 and not set(train) & set(held)
    assert split_holdout(records, 0.25, seed=3) == (train, held)


def test_student_training_does_not_depend_on_the_msn(tiny_tree, tmp_path):
    """The "w/o MSN" evaluation of a trained student equals a run with the MSN switched off."""
    msn_cfg = tiny_config(tiny_tree, epochs=2).replace(model={"msn": True})
    with_msn = load_checkpoint(fit(msn_cfg, tmp_path / "msn", progress=False))
    cfg = tiny_config(tiny_tree, epochs=2).replace(model={"msn": False})
    without = load_checkpoint(fit(cfg, tmp_path / "plain", progress=False))
    assert set(without["model"]) < set(with_msn["model"])
    for k, v in without["model"].items():
        if k.startswith("map_") or k in ("global_score.score_stats", "regional.pixel_stats"):  # fusion statistics
            continue
        assert torch.equal(v, with_msn["model"][k]), k


def test_channels_last_matches_fp32_and_a_cpu_bf16_step_descends_the_fp32_loss(tiny_tree, tmp_path):
    """Channels-last changes only float rounding of a student step. Under CPU bf16 autocast the convolutions really
    run in bf16 while the loss stays fp32 and close to the fp32 loss, and the bf16 gradient trains the fp32
    objective: a small step along it lowers the fp32 loss. The bf16 gradient itself is ~35-40 % away from the fp32
    one (distances of near-equal features) and how far depends on the CPU's bf16 kernels, so it is not compared
    directly; both settings also reach fit."""
    cfg = tiny_config(tiny_tree).replace(model={"msn": False})
    gen = torch.Generator().manual_seed(0)
    normal, anomalous = torch.rand(2, 3, 64, 64, generator=gen), torch.rand(2, 3, 64, 64, generator=gen)
    mask = (torch.rand(2, 1, 64, 64, generator=gen) > 0.8).float()
    torch.manual_seed(0)
    model = DMDD(cfg.model)
    for param in model.student.parameters():  # off the teacher, so that the maps and gradients are not ~0
        param.data.add_(0.05 * torch.randn(param.shape, generator=gen))
    params = list(model.student.parameters())
    conv_dtypes: set[torch.dtype] = set()
    hooks = [m.register_forward_hook(lambda mod, args, out: conv_dtypes.add(out.dtype))
             for m in model.student.modules() if isinstance(m, torch.nn.Conv2d)]  # fmt: skip

    def step(fmt, amp=False):
        model.zero_grad()
        model.to(memory_format=fmt)
        conv_dtypes.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = objective.student_loss(model, normal.contiguous(memory_format=fmt),
                                            anomalous.contiguous(memory_format=fmt), mask, cfg)[0]  # fmt: skip
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in params]), set(conv_dtypes)

    loss, grad, dtypes = step(torch.contiguous_format)
    loss_cl, grad_cl, _ = step(torch.channels_last)
    loss_bf, grad_bf, dtypes_bf = step(torch.channels_last, amp=True)
    for hook in hooks:
        hook.remove()
    assert torch.allclose(loss, loss_cl, rtol=1e-5) and (grad - grad_cl).norm() < 1e-4 * grad.norm()
    # Kernel-independent: autocast ran the convolutions in bf16; the loss and the gradients stay fp32.
    assert dtypes == {torch.float32} and dtypes_bf == {torch.bfloat16}
    assert loss_bf.dtype == grad_bf.dtype == torch.float32 and torch.isfinite(grad_bf).all()
    # bf16 keeps 8 significant bits (unit roundoff 2^-9 = 0.002 per rounding); the loss averages thousands of
    # cosine distances whose rounding errors do not add up, so it stays within 1 % (measured: 3.5e-4 at most over
    # this CPU's AMX, AVX-512 and AVX2 kernels, ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY).
    assert torch.allclose(loss, loss_bf, rtol=0.01)

    def fp32_loss_after(direction: torch.Tensor, length: float) -> float:
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, d in zip(params, (direction / direction.norm()).split([p.numel() for p in params])):
                p.sub_(length * d.view_as(p))
            after = float(objective.student_loss(model, normal, anomalous, mask, cfg)[0])
            for p, s in zip(params, saved):
                p.copy_(s)
        return after

    model.to(memory_format=torch.contiguous_format)
    before = float(loss)
    # A step of Euclidean length 0.01 over the 3.2M student weights along the bf16 gradient lowers the fp32 loss by
    # more than 1e-3 of it (measured: by 1.34 %; along the fp32 gradient: 1.36 %). Along a random direction (cosine
    # ~2e-4 with the gradient) the loss moves by ~1e-5, 0.0004 %: the check needs a gradient, not just any step.
    assert fp32_loss_after(grad_bf, 0.01) < before * (1 - 1e-3)
    ckpt = fit(tiny_config(tiny_tree, channels_last=True, amp=True), tmp_path / "o", progress=False)
    weight = load_checkpoint(ckpt)["model"]["student.stages.0.0.conv.weight"]
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert torch.isfinite(restore_model(ckpt)[0].map_std).all()


def test_step_budget_stops_mid_epoch_and_keeps_snapshots(tiny_tree, tmp_path):
    cfg = tiny_config(tiny_tree, epochs=50, steps=3, snapshot_every=2)
    ckpt = fit(cfg, tmp_path / "s", progress=False)
    payload = load_checkpoint(ckpt)
    steps_per_epoch = payload["history"][0]["step"]
    assert payload["step"] == 3 and payload["total_steps"] == 3
    assert payload["epoch"] == -(-3 // steps_per_epoch)  # ceil: the last epoch is partial
    snaps = sorted(p.name for p in (tmp_path / "s/snapshots").glob("*.pt"))
    assert snaps[-1] == "step_000003.pt" and len(snaps) >= 2
    model, snap = restore_model(tmp_path / "s/snapshots" / snaps[-1])
    assert snap["step"] == 3 and "optimizer_student" not in snap
    assert torch.equal(model.map_std, payload["model"]["map_std"])
    assert not torch.equal(model.map_std, torch.ones_like(model.map_std))  # fitted on the held-out images


class FakeClock:
    """Seconds that pass only when the test says so (each patched stage adds its cost); everything else, the real
    wall clock included, takes no time."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.steps = 0

    def __call__(self) -> float:
        return self.now

    def timed(self, real, cost):
        """``real`` that first moves the clock by ``cost`` seconds (a number, or a function giving one)."""

        def run(*args, **kwargs):
            self.now += cost() if callable(cost) else cost
            return real(*args, **kwargs)

        return run

    def fit(self, cfg, out, step_cost, statistics: float, calibration: float, gaussians: float | None = None) -> dict:
        """Train ``cfg`` into ``out`` on this clock: each student step costs ``step_cost()``, the map statistics
        ``statistics``, the final calibration ``calibration`` and (when given) the teacher's Gaussians ``gaussians``
        seconds. Returns the checkpoint's payload; ``self.start`` is the clock when training began."""
        from dmdd.training import loop as engine

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(objective, "student_loss", self.timed(objective.student_loss, step_cost))
            mp.setattr(engine, "fit_map_statistics", self.timed(engine.fit_map_statistics, statistics))
            if gaussians is not None:
                mp.setattr(engine, "fit_teacher_gaussians", self.timed(engine.fit_teacher_gaussians, gaussians))
            mp.setattr(engine, "calibrate", self.timed(engine.calibrate, calibration))
            self.start = self.now
            return load_checkpoint(fit(cfg, out, progress=False, clock=self))


def test_minutes_budget_replans_as_the_step_time_settles_and_ends_within_it(tiny_tree, tmp_path):
    """The budget covers everything: 10 s of setup (7 s for the teacher's Gaussians, 3 s timing the statistics on the
    held-out images, from which the first epoch's overhead and the final reserve are guessed), 3 slow first steps (15 s each, as
    while foregrounds are computed), 5 s steps after, 3 s of map statistics per epoch, 6 s of final calibration.
    The plan dmdd had before, fixed from the first epoch (3 steps in 48 s: int(90 / 48 * 3) = 5 steps), ended after
    77 s, 14 % short; re-planning after every epoch ends at the budget."""
    from dmdd.training import loop as engine

    clock = FakeClock()

    def step_cost():
        clock.steps += 1
        return 15.0 if clock.steps <= 3 else 5.0

    cfg = tiny_config(tiny_tree, minutes=1.5, batch_size=2)  # 90 s; 6 training images: 3 steps an epoch
    payload = clock.fit(cfg, tmp_path / "m", step_cost, statistics=3.0, calibration=6.0, gaussians=7.0)
    start = clock.start
    history = payload["history"]
    # epoch 1: 10 s setup + 3 x 15 s + 3 s = 58 s; 90 - 58 - 6 (calibration: a good and a synthetic input per
    # held-out image, 4, at the statistics pass's 1.5 s per image) leaves 26 s,
    # one more step at 15 s + 3 s. In epoch 2 the first step takes 5 s: re-planned inside the epoch, 90 - 63 - 6 =
    # 21 s hold 3 steps (2 in this epoch, one in the next) and two epochs' 3 s.
    assert [e["step"] for e in history] == [3, 6, 7] and [e["total_steps"] for e in history] == [4, 7, 7]
    assert [e["elapsed"] for e in history] == [58.0, 76.0, 84.0]
    assert payload["step"] == clock.steps == 7
    assert clock.now - start == 90.0  # 84 s of training and 6 s of calibration: the budget, to the second
    assert engine.planned_steps(tiny_config(tiny_tree, minutes=5.0), 4) == 0


def test_minutes_budget_replans_inside_an_epoch_when_steps_slow_down(tiny_tree, tmp_path):
    """6 steps an epoch; steps take 5 s until the machine gets busy at step 10 (30 s each); 3 s of statistics per
    epoch, 6 s of calibration, a 120 s budget. Planned only at epoch ends, epoch 2 would run all 6 steps (15 + 90 s)
    and the run would end after 150 s, 25 % over; re-planned after every step it stops after step 11 and ends at
    120 s (3 s of setup: the statistics timed before training)."""
    clock = FakeClock()

    def step_cost():
        clock.steps += 1
        return 5.0 if clock.steps <= 9 else 30.0

    cfg = tiny_config(tiny_tree, minutes=2.0, batch_size=1)  # 6 training images: 6 steps an epoch
    payload = clock.fit(cfg, tmp_path / "m", step_cost, statistics=3.0, calibration=6.0)
    start = clock.start
    # epoch 1: 3 s + 30 s + 3 s, plan 19 steps; after step 10 (81 s, 11.25 s a step this epoch) 2 more fit; after
    # step 11 (111 s, 15 s a step) none: the epoch ends, 114 s, and calibration brings the run to 120 s
    assert [e["step"] for e in payload["history"]] == [6, 11] and payload["step"] == clock.steps == 11
    assert [e["elapsed"] for e in payload["history"]] == [36.0, 114.0]
    assert clock.now - start == 120.0


def test_minutes_budget_that_ends_inside_the_first_epoch_reserves_its_statistics_and_calibration(tiny_tree, tmp_path):
    """A large training set or a short budget: the run must stop before its first epoch ends. 6 steps an epoch at
    4 s, 10 s for the teacher's Gaussians, 3 s of statistics, 6 s of calibration, a 30 s budget. Before the first
    epoch ended nothing had measured the statistics or the calibration, and a plan without them took 5 steps, to
    30 s, and then 3 + 6 s more: 39 s, 30 % over. Timed on the held-out images before training (3 s: 1.5 s an
    image), they are reserved from the first step on."""
    clock = FakeClock()

    def step_cost():
        clock.steps += 1
        return 4.0

    cfg = tiny_config(tiny_tree, minutes=0.5, batch_size=1)  # 30 s; 6 training images: 6 steps an epoch
    payload = clock.fit(cfg, tmp_path / "m", step_cost, statistics=3.0, calibration=6.0, gaussians=10.0)
    start = clock.start
    # 13 s of setup; after step 1 (17 s): 30 - 17 - 6 (reserve) = 7 s hold this epoch's 3 s and one more step
    (epoch,) = payload["history"]
    assert epoch["step"] == payload["step"] == clock.steps == 2 and epoch["total_steps"] == 2
    assert epoch["elapsed"] == 24.0  # 13 + 2 x 4 + 3
    assert clock.now - start == 30.0  # and 6 s of calibration: the budget, to the second


@pytest.mark.parametrize("seed", range(5))
def test_steps_for_budget_is_the_most_steps_that_fit(seed):
    from dmdd.training.loop import steps_for_budget

    rng = np.random.default_rng(seed)
    for _ in range(50):
        budget, elapsed, reserve = rng.uniform(50, 500), rng.uniform(0, 100), rng.uniform(0, 20)
        step, overhead, per_epoch, done = rng.uniform(0.5, 5), rng.uniform(0, 10), int(rng.integers(1, 12)), 7
        left = budget - elapsed - reserve
        fits = [n for n in range(2000) if n * step + math.ceil(n / per_epoch) * overhead <= left]
        assert steps_for_budget(budget, elapsed, step, overhead, per_epoch, done, reserve) == done + max(fits, default=0)
        # inside an epoch with `rest` steps left: its own overhead is due, steps past `rest` start new epochs
        rest = int(rng.integers(0, per_epoch))
        fits = [n for n in range(2000)
                if n * step + overhead + sum(1 for k in range(rest, n) if (k - rest) % per_epoch == 0) * overhead <= left]
        inside = steps_for_budget(budget, elapsed, step, overhead, per_epoch, done, reserve, left_in_epoch=rest)
        assert inside == done + max(fits, default=0)


def test_learning_rate_schedule(tiny_tree):
    from dmdd.training.loop import lr_factor
    cosine = tiny_config(tiny_tree, lr_schedule="cosine", warmup_steps=4)
    assert lr_factor(cosine, 0, 100) == pytest.approx(0.25 * 0.5 * (1 + math.cos(0)))
    assert lr_factor(cosine, 50, 100) == pytest.approx(0.5)
    assert lr_factor(cosine, 100, 100) == pytest.approx(0.0)
    assert lr_factor(tiny_config(tiny_tree), 77, 100) == 1.0


def test_map_statistics_make_the_residual_base_the_standardised_sum_of_standardised_maps(tiny_tree):
    from dmdd.evaluation import fit_map_statistics
    from dmdd.models import DMDD

    cfg = tiny_config(tiny_tree).replace(model={"msn": True})
    torch.manual_seed(0)
    model = DMDD(cfg.model).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move the student away from the teacher so the maps are not all zero
        for p in model.student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    records = load_category(tiny_tree).train
    mean, std = fit_map_statistics(model, records, cfg, torch.device("cpu"))
    images = torch.stack([torch.from_numpy(read_image(r.image, 64)).permute(2, 0, 1) / 255.0 for r in records])
    with torch.no_grad():
        z = model.stacked_maps(images)
        base = (z * model.segmentation.sum_weights.view(1, -1, 1, 1)).sum(1)
    plain = z.sum(1)
    expected = (plain - plain.mean()) / plain.std(unbiased=False)
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(len(mean)), atol=1e-4)
    assert torch.allclose(base, expected, atol=1e-3)


def test_checkpoint_from_before_image_score_ema_and_global_score_keeps_its_score_and_last_weights(tiny_tree, tmp_path):
    from dmdd.checkpoint import config_of

    ckpt = fit(tiny_config(tiny_tree), tmp_path / "o", progress=False)
    payload = load_checkpoint(ckpt)
    assert restore_model(ckpt)[0].cfg.image_score == "top_k" and config_of(payload).train.ema_decay == 0.99
    del payload["config"]["model"]["image_score"]  # as written before the options existed
    del payload["config"]["model"]["global_score"]
    payload["model"] = {k: v for k, v in payload["model"].items() if not k.startswith("global_score.")}
    for key in ("ema_decay", "update_clip", "ema_gate", "spike_rollback"):
        del payload["config"]["train"][key]
    save_checkpoint(tmp_path / "old.pt", {k: v for k, v in payload.items() if not k.startswith("format")})
    old = restore_model(tmp_path / "old.pt")[0]
    assert old.cfg.image_score == "max" and old.cfg.global_score == "off" and old.global_score is None
    train = config_of(load_checkpoint(tmp_path / "old.pt")).train
    assert (train.ema_decay, train.update_clip, train.ema_gate, train.spike_rollback) == (0.0, False, 0.0, 0)


def test_checkpoint_with_a_global_score_over_all_stages_from_before_the_stage_choice_loads_as_written(
    tiny_tree, tmp_path
):
    cfg = tiny_config(tiny_tree).replace(model={"global_stages": [1, 2, 3, 4]})
    payload = load_checkpoint(fit(cfg, tmp_path / "o", progress=False))
    del payload["config"]["model"]["global_stages"]  # as written before the option existed
    save_checkpoint(tmp_path / "old.pt", {k: v for k, v in payload.items() if not k.startswith("format")})
    old = restore_model(tmp_path / "old.pt")[0]
    assert old.cfg.global_stages == (1, 2, 3, 4) and old.global_score.stages == (0, 1, 2, 3)
    assert DMDD(tiny_config(tiny_tree).model).global_score.stages == (1, 2, 3)  # the default leaves stage 1 out


def test_checkpoint_without_residual_base_weights_loads_with_the_mean_base(tiny_tree, tmp_path):
    ckpt = fit(tiny_config(tiny_tree).replace(model={"msn": True}), tmp_path / "o", progress=False)
    payload = load_checkpoint(ckpt)
    del payload["model"]["segmentation.sum_weights"]  # as written before the weights existed
    save_checkpoint(tmp_path / "old.pt", {k: v for k, v in payload.items() if not k.startswith("format")})
    model, _ = restore_model(tmp_path / "old.pt")
    assert torch.allclose(model.segmentation.sum_weights, torch.full((8,), 1 / 8))
    del payload["model"]["map_std"]  # anything else missing is still an error
    save_checkpoint(tmp_path / "older.pt", {k: v for k, v in payload.items() if not k.startswith("format")})
    with pytest.raises(CheckpointError, match="does not match"):
        restore_model(tmp_path / "older.pt")


def test_weight_average_drives_the_maps_and_resume_keeps_both_weight_sets(tiny_tree, tmp_path):
    from dmdd.training.averaging import student_state

    cfg = tiny_config(tiny_tree, epochs=2, ema_decay=0.5)
    # Recompute the average by hand from the raw weights after every step (the engine's update is not reused).
    seen: list[dict[str, torch.Tensor]] = []
    original = torch.optim.Adam.step

    def spy(self, *a, **k):
        out = original(self, *a, **k)
        if len(self.param_groups) > 1:  # the student optimiser (the segmentation head's has one group)
            seen.append({k: v.detach().clone() for k, v in student_state(model_ref[0]).items()})
        return out

    from dmdd.training import loop as engine

    model_ref, seen_init = [], {}
    real_init = engine.WeightAverage.__init__

    def init(self, model, decay):
        model_ref.append(model)
        seen_init.update({k: v.detach().clone() for k, v in student_state(model).items()})
        real_init(self, model, decay)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.Adam, "step", spy)
        mp.setattr(engine.WeightAverage, "__init__", init)
        payload = load_checkpoint(fit(cfg, tmp_path / "e", progress=False))
    expected = {k: v.float() for k, v in seen_init.items() if v.is_floating_point()}
    for t, weights in enumerate(seen):
        d = min(0.5, (1 + t) / (10 + t))
        for k in expected:
            expected[k] = d * expected[k] + (1 - d) * weights[k]
    raw = payload["training_student"]
    key = "student.stages.1.0.conv.weight" if "student.stages.1.0.conv.weight" in raw else next(iter(expected))
    for k in expected:
        assert torch.allclose(payload["model"][k], expected[k], atol=1e-6), k
        assert torch.equal(raw[k], seen[-1][k]), k
    assert not torch.equal(payload["model"][key], raw[key])  # the maps do not come from the last raw weights
    # A killed run resumed from epoch 1 ends with the same averaged and raw weights as an uninterrupted one.
    fit(tiny_config(tiny_tree, epochs=1, ema_decay=0.5), tmp_path / "r", progress=False)
    resumed = load_checkpoint(fit(cfg, tmp_path / "r", resume=True, progress=False))
    for k, v in payload["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    for k, v in raw.items():
        assert torch.equal(v, resumed["training_student"][k]), k
    assert resumed["spike_guard"] == payload["spike_guard"]  # the guards' running levels continue too
    assert payload["spike_guard"]["loss"]["count"] == len(seen)


def test_steps_the_loss_gate_rejects_stay_out_of_the_weight_average(tiny_tree, tmp_path):
    from dmdd.training.averaging import student_state
    from dmdd.training.stability import SpikeGuard

    cfg = tiny_config(tiny_tree, epochs=2, ema_decay=0.5)
    torch.manual_seed(cfg.train.seed)
    initial = student_state(DMDD(cfg.model))  # the engine builds the same model from the same seed
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SpikeGuard, "admit", lambda self, loss: False)
        payload = load_checkpoint(fit(cfg, tmp_path / "g", progress=False))
    for k, v in initial.items():
        assert torch.equal(payload["model"][k], v), k
    assert any(not torch.equal(payload["training_student"][k], v) for k, v in initial.items())
    assert {"update_rms_max", "clipped_tensors_per_step", "gated_steps"} <= payload["history"][-1].keys()


def test_a_roll_back_puts_the_average_into_the_training_weights_and_restarts_adam(tiny_tree, tmp_path):
    from dmdd.training.averaging import student_state
    from dmdd.training.stability import SpikeGuard

    cfg = tiny_config(tiny_tree, epochs=2, ema_decay=0.5, spike_rollback=1)
    torch.manual_seed(cfg.train.seed)
    initial = student_state(DMDD(cfg.model))

    def gate_every_step(self, loss):
        self.in_a_row += 1
        return False

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SpikeGuard, "admit", gate_every_step)
        payload = load_checkpoint(fit(cfg, tmp_path / "b", progress=False))
    # Every step was gated and rolled back: the average never moved and the training weights went back to it.
    for k, v in initial.items():
        assert torch.equal(payload["model"][k], v), k
        assert torch.equal(payload["training_student"][k], v), k
    assert payload["optimizer_student"]["state"] == {}
    history = [row for row in payload["history"] if "rollbacks" in row]
    assert sum(row["rollbacks"] for row in history) == payload["step"] > 0


def test_demo_sets_aside_a_checkpoint_of_another_model_configuration_and_keeps_its_own(tiny_tree, tmp_path):
    from dmdd.demo import set_aside_other_model

    cfg = tiny_config(tiny_tree)
    fit(cfg, tmp_path / "demo", progress=False)
    assert set_aside_other_model(tmp_path / "demo", cfg) is None  # its own run: resumed, untouched
    assert (tmp_path / "demo" / "last.pt").is_file()
    from dmdd.checkpoint import load_checkpoint, save_checkpoint

    payload = load_checkpoint(tmp_path / "demo" / "last.pt")
    for stages in ([1, 2, 3], "absent"):  # stages chosen after training, or a checkpoint from before the option
        if stages == "absent":
            payload["config"]["model"].pop("fused_stages")
        else:
            payload["config"]["model"]["fused_stages"] = stages
        save_checkpoint(tmp_path / "demo" / "last.pt", payload)
        assert set_aside_other_model(tmp_path / "demo", cfg) is None, stages
    other = cfg.replace(model={"global_stages": [1, 2, 3, 4]})  # as an earlier dmdd's defaults
    aside = set_aside_other_model(tmp_path / "demo", other)
    assert aside == tmp_path / "demo" / "last.previous.pt" and aside.is_file()
    assert not (tmp_path / "demo" / "last.pt").exists() and not (tmp_path / "demo" / "train_log.jsonl").exists()
    fit(other, tmp_path / "demo", resume=True, progress=False)  # trains afresh instead of refusing to resume


def test_step_log_records_every_student_step_with_the_gradient_against_adams_moments(tiny_tree, tmp_path):
    cfg = tiny_config(tiny_tree, epochs=2, step_log=True)
    fit(cfg, tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "step_log.jsonl").read_text().splitlines()]
    history = load_checkpoint(tmp_path / "run" / "last.pt")["history"]
    assert [r["step"] for r in records] == list(range(history[-1]["step"]))
    assert records[0]["ratio_max"] == 0 and records[0]["ratio_tensor"] is None  # no Adam history at the first step
    names = {n for n, _ in restore_model(tmp_path / "run" / "last.pt")[0].named_parameters()}
    assert all(r["ratio_max"] > 0 and r["ratio_tensor"] in names for r in records[1:])
    assert all(r["grad_norm"] > 0 and 0 < r["anomaly_area"] < 1 and r["loss"] > 0 for r in records)


def test_timing_the_statistics_before_training_leaves_the_models_buffers_as_they_were(tiny_tree, tmp_path):
    """A resumed --minutes run times the statistics on a few held-out images; its fitted statistics must survive."""
    from dmdd.checkpoint import restore_model
    from dmdd.evaluation.stages import statistics_inputs
    from dmdd.training.loop import statistics_seconds_per_image

    model, payload = restore_model(fit(tiny_config(tiny_tree), tmp_path / "r", progress=False))
    model.map_std.mul_(2.0)  # statistics a refit on the same images would not give back
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, holdout = split_holdout(load_category(tiny_tree).train, 0.25, 0)
    clock = FakeClock()
    with pytest.MonkeyPatch.context() as mp:
        from dmdd.training import loop as engine

        mp.setattr(engine, "fit_map_statistics", clock.timed(engine.fit_map_statistics, 3.0))
        seconds = statistics_seconds_per_image(model, statistics_inputs(holdout, tiny_config(tiny_tree)),
                                               tiny_config(tiny_tree), torch.device("cpu"), clock)  # fmt: skip
    assert seconds == 3.0 / len(holdout)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
