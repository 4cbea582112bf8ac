"""Relevance figures in the spirit of RAD Fig. 1 / 5: the image with its predicted boxes, SGLRP maps of a
few single boxes, and the Multi-Node SGLRP map. Drawn with matplotlib's Agg canvas (no display needed,
the global backend is not touched) and written atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch


def _to_hwc(image) -> np.ndarray:
    a = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.ndim != 3 or a.shape[-1] not in (1, 3):
        raise ValueError(f"image must be (3, H, W) or (H, W, 3), got shape {a.shape}")
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    a = np.clip(a.astype(np.float32), 0.0, 1.0)
    return np.repeat(a, 3, -1) if a.shape[-1] == 1 else a


def _to_map(m) -> np.ndarray:
    a = m.detach().cpu().double().numpy() if isinstance(m, torch.Tensor) else np.asarray(m, dtype=np.float64)
    a = np.squeeze(a)
    if a.ndim == 3:  # per-channel map: sum over channels
        a = a.sum(0) if a.shape[0] in (1, 3) else a.sum(-1)
    if a.ndim != 2:
        raise ValueError(f"a relevance map must be (H, W) (or per-channel), got shape {a.shape}")
    return np.nan_to_num(a)


def _boxes(b) -> np.ndarray:
    if b is None:
        return np.zeros((0, 4))
    a = b.detach().cpu().double().numpy() if isinstance(b, torch.Tensor) else np.asarray(b, dtype=np.float64)
    return a.reshape(-1, 4)


def _draw_box(ax, box, color, label=None) -> None:
    from matplotlib.patches import Rectangle

    x0, y0, x1, y1 = (float(v) for v in box)
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=1.5))
    if label:
        ax.text(x0, y0, label, color="white", fontsize=7, va="bottom",
                bbox=dict(facecolor=color, alpha=0.7, pad=1, edgecolor="none"))


def relevance_figure(image, boxes, single_maps: Sequence, multi_map, out_png: str | os.PathLike, *,
                     labels: Sequence[str] | None = None, single_boxes=None,
                     single_titles: Sequence[str] | None = None, title: str | None = None,
                     dpi: int = 100) -> Path:
    """Write a PNG: [image + predicted boxes] [SGLRP map of each single box] [Multi-Node SGLRP map].

    Args:
        image: (3, H, W) tensor / array in [0, 1] (or (H, W, 3), uint8 allowed).
        boxes: (M, 4) xyxy predicted boxes in pixels (drawn on the image); ``labels`` their captions.
        single_maps: k maps (H, W) (or per-channel (3, H, W), summed), one per single box.
        multi_map: the multi-node map (H, W) (or per-channel).
        out_png: output path; parent directories are created; written atomically.
        single_boxes: (k, 4) the box of each single map (outlined on its panel); default: the first k of
            ``boxes`` when there are that many.
        single_titles: panel titles of the single maps (default "SGLRP on box i" or on its label).
    Maps are shown with a diverging colormap centred at 0 (red positive, blue negative), each scaled by
    its own largest absolute value.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    img = _to_hwc(image)
    bx = _boxes(boxes)
    maps = [_to_map(m) for m in single_maps]
    mm = _to_map(multi_map)
    sb = _boxes(single_boxes) if single_boxes is not None else (bx[: len(maps)] if len(bx) >= len(maps) else None)
    n = 2 + len(maps)
    fig = Figure(figsize=(2.6 * n, 2.9), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False)[0]
    axes[0].imshow(img)
    for i, b in enumerate(bx):
        _draw_box(axes[0], b, "tab:green", labels[i] if labels is not None and i < len(labels) else None)
    axes[0].set_title("Prediction", fontsize=9)

    def show(ax, m, t):
        v = float(np.abs(m).max()) or 1.0
        ax.imshow(m, cmap="bwr", vmin=-v, vmax=v)
        ax.set_title(t, fontsize=9)

    for j, m in enumerate(maps):
        name = (single_titles[j] if single_titles is not None and j < len(single_titles)
                else f"SGLRP on {labels[j]}" if labels is not None and j < len(labels) else f"SGLRP on box {j}")
        show(axes[1 + j], m, name)
        if sb is not None and j < len(sb):
            _draw_box(axes[1 + j], sb[j], "black")
    show(axes[-1], mm, "Multi-Node SGLRP")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the figure the usual permissions
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def explain_image(detector, x: torch.Tensor, out_png: str | os.PathLike, *, k: int = 3, nodes=None, rules=None,
                  variant: str = "paper", class_names: Sequence[str] | None = None,
                  score_thresh: float = 0.0, max_boxes: int = 100, title: str | None = None) -> Path:
    """One-call figure for one image ``x`` (1, 3, S, S) or (3, S, S): predicted boxes (``predict``; those
    with score >= ``score_thresh``, at most ``max_boxes``), the SGLRP maps of the ``k`` most confident
    distinct candidates and the multi-node map of ``nodes``."""
    from advdet.relevance.nodes import NodeSelection, distinct_candidates
    from advdet.relevance.rules import LRPRules
    from advdet.relevance.sglrp import box_relevance_maps, relevance_map

    x = x[None] if x.ndim == 3 else x
    x = x[:1].detach()
    rules = rules or LRPRules()
    nodes = nodes or NodeSelection()
    with torch.no_grad():
        det = detector.predict(x)[0]
        dense = detector.dense(x)
    sel = nodes if isinstance(nodes, NodeSelection) else NodeSelection()
    cands = distinct_candidates(detector, dense, k, cls_node=sel.cls_node)[0]
    singles = []
    if cands.numel():
        res, _ = box_relevance_maps(detector, x, cands[None], node_type=sel.node_type, cls_node=sel.cls_node,
                                    outputs=sel.outputs, values=sel.values, rules=rules,
                                    variant=variant)
        singles = [r.map[0] for r in res]
    conf, label = dense.class_probs()[0, cands].max(-1) if cands.numel() else (None, None)

    def name(lb) -> str:
        return class_names[int(lb)] if class_names is not None and int(lb) < len(class_names) else str(int(lb))

    multi = relevance_map(detector, x, nodes, rules=rules, variant=variant).map[0]
    keep = det["scores"] >= score_thresh
    det = {key: v[keep][:max_boxes] for key, v in det.items() if key in ("boxes", "scores", "labels")}
    names = None
    if len(det["labels"]):
        names = [f"{name(lb)} {float(s):.2f}" for lb, s in zip(det["labels"], det["scores"])]
    return relevance_figure(x[0], det["boxes"], singles, multi, out_png, labels=names,
                            single_boxes=dense.boxes[0, cands].detach() if cands.numel() else None,
                            single_titles=[f"SGLRP on {name(lb)} {float(c):.2f}" for lb, c in zip(label, conf)]
                            if cands.numel() else None, title=title)
