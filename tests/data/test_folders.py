"""Plain folders on the command line: good images only, rejects with partial or no masks, nested, mixed formats."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dmdd.cli import main
from dmdd.data import detect_layout, load_category
from dmdd.data.datasets import folder_test_records, list_categories

TINY = ["--backbone", "efficientnet_lite0", "--image-size", "64", "--steps", "1", "--batch-size", "4",
        "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def plain(tiny_tree, tmp_path_factory) -> Path:
    """my_parts/good (nested, png + jpg), my_parts/rejects/{scratch,spot} and masks for only some rejects."""
    root = tmp_path_factory.mktemp("plain") / "my_parts"
    good = root / "good"
    (good / "line2").mkdir(parents=True)
    for i, src in enumerate(sorted((tiny_tree / "train/good").glob("*.png"))):
        target = good / ("line2" if i % 2 else "") / f"part{i}.{'jpg' if i % 3 == 0 else 'png'}"
        Image.open(src).convert("RGB").save(target)
    for kind in ("scratch", "spot"):
        (root / "rejects" / kind).mkdir(parents=True)
        for src in sorted((tiny_tree / "test" / kind).glob("*.png")):  # unique names across defect types
            shutil.copy(src, root / "rejects" / kind / f"{kind}_{src.name}")
    shutil.copytree(tiny_tree / "test/good", root / "holdout_good")
    masks = root / "masks"
    masks.mkdir()
    for src in sorted((tiny_tree / "ground_truth/scratch").glob("*.png")):  # scratch masks only
        shutil.copy(src, masks / f"scratch_{src.name}")
    return root


def test_layouts_are_detected_and_listed(plain, tiny_tree):
    assert detect_layout(plain / "good") == "folder"
    assert len(load_category(plain / "good").train) == 8  # nested folder and both formats found
    assert detect_layout(tiny_tree) == "mvtec"
    assert list_categories(tiny_tree.parent) == [tiny_tree.name]


def test_a_category_with_good_beside_defect_folders(tmp_path, tiny_tree):
    root = tmp_path / "cat"
    shutil.copytree(tiny_tree / "train/good", root / "good")
    shutil.copytree(tiny_tree / "test/scratch", root / "scratch")
    shutil.copytree(tiny_tree / "ground_truth/scratch", root / "ground_truth/scratch")
    assert detect_layout(root) == "classes"
    cat = load_category(root)
    assert len(cat.train) == 8 and {r.defect_type for r in cat.test} == {"scratch"}
    assert all(r.mask is not None and r.label == 1 for r in cat.test)


def test_unknown_layout_lists_what_was_found(tmp_path):
    (tmp_path / "empty_a").mkdir()
    (tmp_path / "notes").mkdir()
    with pytest.raises(Exception, match=r"sub-folders: \['empty_a', 'notes'\]"):
        detect_layout(tmp_path)


def test_partial_masks_are_matched_by_stem(plain):
    dirs = {"scratch": plain / "rejects/scratch", "spot": plain / "rejects/spot", "good": plain / "holdout_good"}
    records = folder_test_records(dirs, plain / "masks")
    with_mask = {r.defect_type for r in records if r.mask is not None}
    assert with_mask == {"scratch"} and sum(r.label for r in records) == 4


@pytest.fixture(scope="module")
def trained_plain(plain):
    out = plain.parent / "run"
    assert main(["train", "--data", str(plain / "good"), "--out", str(out), *TINY]) == 0
    return out / "last.pt"


def test_train_on_a_plain_folder_with_data_or_normal_dir(plain, trained_plain, tmp_path):
    assert trained_plain.is_file()
    assert main(["train", "--normal-dir", str(plain / "good"), "--out", str(tmp_path / "r"), *TINY]) == 0


def test_test_without_masks_gives_image_metrics_and_says_why(plain, trained_plain, tmp_path):
    out = tmp_path / "nomask"
    assert main(["test", str(trained_plain), "--normal-dir", str(plain / "holdout_good"),
                 "--abnormal-dir", str(plain / "rejects/scratch"), "--abnormal-dir", f"dots={plain / 'rejects/spot'}",
                 "--out", str(out)]) == 0  # fmt: skip
    overall = json.loads((out / "metrics.json").read_text())["overall"]
    assert overall["image_auroc"] is not None and overall["pixel_auroc"] is None and overall["au_pro"] is None
    assert overall["defective"] == 4 and overall["defective_with_masks"] == 0
    types = set(json.loads((out / "metrics.json").read_text())["per_defect_type"])
    assert types == {"scratch", "dots"}
    page = (out / "report.html").read_text()
    assert "Pixel metrics need masks" in page and "none of the defective images" in page


def test_test_with_partial_masks_uses_those_images(plain, trained_plain, tmp_path):
    out = tmp_path / "partial"
    assert main(["test", str(trained_plain), "--normal-dir", str(plain / "holdout_good"),
                 "--abnormal-dir", str(plain / "rejects/scratch"), "--abnormal-dir", str(plain / "rejects/spot"),
                 "--mask-dir", str(plain / "masks"), "--out", str(out)]) == 0  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["overall"]["defective_with_masks"] == 2 and metrics["overall"]["pixel_auroc"] is not None
    assert metrics["per_defect_type"]["spot"]["pixel_auroc"] is None
    assert "2 of 4 defective images have one" in (out / "report.html").read_text()


def test_plain_folder_errors_are_one_line(plain, trained_plain, tmp_path, capsys):
    assert main(["test", str(trained_plain), "--abnormal-dir", str(tmp_path / "nope")]) == 2
    assert "test folder not found" in capsys.readouterr().err
    assert main(["test", str(trained_plain), "--abnormal-dir", str(plain / "rejects/spot"),
                 "--mask-dir", str(tmp_path / "nomasks")]) == 2  # fmt: skip
    assert "mask folder not found" in capsys.readouterr().err
    bad = tmp_path / "junk"
    bad.mkdir()
    (bad / "a.txt").write_text("x")
    assert main(["train", "--data", str(bad), "--out", str(tmp_path / "x"), *TINY]) == 2
    assert "unknown dataset layout" in capsys.readouterr().err


def test_resize_mode_is_stored_and_used_by_predict_and_the_onnx_inferencer(tiny_tree, tmp_path):
    from dmdd.checkpoint import load_checkpoint
    from dmdd.deploy.inference import OnnxInferencer
    from dmdd.deploy.predict import Predictor

    good = tmp_path / "wide"
    good.mkdir()
    for i, src in enumerate(sorted((tiny_tree / "train/good").glob("*.png"))):
        Image.open(src).resize((96, 48)).save(good / f"w{i}.png")  # 2:1 images
    out = tmp_path / "run"
    assert main(["train", "--data", str(good), "--resize", "pad", "--out", str(out), *TINY]) == 0
    assert load_checkpoint(out / "last.pt")["config"]["model"]["resize"] == "pad"
    pred = tmp_path / "pred"
    assert main(["predict", str(out / "last.pt"), str(good / "w0.png"), "--out", str(pred)]) == 0
    summary = json.loads((pred / "results.json").read_text())
    assert Image.open(summary["images"][0]["overlay"]).size == (96, 48)
    assert main(["export", str(out / "last.pt"), "--format", "onnx"]) == 0
    rgb = np.asarray(Image.open(good / "w0.png").convert("RGB"))
    detection = OnnxInferencer(out / "model.onnx").predict(rgb)
    predictor = Predictor(out / "last.pt", "cpu")
    scores, maps = predictor.score([predictor_input(rgb, predictor)])
    assert detection.anomaly_map.shape == (48, 96)
    assert abs(detection.score - float(scores[0])) <= 1e-4 * max(1.0, abs(float(scores[0])))


def predictor_input(rgb, predictor):
    from dmdd.data.geometry import to_square

    return to_square(rgb, predictor.image_size, predictor.resize)
