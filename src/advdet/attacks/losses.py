"""Per-image detector losses and shared helpers of the detector attacks.

Normalisation (why batch 8 equals batch 1): every loss here is computed per image exactly as for a
batch of that image alone, i.e. normalised by *that image's* number of positives (SSD) or not
normalised across images (other families), and attacks sum them over the batch. SSD's
``multibox_loss`` normalises by the positives of the whole batch, even with ``reduction="none"``, so
for SSD-VGG one forward pass is followed by one ``multibox_loss`` call per image slice; for other
families ``detector.loss`` is called once per image (B forward passes), unless the detector offers a
``per_image_loss(x, targets) -> dict[str, (B,)]`` method.

The gradient of a loss-based attack only needs the *sum* over the batch (``total_losses``). For the
families in ``BATCH_MEAN_FAMILIES`` the loss of a batch is the mean over its images of the loss of each
image alone, so that sum is ``B * loss(batch)``: one batched forward and backward pass, and the same
gradient as the per-image calls (the model is in eval mode, so images do not interact).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

#: loss names of the Detector contract counted as classification (A_cls) and localization (A_loc):
#: objectness (YOLO ``obj``, Faster R-CNN ``rpn_obj``) is the background/foreground part of the
#: classification confidence, like SSD's background column. Localization includes the box terms that
#: come beside an L1/IoU one: ultralytics' distribution focal loss (``dfl``) and RT-DETR's GIoU (``giou``).
CLS_KEYS = ("cls", "obj", "rpn_obj")
LOC_KEYS = ("loc", "rpn_loc", "dfl", "giou")


def _is_ssd_vgg(detector: Any) -> bool:
    return hasattr(detector, "multibox_loss") and hasattr(detector, "raw") and hasattr(detector, "encode_targets")


def per_image_losses(detector: Any, x: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
    """The detector's losses per image: name -> (B,), each as if the image were its own batch."""
    if len(targets) != x.shape[0]:
        raise ValueError(f"{x.shape[0]} images but {len(targets)} targets")
    if hasattr(detector, "per_image_loss"):
        return detector.per_image_loss(x, targets)
    if _is_ssd_vgg(detector):
        loc, conf = detector.raw(x)
        parts = [detector.multibox_loss(loc[i:i + 1], conf[i:i + 1], [targets[i]]) for i in range(x.shape[0])]
    else:
        parts = [detector.loss(x[i:i + 1], [targets[i]]) for i in range(x.shape[0])]
    keys = parts[0].keys()
    return {k: torch.stack([p[k].reshape(()) for p in parts]) for k in keys}


#: families whose ``loss(batch)`` is the mean over the images of ``loss(image alone)`` (model in eval
#: mode): torchvision RetinaNet (per-image focal / L1 sums over that image's foreground, averaged over
#: the images), YOLOv3 (sums over candidates divided by B), torchvision Faster R-CNN (means over the same
#: number of sampled anchors and ROIs per image, 128 by default, which every image fills in practice).
#: Not FCOS or torchvision SSD (normalised by the foreground count of the whole batch), nor Mask R-CNN
#: (mask loss averaged over the positive ROIs of the whole batch).
BATCH_MEAN_FAMILIES = ("retinanet", "yolov3", "faster_rcnn")


def total_losses(detector: Any, x: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
    """The sum over the batch of ``per_image_losses`` (name -> 0-dim tensor); one batched call,
    ``B * detector.loss(x, targets)``, for the families of ``BATCH_MEAN_FAMILIES``."""
    if len(targets) != x.shape[0]:
        raise ValueError(f"{x.shape[0]} images but {len(targets)} targets")
    if not hasattr(detector, "per_image_loss") and getattr(detector, "family", None) in BATCH_MEAN_FAMILIES:
        b = x.shape[0]
        return {k: v * b for k, v in detector.loss(x, list(targets)).items()}
    return {k: v.sum() for k, v in per_image_losses(detector, x, targets).items()}


def sum_keys(losses: dict[str, torch.Tensor], keys: tuple[str, ...] | None) -> torch.Tensor:
    """Sum of the named losses present in ``losses`` (all of them for ``keys=None``)."""
    names = list(losses) if keys is None else [k for k in keys if k in losses]
    if not names:
        raise KeyError(f"none of the losses {keys} in the detector's losses {sorted(losses)}")
    return sum(losses[k] for k in names)


def cwa_loss(detector: Any, x: torch.Tensor, targets: list[dict]) -> torch.Tensor:
    """Class-wise loss of CWA (Chen et al. 2021; ALGORITHMS.md 1.6), per image (B,).

    SSD-VGG: loss per positive prior = CE(conf) + sum Smooth-L1(loc), negatives unused; averaged over the
    priors of each matched ground-truth class, then over the classes present. Other families (an
    approximation, no per-prior losses in the contract): for each class present, the family's
    ``cls + loc`` losses with the targets of that class only, averaged over the classes present.
    An image without targets scores 0.
    """
    b = x.shape[0]
    if _is_ssd_vgg(detector):
        loc, conf = detector.raw(x)
        loc_t, cls_t = detector.encode_targets(targets)
        pos = cls_t > 0
        ce = F.cross_entropy(conf.reshape(-1, conf.shape[-1]), cls_t.reshape(-1), reduction="none").view(pos.shape)
        per = (ce + F.smooth_l1_loss(loc, loc_t, reduction="none").sum(-1)) * pos
        onehot = F.one_hot(cls_t, conf.shape[-1]).to(per.dtype) * pos[..., None]  # (B, P, K+1)
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
