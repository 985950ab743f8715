"""The HTML report: self-contained, and rendered by headless Chromium when it is installed."""

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dmdd.evaluation import Predictions, compute_metrics
from dmdd.evaluation.report import write_report

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from screenshot_report import find_chromium, screenshot  # noqa: E402


def fake_predictions(tmp_path: Path) -> Predictions:
    rng = np.random.default_rng(0)
    paths, types = [], []
    masks = np.zeros((6, 32, 32), bool)
    for i in range(6):
        path = tmp_path / f"{i}.png"
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(path)
        paths.append(str(path))
        types.append("good" if i < 3 else "crack")
        if i >= 3:
            masks[i, 10:20, 8:12] = True
    maps = rng.random(masks.shape).astype(np.float32) + masks
    labels = np.array([0, 0, 0, 1, 1, 1])
    return Predictions(maps.reshape(6, -1).max(1), maps, masks, labels, types, paths)


def test_report_is_self_contained(tmp_path):
    p = fake_predictions(tmp_path)
    page = write_report(tmp_path / "r.html", compute_metrics(p), p, "T", {"thresholds": {"image": 0.5}})
    text = page.read_text()
    assert "<table>" in text and "crack" in text and "image: 0.5" in text
    assert 'src="http' not in text and text.count("data:image/png;base64,") >= 2 + 3  # curves + gallery


@pytest.mark.skipif(find_chromium() is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    p = fake_predictions(tmp_path)
    page = write_report(tmp_path / "r.html", compute_metrics(p), p, "Render check")
    png = screenshot(page, tmp_path / "shot.png", height=1200)
    shot = np.asarray(Image.open(png).convert("L"), dtype=np.float32)
    assert shot.shape == (1200, 1280)
    assert shot.std() > 10  # text, curves and images were drawn, not a blank page


def test_operating_point_counts_decisions_and_the_report_shows_it(tmp_path):
    from dmdd.evaluation import operating_point

    p = fake_predictions(tmp_path)
    p.scores[:] = [0.1, 0.2, 0.9, 0.5, 0.95, 0.15]  # good: 0.1 0.2 0.9; crack: 0.5 0.95 0.15
    op = operating_point(p, threshold=0.5)
    assert op["false_alarm_rate"] == pytest.approx(1 / 3) and op["detection_rate"] == pytest.approx(2 / 3)
    assert op["per_defect_type"] == {"crack": pytest.approx(2 / 3)}
    # at one false alarm in three, the best threshold sits just above 0.2: 0.5 and 0.95 pass, 0.15 not
    assert op["best_detection_rate_at_same_false_alarms"] == pytest.approx(2 / 3)
    assert operating_point(p, threshold=0.92)["best_detection_rate_at_same_false_alarms"] == pytest.approx(1 / 3)
    result = compute_metrics(p) | {"operating_point": {"mode": "normal", "target_fpr": 0.01, **op}}
    text = write_report(tmp_path / "r.html", result, p, "T").read_text()
    assert "Operating point" in text and "33.3 % of 3" in text and "target false-alarm rate 1 %" in text
