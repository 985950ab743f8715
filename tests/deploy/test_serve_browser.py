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
