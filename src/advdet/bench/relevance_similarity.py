"""RAD's premise, measured (issue 24, item 3): do detectors of different families have similar relevance
maps on the same clean image (RAD Fig. 1)?

For every pair of models and every image, the rank (Spearman) and cosine correlation of their maps on the
original image's pixel grid, for two kinds of map:

- ``sglrp``: the Multi-Node SGLRP map h(x, T) of :func:`advdet.relevance.relevance_map` (eq. 2, default
  ``NodeSelection``: each model's own top-20 cls nodes), per pixel summed over RGB (``RelevanceResult.map``);
- ``gradient`` (the baseline): the plain input gradient ``d s / d x`` of the sum ``s`` of the same nodes'
  score values (the entries of the output vector before the ReLU: logits or probabilities, as the map's
  ``NodeSet.values`` says), per pixel ``sum_c |d s / d x_c|`` (``gradient="abs"``, the default) or the
  signed ``sum_c d s / d x_c`` (``gradient="signed"``).

Each model sees the image letterboxed to its own input size; its map is cropped to the letterbox content
(the padding dropped) and resized bilinearly to the original (H, W) (:func:`to_image_grid`), so two models
of different input sizes are compared pixel for pixel. Per image and pair: Spearman = Pearson correlation of
the average ranks (ties share their mean rank, as ``scipy.stats.spearmanr``), cosine = a.b / (|a| |b|).
A map compared with itself gives exactly 1 for both (the diagonal); a constant map has no defined
correlation (None in the JSON). The matrices are the means over the images with a defined value.

:func:`run_relevance_similarity` loads the models and data by name and writes ``relevance_similarity.json``
and one heat map ``relevance_similarity_KIND.png`` per kind into an output folder.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from advdet.bench.loading import LoadedModel, load_model
from advdet.bench.pipeline import DatasetsBySize
from advdet.bench.plots import figure_png, new_figure
from advdet.bench.runtime import jsonable, nan_to_none, resolve_device
from advdet.data.io import atomic_write_bytes, atomic_write_json
from advdet.data.letterbox import LetterboxParams, letterbox_params
from advdet.models.detector import Detector
from advdet.relevance import LRPRules, NodeSelection, NodeSet, output_vector, relevance_map, score_values

log = logging.getLogger(__name__)

__all__ = ["KINDS", "METRICS", "rankdata", "spearman", "cosine", "map_similarity", "to_image_grid",
           "gradient_map", "model_maps", "pair_key", "similarity_matrices", "similarity_figure",
           "run_relevance_similarity"]

#: the map kinds, in output order
KINDS = ("sglrp", "gradient")
#: the similarity measures
METRICS = ("spearman", "cosine")
GradientReduce = Literal["abs", "signed"]


# ------------------------------------------------------------------------------------ correlations
def rankdata(a: np.ndarray) -> np.ndarray:
    """1-based ranks of the flattened ``a`` (float64); tied values share the mean of their ranks."""
    v = np.asarray(a, dtype=np.float64).ravel()
    order = np.argsort(v, kind="stable")
    sv = v[order]
    # start of each run of equal values, in sorted order
    new = np.ones(sv.size, dtype=bool)
    new[1:] = sv[1:] != sv[:-1]
    run = np.cumsum(new) - 1                       # run id per sorted position
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], sv.size)          # exclusive
    mean_rank = (starts + ends + 1) / 2.0          # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(v.size, dtype=np.float64)
    ranks[order] = mean_rank[run]
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float("nan") if den == 0.0 else float(np.clip(float(a @ b) / den, -1.0, 1.0))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two equally sized maps (NaN when either is constant)."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"maps differ in size: {a.size} vs {b.size} pixels")
    return _pearson(rankdata(a), rankdata(b))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity a.b / (|a| |b|) of two equally sized maps (NaN when either is all zero)."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"maps differ in size: {a.size} vs {b.size} pixels")
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float("nan") if den == 0.0 else float(np.clip(float(a @ b) / den, -1.0, 1.0))


def map_similarity(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """{"spearman", "cosine"} of two maps; identical maps give exactly 1 for both (unless a constant map
    leaves the measure undefined: NaN)."""
    if a is b or (np.shape(a) == np.shape(b) and np.array_equal(a, b)):
        v = np.asarray(a, dtype=np.float64).ravel()
        const = v.size == 0 or bool(np.all(v == v[0]))
        return {"spearman": float("nan") if const else 1.0,
                "cosine": float("nan") if not np.any(v) else 1.0}
    return {"spearman": spearman(a, b), "cosine": cosine(a, b)}


# ------------------------------------------------------------------------------------ maps
def to_image_grid(m: torch.Tensor, p: LetterboxParams) -> np.ndarray:
    """A (S, S) map on a model's letterbox canvas back onto the original (H, W) image grid: the content
    region is cropped (the padding dropped) and resized bilinearly (antialiased where it shrinks)."""
    if m.ndim != 2 or tuple(m.shape) != (p.size, p.size):
        raise ValueError(f"map of shape {tuple(m.shape)} does not fit the {p.size} x {p.size} letterbox")
    nh, nw = p.content_hw
    crop = m.detach()[p.pad_y:p.pad_y + nh, p.pad_x:p.pad_x + nw].double()
    if (nh, nw) != (p.orig_h, p.orig_w):
        shrink = p.orig_h < nh or p.orig_w < nw
        crop = F.interpolate(crop[None, None], size=(p.orig_h, p.orig_w), mode="bilinear", align_corners=False,
                             antialias=shrink)[0, 0]
    return crop.cpu().numpy()


@torch.enable_grad()
def gradient_map(detector: Detector, x: torch.Tensor, nodes: NodeSet,
                 reduce: GradientReduce = "abs") -> torch.Tensor:
    """(B, S, S) the input gradient of ``s = sum`` of the score values of the nodes ``nodes`` (a
    :class:`NodeSet` built on ``detector.dense(x)``'s layout, e.g. ``relevance_map(...).nodes``), per pixel
    ``sum_c |ds/dx_c|`` (``reduce="abs"``) or ``sum_c ds/dx_c`` (``"signed"``). The score values are the
    output vector's entries before the ReLU (logits or probabilities: ``nodes.values``)."""
    if reduce not in ("abs", "signed"):
        raise ValueError(f"gradient reduce must be 'abs' or 'signed', got {reduce!r}")
    xg = x.detach().clone().requires_grad_(True)
    dense = detector.dense(xg)
    ov = output_vector(detector, dense, include_boxes=any(c.startswith("box") for c in nodes.layout))
    if tuple(ov.columns) != tuple(nodes.layout) or tuple(nodes.mask.shape) != (ov.raw.shape[0],
                                                                                  ov.raw.shape[1] * ov.width):
        raise ValueError("the NodeSet was built for another output layout")
    vals = score_values(ov, ov.raw, nodes.values).reshape(ov.raw.shape[0], -1)
    s = vals.masked_fill(~nodes.mask.to(vals.device), 0.0).sum()
    if not s.requires_grad:  # no node (or an output that does not depend on x): a zero map
        return torch.zeros(x.shape[0], x.shape[2], x.shape[3], dtype=x.dtype, device=x.device)
    (g,) = torch.autograd.grad(s, xg, allow_unused=True)
    if g is None:
        return torch.zeros(x.shape[0], x.shape[2], x.shape[3], dtype=x.dtype, device=x.device)
    return (g.abs() if reduce == "abs" else g).sum(1).detach()


def model_maps(detector: Detector, x: torch.Tensor, *, selection: NodeSelection = NodeSelection(),
               rules: LRPRules = LRPRules(), variant: str = "paper",
               gradient: GradientReduce = "abs") -> tuple[dict[str, torch.Tensor], list[int]]:
    """Both map kinds of a batch ``x`` on the model's canvas: ({"sglrp": (B, S, S), "gradient": (B, S, S)},
    number of target nodes per image). The gradient uses the SGLRP map's node set T."""
    res = relevance_map(detector, x, selection, rules=rules, variant=variant)
    grad = gradient_map(detector, x, res.nodes, gradient)
    return {"sglrp": res.map.detach(), "gradient": grad}, res.nodes.counts


# ------------------------------------------------------------------------------------ matrices
def pair_key(a: str, b: str) -> str:
    """The key of a model pair in the per-image values: ``"a|b"`` in the order of ``--models``."""
    return f"{a}|{b}"


def similarity_matrices(models: Sequence[str], per_image: Mapping[str, Mapping[str, Sequence[float]]]) -> dict:
    """Mean over images (NaN values left out) of each pair's per-image values, as symmetric matrices:
    ``per_image[metric][pair_key(a, b)]`` for a before b in ``models`` -> {metric: K x K matrix (diagonal:
    the model against itself, ``pair_key(a, a)``), "n": {metric: K x K number of images averaged}}."""
    k = len(models)
    out: dict[str, Any] = {}
    counts: dict[str, list[list[int]]] = {}
    for metric, pairs in per_image.items():
        mat = [[float("nan")] * k for _ in range(k)]
        n = [[0] * k for _ in range(k)]
        for i in range(k):
            for j in range(i, k):
                v = np.asarray(pairs[pair_key(models[i], models[j])], dtype=np.float64)
                v = v[np.isfinite(v)]
                mean = float(v.mean()) if v.size else float("nan")
                if i == j and v.size and np.all(v == 1.0):
                    mean = 1.0  # exactly, not a float sum divided back
                mat[i][j] = mat[j][i] = mean
                n[i][j] = n[j][i] = int(v.size)
        out[metric] = mat
        counts[metric] = n
    out["n"] = counts
    return out


def similarity_figure(models: Sequence[str], kind: str, matrices: Mapping[str, Sequence[Sequence[float]]],
                      images: int):
    """One panel per measure (Spearman, cosine): the K x K matrix on a fixed [-1, 1] colour scale with its
    values printed (an undefined cell is left blank)."""
    k = len(models)
    side = 1.2 + 0.75 * k
    fig = new_figure(2 * side + 1.2, side)
    axes = fig.subplots(1, 2, squeeze=False)[0]
    im = None
    for ax, metric in zip(axes, METRICS):
        a = np.array([[np.nan if v is None else float(v) for v in row] for row in matrices[metric]],
                     dtype=np.float64)
        im = ax.imshow(np.ma.masked_invalid(a), cmap="RdBu_r", vmin=-1.0, vmax=1.0)
        ax.set_xticks(range(k), labels=list(models), rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(k), labels=list(models) if metric == METRICS[0] else [""] * k, fontsize=8)
        for i in range(k):
            for j in range(k):
                if np.isfinite(a[i, j]):
                    ax.text(j, i, f"{a[i, j]:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if abs(a[i, j]) > 0.6 else "black")
        ax.set_title("Spearman (rank)" if metric == "spearman" else "cosine", fontsize=9)
    fig.colorbar(im, ax=list(axes), fraction=0.03, pad=0.04)
    name = "multi-node SGLRP maps" if kind == "sglrp" else "input-gradient maps"
    fig.suptitle(f"{name}: mean correlation over {images} clean images", fontsize=10)
    return fig


# ------------------------------------------------------------------------------------ runner
def _load(models: Sequence[str], weights: Mapping[str, Any], modules: Mapping[str, nn.Module],
          sizes: Mapping[str, int], allow_untrained: bool, device: torch.device) -> dict[str, LoadedModel]:
    loaded = {}
    for name in models:
        lm = load_model(name, weights=weights.get(name), allow_untrained=allow_untrained, device=device,
                        model=modules.get(name), input_size=sizes.get(name))
        if lm.kind != "detector":
            raise ValueError(f"{name!r} is a {lm.kind}, not a detector; relevance-similarity compares detectors")
        loaded[name] = lm
    return loaded


def run_relevance_similarity(models: Sequence[str], data: str | os.PathLike, out_dir: str | os.PathLike, *,
                             weights: Mapping[str, Any] | None = None, ann=None, limit: int | None = 16,
                             batch_size: int = 4, top: int = 20, variant: str = "paper",
                             gradient: GradientReduce = "abs", device=None, allow_untrained: bool = False,
                             detectors: Mapping[str, nn.Module] | None = None,
                             input_sizes: Mapping[str, int] | None = None, voc_split: str = "test",
                             skip_bad: bool = False) -> dict:
    """Relevance-map similarity between every pair of ``models`` on the first ``limit`` clean images of
    ``data`` (see the module docstring); writes ``relevance_similarity.json`` and
    ``relevance_similarity_{sglrp,gradient}.png`` into ``out_dir`` and returns the JSON dict.

    ``weights``: {name: file} overriding the zoo's; ``detectors``: {name: module} already built (tests);
    ``input_sizes``: {name: S} for ``torchvision:`` models; ``top``: the m of the static cls
    ``NodeSelection``; ``variant``: the map's head (``"paper"`` eq. 2, or ``"rad_code"``); ``gradient``:
    ``"abs"`` or ``"signed"`` channel sum of the baseline's gradient.

    JSON: ``models``, ``model_info`` (per model: input size, weights file and ``weights_sha256``, target
    nodes per image), ``image_ids`` / ``image_sizes``, ``settings``, and per kind ``spearman`` / ``cosine``
    (K x K means over images, order of ``models``), ``n`` (images averaged per cell) and ``per_image``
    ({measure: {"a|b": [value per image]}} for every pair a before b and every model against itself).
    """
    models = list(models)
    if len(models) < 2:
        raise ValueError(f"relevance-similarity needs at least 2 models, got {len(models)}")
    dup = sorted({m for m in models if models.count(m) > 1})
    if dup:
        raise ValueError(f"model {dup[0]!r} is listed twice in --models")
    if batch_size < 1 or (limit is not None and limit < 1):
        raise ValueError(f"batch_size and limit must be >= 1 (got {batch_size}, {limit})")
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    if variant not in ("paper", "rad_code"):
        raise ValueError(f"variant must be 'paper' or 'rad_code', got {variant!r}")
    if gradient not in ("abs", "signed"):
        raise ValueError(f"gradient must be 'abs' or 'signed', got {gradient!r}")
    t0 = time.perf_counter()
    dev = resolve_device(device)
    loaded = _load(models, dict(weights or {}), dict(detectors or {}), dict(input_sizes or {}), allow_untrained,
                   dev)
    selection = NodeSelection(m=top)
    rules = LRPRules()

    datasets = DatasetsBySize(data, ann, skip_bad=skip_bad, voc_split=voc_split)
    first = datasets[next(iter(loaded.values())).input_size]
    n = min(limit, len(first)) if limit else len(first)
    if n == 0:
        raise ValueError(f"{data}: no images")

    pairs = [(models[i], models[j]) for i in range(len(models)) for j in range(i, len(models))]
    per_image = {kind: {metric: {pair_key(a, b): [] for a, b in pairs} for metric in METRICS} for kind in KINDS}
    node_counts: dict[str, list[int]] = {m: [] for m in models}
    ids: list[int] = []
    sizes: list[list[int]] = []
    for start in range(0, n, batch_size):
        idx = range(start, min(n, start + batch_size))
        grids: dict[str, dict[str, list[np.ndarray]]] = {}
        for name, lm in loaded.items():
            ds = datasets[lm.input_size]
            items = [ds[i] for i in idx]
            if name == models[0]:
                ids += [int(it["image_id"]) for it in items]
                sizes += [list(it["orig_size"]) for it in items]
            elif [int(it["image_id"]) for it in items] != ids[start:start + len(items)]:
                raise RuntimeError("the datasets of different input sizes list the images in different orders")
            x = torch.stack([it["image"] for it in items]).to(dev)
            maps, counts = model_maps(lm.model, x, selection=selection, rules=rules, variant=variant,
                                      gradient=gradient)
            node_counts[name] += counts
            grids[name] = {}
            for kind in KINDS:
                grids[name][kind] = []
                for b, it in enumerate(items):
                    p = it.get("letterbox") or letterbox_params(*it["orig_size"], lm.input_size)
                    grids[name][kind].append(to_image_grid(maps[kind][b], p))
        for kind in KINDS:
            for a, b in pairs:
                for i in range(len(idx)):
                    sim = map_similarity(grids[a][kind][i], grids[b][kind][i])
                    for metric in METRICS:
                        per_image[kind][metric][pair_key(a, b)].append(sim[metric])
        log.info("relevance similarity: %d / %d images", min(n, start + batch_size), n)

    result: dict[str, Any] = {
        "analysis": "relevance_similarity",
        "models": models,
        "model_info": {name: {**lm.info(), "nodes_per_image": node_counts[name]} for name, lm in loaded.items()},
        "data": str(data), "images": n, "image_ids": ids, "image_sizes": sizes,
        "settings": {
            "nodes": jsonable(selection), "variant": variant, "rules": jsonable(rules), "gradient": gradient,
            "sglrp_map": "relevance_map(detector, x, NodeSelection(m=top), variant): per-pixel relevance summed "
                         "over RGB (RelevanceResult.map)",
            "gradient_map": ("sum_c |d s/d x_c|" if gradient == "abs" else "sum_c d s/d x_c") +
                            ", s = sum of the SGLRP node set T's score values (before the ReLU; logits or "
                            "probabilities as the node set's values)",
            "grid": "each model's own letterbox; map cropped to the letterbox content and resized bilinearly "
                    "to the original image (H, W)",
            "spearman": "Pearson correlation of the average ranks of the pixels (ties share their mean rank)",
            "cosine": "a.b / (|a| |b|) over the pixels",
            "average": "mean over the images whose value is defined (a constant map has none)",
        },
        "kinds": {},
    }
    for kind in KINDS:
        mats = similarity_matrices(models, per_image[kind])
        result["kinds"][kind] = {"spearman": mats["spearman"], "cosine": mats["cosine"], "n": mats["n"],
                                 "per_image": per_image[kind]}
    result["seconds"] = round(time.perf_counter() - t0, 2)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs = {kind: str(out / f"relevance_similarity_{kind}.png") for kind in KINDS}
    result["pngs"] = pngs
    result["json"] = str(out / "relevance_similarity.json")
    for kind in KINDS:
        fig = similarity_figure(models, kind, result["kinds"][kind], n)
        atomic_write_bytes(pngs[kind], figure_png(fig))
    result = nan_to_none(result)
    atomic_write_json(result["json"], result, indent=2)
    return result
