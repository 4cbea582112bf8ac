"""The report writer: Markdown + self-contained HTML, atomic files, embedded images; headless render."""

from __future__ import annotations

import base64
import importlib.util
import io
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from advdet.bench.report import Report, format_cell, markdown_to_html  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _solid(h: int, w: int, rgb: tuple[int, int, int]) -> np.ndarray:
    a = np.zeros((h, w, 3), np.uint8)
    a[:] = rgb
    return a


def _report() -> Report:
    rep = Report("Transfer <test> report")
    rep.add_text("Crafted at **eps = 16** on `shapes-val`.\n\n- one\n- two | pipe")
    rep.add_table("Box mAP", ["attack", "m1", "m2"], [["No Attack", 0.41234, 0.5], ["RAD", float("nan"), None]],
                  note="COCO mAP")
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0], color="blue")
    rep.add_figure("A plot", fig)
    plt.close(fig)
    rep.add_image_grid("Grid", [[_solid(24, 32, (255, 0, 0)), _solid(24, 32, (0, 255, 0))],
                                [_solid(24, 32, (0, 0, 255)), _solid(24, 32, (255, 255, 0))]],
                       ["img 1", "img 2"], ["clean", "adv"])
    return rep


def test_format_cell():
    assert format_cell(0.123456) == "0.1235"
    assert format_cell(float("nan")) == "-"
    assert format_cell(None) == "-"
    assert format_cell(np.int64(3)) == "3"
    assert format_cell("RAD") == "RAD"
    assert format_cell(1.5, "{:.1f}") == "1.5"


def test_markdown_to_html_subset():
    h = markdown_to_html("# Title\nsome **bold** and `a<b>` text\n\n- x\n- *y*\n\n```\nraw <tag>\n```")
    assert "<h2>Title</h2>" in h
    assert "<strong>bold</strong>" in h and "<code>a&lt;b&gt;</code>" in h
    assert "<ul>\n<li>x</li>\n<li><em>y</em></li>\n</ul>" in h
    assert "<pre><code>raw &lt;tag&gt;</code></pre>" in h


def test_write_markdown_and_html(tmp_path):
    rep = _report()
    out = rep.write(tmp_path / "rep")
    assert out == tmp_path / "rep"
    md = (out / "report.md").read_text()
    lines = md.splitlines()
    assert lines[0] == "# Transfer <test> report"
    i = lines.index("## Box mAP")
    assert lines[i + 2] == "| attack | m1 | m2 |"
    assert lines[i + 3] == "|---|---:|---:|"
    assert lines[i + 4] == "| No Attack | 0.4123 | 0.5000 |"
    assert lines[i + 5] == "| RAD | - | - |"
    assert "*COCO mAP*" in md
    # figure and grid files exist next to report.md and are linked
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 1 + 4
    for f in links:
        assert (out / f).is_file()
    grid_files = [f for f in links if f.startswith("grid_")]
    first = np.asarray(Image.open(out / grid_files[0]))
    assert first.shape == (24, 32, 3) and (first == (255, 0, 0)).all()

    page = (out / "index.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "<title>Transfer &lt;test&gt; report</title>" in page
    # self-contained: no external URL, no scripts, no linked stylesheets
    assert not re.search(r"(src|href)=\"(https?:|//)", page)
    assert "<script" not in page and "<link" not in page
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(uris) == 5
    decoded = [base64.b64decode(u) for u in uris]
    assert decoded[0] == (out / links[0]).read_bytes()  # the figure, byte for byte
    img = np.asarray(Image.open(io.BytesIO(decoded[1])))
    assert (img == (255, 0, 0)).all()
    assert '<td class="num">0.4123</td>' in page and "<td>No Attack</td>" in page
    # no temp files left behind, writing again gives identical bytes
    assert not list(out.glob("*.tmp"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _report().write(out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_bad_input_is_rejected():
    rep = Report("x")
    with pytest.raises(ValueError, match="row 0 has 2 cells"):
        rep.add_table("t", ["a", "b", "c"], [[1, 2]])
    with pytest.raises(TypeError, match="uint8"):
        rep.add_image_grid("g", [[np.zeros((4, 4, 3), np.float32)]], ["r"], ["c"])
    with pytest.raises(ValueError, match="1 rows but 2 row labels"):
        rep.add_image_grid("g", [[_solid(4, 4, (0, 0, 0))]], ["r", "s"], ["c"])
    with pytest.raises(TypeError, match="matplotlib Figure"):
        rep.add_figure("f", np.zeros((3, 3)))


def test_same_titles_get_distinct_files(tmp_path):
    rep = Report("x")
    for _ in range(2):
        fig, ax = plt.subplots(figsize=(1, 1))
        rep.add_figure("Same", fig)
        plt.close(fig)
        rep.add_image_grid("Same", [[_solid(4, 4, (1, 2, 3))]], ["r"], ["c"])
    out = rep.write(tmp_path)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["fig_same.png", "fig_same_2.png", "grid_same_2_r0_c0.png", "grid_same_r0_c0.png"]


def _render_module():
    spec = importlib.util.spec_from_file_location("check_report_render", ROOT / "benchmarks" / "check_report_render.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_html_renders_in_headless_chromium(tmp_path):
    mod = _render_module()
    if mod.find_chromium() is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install -y chromium); render check not run")
    out = _report().write(tmp_path / "rep")
    shot = mod.render(out / "index.html", tmp_path / "shot.png", width=900, height=1200)
    stats = mod.screenshot_stats(shot)
    assert stats["non_white_fraction"] > 0.01
    # the embedded base64 grid images are drawn: pure red and pure green patches of 24x32 pixels
    assert mod.count_colour(shot, (255, 0, 0), tol=2) >= 24 * 32 * 0.9
    assert mod.count_colour(shot, (0, 255, 0), tol=2) >= 24 * 32 * 0.9
    # a blank page is detected as blank
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    assert mod.screenshot_stats(mod.render(blank, tmp_path / "b.png", 400, 300))["non_white_fraction"] < 0.01
