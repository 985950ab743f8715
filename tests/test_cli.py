"""The CLI driven as a user would: train -> test -> predict -> export -> ONNX inference, and user errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import read_labelled_test_set, reference_metrics
from PIL import Image

from dmdd.checkpoint import restore_model
from dmdd.cli import main

TINY = ["--backbone", "efficientnet_lite0", "--image-size", "64", "--epochs", "1", "--batch-size", "4", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tiny_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    config = out.parent / "cfg.yaml"
    config.write_text(yaml.safe_dump({"train": {"seg_steps": 1, "eval_size": 64, "holdout_fraction": 0.25}}))
    assert main(["train", "--data", str(tiny_tree.parent), "--category", tiny_tree.name, "--config", str(config),
                 "--out", str(out), *TINY]) == 0  # fmt: skip
    return out


def test_train_writes_checkpoint_and_resolved_config(trained):
    assert (trained / "last.pt").is_file()
    resolved = yaml.safe_load((trained / "config.yaml").read_text())
    assert resolved["train"]["seg_steps"] == 1 and resolved["model"]["image_size"] == 64  # file + flags merged


def test_test_writes_metrics_report_and_overlays(trained, tiny_tree, capsys):
    assert main(["test", str(trained / "last.pt"), "--data", str(tiny_tree), "--out", str(trained / "t")]) == 0
    metrics = json.loads((trained / "t/metrics.json").read_text())
    # the metrics of the checkpoint's own outputs on the test split (read with Pillow, scored with scikit-learn)
    model, _ = restore_model(trained / "last.pt")
    images, labels, masks, _ = read_labelled_test_set(tiny_tree)
    with torch.no_grad():
        out = model(images)
    expected = reference_metrics(out.pred_score.numpy(), out.anomaly_map[:, 0].numpy(), labels, masks)
    for key, value in expected.items():
        assert metrics["overall"][key] == pytest.approx(value, abs=1e-4), key
    page = (trained / "t/report.html").read_text()
    assert "<table>" in page and page.count("data:image/png;base64,") >= 4
    assert "report:" in capsys.readouterr().out


def test_predict_files_folders_globs_and_bad_files(trained, tiny_tree, tmp_path):
    folder = tmp_path / "incoming"
    shutil.copytree(tiny_tree / "test/scratch", folder)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "empty.jpg").write_bytes(b"")
    good = str(tiny_tree / "test/good/*.png")
    out = tmp_path / "pred"
    code = main(["predict", str(trained / "last.pt"), str(folder), good, str(tmp_path / "missing.png"),
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    summary = json.loads((out / "results.json").read_text())
    assert len(summary["images"]) == 2 + 3
    assert {Path(f["path"]).name for f in summary["failed"]} == {"broken.png", "empty.jpg", "missing.png"}
    first = summary["images"][0]
    assert Path(first["overlay"]).is_file() and Path(first["mask"]).is_file()
    mask = np.asarray(Image.open(first["mask"]))
    assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}
    assert (out / "results.csv").read_text().count("\n") == 1 + 5 + 3
    # image scores are z-scores and can lie below -1: a threshold far below all of them flags every image
    assert main(["predict", str(trained / "last.pt"), good, "--out", str(out), "--threshold=-1e9"]) == 0
    assert all(r["anomalous"] for r in json.loads((out / "results.json").read_text())["images"])


@pytest.mark.parametrize("fmt", ["onnx", "openvino", "torchscript"])
def test_export_with_parity_and_runtime_inference(trained, tiny_tree, tmp_path, fmt, capsys):
    assert main(["export", str(trained / "last.pt"), "--format", fmt, "--out", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the export's own check; the relative difference is the absolute one over max(1, |output|), never larger
    assert report["max_rel_diff"] <= 1e-4 and report["max_abs_diff"] >= report["max_rel_diff"]
    from dmdd.data.geometry import from_square, to_square
    from dmdd.deploy.inference import OnnxInferencer, OpenVinoInferencer
    from dmdd.deploy.predict import Predictor

    # The exported graph's maps and scores equal eager PyTorch's on the generated test images (not the export's
    # random check images), up to float32 rounding: 1e-4 of max(1, max |output|), dmdd.deploy.export's tolerance (the
    # summed standardised maps reach ~100, where float32 rounding alone is ~1e-5; measured on a demo model: < 1e-6
    # for ONNX and OpenVINO, 0 for TorchScript).
    model, _ = restore_model(trained / "last.pt")
    images = read_labelled_test_set(tiny_tree)[0]
    with torch.no_grad():
        eager = model(images)
    ref_scores, ref_maps = eager.pred_score.numpy(), eager.anomaly_map.numpy()
    if fmt == "torchscript":
        with torch.no_grad():
            scores, maps = (t.numpy() for t in torch.jit.load(str(tmp_path / "model.torchscript.pt"))(images))
    else:
        runtime = OnnxInferencer if fmt == "onnx" else OpenVinoInferencer
        detector = runtime(tmp_path / ("model.onnx" if fmt == "onnx" else "model.xml"))
        scores, maps = detector.run(images.numpy())
    assert maps.shape == ref_maps.shape == (9, 1, 64, 64) and np.ptp(ref_maps) > 1  # real maps, not constants
    assert np.abs(maps - ref_maps).max() <= 1e-4 * max(1.0, float(np.abs(ref_maps).max()))
    assert np.abs(scores - ref_scores).max() <= 1e-4 * max(1.0, float(np.abs(ref_scores).max()))
    if fmt == "torchscript":
        return
    # one image of another size and aspect, through the deployment API: the map at the image's own size and the
    # decisions equal those of dmdd's Predictor
    from dmdd.data import read_image

    image = np.ascontiguousarray(np.asarray(Image.fromarray(read_image(
        sorted((tiny_tree / "test/spot").glob("*.png"))[0])).resize((96, 64), Image.BILINEAR)))  # fmt: skip
    result = detector.predict(image)
    predictor = Predictor(trained / "last.pt", "cpu")
    score, square = predictor.score([to_square(image, 64, predictor.resize)])
    full = from_square(square[0], image.shape[:2], predictor.resize)
    assert result.anomaly_map.shape == full.shape == (64, 96)
    assert np.abs(result.anomaly_map - full).max() <= 1e-4 * max(1.0, float(np.abs(full).max()))
    assert abs(result.score - float(score[0])) <= 1e-4 * max(1.0, abs(float(score[0])))
    assert result.anomalous == (float(score[0]) >= predictor.image_threshold)


def test_train_over_a_dataset_root_trains_every_category(tmp_path):
    from dmdd.data.generated import make_demo_dataset

    for name in ("metal", "fabric"):
        make_demo_dataset(tmp_path / "data", name, size=64, train=4, test_good=1, test_per_defect=1)
    args = ["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "runs"), *TINY]
    assert main(args) == 0
    assert (tmp_path / "runs/metal/last.pt").is_file() and (tmp_path / "runs/fabric/last.pt").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--data", "/nonexistent/data"], "data folder not found: /nonexistent/data"),
        (["train"], "no data given"),
        (["train", "--data", "{tree}", "--backbone", "vgg"], "unknown backbone 'vgg'"),
        (["train", "--data", "{tree}", "--image-size", "100"], "multiple of 32"),
        (["train", "--data", "{tree}", "--config", "/nonexistent.yaml"], "config file not found"),
        (["test", "/nonexistent/last.pt", "--data", "{tree}"], "checkpoint not found"),
        (["predict", "{bogus}", "{tree}"], "not a dmdd checkpoint"),
        (["predict", "{ckpt}", "/nonexistent/*.png"], "no images to predict"),
        (["export", "{bogus}"], "not a dmdd checkpoint"),
    ],
)
def test_user_errors_print_one_line_and_exit_nonzero(argv, message, trained, tiny_tree, tmp_path, capsys):
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"garbage")
    subst = {"{tree}": str(tiny_tree), "{bogus}": str(bogus), "{ckpt}": str(trained / "last.pt")}
    argv = [subst.get(a, a) for a in argv]
    if argv[0] == "train":
        argv += ["--out", str(tmp_path / "out")]  # never write into the working directory
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dmdd: error:") and message in err and len(err.splitlines()) == 1
    assert "Traceback" not in err


def test_subprocess_error_has_no_traceback_but_debug_does(tmp_path):
    cmd = [sys.executable, "-m", "dmdd.cli", "train", "--data", str(tmp_path / "none")]
    plain = subprocess.run(cmd, capture_output=True, text=True)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr and "data folder not found" in plain.stderr
    debug = subprocess.run([*cmd, "--debug"], capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_every_verb_documents_its_options(capsys):
    for verb in ("train", "test", "predict", "export", "demo"):
        with pytest.raises(SystemExit) as info:
            main([verb, "--help"])
        assert info.value.code == 0
        text = capsys.readouterr().out
        assert "--out" in text
