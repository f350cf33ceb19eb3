"""Open leaderboard.html in headless Chromium: save a screenshot and the rendered DOM.

    python evals/screenshot_leaderboard.py artifacts/evaluate/leaderboard.html [--out DIR] [--sort tasks:1:desc]

A broken page (bad markup, a script error that stops sorting) shows in the screenshot and in the
DOM after the script ran. Needs Debian's `chromium` (apt-get install chromium).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _run(browser: str, args: list[str], url: str, timeout: int) -> subprocess.CompletedProcess:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--allow-file-access-from-files", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def screenshot(html: Path, png: Path, width: int = 1400, height: int = 1000, timeout: int = 60) -> None:
    browser = chromium()
    if browser is None:
        raise RuntimeError("chromium not found (apt-get install chromium)")
    png.parent.mkdir(parents=True, exist_ok=True)
    proc = _run(browser, [f"--screenshot={png.resolve()}", f"--window-size={width},{height}"],
                html.resolve().as_uri(), timeout)
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot: {proc.stderr[-500:]}")


def rendered_dom(html: Path, fragment: str = "", timeout: int = 60) -> str:
    """The DOM after the page's scripts ran (`fragment` e.g. 'sort=tasks:1:desc')."""
    browser = chromium()
    if browser is None:
        raise RuntimeError("chromium not found (apt-get install chromium)")
    url = html.resolve().as_uri() + (f"#{fragment}" if fragment else "")
    proc = _run(browser, ["--dump-dom", "--virtual-time-budget=2000"], url, timeout)
    if proc.returncode != 0 or "<table" not in proc.stdout:
        raise RuntimeError(f"chromium could not render {html}: {proc.stderr[-500:]}")
    return proc.stdout


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("html", type=Path)
    p.add_argument("--out", type=Path, default=None, help="directory (default: beside the html)")
    p.add_argument("--sort", default="", help="sort spec applied before dumping the DOM, e.g. tasks:1:desc")
    args = p.parse_args(argv)
    out = args.out or args.html.parent
    png = out / (args.html.stem + ".screenshot.png")
    screenshot(args.html, png)
    dom = rendered_dom(args.html, f"sort={args.sort}" if args.sort else "")
    (out / (args.html.stem + ".dom.html")).write_text(dom, encoding="utf-8")
    print(f"{png}: {png.stat().st_size} bytes; DOM {len(dom)} chars")
    return 0


if __name__ == "__main__":
    sys.exit(main())
