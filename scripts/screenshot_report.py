"""Render a pipeline report page in headless Chromium, check that every image loaded, and save a screenshot.

    python scripts/screenshot_report.py runs/fashion/report/index.html --output docs/report_screenshot.png

Why a browser: the page is what a person looks at, so "the report works" means a real browser loaded every
picture it references. The page's inline script (generator/report.py) writes "images loaded: k/n; page height:
H" into its title once loaded; `--dump-dom` returns the DOM after that, so the title says whether every image
loaded and how tall the full-page screenshot must be. Chromium: Debian's `chromium` (apt-get install chromium),
run with `--headless --no-sandbox --disable-gpu`. Exit status 1 when an image failed to load or no title came back.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
TITLE = re.compile(r"<title>images loaded: (\d+)/(\d+); page height: (\d+)</title>")
WIDTH = 1280


def find_browser(explicit: str | None) -> str:
    """The Chromium executable: `explicit`, else the first of BROWSERS on PATH."""
    found = explicit or next((b for b in BROWSERS if shutil.which(b)), None)
    if not found or not shutil.which(found):
        raise SystemExit(f"no Chromium found ({explicit or ', '.join(BROWSERS)}); on Debian: apt-get install chromium")
    return found


def _run(browser: str, arguments: list[str], timeout: int) -> str:
    with tempfile.TemporaryDirectory(prefix="chromium_profile_") as profile:   # no state left in $HOME
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                   f"--user-data-dir={profile}", "--virtual-time-budget=10000", *arguments]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise SystemExit(f"{browser} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return result.stdout


def check_images(browser: str, page: Path, timeout: int = 120) -> tuple[int, int, int]:
    """(images loaded, images on the page, page height in px) as the page's own script reports them."""
    match = TITLE.search(_run(browser, ["--dump-dom", page.resolve().as_uri()], timeout))
    if match is None:
        raise SystemExit(f"{page}: the page title carries no image count (not a pipeline report, or its script "
                         "did not run)")
    loaded, total, height = (int(g) for g in match.groups())
    return loaded, total, height


def screenshot(browser: str, page: Path, output: Path, height: int, timeout: int = 120) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    _run(browser, [f"--screenshot={output.resolve()}", f"--window-size={WIDTH},{height}",
                   page.resolve().as_uri()], timeout)
    if not output.is_file():
        raise SystemExit(f"{browser} wrote no screenshot to {output}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("page", type=Path, help="the report's index.html")
    parser.add_argument("--output", type=Path, default=Path("docs/report_screenshot.png"))
    parser.add_argument("--browser", help=f"Chromium executable (default: the first of {', '.join(BROWSERS)})")
    args = parser.parse_args(argv)
    if not args.page.is_file():
        parser.error(f"{args.page} not found")
    browser = find_browser(args.browser)
    loaded, total, height = check_images(browser, args.page)
    print(f"{args.page}: {loaded}/{total} images loaded, page height {height} px")
    if total == 0 or loaded != total:
        print(f"error: {total - loaded} image(s) did not load", file=sys.stderr)
        return 1
    screenshot(browser, args.page, args.output, height)
    print(f"screenshot: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
