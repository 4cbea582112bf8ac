"""The analyses of RobustDet section 3.2 and 5.3 (Dong, Wei, Lin, ECCV 2022): does learning clean images
conflict with learning adversarial images?

The three measures, loss change (Fig. 3), gradient entanglement (Fig. 4) and the confidence
distribution (Fig. 7c), are defined with their formulas in :mod:`advdet.bench.analyses_measures`;
this module runs them on zoo models and draws their figures.

The released RobustDet code has neither the loss-change nor the R tool (ALGORITHMS.md 1.7, ambiguity 1),
so the protocols below follow the paper's text; their choices (probe step, images) are parameters.
The runners ``run_loss_change``, ``run_entanglement`` and ``run_confidence`` take a model and dataset by
name, craft the adversarial images white box with ground-truth targets, and write ``NAME.json`` and
``NAME.png`` into an output folder.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from advdet.bench.analyses_measures import (LOSS_CHANGE_PAIRS, confidence_distribution, conv_layers,
                                            gradient_entanglement, histogram, loss_change, summary)
from advdet.bench.loading import load_detector
from advdet.bench.pipeline import Crafter, DatasetsBySize, index_batches
from advdet.bench.plots import figure_png, new_figure
from advdet.bench.robustness_columns import attack_label, attack_targets, build_table_attack
from advdet.bench.runtime import jsonable, nan_to_none, resolve_device
from advdet.data.io import atomic_write_bytes, atomic_write_json
from advdet.models.detector import Detector

log = logging.getLogger(__name__)

__all__ = ["loss_change_figure", "entanglement_figure", "confidence_figure", "load_batches", "run_loss_change",
           "run_entanglement", "run_confidence"]


# ------------------------------------------------------------------------------------ figures
def _write_png(fig: Any, path: Path) -> None:
    atomic_write_bytes(path, figure_png(fig))


def loss_change_figure(result: dict):
    """Fig. 3: one histogram of per-image loss changes per (trained on -> measured on) pair."""
    pairs = [p for p in LOSS_CHANGE_PAIRS if p in result["pairs"]]
    fig = new_figure(3.2 * len(pairs), 2.8)
    axes = fig.subplots(1, len(pairs), squeeze=False)[0]
    edges = np.asarray(result["bin_edges"])
    for ax, p in zip(axes, pairs):
        d = result["pairs"][p]
        ax.bar(edges[:-1], d["counts"], width=np.diff(edges), align="edge", color="tab:blue", alpha=0.8)
        ax.axvline(0.0, color="k", lw=0.8)
        a, b = p.split("->")
        mean = d["mean"]
        ax.set_title(f"{a} → {b}\nmean {mean:+.3g}, {100 * d['frac_positive']:.0f}% > 0" if mean is not None
                     else f"{a} → {b}", fontsize=9)
        ax.set_xlabel("loss change")
    axes[0].set_ylabel("images")
    fig.suptitle(f"{result['model']}: loss change after a step on another batch", fontsize=10, y=1.08)
    return fig


def entanglement_figure(result: dict):
    """Fig. 4: ``R`` per layer (bars: all images' gradients; dots: single images)."""
    layers = result["layers"]
    fig = new_figure(max(4.0, 0.28 * len(layers) + 1.5), 3.2)
    ax = fig.subplots()
    xs = np.arange(len(layers))
    bars = [0.0 if v is None or not math.isfinite(v) else v for v in result["r_dataset"]]
    ax.bar(xs, bars, color="tab:orange", alpha=0.7, label="R of the summed gradients")
    per = np.asarray([[np.nan if v is None else v for v in row] for row in result["r_per_image"]], dtype=np.float64)
    for i in range(per.shape[0]):
        ax.plot(xs, per[i], ".", color="tab:blue", ms=3, alpha=0.5, label="R of single images" if i == 0 else None)
    none = [j for j, v in enumerate(result["r_dataset"]) if v is None or not math.isfinite(v)]
    if none:
        ax.plot(none, [0.0] * len(none), "x", color="tab:red", ms=4, label="no adversarial gradient (R undefined)")
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xticks(xs, layers, rotation=90, fontsize=6)
    ax.set_ylabel("R = g_clean · g_adv / |g_adv|²")
    ax.set_title(f"{result['model']}: gradient entanglement per layer", fontsize=10)
    ax.legend(fontsize=7)
    return fig


def confidence_figure(result: dict):
    """Fig. 7c: the distribution of detection confidences per condition."""
    fig = new_figure(4.5, 3.0)
    ax = fig.subplots()
    edges = np.asarray(result["bin_edges"])
    centers = (edges[:-1] + edges[1:]) / 2
    for name, d in result["conditions"].items():
        total = max(1, sum(d["counts"]))
        label = f"{attack_label(name)} (n={d['n']}" + (f", mean {d['mean']:.2f})" if d["mean"] is not None else ")")
        ax.step(centers, [c / total for c in d["counts"]], where="mid", label=label)
    ax.set_xlabel("detection confidence")
    ax.set_ylabel("fraction of detections")
    ax.set_title(f"{result['model']}: confidences >= {result['thresh']:g}", fontsize=10)
    ax.legend(fontsize=7)
    return fig


# ------------------------------------------------------------------------------------ runners
def load_batches(detector: Detector, data: str | os.PathLike, *, ann=None, limit: int | None = 16,
                 batch_size: int = 4, voc_split: str = "test", skip_bad: bool = False
                 ) -> tuple[list[torch.Tensor], list[list[dict]], list[int]]:
    """The first ``limit`` images of ``data`` letterboxed to the detector's size, in batches on its
    device: (images, attack targets, image ids)."""
    if batch_size < 1 or (limit is not None and limit < 1):
        raise ValueError(f"batch_size and limit must be >= 1 (got {batch_size}, {limit})")
    size = int(detector.input_size)
    datasets = DatasetsBySize(data, ann, voc_split=voc_split, skip_bad=skip_bad)
    ds = datasets[size]
    n = min(limit, len(ds)) if limit else len(ds)
    if n == 0:
        raise ValueError(f"{data}: no images")
    dev = detector.device
    xs, tgs, ids = [], [], []
    for idx in index_batches(n, batch_size):
        images, targets = datasets.batch(size, idx)
        xs.append(images.to(dev))
        tgs.append(attack_targets(targets, dev))
        ids += [int(t["image_id"]) for t in targets]
    return xs, tgs, ids


def _setup(model: str, detector: Detector | None, weights, allow_untrained: bool, device) -> tuple[Detector, str]:
    if detector is None:
        detector, origin = load_detector(model, weights=weights, allow_untrained=allow_untrained)
    else:
        origin = "given"
    return detector.to(resolve_device(device)).eval(), origin


def _craft(detector: Detector, attack: str, xs: list[torch.Tensor], tgs: list[list[dict]], *, eps: float,
           steps: int | None, seed: int) -> tuple[list[torch.Tensor], dict]:
    """``attack``: a spec (``mtd``, ``cls:steps=5,technique=MI``; ``advdet.attacks.spec``) at the table's
    budget (``build_table_attack``), the spec's settings over it."""
    from advdet.attacks.spec import AttackSpec

    spec = AttackSpec.parse(attack, extra_names=("clean",))
    atk = build_table_attack(spec.name, detector, eps=eps, steps=steps, seed=seed, overrides=spec.kwargs)
    if atk is None:
        raise ValueError("the analyses need an attack, not 'clean'")
    crafter = Crafter(atk, seed, detector.device, quantize=False)  # float, white box, ground truth
    out, start = [], 0
    for x, t in zip(xs, tgs):
        out.append(crafter.craft(start, x, t))
        start += x.shape[0]
    return out, {"attack": atk.name, **jsonable(atk.hyperparameters())}


def _write(out_dir: str | os.PathLike, name: str, result: dict, fig: Any) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(result, png=str(out / f"{name}.png"), json=str(out / f"{name}.json"))
    _write_png(fig, out / f"{name}.png")
    atomic_write_json(out / f"{name}.json", nan_to_none(result), indent=2)
    return result


def _common(model: str, origin: str, data: Any, ids: list[int], settings: dict, seed: int) -> dict:
    return {"model": model, "weights": origin, "data": str(data), "images": len(ids), "image_ids": ids,
            "seed": seed, "attack_settings": settings}


def run_loss_change(model: str, data: str | os.PathLike, out_dir: str | os.PathLike, *, weights=None, ann=None,
                    limit: int | None = 16, batch_size: int = 4, attack: str = "mtd", eps: float = 8.0,
                    steps: int | None = None, lr: float = 1e-3, probe_steps: int = 1, bins: int = 30,
                    seed: int = 0, device=None, allow_untrained: bool = False, detector: Detector | None = None,
                    voc_split: str = "test") -> dict:
    """Loss-change analysis (Fig. 3) of ``model`` on the first ``limit`` images of ``data``; writes
    ``loss_change.json`` and ``loss_change.png`` into ``out_dir`` and returns the JSON dict.

    Adversarial images: ``attack`` (default ``mtd``, the default of RobustDet's adversarial training) at
    ``eps`` (step = eps) for ``steps`` (default 20), white box, ground truth. JSON: per pair ``values``
    (per image, in the order of ``measured_ids``), ``counts`` over the shared ``bin_edges`` (summing to
    the number of images), ``mean``, ``median``, ``std``, ``frac_positive``."""
    det, origin = _setup(model, detector, weights, allow_untrained, device)
    xs, tgs, ids = load_batches(det, data, ann=ann, limit=limit, batch_size=batch_size, voc_split=voc_split)
    advs, settings = _craft(det, attack, xs, tgs, eps=eps, steps=steps, seed=seed)
    changes = loss_change(det, xs, advs, tgs, lr=lr, probe_steps=probe_steps)
    allv = np.concatenate([np.asarray(v, dtype=np.float64) for v in changes.values()])
    lim = float(np.abs(allv).max()) if allv.size else 1.0
    edges = np.linspace(-lim, lim, int(bins) + 1) if lim > 0 else np.linspace(-1.0, 1.0, int(bins) + 1)
    starts = np.cumsum([0] + [x.shape[0] for x in xs])
    measured = []
    for j in range(len(xs)):
        m = (j + 1) % len(xs)
        measured += ids[starts[m]:starts[m + 1]]
    pairs = {}
    for p, v in changes.items():
        pairs[p] = {**summary(v), "frac_positive": float(np.mean(np.asarray(v) > 0)) if v else None,
                    "values": v, "counts": histogram(v, edges)}
    result = {"analysis": "loss_change", **_common(model, origin, data, ids, settings, seed),
              "lr": lr, "probe_steps": probe_steps, "batch_size": batch_size, "measured_ids": measured,
              "bin_edges": edges.tolist(), "pairs": pairs,
              "protocol": "per batch j from the same weights: probe_steps SGD steps (lr, no momentum) on the "
                          "clean (or adversarial) images of batch j, then L(theta') - L(theta) per image on the "
                          "clean and adversarial images of batch j+1 (cyclic); L = L_cls + L_loc, eval mode"}
    return _write(out_dir, "loss_change", result, loss_change_figure(result))


def run_entanglement(model: str, data: str | os.PathLike, out_dir: str | os.PathLike, *, weights=None, ann=None,
                     limit: int | None = 16, batch_size: int = 4, attack: str = "mtd", eps: float = 8.0,
                     steps: int | None = None, min_weight_dim: int = 4, seed: int = 0, device=None,
                     allow_untrained: bool = False, detector: Detector | None = None, voc_split: str = "test") -> dict:
    """Gradient-entanglement analysis (Fig. 4): ``R`` per convolutional layer for every image and its
    adversarial counterpart; writes ``entanglement.json`` / ``entanglement.png`` into ``out_dir``."""
    det, origin = _setup(model, detector, weights, allow_untrained, device)
    xs, tgs, ids = load_batches(det, data, ann=ann, limit=limit, batch_size=batch_size, voc_split=voc_split)
    advs, settings = _craft(det, attack, xs, tgs, eps=eps, steps=steps, seed=seed)
    x, xa = torch.cat(xs), torch.cat(advs)
    tg = [t for b in tgs for t in b]
    res = gradient_entanglement(det, x, tg, xa, layers=conv_layers(det, min_weight_dim=min_weight_dim))
    result = {"analysis": "entanglement", **_common(model, origin, data, ids, settings, seed), **res,
              "definition": "R_l = g1.g2/|g2|^2, g1 = dL_det(clean)/dtheta_l, g2 = dL_det(adv)/dtheta_l, "
                            "per image and for the summed gradients; eval mode"}
    return _write(out_dir, "entanglement", result, entanglement_figure(result))


def run_confidence(model: str, data: str | os.PathLike, out_dir: str | os.PathLike, *, weights=None, ann=None,
                   limit: int | None = 16, batch_size: int = 4, attacks: Sequence[str] = ("cls", "loc"),
                   eps: float = 8.0, steps: int | None = None, thresh: float = 0.3, bins: int = 14, seed: int = 0,
                   device=None, allow_untrained: bool = False, detector: Detector | None = None,
                   voc_split: str = "test") -> dict:
    """Confidence distribution (Fig. 7c) on clean images and under ``attacks`` (default A_cls, A_loc);
    writes ``confidence.json`` / ``confidence.png`` into ``out_dir``. JSON per condition: ``scores``,
    ``counts`` over ``bin_edges`` (``thresh`` .. 1, summing to ``n`` detections), ``mean``, ``median``."""
    if not 0.0 <= thresh < 1.0:
        raise ValueError(f"thresh must be in [0, 1), got {thresh}")
    det, origin = _setup(model, detector, weights, allow_untrained, device)
    xs, tgs, ids = load_batches(det, data, ann=ann, limit=limit, batch_size=batch_size, voc_split=voc_split)
    conditions: dict[str, list[torch.Tensor]] = {"clean": xs}
    settings = {}
    for a in attacks:
        if a == "clean":
            continue
        conditions[a], settings[a] = _craft(det, a, xs, tgs, eps=eps, steps=steps, seed=seed)
    scores = confidence_distribution(det, conditions, thresh)
    edges = np.linspace(thresh, 1.0, int(bins) + 1)
    result = {"analysis": "confidence", **_common(model, origin, data, ids, settings, seed), "thresh": thresh,
              "bin_edges": edges.tolist(),
              "conditions": {k: {**summary(v), "counts": histogram(v, edges), "scores": v} for k, v in scores.items()}}
    return _write(out_dir, "confidence", result, confidence_figure(result))
