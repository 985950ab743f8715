"""Render an HTML report in headless Chromium (Debian package `chromium`) and save a PNG screenshot.

python scripts/screenshot_report.py runs/demo/test/report.html docs/figures/report_screenshot.png
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
]  # fmt: skip


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 2400) -> Path:
    browser = find_chromium()
    if browser is None:
        raise RuntimeError("no Chromium found; install it (Debian: apt-get install chromium)")
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        cmd = [browser, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--screenshot={png.resolve()}", page.resolve().as_uri()]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return png


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("page", type=Path)
    p.add_argument("png", type=Path)
    p.add_argument("--height", type=int, default=2400)
    args = p.parse_args()
    print(screenshot(args.page, args.png, height=args.height))


if __name__ == "__main__":
    main()
