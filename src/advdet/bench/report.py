"""Benchmark reports: one ``Report`` collects text, tables, matplotlib figures and image grids and writes
them as ``report.md`` (Markdown tables, PNG files linked next to it) and a self-contained
``index.html`` (inline CSS, every image embedded as base64, no external resource, no script).

Usage::

    rep = Report("Transfer from yolov3")
    rep.add_text("Adversarial images crafted at **eps = 16** on `shapes-val`.")
    rep.add_table("Box mAP", ["attack", "ssd_vgg", "retinanet"], [["No Attack", 0.41, 0.38]],
                  note="COCO mAP@[.5:.95]")
    rep.add_figure("mAP vs eps", fig)                 # a matplotlib Figure, rendered at once
    rep.add_image_grid("Examples", [[clean, adv]], ["image 1"], ["clean", "adversarial"])
    rep.write("advdet-report")                        # -> Path("advdet-report")

Every file is written atomically (temp file, then rename; PNGs first, ``report.md``, ``index.html``
last), so a reader never sees a half-written report. Writing the same report twice gives the same
bytes (PNG metadata is fixed, figures are rendered once when added).
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from advdet.bench.plots import figure_png, to_hwc_uint8
from advdet.data.io import atomic_write_bytes

__all__ = ["Report", "format_cell", "markdown_to_html"]

FIGURE_DPI = 100


# ---------------------------------------------------------------------------------------- helpers
def format_cell(value: Any, float_format: str = "{:.4f}") -> str:
    """Text of one table cell: floats with ``float_format``, None / NaN as ``-``, everything else ``str``."""
    if value is None:
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return "-" if math.isnan(v) else float_format.format(v)
    if isinstance(value, np.integer):
        return str(int(value))
    return str(value)


def _slug(text: str, max_len: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return (s[:max_len].rstrip("_")) or "item"


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _figure_png(fig: Any) -> bytes:
    if not hasattr(fig, "savefig"):
        raise TypeError(f"Report.add_figure: expected a matplotlib Figure, got {type(fig).__name__}")
    return figure_png(fig, FIGURE_DPI)


_INLINE = [
    (re.compile(r"\*\*([^*]+)\*\*"), r"<strong>\1</strong>"),
    (re.compile(r"(?<![*\w])\*([^*\s][^*]*)\*(?![*\w])"), r"<em>\1</em>"),
    (re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)"), r'<a href="\2">\1</a>'),
]


def _inline_html(text: str) -> str:
    out = html.escape(text, quote=False)
    # code spans first, protected from the other rules
    codes: list[str] = []

    def _stash(m: re.Match) -> str:
        codes.append(m.group(1))
        return f"\x00{len(codes) - 1}\x00"

    out = re.sub(r"`([^`]+)`", _stash, out)
    for pat, rep in _INLINE:
        out = pat.sub(rep, out)
    return re.sub(r"\x00(\d+)\x00", lambda m: f"<code>{codes[int(m.group(1))]}</code>", out)


def markdown_to_html(md: str) -> str:
    """A small Markdown subset as HTML: ``#`` headings, paragraphs, ``-``/``*``/``1.`` lists, fenced code,
    inline code, bold, italics and links. Everything else is escaped text."""
    lines = md.replace("\r\n", "\n").split("\n")
    out: list[str] = []
    para: list[str] = []
    list_tag: str | None = None
    in_code = False
    code: list[str] = []

    def flush_para() -> None:
        if para:
            out.append("<p>" + _inline_html(" ".join(s.strip() for s in para)) + "</p>")
            para.clear()

    def close_list() -> None:
        nonlocal list_tag
        if list_tag:
            out.append(f"</{list_tag}>")
            list_tag = None

    for line in lines:
        if line.strip().startswith("```"):
            if in_code:
                out.append("<pre><code>" + html.escape("\n".join(code)) + "</code></pre>")
                code.clear()
                in_code = False
            else:
                flush_para()
                close_list()
                in_code = True
            continue
        if in_code:
            code.append(line)
            continue
        stripped = line.strip()
        m_head = re.match(r"^(#{1,6})\s+(.*)$", stripped)
        m_ul = re.match(r"^[-*]\s+(.*)$", stripped)
        m_ol = re.match(r"^\d+[.)]\s+(.*)$", stripped)
        if not stripped:
            flush_para()
            close_list()
        elif m_head:
            flush_para()
            close_list()
            level = min(6, len(m_head.group(1)) + 1)  # the report title is the only <h1>
            out.append(f"<h{level}>{_inline_html(m_head.group(2))}</h{level}>")
        elif m_ul or m_ol:
            flush_para()
            tag = "ul" if m_ul else "ol"
            if list_tag != tag:
                close_list()
                out.append(f"<{tag}>")
                list_tag = tag
            out.append("<li>" + _inline_html((m_ul or m_ol).group(1)) + "</li>")
        else:
            if list_tag:
                close_list()
            para.append(line)
    if in_code:
        out.append("<pre><code>" + html.escape("\n".join(code)) + "</code></pre>")
    flush_para()
    close_list()
    return "\n".join(out)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1200px;padding:0 1em;color:#1f2328;background:#fff;line-height:1.45}
h1{border-bottom:2px solid #d0d7de;padding-bottom:.3em}
h2{border-bottom:1px solid #d0d7de;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0 1em 0;font-size:.92em}
th,td{border:1px solid #d0d7de;padding:.3em .6em}
th{background:#f6f8fa;text-align:center}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#fbfcfd}
p.note{color:#57606a;font-size:.9em;margin-top:-.4em}
figure{margin:.6em 0 1.2em 0}
figure img{max-width:100%;border:1px solid #d0d7de}
table.grid td{border:none;padding:2px;text-align:center;vertical-align:top;background:#fff}
table.grid th{border:none;background:#fff;font-weight:600}
table.grid img{image-rendering:pixelated;border:1px solid #d0d7de}
code{background:#f6f8fa;padding:.1em .3em;border-radius:3px}
pre{background:#f6f8fa;padding:.6em;overflow:auto}
"""


# ---------------------------------------------------------------------------------------- blocks
@dataclass
class _Text:
    markdown: str


@dataclass
class _Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    numeric: list[list[bool]]
    note: str | None


@dataclass
class _Figure:
    title: str
    png: bytes
    file: str


@dataclass
class _Grid:
    title: str
    cells: list[list[tuple[bytes, str]]]  # (png, file) per cell
    row_labels: list[str]
    col_labels: list[str]
    sizes: list[list[tuple[int, int]]] = field(default_factory=list)


class Report:
    """A benchmark report (see the module docstring).

    Args:
        title: the report's title (``# title`` in Markdown, ``<title>`` and ``<h1>`` in HTML).
        float_format: how float table cells are printed (default 4 decimals).
    """

    def __init__(self, title: str, *, float_format: str = "{:.4f}"):
        self.title = str(title)
        self.float_format = float_format
        self._blocks: list[Any] = []
        self._files: set[str] = set()

    # ------------------------------------------------------------------ adding content
    def add_text(self, markdown: str) -> "Report":
        """A block of Markdown (headings, paragraphs, lists, code, bold/italic/links in HTML)."""
        self._blocks.append(_Text(str(markdown)))
        return self

    def add_table(self, title: str, columns: list[str], rows: list[list], note: str | None = None) -> "Report":
        """A table; every row must have ``len(columns)`` cells (floats formatted, None/NaN as ``-``)."""
        columns = [str(c) for c in columns]
        if not columns:
            raise ValueError(f"Report.add_table({title!r}): no columns")
        text_rows, numeric = [], []
        for i, row in enumerate(rows):
            row = list(row)
            if len(row) != len(columns):
                raise ValueError(f"Report.add_table({title!r}): row {i} has {len(row)} cells, "
                                 f"expected {len(columns)} ({columns})")
            text_rows.append([format_cell(v, self.float_format) for v in row])
            numeric.append([isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                            for v in row])
        self._blocks.append(_Table(str(title), columns, text_rows, numeric, note))
        return self

    def add_figure(self, title: str, fig: Any) -> "Report":
        """A matplotlib Figure, rendered to PNG now (the caller may close it afterwards)."""
        png = _figure_png(fig)
        self._blocks.append(_Figure(str(title), png, self._new_file(f"fig_{_slug(title)}", ".png")))
        return self

    def add_image_grid(self, title: str, images: Sequence[Sequence[Any]], row_labels: Sequence[str],
                       col_labels: Sequence[str]) -> "Report":
        """A grid of images (rows x columns, each H x W x 3 uint8) with row and column labels."""
        if len(images) != len(row_labels):
            raise ValueError(f"Report.add_image_grid({title!r}): {len(images)} rows but "
                             f"{len(row_labels)} row labels")
        stem = self._new_file(f"grid_{_slug(title)}", "")
        cells, sizes = [], []
        for r, row in enumerate(images):
            if len(row) != len(col_labels):
                raise ValueError(f"Report.add_image_grid({title!r}): row {r} has {len(row)} images but "
                                 f"{len(col_labels)} column labels")
            cr, sr = [], []
            for c, img in enumerate(row):
                a = to_hwc_uint8(img, f"Report.add_image_grid({title!r}) row {r} column {c}", floats=False)
                fname = f"{stem}_r{r}_c{c}.png"
                self._files.add(fname)
                cr.append((_png_bytes(a), fname))
                sr.append((a.shape[1], a.shape[0]))
            cells.append(cr)
            sizes.append(sr)
        self._blocks.append(_Grid(str(title), cells, [str(x) for x in row_labels],
                                  [str(x) for x in col_labels], sizes))
        return self

    def _new_file(self, stem: str, suffix: str) -> str:
        k = 1
        name = f"{stem}{suffix}"
        while name in self._files or f"{name}_r0_c0.png" in self._files:
            k += 1
            name = f"{stem}_{k}{suffix}"
        self._files.add(name)
        return name

    # ------------------------------------------------------------------ rendering
    def to_markdown(self) -> str:
        """The report as Markdown (images referenced by file name, relative to the report folder)."""
        out = [f"# {self.title}", ""]
        for b in self._blocks:
            if isinstance(b, _Text):
                out += [b.markdown.rstrip(), ""]
            elif isinstance(b, _Table):
                out += [f"## {b.title}", ""]
                out.append("| " + " | ".join(_md_cell(c) for c in b.columns) + " |")
                out.append("|" + "|".join("---:" if any(n[j] for n in b.numeric) else "---"
                                          for j in range(len(b.columns))) + "|")
                for row in b.rows:
                    out.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
                out.append("")
                if b.note:
                    out += [f"*{b.note}*", ""]
            elif isinstance(b, _Figure):
                out += [f"## {b.title}", "", f"![{b.title}]({b.file})", ""]
            elif isinstance(b, _Grid):
                out += [f"## {b.title}", ""]
                out.append("| | " + " | ".join(_md_cell(c) for c in b.col_labels) + " |")
                out.append("|---|" + "|".join("---" for _ in b.col_labels) + "|")
                for label, row in zip(b.row_labels, b.cells):
                    out.append(f"| {_md_cell(label)} | "
                               + " | ".join(f"![{_md_cell(label)}]({f})" for _, f in row) + " |")
                out.append("")
        return "\n".join(out).rstrip() + "\n"

    def to_html(self) -> str:
        """The report as one self-contained HTML page (inline CSS, base64 images, no scripts)."""
        esc = html.escape
        parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
                 '<meta name="viewport" content="width=device-width, initial-scale=1">',
                 f"<title>{esc(self.title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
                 f"<h1>{esc(self.title)}</h1>"]
        for b in self._blocks:
            if isinstance(b, _Text):
                parts.append(markdown_to_html(b.markdown))
            elif isinstance(b, _Table):
                parts.append(f"<h2>{esc(b.title)}</h2>")
                parts.append("<table><thead><tr>" + "".join(f"<th>{esc(c)}</th>" for c in b.columns)
                             + "</tr></thead><tbody>")
                for row, num in zip(b.rows, b.numeric):
                    parts.append("<tr>" + "".join(f'<td class="num">{esc(c)}</td>' if n else f"<td>{esc(c)}</td>"
                                                  for c, n in zip(row, num)) + "</tr>")
                parts.append("</tbody></table>")
                if b.note:
                    parts.append(f'<p class="note">{_inline_html(b.note)}</p>')
            elif isinstance(b, _Figure):
                parts.append(f"<h2>{esc(b.title)}</h2>")
                parts.append(f'<figure><img alt="{esc(b.title)}" src="{_data_uri(b.png)}"></figure>')
            elif isinstance(b, _Grid):
                parts.append(f"<h2>{esc(b.title)}</h2>")
                parts.append('<table class="grid"><thead><tr><th></th>'
                             + "".join(f"<th>{esc(c)}</th>" for c in b.col_labels) + "</tr></thead><tbody>")
                for label, row, srow in zip(b.row_labels, b.cells, b.sizes):
                    tds = "".join(f'<td><img alt="{esc(label)} / {esc(col)}" width="{w}" height="{h}" '
                                  f'src="{_data_uri(png)}"></td>'
                                  for (png, _), (w, h), col in zip(row, srow, b.col_labels))
                    parts.append(f"<tr><th>{esc(label)}</th>{tds}</tr>")
                parts.append("</tbody></table>")
        parts += ["</body>", "</html>"]
        return "\n".join(parts) + "\n"

    def write(self, out_dir: str | os.PathLike) -> Path:
        """Write the PNG files, ``report.md`` and ``index.html`` into ``out_dir`` (created), each atomically;
        returns ``out_dir`` as a Path."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for b in self._blocks:
            if isinstance(b, _Figure):
                atomic_write_bytes(out / b.file, b.png)
            elif isinstance(b, _Grid):
                for row in b.cells:
                    for png, fname in row:
                        atomic_write_bytes(out / fname, png)
        atomic_write_bytes(out / "report.md", self.to_markdown().encode("utf-8"))
        atomic_write_bytes(out / "index.html", self.to_html().encode("utf-8"))
        return out


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
