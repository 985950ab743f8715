"""Drive the `dmdd serve` page in headless Chromium (Debian's `chromium`, through Playwright; nothing downloaded):
upload images, read the gallery, move the threshold slider to both ends, save a screenshot; or, with --defective,
mark uploads good / defective, preview the calibration and save it.

The browser tests run this against a tiny model. docs/figures/serve_screenshot.png comes from a copy of the dev
suite's tire model (runs/benchmark/dev/tire/tire/dmdd-lite0-250steps-seed0/run/last.pt), with tire test images
copied under distinct names (good_000..009 from test/good; cut_, hole_, contamination_000..001):

    python scripts/browse_serve.py COPY/last.pt shot/good/*.png --defective shot/bad/*.png \
        --rule recall-at-fpr=0.1 --png docs/figures/serve_screenshot.png
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import threading
import time
from pathlib import Path

from screenshot_report import find_chromium


@contextlib.contextmanager
def live_server(app):
    """Serve an ASGI app with uvicorn on a free port of 127.0.0.1 in a thread; yields its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def cards(page) -> list[dict]:
    """The gallery as the user sees it: name, score and decision of each card, top to bottom."""
    return page.eval_on_selector_all(
        ".card",
        """cards => cards.map(c => ({name: c.dataset.name, score: parseFloat(c.querySelector('.score').textContent),
            decision: c.querySelector('.decision').textContent, overlay: c.querySelector('img').naturalWidth}))""",
    )


@contextlib.contextmanager
def uploaded_page(base_url: str, images: list[Path], height: int = 900):
    """Headless Chromium on the app's page with ``images`` uploaded and their cards shown; yields the page."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=find_chromium(), args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": height})
            page.goto(base_url + "/")
            page.set_input_files("#file-input", [str(i) for i in images])
            page.wait_for_function(f"document.querySelectorAll('.card img').length === {len(images)}", timeout=60_000)
            yield page
        finally:
            browser.close()


def inspect_in_browser(base_url: str, images: list[Path], png: Path | None = None) -> dict:
    """Upload ``images`` on the page, wait for their cards, click the first image (mask) and back, then press End
    and Home on the slider.

    Returns the cards after the upload, whether the click showed the mask, the cards with the slider at its maximum
    (End) and at its minimum (Home), and the threshold shown at first.
    """
    with uploaded_page(base_url, images) as page:
        page.wait_for_function("[...document.querySelectorAll('.card img')].every(i => i.complete)")
        first = {"cards": cards(page), "threshold": page.text_content("#threshold-value"),
                 "counts": page.text_content("#counts")}  # fmt: skip
        if png is not None:
            png.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(png), full_page=True)
        page.click(".card img")  # the mask instead of the overlay
        mask_shown = page.get_attribute(".card img", "class") == "mask"
        page.click(".card img")
        slider = page.locator("#threshold")
        slider.focus()
        slider.press("End")
        at_max = cards(page)
        slider.press("Home")
        at_min = cards(page)
        return {**first, "mask_shown": mask_shown, "at_max": at_max, "at_min": at_min}


def calibrate_in_browser(base_url: str, good: list[Path], defective: list[Path], rule: str = "f1",
                         png: Path | None = None) -> dict:  # fmt: skip
    """Upload good and defective images, mark their cards, preview the calibration, then save it.

    Returns the preview's text and slider value, the cards after saving, the threshold source shown and whether the
    histogram and ROC canvases were drawn.
    """
    with uploaded_page(base_url, [*good, *defective], height=1100) as page:
        for path in good:
            page.click(f'.card[data-name="{path.name}"] .labels button[data-label="0"]')
        for path in defective:
            page.click(f'.card[data-name="{path.name}"] .labels button[data-label="1"]')
        page.click("#calibration summary")
        name, _, rate = rule.partition("=")
        page.select_option("#rule", name)
        if rate:
            page.fill("#rate", rate)
        page.click("#calibrate-preview")
        page.wait_for_function("document.querySelector('#calibration-text').textContent.startsWith('Preview')")
        preview = {"text": page.text_content("#calibration-text"), "threshold": page.text_content("#threshold-value"),
                   "drawn": page.evaluate("""() => ['histogram', 'roc'].map(id => { const c = document.getElementById(id);
                       return c.getContext('2d').getImageData(0, 0, c.width, c.height).data.some(v => v > 0); })""")}  # fmt: skip
        page.click("#calibrate-save")
        page.wait_for_function("document.querySelector('#calibration-text').textContent.startsWith('Saved')")
        page.wait_for_function("[...document.querySelectorAll('.card img')].every(i => i.complete)")
        saved = {"cards": cards(page), "source": page.text_content("#threshold-source"),
                 "text": page.text_content("#calibration-text"), "counts": page.text_content("#counts")}  # fmt: skip
        if png is not None:
            png.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(png), full_page=True)
        return {"preview": preview, **saved}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="checkpoint or exported .onnx to serve")
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--png", type=Path, required=True)
    p.add_argument("--defective", nargs="+", type=Path,
                   help="calibrate: IMAGES are known good, these known defective; the labelled thresholds are "
                        "SAVED INTO THE MODEL's checkpoint (use a copy)")  # fmt: skip
    p.add_argument("--rule", default="f1")
    args = p.parse_args()
    from dmdd.deploy.serve import ServeSettings, create_app

    with live_server(create_app(ServeSettings(models=[args.model], device="cpu"))) as url:
        if args.defective:
            seen = calibrate_in_browser(url, args.images, args.defective, args.rule, args.png)
            print(seen["preview"]["text"])
            print(seen["text"], seen["source"], seen["counts"])
        else:
            seen = inspect_in_browser(url, args.images, args.png)
    for card in seen["cards"]:
        print(f"{card['score']:8.3f}  {card['decision']:9s}  {card['name']}")
    print(f"threshold {seen.get('threshold') or seen['preview']['threshold']}; screenshot {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
