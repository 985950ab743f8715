"""`dmdd serve` in a real browser: headless Chromium uploads a tire test image, sees its overlay and score, and the
decision follows the threshold slider without another request to the model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import SHARED_DATA, tiny_config

from dmdd.deploy.serve import ServeSettings, create_app
from dmdd.training.loop import fit

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from browse_serve import inspect_in_browser, live_server  # noqa: E402
from screenshot_report import find_chromium  # noqa: E402

pytest.importorskip("playwright", reason="the browser test needs playwright (the dev extra)")


@pytest.mark.skipif(find_chromium() is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
def test_upload_shows_overlay_and_score_and_the_slider_changes_the_decision(tiny_tree, tmp_path):
    ckpt = fit(tiny_config(tiny_tree), tmp_path / "run", progress=False)
    tire = SHARED_DATA / "tire" / "test" / "cut" / "000.png"
    # a tire test image when the shared data is here; else one of the generated test images (same flow)
    image = tire if tire.is_file() else sorted((tiny_tree / "test" / "scratch").glob("*.png"))[0]
    app = create_app(ServeSettings(models=[ckpt], device="cpu"))
    with live_server(app) as url:
        seen = inspect_in_browser(url, [image], tmp_path / "page.png")
    (card,) = seen["cards"]
    assert card["name"] == image.name and card["overlay"] > 0  # the overlay image decoded in the browser
    assert seen["mask_shown"]  # a click shows the mask at the pixel threshold
    threshold = float(seen["threshold"])
    assert card["decision"] == ("anomalous" if card["score"] >= threshold else "good")
    assert seen["counts"] == f"{int(card['score'] >= threshold)} of 1 anomalous"
    # the slider at its maximum lies above every score, at its minimum below: the decision flips both ways
    assert seen["at_max"][0]["decision"] == "good" and seen["at_min"][0]["decision"] == "anomalous"
    assert (tmp_path / "page.png").stat().st_size > 10_000


@pytest.mark.skipif(find_chromium() is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
def test_marking_cards_calibrates_shows_histogram_and_roc_and_saves_the_clis_threshold(tiny_tree, tmp_path, capsys):
    import json
    import shutil

    from browse_serve import calibrate_in_browser

    from dmdd.checkpoint import load_checkpoint
    from dmdd.cli import main

    ckpt = fit(tiny_config(tiny_tree), tmp_path / "run", progress=False)
    good, bad = tmp_path / "good", tmp_path / "bad"  # distinct names: cards are found by file name
    good.mkdir(), bad.mkdir()
    for i, path in enumerate(sorted((tiny_tree / "test" / "good").glob("*.png"))):
        shutil.copy(path, good / f"good{i}.png")
    for i, path in enumerate(sorted((tiny_tree / "test").glob("[!g]*/*.png"))):
        shutil.copy(path, bad / f"bad{i}.png")
    cli = ["calibrate", str(ckpt), "--normal-dir", str(good), "--abnormal-dir", str(bad), "--dry-run", "--json"]
    assert main(cli) == 0
    by_cli = json.loads(capsys.readouterr().out)["thresholds"]["image"]
    with live_server(create_app(ServeSettings(models=[ckpt], device="cpu"))) as url:
        seen = calibrate_in_browser(url, sorted(good.glob("*.png")), sorted(bad.glob("*.png")))
    stored = load_checkpoint(ckpt)["thresholds"]
    assert seen["preview"]["text"].startswith("Preview: rule f1") and "Expected on new parts" in seen["preview"]["text"]
    assert seen["preview"]["drawn"] == [True, True]  # histogram and ROC painted
    assert stored["mode"] == "labelled" and stored["labelled"]["good_images"] == 3
    assert stored["labelled"]["defective_images"] == 6 and seen["source"].startswith("(labelled: rule f1 on 3 good")
    assert float(seen["preview"]["threshold"]) == pytest.approx(stored["image"], abs=5e-4)  # shown to 3 decimals
    assert stored["image"] == pytest.approx(by_cli, rel=1e-5, abs=1e-6)  # what the command line would store
    decided = [c for c in seen["cards"] if abs(c["score"] - stored["image"]) > 1e-3]  # scores are shown rounded
    assert decided and all(c["decision"] == ("anomalous" if c["score"] > stored["image"] else "good") for c in decided)
