"""End-to-end training and evaluation on a generated 64 px tree; checkpoints, resume, divergence."""

import json
import math

import pytest
import torch
from conftest import tiny_config
from torch.nn import functional as F

from dmdd import distributed
from dmdd.checkpoint import load_checkpoint, restore_model, save_checkpoint
from dmdd.data import load_category, read_image
from dmdd.engine import fit, split_holdout
from dmdd.errors import CheckpointError, TrainingDivergedError
from dmdd.evaluation import evaluate
from dmdd.models import DMDD


def run(tiny_tree, out, **train):
    cfg = tiny_config(tiny_tree, **train)
    ckpt = fit(cfg, out, progress=False)
    model, payload = restore_model(ckpt)
    result, _ = evaluate(model, cfg, load_category(tiny_tree).test, out / "eval", overlays_per_type=1)
    return ckpt, payload, result


def test_fit_and_evaluate_end_to_end_is_reproducible(tiny_tree, tmp_path):
    ckpt, payload, result = run(tiny_tree, tmp_path / "a", epochs=2)
    overall = result["overall"]
    for key in ("image_auroc", "pixel_auroc", "au_pro", "image_f1_max", "pixel_f1_max"):
        assert 0.0 <= overall[key] <= 1.0, key
    assert set(result["per_defect_type"]) == {"scratch", "spot", "contamination"}
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
    real = distributed.ngm_loss
    monkeypatch.setattr(distributed, "ngm_loss", lambda *a: real(*a) * float("nan"))
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


def test_channels_last_and_cpu_bf16_steps_match_fp32(tiny_tree, tmp_path):
    """Channels-last changes only float rounding of a student step; CPU bf16 autocast stays close; both reach fit."""
    cfg = tiny_config(tiny_tree).replace(model={"msn": False})
    gen = torch.Generator().manual_seed(0)
    normal, anomalous = torch.rand(2, 3, 64, 64, generator=gen), torch.rand(2, 3, 64, 64, generator=gen)
    mask = (torch.rand(2, 1, 64, 64, generator=gen) > 0.8).float()
    torch.manual_seed(0)
    model = DMDD(cfg.model)
    for param in model.student.parameters():  # off the teacher, so that the maps and gradients are not ~0
        param.data.add_(0.05 * torch.randn(param.shape, generator=gen))

    def step(fmt, amp=False):
        model.zero_grad()
        model.to(memory_format=fmt)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = distributed.student_loss(model, normal.contiguous(memory_format=fmt),
                                            anomalous.contiguous(memory_format=fmt), mask, cfg)[0]  # fmt: skip
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.student.parameters()])

    loss, grad = step(torch.contiguous_format)
    loss_cl, grad_cl = step(torch.channels_last)
    loss_bf, grad_bf = step(torch.channels_last, amp=True)
    assert torch.allclose(loss, loss_cl, rtol=1e-5) and (grad - grad_cl).norm() < 1e-4 * grad.norm()
    # bf16: same loss, gradients in the same direction but ~40 % apart in norm (distances of near-equal features)
    assert torch.allclose(loss, loss_bf, rtol=0.01) and F.cosine_similarity(grad, grad_bf, dim=0) > 0.8
    assert (grad - grad_bf).norm() > 1e-3 * grad.norm()  # autocast really ran in bf16
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


def test_minutes_budget_is_fixed_after_the_first_epoch(tiny_tree, tmp_path, monkeypatch):
    from dmdd import engine

    monkeypatch.setattr(engine, "steps_for_minutes", lambda minutes, seconds, steps: steps + 1)
    payload = load_checkpoint(fit(tiny_config(tiny_tree, minutes=0.01), tmp_path / "m", progress=False))
    first = payload["history"][0]["step"]
    assert payload["total_steps"] == first + 1 and payload["step"] == first + 1
    assert engine.planned_steps(tiny_config(tiny_tree, minutes=5.0), 4) == 0


def test_steps_for_minutes_and_learning_rate_schedule(tiny_tree):
    from dmdd.engine import lr_factor, steps_for_minutes

    assert steps_for_minutes(2.0, seconds=30.0, steps=10) == 40  # 10 steps in 30 s -> 120 s hold 40
    assert steps_for_minutes(0.001, seconds=30.0, steps=10) == 10  # never below what is done
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
    with torch.no_grad():  # move the student away from the teacher so the maps are not all zero
        for p in model.student.parameters():
            p.add_(0.05 * torch.randn_like(p))
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
    for key in ("ema_decay", "update_clip", "ema_gate"):
        del payload["config"]["train"][key]
    save_checkpoint(tmp_path / "old.pt", {k: v for k, v in payload.items() if not k.startswith("format")})
    old = restore_model(tmp_path / "old.pt")[0]
    assert old.cfg.image_score == "max" and old.cfg.global_score == "off" and old.global_score is None
    train = config_of(load_checkpoint(tmp_path / "old.pt")).train
    assert (train.ema_decay, train.update_clip, train.ema_gate) == (0.0, False, 0.0)


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
    from dmdd.averaging import student_state

    cfg = tiny_config(tiny_tree, epochs=2, ema_decay=0.5)
    # Recompute the average by hand from the raw weights after every step (the engine's update is not reused).
    seen: list[dict[str, torch.Tensor]] = []
    original = torch.optim.Adam.step

    def spy(self, *a, **k):
        out = original(self, *a, **k)
        if len(self.param_groups) > 1:  # the student optimiser (the segmentation head's has one group)
            seen.append({k: v.detach().clone() for k, v in student_state(model_ref[0]).items()})
        return out

    from dmdd import engine

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
    from dmdd.averaging import student_state
    from dmdd.stability import SpikeGuard

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
    from dmdd.averaging import student_state
    from dmdd.stability import SpikeGuard

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
