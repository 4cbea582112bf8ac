"""Per-image detector losses and shared helpers of the detector attacks.

Normalisation (why batch 8 equals batch 1): every loss here is computed per image exactly as for a
batch of that image alone, and attacks sum them over the batch. How is the detector's knowledge
(the Detector contract's capabilities, models/detector.py): ``Detector.per_image_loss`` (a loop over the
images by default, one batched pass where the family overrides it) and ``Detector.total_loss`` (the sum
over the batch; ``B * loss(batch)`` in one pass for families that declare ``loss_is_batch_mean``: the
gradient of a loss-based attack only needs that sum). A model that is not a :class:`Detector` but has a
``loss`` is called once per image.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from advdet.models.detector import Detector, loop_per_image_loss

#: loss names of the Detector contract counted as classification (A_cls) and localization (A_loc):
#: objectness (YOLO ``obj``, Faster R-CNN ``rpn_obj``) is the background/foreground part of the
#: classification confidence, like SSD's background column. Localization includes the box terms that
#: come beside an L1/IoU one: ultralytics' distribution focal loss (``dfl``) and RT-DETR's GIoU (``giou``).
CLS_KEYS = ("cls", "obj", "rpn_obj")
LOC_KEYS = ("loc", "rpn_loc", "dfl", "giou")


def per_image_losses(detector: Any, x: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
    """The detector's losses per image: name -> (B,), each as if the image were its own batch
    (``Detector.per_image_loss``)."""
    if len(targets) != x.shape[0]:
        raise ValueError(f"{x.shape[0]} images but {len(targets)} targets")
    if isinstance(detector, Detector):
        return detector.per_image_loss(x, targets)
    return loop_per_image_loss(detector.loss, x, targets)


def total_losses(detector: Any, x: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
    """The sum over the batch of ``per_image_losses`` (name -> 0-dim tensor): ``Detector.total_loss``, one
    batched call for the families whose loss is a batch mean."""
    if len(targets) != x.shape[0]:
        raise ValueError(f"{x.shape[0]} images but {len(targets)} targets")
    if isinstance(detector, Detector):
        return detector.total_loss(x, list(targets))
    return {k: v.sum() for k, v in per_image_losses(detector, x, targets).items()}


def sum_keys(losses: dict[str, torch.Tensor], keys: tuple[str, ...] | None) -> torch.Tensor:
    """Sum of the named losses present in ``losses`` (all of them for ``keys=None``)."""
    names = list(losses) if keys is None else [k for k in keys if k in losses]
    if not names:
        raise KeyError(f"none of the losses {keys} in the detector's losses {sorted(losses)}")
    return sum(losses[k] for k in names)


def cwa_loss(detector: Any, x: torch.Tensor, targets: list[dict]) -> torch.Tensor:
    """Class-wise loss of CWA (Chen et al. 2021; ALGORITHMS.md 1.6), per image (B,).

    Families with per-prior losses (``Detector.positive_prior_losses``, SSD-VGG: CE(conf) + sum
    Smooth-L1(loc) on each positive prior, negatives unused): averaged over the priors of each matched
    ground-truth class, then over the classes present. Other families (an approximation, no per-prior
    losses in the contract): for each class present, the family's ``cls + loc`` losses with the targets of
    that class only, averaged over the classes present. An image without targets scores 0.
    """
    b = x.shape[0]
    prior = detector.positive_prior_losses(x, targets) if isinstance(detector, Detector) else None
    if prior is not None:
        per, cls_t = prior
        pos = cls_t > 0
        onehot = F.one_hot(cls_t, detector.num_classes + 1).to(per.dtype) * pos[..., None]  # (B, P, K+1)
        sums = torch.einsum("bp,bpc->bc", per, onehot)
        counts = onehot.sum(1)
        present = counts > 0
        class_mean = sums / counts.clamp_min(1)
        n_present = present.sum(1)
        return (class_mean * present).sum(1) / n_present.clamp_min(1)
    out = []
    for i in range(b):
        t = targets[i]
        labels = t["labels"]
        classes = labels.unique().tolist() if labels.numel() else []
        vals = []
        for c in classes:
            keep = labels == c
            sub = dict(t, boxes=t["boxes"][keep], labels=labels[keep])
            if "masks" in t:
                sub["masks"] = t["masks"][keep]
            losses = detector.loss(x[i:i + 1], [sub])
            vals.append(sum_keys(losses, CLS_KEYS + LOC_KEYS).reshape(()))
        out.append(torch.stack(vals).mean() if vals else x.new_zeros(()) + 0 * x[i].sum())
    return torch.stack(out)


@torch.no_grad()
def pseudo_targets(detector: Any, x: torch.Tensor, score_thresh: float = 0.5, min_k: int = 1) -> list[dict]:
    """The clean predictions as pseudo ground truth: per image the detections with score >=
    ``score_thresh``; an image with fewer keeps its ``min_k`` best detections (so a weakly trained model
    still has something to attack). Returns dicts with ``boxes``, ``labels``, ``scores`` (and binary
    ``masks`` for mask models)."""
    out = []
    for det in detector.predict(x):
        scores = det["scores"]
        keep = scores >= score_thresh
        if int(keep.sum()) < min_k:
            order = scores.argsort(descending=True)[:min_k]
            keep = torch.zeros_like(keep)
            keep[order] = True
        t = {"boxes": det["boxes"][keep].to(x.dtype), "labels": det["labels"][keep].long(), "scores": scores[keep]}
        if "masks" in det:  # mask models: their loss needs masks too
            t["masks"] = (det["masks"][keep] > 0.5).to(torch.uint8)
        out.append(t)
    return out


def top_candidates(dense, k: int) -> torch.Tensor:
    """(B, min(k, N)) indices of the dense candidates with the highest max foreground score (invalid
    candidates last), as DAG's dense proposals (RAD appendix E.3)."""
    score = dense.class_probs().amax(-1).masked_fill(~dense.valid, -1.0)
    return score.topk(min(k, score.shape[1]), dim=1).indices


def match_candidates(cand_boxes: torch.Tensor, boxes: torch.Tensor, iou_thresh: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For candidate boxes (n, 4) and reference boxes (G, 4): (index of the best-IoU reference (n,),
    matched mask (n,): IoU >= ``iou_thresh``). Every reference keeps at least its best candidate."""
    n = cand_boxes.shape[0]
    if boxes.numel() == 0 or n == 0:
        return (torch.zeros(n, dtype=torch.long, device=cand_boxes.device),
                torch.zeros(n, dtype=torch.bool, device=cand_boxes.device))
    iou = box_iou(cand_boxes, boxes.to(cand_boxes))  # (n, G)
    best_iou, best = iou.max(1)
    matched = best_iou >= iou_thresh
    forced = iou.argmax(0)  # best candidate of each reference
    ok = iou.amax(0) > 0
    best[forced[ok]] = torch.arange(boxes.shape[0], device=boxes.device)[ok]
    matched[forced[ok]] = True
    return best, matched


def gather_candidates(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t`` (B, N, ...) at candidate indices ``idx`` (B, n) -> (B, n, ...)."""
    shape = idx.shape + t.shape[2:]
    flat = idx.reshape(idx.shape[0], idx.shape[1], *([1] * (t.ndim - 2))).expand(shape)
    return t.gather(1, flat)
