"""Figures and images of the benchmark reports (matplotlib ``Figure`` objects, no pyplot state, and
uint8 H x W x 3 images for ``Report.add_image_grid``).

- ``draw_detections``: an image with its boxes and class labels (RAD Fig. 6, 9);
- ``perturbation_image``: the perturbation times 5 around mid-grey (RAD Fig. 4);
- ``relevance_image``: a relevance map as a red (positive) / blue (negative) heat image (RAD Fig. 3, 8);
- ``eps_curve_figure``: mAP against eps, one line per victim (RAD Fig. 7);
- ``heatmap_figure``: a value matrix with its numbers (surrogate x victim, attack x victim; RAD Table 8);
- ``per_class_ap_figure``: grouped per-class AP bars (clean against attacked);
- ``new_figure`` / ``figure_png``: an empty Agg figure, and a figure as PNG bytes that are the same on every
  run (the other bench modules draw their figures with these).
"""

from __future__ import annotations

import io
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

__all__ = ["PALETTE", "draw_detections", "perturbation_image", "relevance_image", "placeholder_image",
           "eps_curve_figure", "heatmap_figure", "per_class_ap_figure", "to_hwc_uint8", "new_figure", "figure_png"]

#: box colours per class (tab10 in 0-255)
PALETTE = [tuple(int(round(255 * c)) for c in colormaps["tab10"](i)[:3]) for i in range(10)]


def new_figure(w: float, h: float, dpi: int = 100) -> Figure:
    """An empty ``w`` x ``h`` inch figure on the Agg canvas (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = Figure(figsize=(w, h), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """``fig`` as PNG bytes, tightly cropped, with fixed metadata: the same figure gives the same bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def to_hwc_uint8(img: Any, where: str = "image", *, floats: bool = True) -> np.ndarray:
    """(H, W, 3) uint8 from a uint8 or [0, 1] float image in HWC or CHW layout (tensor or array).

    ``floats=False`` accepts uint8 only (TypeError otherwise); ``where`` names the image in errors."""
    if hasattr(img, "detach"):
        img = img.detach().cpu().numpy()
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = np.transpose(a, (1, 2, 0))
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"{where}: expected an H x W x 3 (or 3 x H x W) RGB image, got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{where}: empty image {a.shape}")
    if a.dtype != np.uint8:
        if not floats:
            raise TypeError(f"{where}: expected a uint8 image, got {a.dtype}")
        a = np.clip(np.round(a.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a)


def draw_detections(image: Any, boxes: Any, labels: Any, scores: Any | None = None,
                    class_names: Sequence[str] | None = None, width: int = 2) -> np.ndarray:
    """A copy of ``image`` with xyxy ``boxes`` (image pixels) drawn in per-class colours and labelled
    ``name score``."""
    arr = to_hwc_uint8(image)
    im = Image.fromarray(arr.copy())
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default()
    b = np.asarray(boxes.detach().cpu() if hasattr(boxes, "detach") else boxes, dtype=np.float64).reshape(-1, 4)
    lab = np.asarray(labels.detach().cpu() if hasattr(labels, "detach") else labels).reshape(-1).astype(int)
    sc = None if scores is None else np.asarray(scores.detach().cpu() if hasattr(scores, "detach") else scores,
                                                dtype=np.float64).reshape(-1)
    for i, (x1, y1, x2, y2) in enumerate(b):
        color = PALETTE[lab[i] % len(PALETTE)]
        draw.rectangle([x1, y1, x2, y2], outline=color, width=width)
        name = class_names[lab[i]] if class_names is not None and 0 <= lab[i] < len(class_names) else str(lab[i])
        text = name if sc is None else f"{name} {sc[i]:.2f}"
        tx, ty = max(0.0, x1), max(0.0, y1 - 11)
        tb = draw.textbbox((tx, ty), text, font=font)
        draw.rectangle(tb, fill=color)
        draw.text((tx, ty), text, fill=(255, 255, 255), font=font)
    return np.asarray(im)


def perturbation_image(clean: Any, adv: Any, gain: float = 5.0) -> np.ndarray:
    """``127.5 + gain * (adv - clean)`` clipped to 0-255 (RAD Fig. 4 shows perturbations x5)."""
    c, a = to_hwc_uint8(clean).astype(np.float64), to_hwc_uint8(adv).astype(np.float64)
    if c.shape != a.shape:
        raise ValueError(f"perturbation_image: clean {c.shape} and adversarial {a.shape} differ")
    return np.clip(np.round(127.5 + gain * (a - c)), 0, 255).astype(np.uint8)


def relevance_image(rel: Any, scale: float | None = None, percentile: float = 99.5) -> np.ndarray:
    """A (H, W) relevance map as an RGB heat image: red positive, blue negative, white zero, normalised by
    ``scale`` (default: the ``percentile`` of |map|, so that a few extreme pixels do not wash it out)."""
    if hasattr(rel, "detach"):
        rel = rel.detach().cpu().numpy()
    m = np.asarray(rel, dtype=np.float64)
    if m.ndim == 3:
        m = m.sum(0) if m.shape[0] == 3 else m.squeeze(0)
    if m.ndim != 2:
        raise ValueError(f"relevance_image: expected an (H, W) map, got shape {m.shape}")
    m = np.nan_to_num(m)
    s = scale if scale is not None else float(np.percentile(np.abs(m), percentile))
    s = s if s > 0 else 1.0
    v = np.clip(m / s, -1.0, 1.0) * 0.5 + 0.5
    return np.round(colormaps["bwr"](v)[..., :3] * 255).astype(np.uint8)


def placeholder_image(h: int, w: int, text: str = "n/a") -> np.ndarray:
    """A light-grey (H, W, 3) image with a short text, for grid cells without content."""
    im = Image.new("RGB", (w, h), (235, 235, 235))
    ImageDraw.Draw(im).text((4, h // 2 - 6), text, fill=(90, 90, 90), font=ImageFont.load_default())
    return np.asarray(im)


def eps_curve_figure(eps: Sequence[float], series: Mapping[str, Sequence[float | None]], title: str,
                     ylabel: str = "box mAP", reference: Mapping[str, float] | None = None) -> Figure:
    """One line per victim of a metric against eps (RAD Fig. 7); ``reference`` (the clean values) is drawn
    at eps = 0."""
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    for name, ys in series.items():
        xs, vals = list(eps), list(ys)
        if reference and name in reference and reference[name] is not None:
            xs, vals = [0.0] + xs, [reference[name]] + vals
        pts = [(x, y) for x, y in zip(xs, vals) if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("eps (Linf, 0-255)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def heatmap_figure(values: Sequence[Sequence[float | None]], row_labels: Sequence[str], col_labels: Sequence[str],
                   title: str, fmt: str = "{:.1f}", scale: float = 100.0, cmap: str = "viridis") -> Figure:
    """A matrix as a heat map with each value printed (times ``scale``; None cells blank)."""
    a = np.array([[np.nan if v is None else float(v) * scale for v in row] for row in values], dtype=np.float64)
    if a.ndim != 2 or a.shape != (len(row_labels), len(col_labels)):
        raise ValueError(f"heatmap_figure: values {a.shape} do not fit {len(row_labels)} x {len(col_labels)} labels")
    fig = Figure(figsize=(1.2 + 0.9 * len(col_labels), 0.9 + 0.45 * len(row_labels)))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(np.ma.masked_invalid(a), cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(col_labels)), labels=list(col_labels), rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(row_labels)), labels=list(row_labels), fontsize=8)
    finite = a[np.isfinite(a)]
    mid = float(finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            if np.isfinite(a[i, j]):
                ax.text(j, i, fmt.format(a[i, j]), ha="center", va="center", fontsize=7,
                        color="black" if a[i, j] > mid else "white")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def per_class_ap_figure(class_names: Sequence[str], series: Mapping[str, Sequence[float | None]], title: str,
                        max_classes: int = 20) -> Figure:
    """Grouped bars: per class, one bar per series (e.g. No Attack and each attack). With more than
    ``max_classes`` classes the ones with the highest AP in the first series are shown."""
    names = list(class_names)
    keys = list(series)
    vals = np.array([[np.nan if v is None or v < 0 else v for v in series[k]] for k in keys], dtype=np.float64)
    order = list(range(len(names)))
    if len(names) > max_classes and keys:
        order = list(np.argsort(-np.nan_to_num(vals[0], nan=-1.0))[:max_classes])
    fig = Figure(figsize=(max(5.0, 0.5 * len(order) * max(1, len(keys)) / 2 + 2), 3.6))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(keys))
    for k, key in enumerate(keys):
        ax.bar(np.arange(len(order)) + (k - (len(keys) - 1) / 2) * width, np.nan_to_num(vals[k, order]),
               width=width, label=key)
    ax.set_xticks(range(len(order)), labels=[names[i] for i in order], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("AP@[.5:.95]")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=min(4, max(1, len(keys))))
    fig.tight_layout()
    return fig
