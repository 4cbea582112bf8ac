"""The measurements of RobustDet section 3.2 and 5.3 (Dong, Wei, Lin, ECCV 2022), on a model and batches:

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
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from advdet.attacks.base import eval_mode
from advdet.attacks.losses import CLS_KEYS, LOC_KEYS, per_image_losses, sum_keys
from advdet.models.detector import Detector

__all__ = ["LOSS_CHANGE_PAIRS", "conv_layers", "entanglement_ratio", "per_layer_entanglement", "detection_loss",
           "per_image_detection_loss", "loss_change", "gradient_entanglement", "confidence_distribution",
           "histogram", "summary"]

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


def summary(values: Sequence[float]) -> dict:
    """n, mean, median, std, min and max of ``values`` (None for an empty list)."""
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
