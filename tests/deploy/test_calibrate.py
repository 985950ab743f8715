"""`dmdd calibrate` end to end: thresholds from labelled folders stored with their provenance, used (and named) by
test, predict, export and serve; the web API's calibration equals the CLI's; bad input leaves the checkpoint as it
was."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_config
from fastapi.testclient import TestClient
from scipy import stats

from dmdd.checkpoint import config_of, load_checkpoint, restore_model
from dmdd.cli import main
from dmdd.data import load_category
from dmdd.deploy.predict import Predictor
from dmdd.deploy.serve import ServeSettings, create_app
from dmdd.evaluation.labelled import rule_threshold
from dmdd.evaluation.predictions import predict_split
from dmdd.training.loop import fit, split_holdout

RULE = "recall-at-fpr=0.5"  # 3 good images: one may lie above; the threshold sits mid-gap, away from any score


@pytest.fixture(scope="module")
def trained(tiny_tree, tmp_path_factory):
    return fit(tiny_config(tiny_tree), tmp_path_factory.mktemp("calibrate") / "run", progress=False)


@pytest.fixture
def ckpt(trained, tmp_path):
    copy = tmp_path / "run" / "last.pt"
    copy.parent.mkdir()
    shutil.copy(trained, copy)
    return copy


def labelled_args(tree) -> list[str]:
    test = tree / "test"
    return ["--normal-dir", str(test / "good"), "--abnormal-dir", str(test / "scratch"), "--abnormal-dir",
            f"spots={test / 'spot'}", "--mask-dir", str(tree / "ground_truth")]  # fmt: skip


def test_calibrate_stores_the_rules_threshold_with_provenance(ckpt, tiny_tree, capsys):
    before = load_checkpoint(ckpt)["thresholds"]
    assert main(["calibrate", str(ckpt), *labelled_args(tiny_tree), "--rule", RULE, "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "expected on new parts (leave-one-out, 95 % interval)" in printed and "written to the checkpoint" in printed
    stored = load_checkpoint(ckpt)["thresholds"]
    lab = stored["labelled"]
    # the rule applied to the model's own scores of the seven labelled images
    model, payload = restore_model(ckpt)
    from dmdd.data.datasets import folder_test_records

    test = tiny_tree / "test"
    records = folder_test_records({"good": test / "good", "scratch": test / "scratch", "spots": test / "spot"})
    p = predict_split(model, records, config_of(payload), torch.device("cpu"))
    # training stored its held-out good images' scores; they join the labelled good ones unless those score higher
    held = np.asarray(before["normal"]["scores"])
    _, holdout = split_holdout(load_category(tiny_tree).train, 0.25, 0)
    np.testing.assert_allclose(held, predict_split(model, holdout, config_of(payload), torch.device("cpu")).scores,
                               rtol=0, atol=1e-3)  # fmt: skip (decoded by the pairs, not the test loader)
    p_value = stats.mannwhitneyu(p.scores[p.labels == 0], held, alternative="greater").pvalue
    assert lab["held_out_good"] == {"count": len(holdout), "p_value": p_value, "pooled": bool(p_value >= 0.05)}
    good = np.r_[p.scores[p.labels == 0], held] if p_value >= 0.05 else p.scores[p.labels == 0]
    assert stored["image"] == rule_threshold(good, p.scores[p.labels == 1], "recall-at-fpr", 0.5)
    assert ("held-out good training images" in printed) and len(holdout) == 2
    assert stored["mode"] == "labelled" and stored["unlabelled"] == {k: before[k] for k in ("image", "pixel", "mode")}
    assert stored["normal"] == before["normal"]  # training's operating points stay
    # the spot images, renamed "spots", find no mask folder of that name: the pixel threshold uses the two that do
    assert (lab["rule"], lab["good_images"], lab["defective_images"], lab["masks"]) == (RULE, 3, 4, 2)
    assert lab["pixel"] == stored["pixel"] and "over 5 images with known pixels (2 defect masks)" in lab["pixel_source"]
    assert lab["files"] == {str(r.image): hashlib.sha256(r.image.read_bytes()).hexdigest()[:16] for r in records}
    assert lab["date"][:4].isdigit() and lab["dmdd"]
    assert 0 <= lab["estimate"]["recall_95ci"][0] <= lab["estimate"]["recall"] <= lab["estimate"]["recall_95ci"][1]


def test_test_predict_export_and_serve_decide_with_the_labelled_threshold_and_say_so(ckpt, tiny_tree, tmp_path):
    assert main(["calibrate", str(ckpt), *labelled_args(tiny_tree), "--rule", RULE, "--threads", "1"]) == 0
    stored = load_checkpoint(ckpt)["thresholds"]
    source = "labelled: rule recall-at-fpr=0.5 on 3 good + 4 defective images"

    assert main(["test", str(ckpt), "--data", str(tiny_tree), "--out", str(tmp_path / "t")]) == 0
    op = json.loads((tmp_path / "t" / "metrics.json").read_text())["operating_point"]
    assert op["threshold"] == stored["image"] and op["threshold_source"].startswith(source)
    assert source in (tmp_path / "t" / "report.html").read_text()

    assert main(["predict", str(ckpt), str(tiny_tree / "test"), "--out", str(tmp_path / "p")]) == 0
    results = json.loads((tmp_path / "p" / "results.json").read_text())
    assert results["image_threshold"] == stored["image"] and results["threshold_source"].startswith(source)
    assert all(r["anomalous"] == (r["score"] >= stored["image"]) for r in results["images"])
    decided = {r["path"]: r["anomalous"] for r in results["images"]}

    assert main(["export", str(ckpt), "--out", str(tmp_path / "e")]) == 0
    from dmdd.data.io import read_image
    from dmdd.deploy.inference import OnnxInferencer

    runtimes = [OnnxInferencer(tmp_path / "e" / "model.onnx")]
    try:
        import openvino  # noqa: F401

        assert main(["export", str(ckpt), "--format", "openvino", "--out", str(tmp_path / "ov")]) == 0
        from dmdd.deploy.inference import OpenVinoInferencer

        runtimes.append(OpenVinoInferencer(tmp_path / "ov" / "model.xml"))
    except ImportError:
        pass
    for runtime in runtimes:  # the exported model decides every test image as the checkpoint does
        assert runtime.image_threshold == stored["image"] and runtime.threshold_source.startswith(source)
        assert {path: runtime.predict(read_image(path)).anomalous for path in decided} == decided

    c = TestClient(create_app(ServeSettings(models=[ckpt], device="cpu")))
    (info,) = c.get("/models").json()["models"]
    assert info["image_threshold"] == stored["image"] and info["threshold_source"].startswith(source)


def test_dry_run_leaves_the_file_and_reset_goes_back_to_trainings_thresholds(ckpt, tiny_tree, capsys):
    original = ckpt.read_bytes()
    assert main(["calibrate", str(ckpt), *labelled_args(tiny_tree), "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["written"] is False and ckpt.read_bytes() == original
    assert report["thresholds"]["labelled"]["rule"] == "f1"
    trained = load_checkpoint(ckpt)["thresholds"]
    assert main(["calibrate", str(ckpt), *labelled_args(tiny_tree)]) == 0
    assert main(["calibrate", str(ckpt), "--reset"]) == 0
    back = load_checkpoint(ckpt)["thresholds"]
    assert (back["image"], back["pixel"], back["mode"]) == (trained["image"], trained["pixel"], trained["mode"])
    assert "labelled" not in back and "unlabelled" not in back


def _bad_inputs(tree, tmp_path):
    test = tree / "test"
    empty = tmp_path / "empty"
    empty.mkdir()
    wrong_masks = tmp_path / "masks" / "scratch"
    wrong_masks.mkdir(parents=True)
    from PIL import Image

    Image.new("L", (10, 10)).save(wrong_masks / "000.png")
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(test / "scratch" / "000.png", one)
    alien = tmp_path / "alien.pt"
    import torch

    torch.save({"weights": torch.zeros(3)}, alien)
    good, scratch = str(test / "good"), str(test / "scratch")
    return [
        (["--normal-dir", good], "no defective images given"),
        (["--abnormal-dir", scratch], "no good images given"),
        (["--normal-dir", good, "--abnormal-dir", str(empty)], f"test folder {empty} holds no images"),
        (["--normal-dir", str(one), "--abnormal-dir", str(one)], "at least 3 labelled images"),
        (["--normal-dir", good, "--abnormal-dir", scratch, "--mask-dir", str(tmp_path / "masks")],
         "is 10x10 but its image is 64x64"),
        (["--normal-dir", good, "--abnormal-dir", scratch, "--rule", "fpr=0.01"], "give at least 99 good images"),
        (["--normal-dir", good, "--abnormal-dir", scratch, "--rule", "f2"], "unknown --rule"),
        (["--normal-dir", good, "--abnormal-dir", scratch, "--checkpoint-swap", str(alien)], "not a dmdd checkpoint"),
    ]  # fmt: skip


def test_bad_input_gives_one_line_and_leaves_the_checkpoint(ckpt, tiny_tree, tmp_path, capsys):
    original = ckpt.read_bytes()
    for args, message in _bad_inputs(tiny_tree, tmp_path):
        target = str(ckpt)
        if "--checkpoint-swap" in args:  # a checkpoint from somewhere else
            target, args = args[-1], args[:-2]
        assert main(["calibrate", target, *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("dmdd: error:") and message in err and len(err.splitlines()) == 1, (args, err)
        assert ckpt.read_bytes() == original
    assert not list(ckpt.parent.glob(".*.tmp"))  # no half-written file left beside it


def test_an_unreadable_good_image_is_named_and_skipped(ckpt, tiny_tree, tmp_path, capsys):
    good = tmp_path / "good"
    shutil.copytree(tiny_tree / "test" / "good", good)
    (good / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    args = ["--normal-dir", str(good), "--abnormal-dir", str(tiny_tree / "test" / "scratch")]
    assert main(["calibrate", str(ckpt), *args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"warning: skipped {good / 'broken.png'}" in out and "on 3 good + 2 defective images" in out


def test_the_web_api_calibrates_like_the_cli_and_saves_for_later_requests(ckpt, tiny_tree, capsys):
    root = tiny_tree.parent
    test = tiny_tree.relative_to(root) / "test"
    assert main(["calibrate", str(ckpt), "--normal-dir", str(tiny_tree / "test" / "good"), "--abnormal-dir",
                 str(tiny_tree / "test" / "scratch"), "--rule", RULE, "--dry-run", "--json"]) == 0  # fmt: skip
    cli = json.loads(capsys.readouterr().out)["thresholds"]["labelled"]
    c = TestClient(create_app(ServeSettings(models=[ckpt], data_root=root, device="cpu")))
    form = {"good_paths": [str(test / "good" / f"00{i}.png") for i in range(3)],
            "defective_paths": [str(test / "scratch" / f"00{i}.png") for i in range(2)]}  # fmt: skip
    preview = c.post(f"/calibrate?rule={RULE}", data=form).json()
    # the same rule code on the same images; the server scores through its predictor (channels-last), the CLI
    # through the evaluation loader: the scores agree to float rounding, so do the thresholds
    assert preview["labelled"]["image"] == pytest.approx(cli["image"], rel=1e-5, abs=1e-6)
    assert preview["saved"] is False and preview["image_threshold"] != preview["labelled"]["image"]
    assert [s["label"] for s in preview["scores"]] == [0, 0, 0, 1, 1]
    assert load_checkpoint(ckpt)["thresholds"]["mode"] != "labelled"  # a preview writes nothing

    saved = c.post(f"/calibrate?rule={RULE}&save=true", data=form).json()
    assert saved["saved"] and saved["image_threshold"] == saved["labelled"]["image"]
    stored = load_checkpoint(ckpt)["thresholds"]
    assert stored["image"] == saved["labelled"]["image"] and stored["labelled"]["files"].keys() == set(
        form["good_paths"] + form["defective_paths"])
    (info,) = c.get("/models").json()["models"]
    assert info["threshold_source"].startswith("labelled: rule recall-at-fpr=0.5 on 3 good + 2 defective")
    image = (tiny_tree / "test" / "spot" / "000.png").read_bytes()
    body = c.post("/predict", files=[("files", ("s.png", image, "image/png"))]).json()
    assert body["image_threshold"] == stored["image"] and body["threshold_source"] == info["threshold_source"]
    assert body["results"][0]["anomalous"] == (body["results"][0]["score"] >= stored["image"])
    assert Predictor(ckpt, "cpu").image_threshold == stored["image"]  # a fresh load reads the same


def test_the_web_api_refuses_what_it_cannot_calibrate(ckpt, tiny_tree, tmp_path):
    root = tiny_tree.parent
    model, payload = restore_model(ckpt)
    from dmdd.deploy.export import export_onnx

    export_onnx(model, tmp_path / "m.onnx", payload["thresholds"])
    c = TestClient(create_app(ServeSettings(models=[ckpt, f"onnx={tmp_path / 'm.onnx'}"], data_root=root,
                                            device="cpu")))  # fmt: skip
    good = {"good_paths": [str((tiny_tree / "test" / "good" / "000.png").relative_to(root))]}
    r = c.post("/calibrate", data=good)
    assert r.status_code == 400 and "no defective image" in r.json()["detail"]
    r = c.post("/calibrate", data={**good, "defective_paths": ["../../etc/passwd"]})
    assert r.status_code == 403
    both = {**good, "defective_paths": [str((tiny_tree / "test" / "scratch" / f).relative_to(root))
                                        for f in ("000.png", "001.png")]}  # fmt: skip
    assert c.post("/calibrate?model=onnx", data=both).status_code == 200  # a preview works on any model
    r = c.post("/calibrate?model=onnx&save=true", data=both)
    assert r.status_code == 400 and "calibrate its checkpoint" in r.json()["detail"]
    assert np.isfinite(c.post("/calibrate?rule=f1", data=both).json()["labelled"]["image"])


def _pairwise_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Brute force: the share of (defective, good) pixel pairs ranked the right way, ties counting half."""
    pos, neg = np.sort(scores[labels]), np.sort(scores[~labels])
    below = np.searchsorted(neg, pos, side="left")
    ties = np.searchsorted(neg, pos, side="right") - below
    return float((below + 0.5 * ties).sum() / (pos.size * neg.size))


def test_choose_map_keeps_what_the_rejects_show_refits_the_map_and_reset_restores_the_trained_one(
        ckpt, tiny_tree, capsys, monkeypatch):  # fmt: skip
    from dmdd.data.datasets import folder_test_records
    from dmdd.evaluation.stages import training_holdout

    original = load_checkpoint(ckpt)
    test = tiny_tree / "test"
    records = folder_test_records({"good": test / "good", "scratch": test / "scratch", "spots": test / "spot"},
                                  tiny_tree / "ground_truth")  # fmt: skip
    model, payload = restore_model(ckpt)
    before = predict_split(model, records, config_of(payload), torch.device("cpu"))
    known = before.pixel_labelled()

    assert main(["calibrate", str(ckpt), *labelled_args(tiny_tree), "--choose-stages", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    stored = load_checkpoint(ckpt)
    report = stored["thresholds"]["labelled"]["stages"]
    candidates = report["candidates"]
    # the tiny set is a texture: the regional map is on, and its wider stage-3 window is a candidate
    assert original["config"]["model"]["regional_score"] == "on"
    assert list(candidates) == ["all"] + [f"without stage {s}" for s in (1, 2, 3, 4)] + ["stage-3 window 9"]
    assert f"map: {report['chosen']}" in printed and "% of resamples" in printed and report["masked_rejects"] == 2
    # "all", refitted on the same held-out images, is the trained map (to float rounding): its labelled pixel AUROC
    assert candidates["all"]["pixel_auroc"] == pytest.approx(
        _pairwise_auroc(before.masks[known].ravel() > 0, before.maps[known].ravel()), abs=1e-4)
    qualified = {name: c["gain"] for name, c in list(candidates.items())[1:]
                 if c["gain"] > 0 and c["resamples_with_gain"] >= 0.95}  # fmt: skip
    assert report["chosen"] == (max(qualified, key=qualified.get) if qualified else "all")
    without = [s for s in (1, 2, 3, 4) if report["chosen"] == f"without stage {s}"]
    assert stored["config"]["model"]["fused_stages"] == ([s for s in (1, 2, 3, 4) if s not in without] if without
                                                         else None)  # fmt: skip
    assert stored["config"]["model"]["regional_windows"] == [7, 9 if report["chosen"] == "stage-3 window 9" else 5]

    # where the rejects do show a gain (the rule itself: tests/evaluation/test_stages.py), the checkpoint adds up the
    # chosen maps, with statistics refitted for them: the image score's map part is standardised over the held-out
    # good images (mean 0, std 1 there), and the stored labelled thresholds are those of the chosen map
    import dmdd.evaluation.stages as stages

    monkeypatch.setattr(stages, "choose", lambda runs, index=None: ("without stage 4", {}))
    assert main(["calibrate", str(ckpt), *labelled_args(tiny_tree), "--choose-stages", "--threads", "1"]) == 0
    stored = load_checkpoint(ckpt)
    assert stored["config"]["model"]["fused_stages"] == [1, 2, 3]
    model, payload = restore_model(ckpt)
    cfg = config_of(payload)
    assert cfg.model.fused_stages == (1, 2, 3) and model.fused == [0, 1, 2, 4, 5, 6]
    holdout = predict_split(model, training_holdout(cfg), cfg, torch.device("cpu"))
    m_mean, m_std = model.global_score.score_stats[:2].tolist()
    z = (np.array([model.map_score(torch.from_numpy(m)[None, None]).item() for m in holdout.maps]) - m_mean) / m_std
    assert abs(z.mean()) < 1e-3 and abs(z.std(ddof=1) - 1) < 1e-3
    after = predict_split(model, records, cfg, torch.device("cpu"))
    assert not np.allclose(after.maps, before.maps)
    lab = stored["thresholds"]["labelled"]
    assert lab["image"] == stored["thresholds"]["image"] == rule_threshold(
        after.scores[after.labels == 0], after.scores[after.labels == 1], "f1", None)
    from dmdd.evaluation.labelled import describe

    assert describe(stored["thresholds"]).endswith("; map of stages 1, 2, 3, regional windows 7 and 5 (chosen on their "
                                                   "masks)")  # fmt: skip

    # a second choice, the wider regional window (with --choose-map's name): the regional Gaussian and bank are
    # refitted on the training images for a 9-cell window, stored with the window, and the map changes with them
    monkeypatch.setattr(stages, "choose", lambda runs, index=None: ("stage-3 window 9", {}))
    assert main(["calibrate", str(ckpt), *labelled_args(tiny_tree), "--choose-map", "--threads", "1"]) == 0
    stored = load_checkpoint(ckpt)
    assert stored["config"]["model"]["regional_windows"] == [7, 9]
    assert stored["config"]["model"]["fused_stages"] is None
    assert not torch.equal(stored["model"]["regional.bank3"], original["model"]["regional.bank3"])
    assert torch.equal(stored["model"]["regional.bank2"], original["model"]["regional.bank2"])
    model, payload = restore_model(ckpt)
    assert model.regional.windows == {2: 7, 3: 9}
    wide = predict_split(model, records, config_of(payload), torch.device("cpu"))
    assert not np.allclose(wide.maps, before.maps) and not np.allclose(wide.maps, after.maps)
    assert describe(stored["thresholds"]).endswith("; map of stages 1, 2, 3, 4, regional windows 7 and 9 (chosen on "
                                                   "their masks)")  # fmt: skip

    assert main(["calibrate", str(ckpt), "--reset"]) == 0
    back = load_checkpoint(ckpt)
    assert back["config"]["model"] == original["config"]["model"]
    assert all(torch.equal(back["model"][k], v) for k, v in original["model"].items())
    assert back["thresholds"] == original["thresholds"] and "before_stage_choice" not in back


def test_choose_map_refuses_without_masks_or_training_data_and_on_the_msn(ckpt, tiny_tree, tmp_path, capsys):
    from dmdd.config import Config
    from dmdd.errors import DmddError
    from dmdd.evaluation.stages import choose_map
    from dmdd.models.dmdd import DMDD

    original = ckpt.read_bytes()
    test = tiny_tree / "test"
    no_masks = ["--normal-dir", str(test / "good"), "--abnormal-dir", str(test / "scratch")]
    moved = tmp_path / "moved"
    for args, message in [(no_masks, "--choose-map needs masks"),
                          ([*labelled_args(tiny_tree), "--data-root", str(moved)], "pass --data-root DIR")]:  # fmt: skip
        assert main(["calibrate", str(ckpt), *args, "--choose-stages"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert ckpt.read_bytes() == original
    shutil.copytree(tiny_tree, moved)  # the training data moved: --data-root finds it
    assert main(["calibrate", str(ckpt), *labelled_args(tiny_tree), "--data-root", str(moved), "--choose-stages",
                 "--dry-run"]) == 0  # fmt: skip
    assert ckpt.read_bytes() == original
    cfg = Config().replace(model={"backbone": "efficientnet_lite0", "image_size": 64, "msn": True, "pretrained": False})
    with pytest.raises(DmddError, match="needs the plain-sum model"):
        choose_map(DMDD(cfg.model), cfg, [], [], lambda c: None, torch.device("cpu"))


def test_a_chosen_map_exports_to_onnx_with_the_same_maps(ckpt, tiny_tree):
    pytest.importorskip("onnxruntime")
    from dmdd.checkpoint import save_checkpoint
    from dmdd.deploy.export import export_onnx

    assert main(["calibrate", str(ckpt), *labelled_args(tiny_tree), "--choose-map"]) == 0
    stored = load_checkpoint(ckpt)
    # whatever was chosen, impose a subset of stages and the wider regional window to test their graph
    stored["config"]["model"] |= {"fused_stages": [1, 2, 3], "regional_windows": [7, 9]}
    save_checkpoint(ckpt, stored)
    model, payload = restore_model(ckpt)
    assert model.fused is not None and model.regional.windows == {2: 7, 3: 9}
    report = export_onnx(model, ckpt.parent / "m.onnx", payload["thresholds"])  # raises when the maps differ
    assert report["max_abs_diff"] < 1e-4


def test_a_checkpoint_without_held_out_scores_scores_them_again_or_says_it_cannot(ckpt, tiny_tree, tmp_path, capsys):
    """Checkpoints written before training stored the held-out scores: the false-alarm rules score the held-out images
    again from the training data (--data-root where it moved); where it cannot be read, the labelled good images
    alone set the threshold and the output says so."""
    from dmdd.checkpoint import save_checkpoint

    payload = load_checkpoint(ckpt)
    stored = payload["thresholds"]["normal"].pop("scores")
    save_checkpoint(ckpt, payload)
    moved = tmp_path / "moved"
    assert main(["calibrate", str(ckpt), *labelled_args(tiny_tree), "--rule", RULE, "--data-root", str(moved),
                 "--json"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert report["thresholds"]["labelled"]["held_out_good"] is None
    assert any("held-out good training images were not found" in w for w in report["warnings"])
    shutil.copytree(tiny_tree, moved)
    assert main(["calibrate", str(ckpt), *labelled_args(tiny_tree), "--rule", RULE, "--data-root", str(moved),
                 "--json"]) == 0  # fmt: skip
    pool = json.loads(capsys.readouterr().out)["thresholds"]["labelled"]["held_out_good"]
    good = load_checkpoint(ckpt)["thresholds"]["labelled"]
    assert pool["count"] == len(stored) == 2 and good["held_out_good"] == pool
