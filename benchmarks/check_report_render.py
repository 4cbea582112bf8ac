"""Render a report's index.html in headless Chromium and check the screenshot is not blank.

    python benchmarks/check_report_render.py advdet-report [--out shot.png] [--width 1280] [--height 3000]

Uses Debian's ``chromium`` package (``apt-get install -y chromium``): ``chromium --headless
--screenshot``. The page is opened from a file:// URL with networking off, so a report that needed any
external resource would render without it. Prints the share of non-background pixels and the number
of distinct colours; exits 1 when the page rendered blank (fewer than 1% non-white pixels), 2 when no
Chromium is on PATH.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary on PATH, or None."""
    for name in CHROMIUM_NAMES:
        p = shutil.which(name)
        if p:
            return p
    return None


def render(html_path: str | os.PathLike, png_path: str | os.PathLike, width: int = 1280, height: int = 3000,
           timeout: float = 120.0, chromium: str | None = None) -> Path:
    """Screenshot ``html_path`` into ``png_path`` with headless Chromium; returns the PNG path."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError(f"no Chromium on PATH (tried {', '.join(CHROMIUM_NAMES)})")
    html_path, png_path = Path(html_path).resolve(), Path(png_path).resolve()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="advdet-chromium-") as profile:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--no-first-run", "--disable-extensions", "--disable-background-networking",
               f"--user-data-dir={profile}", "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
               f"--window-size={width},{height}", f"--screenshot={png_path}", html_path.as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if not png_path.is_file():
        raise RuntimeError(f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return png_path


def screenshot_stats(png_path: str | os.PathLike) -> dict:
    """Share of non-white pixels and distinct colours of a screenshot."""
    a = np.asarray(Image.open(png_path).convert("RGB")).astype(np.int16)
    non_white = (a < 245).any(axis=2)
    colours = np.unique(a.reshape(-1, 3) // 8, axis=0).shape[0]
    return {"width": int(a.shape[1]), "height": int(a.shape[0]),
            "non_white_fraction": float(non_white.mean()), "colours": int(colours)}


def count_colour(png_path: str | os.PathLike, rgb: tuple[int, int, int], tol: int = 8) -> int:
    """Number of screenshot pixels within ``tol`` of colour ``rgb`` (to find an embedded image)."""
    a = np.asarray(Image.open(png_path).convert("RGB")).astype(np.int16)
    return int((np.abs(a - np.asarray(rgb, dtype=np.int16)) <= tol).all(axis=2).sum())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", help="report folder (with index.html) or an HTML file")
    ap.add_argument("--out", default=None, help="screenshot PNG (default: REPORT/screenshot.png)")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=3000)
    args = ap.parse_args(argv)
    src = Path(args.report)
    html_path = src / "index.html" if src.is_dir() else src
    if not html_path.is_file():
        print(f"{html_path}: no such file", file=sys.stderr)
        return 2
    if find_chromium() is None:
        print("no chromium on PATH (apt-get install -y chromium)", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else html_path.parent / "screenshot.png"
    render(html_path, out, args.width, args.height)
    stats = screenshot_stats(out)
    print(f"{out}: {stats['width']}x{stats['height']}, non-white {stats['non_white_fraction']:.3%}, "
          f"{stats['colours']} colours")
    if stats["non_white_fraction"] < 0.01:
        print("BLANK: the page rendered (almost) nothing", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
