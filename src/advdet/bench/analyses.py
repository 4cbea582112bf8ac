"""The analyses of RobustDet section 3.2 and 5.3 (Dong, Wei, Lin, ECCV 2022): does learning clean images
conflict with learning adversarial images?

- **Loss change** (Fig. 3, :func:`loss_change`): per image, how the detection loss of a batch changes
  after the model takes a step on *another* batch of clean (or adversarial) images. Four panels:
  ``clean->clean``, ``clean->adv``, ``adv->clean``, ``adv->adv`` (the paper shows the first three).
  Positive values mean the step made that image worse: ``clean->adv > 0`` for most images means the two
  objectives conflict.
- **Gradient entanglement** (Fig. 4, :func:`gradient_entanglement`): per layer l,
  ``R_l = g1 . g2 / |g2|^2`` with ``g1 = d L_clean / d theta_l`` and ``g2 = d L_adv / d theta_l``
  (flattened over the layer's weight and bias). R < 0: the clean and adversarial gradients conflict;
  R ~ 0: they are disentangled (orthogonal); R ~ 1: entangled (the same direction).
- **Confidence distribution** (Fig. 7c, :func:`confidence_distribution`): the scores of the detections
  above a threshold (0.3, as the paper) on clean, A_cls and A_loc images.

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
from torch import nn
from torch.utils.data import DataLoader, Subset

from advdet.attacks.base import eval_mode
from advdet.attacks.losses import CLS_KEYS, LOC_KEYS, per_image_losses, sum_keys
from advdet.bench.plots import figure_png, new_figure
from advdet.bench.loading import load_detector
from advdet.bench.robustness_columns import attack_label, attack_targets, build_table_attack
from advdet.bench.robustness_scoring import load_eval_dataset
from advdet.bench.runtime import jsonable, resolve_device
from advdet.data.collate import collate_detection
from advdet.data.io import atomic_write_bytes, atomic_write_json
from advdet.models.detector import Detector

log = logging.getLogger(__name__)

__all__ = [
    "LOSS_CHANGE_PAIRS", "conv_layers", "entanglement_ratio", "per_layer_entanglement", "detection_loss",
    "per_image_detection_loss", "loss_change", "gradient_entanglement", "confidence_distribution",
    "histogram", "loss_change_figure", "entanglement_figure", "confidence_figure", "load_batches",
    "run_loss_change", "run_entanglement", "run_confidence",
]

#: (trained on, measured on) pairs of the loss-change analysis, in plotting order
LOSS_CHANGE_PAIRS = ("clean->clean", "clean->adv", "adv->clean", "adv->adv")
DET_KEYS = CLS_KEYS + LOC_KEYS


# ------------------------------------------------------------------------------------ losses
def detection_loss(detector: Detector, x: torch.Tensor, targets: list[dict]) -> torch.Tensor:
    """The detection loss L_det = L_cls + L_loc of a batch as training computes it (``detector.loss``)."""
    return sum_keys(detector.loss(x, targets), DET_KEYS)


def per_image_detection_loss(detector: Detector, x: torch.Tensor, targets: list[dict]) -> torch.Tensor:
    """(B,) L_cls + L_loc of each image as if it were alone in its batch (``attacks.losses.per_image_losses``)."""
    return sum_keys(per_image_losses(detector, x, targets), DET_KEYS)


# ------------------------------------------------------------------------------------ gradient entanglement
def conv_layers(module: nn.Module, *, min_weight_dim: int = 4) -> list[tuple[str, list[nn.Parameter]]]:
    """The layers whose gradients the entanglement analysis compares: every submodule owning a ``weight``
    parameter with at least ``min_weight_dim`` dimensions (4: convolutions, 5: RobustDet's dynamic
    convolutions with K kernels; 2 would add linear layers), with all its own parameters (weight and
    bias), in module order. Returns [(module name, [parameters])]."""
    out = []
    for name, m in module.named_modules():
        own = dict(m.named_parameters(recurse=False))
        w = own.get("weight")
        if w is not None and w.ndim >= min_weight_dim and w.requires_grad:
            out.append((name, [p for p in own.values() if p.requires_grad]))
    return out


def entanglement_ratio(g1: torch.Tensor, g2: torch.Tensor) -> float:
    """``R = g1 . g2 / |g2|^2`` (RobustDet section 3.2) of two gradient vectors; NaN when ``g2 = 0``."""
    g1, g2 = g1.detach().double().flatten(), g2.detach().double().flatten()
    if g1.shape != g2.shape:
        raise ValueError(f"gradients differ in size: {g1.numel()} vs {g2.numel()}")
    den = float(g2 @ g2)
    return float("nan") if den == 0.0 else float(g1 @ g2) / den


def _layer_grads(loss: torch.Tensor, layers: Sequence[tuple[str, list[nn.Parameter]]],
                 retain_graph: bool = False) -> list[torch.Tensor]:
    params = [p for _, ps in layers for p in ps]
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=retain_graph)
    out, k = [], 0
    for _, ps in layers:
        gs = [torch.zeros_like(p) if g is None else g for p, g in zip(ps, grads[k:k + len(ps)])]
        out.append(torch.cat([g.detach().flatten() for g in gs]))
        k += len(ps)
    return out


def per_layer_entanglement(loss_clean: torch.Tensor, loss_adv: torch.Tensor,
                           layers: Sequence[tuple[str, list[nn.Parameter]]]) -> list[float]:
    """``R_l`` of every layer between the gradients of two scalar losses (see :func:`entanglement_ratio`)."""
    g1 = _layer_grads(loss_clean, layers, retain_graph=True)
    g2 = _layer_grads(loss_adv, layers)
    return [entanglement_ratio(a, b) for a, b in zip(g1, g2)]


def gradient_entanglement(detector: Detector, x: torch.Tensor, targets: list[dict], x_adv: torch.Tensor, *,
                          layers: Sequence[tuple[str, list[nn.Parameter]]] | None = None) -> dict:
    """Per-layer gradient entanglement between clean images and their adversarial counterparts (Fig. 4).

    For image i: ``g1 = d L_det(x_i) / d theta_l``, ``g2 = d L_det(x_adv_i) / d theta_l`` (each image alone,
    ground-truth ``targets``), ``R_il = g1 . g2 / |g2|^2``. ``r_dataset`` uses the gradients summed over all
    images (the ratio of the mean gradients). The model is evaluated in eval mode and not changed.

    Returns {"layers": [name], "num_params": [int], "r_per_image": [[R per layer] per image],
    "r_dataset": [R per layer], "r_mean", "r_median", "r_std": [per layer over images, NaN ignored]}.
    """
    if x.shape != x_adv.shape or len(targets) != x.shape[0]:
        raise ValueError(f"x {tuple(x.shape)}, x_adv {tuple(x_adv.shape)} and {len(targets)} targets do not match")
    layers = list(layers) if layers is not None else conv_layers(detector)
    if not layers:
        raise ValueError(f"{type(detector).__name__}: no layers with a >= 4-d weight to analyse")
    per_image: list[list[float]] = []
    sum1 = sum2 = None
    with eval_mode(detector), torch.enable_grad():
        for i in range(x.shape[0]):
            g1 = _layer_grads(detection_loss(detector, x[i:i + 1], [targets[i]]), layers)
            g2 = _layer_grads(detection_loss(detector, x_adv[i:i + 1], [targets[i]]), layers)
            per_image.append([entanglement_ratio(a, b) for a, b in zip(g1, g2)])
            sum1 = g1 if sum1 is None else [s + g for s, g in zip(sum1, g1)]
            sum2 = g2 if sum2 is None else [s + g for s, g in zip(sum2, g2)]
    arr = np.array(per_image, dtype=np.float64)  # (N, L)

    def col_stat(fn) -> list[float]:
        out = []
        for j in range(arr.shape[1]):
            v = arr[:, j][np.isfinite(arr[:, j])]
            out.append(float(fn(v)) if v.size else float("nan"))
        return out

    return {"layers": [_short(n) for n, _ in layers], "num_params": [sum(p.numel() for p in ps) for _, ps in layers],
            "r_per_image": per_image, "r_dataset": [entanglement_ratio(a, b) for a, b in zip(sum1, sum2)],
            "r_mean": col_stat(np.mean), "r_median": col_stat(np.median), "r_std": col_stat(np.std)}


def _short(name: str) -> str:
    return name[len("model."):] if name.startswith("model.") else name


# ------------------------------------------------------------------------------------ loss change
def loss_change(detector: Detector, clean: Sequence[torch.Tensor], adv: Sequence[torch.Tensor],
                targets: Sequence[list[dict]], *, lr: float = 1e-3, probe_steps: int = 1) -> dict[str, list[float]]:
    """Per-image loss changes after a probe update (RobustDet Fig. 3; protocol in docs/robustness.md).

    ``clean[j]`` / ``adv[j]`` are batch j's clean and adversarial images (adversarial crafted once, against
    the starting weights theta), ``targets[j]`` their ground truth. For every batch j, starting each time
    from theta: ``probe_steps`` plain SGD steps (learning rate ``lr``, no momentum or weight decay) on the
    detection loss L_cls + L_loc of batch j's clean images give theta'; the change of the per-image loss
    ``L(theta') - L(theta)`` is recorded on the clean and on the adversarial images of the *next* batch
    (j + 1, cyclically), giving ``clean->clean`` and ``clean->adv``; the same with a step on batch j's
    adversarial images gives ``adv->clean`` and ``adv->adv``. Every image is measured exactly once per
    pair. The model runs in eval mode (SSD-VGG has no BN; CFR uses its mean) and its weights are restored
    afterwards. Needs at least 2 batches.

    Returns {pair: [change per image, in batch order of the measured images]}.
    """
    n_b = len(clean)
    if n_b < 2 or len(adv) != n_b or len(targets) != n_b:
        raise ValueError(f"loss_change needs >= 2 batches with clean, adversarial and targets each "
                         f"(got {len(clean)}, {len(adv)}, {len(targets)}); use more images or a smaller batch")
    if lr <= 0 or probe_steps < 1:
        raise ValueError(f"lr must be > 0 and probe_steps >= 1 (got {lr}, {probe_steps})")
    params = [p for p in detector.parameters() if p.requires_grad]
    saved = {k: v.detach().clone() for k, v in detector.state_dict().items()}
    out: dict[str, list[float]] = {k: [] for k in LOSS_CHANGE_PAIRS}
    with eval_mode(detector):
        with torch.no_grad():
            base = [(per_image_detection_loss(detector, clean[j], targets[j]),
                     per_image_detection_loss(detector, adv[j], targets[j])) for j in range(n_b)]
        try:
            for j in range(n_b):
                m = (j + 1) % n_b
                for src_name, src in (("clean", clean), ("adv", adv)):
                    opt = torch.optim.SGD(params, lr=lr)
                    for _ in range(probe_steps):
                        opt.zero_grad(set_to_none=True)
                        with torch.enable_grad():
                            detection_loss(detector, src[j], targets[j]).backward()
                        opt.step()
                    with torch.no_grad():
                        lc = per_image_detection_loss(detector, clean[m], targets[m]) - base[m][0]
                        la = per_image_detection_loss(detector, adv[m], targets[m]) - base[m][1]
                    out[f"{src_name}->clean"] += lc.tolist()
                    out[f"{src_name}->adv"] += la.tolist()
                    detector.load_state_dict(saved)
        finally:
            detector.load_state_dict(saved)
            for p in params:
                p.grad = None
    return out


def histogram(values: Sequence[float], edges: np.ndarray) -> list[int]:
    """Counts of ``values`` in the bins ``edges`` (the last bin closed; values outside are clipped into
    the end bins, so the counts always sum to ``len(values)``)."""
    v = np.clip(np.asarray(values, dtype=np.float64), edges[0], edges[-1])
    return np.histogram(v, bins=edges)[0].astype(int).tolist()


def _summary(values: Sequence[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"n": 0, "mean": None, "median": None, "std": None, "min": None, "max": None}
    return {"n": int(v.size), "mean": float(v.mean()), "median": float(np.median(v)), "std": float(v.std()),
            "min": float(v.min()), "max": float(v.max())}


# ------------------------------------------------------------------------------------ confidence
@torch.no_grad()
def confidence_distribution(detector: Detector, conditions: dict[str, Sequence[torch.Tensor]],
                            thresh: float = 0.3) -> dict[str, list[float]]:
    """Scores of the detections with score >= ``thresh`` (RobustDet Fig. 7c uses 0.3) on each condition's
    images ({name: [batches]}); returns {name: [scores]}."""
    out = {}
    with eval_mode(detector):
        for name, batches in conditions.items():
            scores: list[float] = []
            for x in batches:
                for det in detector.predict(x):
                    s = det["scores"].detach().cpu()
                    scores += s[s >= thresh].tolist()
            out[name] = scores
    return out


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
    ds = load_eval_dataset(data, ann, size=int(detector.input_size), voc_split=voc_split, skip_bad=skip_bad)
    n = min(limit, len(ds)) if limit else len(ds)
    if n == 0:
        raise ValueError(f"{data}: no images")
    dev = detector.device
    xs, tgs, ids = [], [], []
    for images, targets in DataLoader(Subset(ds, range(n)), batch_size=batch_size, shuffle=False,
                                      collate_fn=collate_detection):
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
    atk = build_table_attack(attack, detector, eps=eps, steps=steps, seed=seed)
    if atk is None:
        raise ValueError("the analyses need an attack, not 'clean'")
    out, start = [], 0
    for x, t in zip(xs, tgs):
        atk.manual_seed(seed + start)
        out.append(atk(x, t))
        start += x.shape[0]
    return out, {"attack": atk.name, **jsonable(atk.hyperparameters())}


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if not math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def _write(out_dir: str | os.PathLike, name: str, result: dict, fig: Any) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(result, png=str(out / f"{name}.png"), json=str(out / f"{name}.json"))
    _write_png(fig, out / f"{name}.png")
    atomic_write_json(out / f"{name}.json", _nan_to_none(result), indent=2)
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
        pairs[p] = {**_summary(v), "frac_positive": float(np.mean(np.asarray(v) > 0)) if v else None,
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
              "conditions": {k: {**_summary(v), "counts": histogram(v, edges), "scores": v} for k, v in scores.items()}}
    return _write(out_dir, "confidence", result, confidence_figure(result))
