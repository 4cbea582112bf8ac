"""Pascal VOC mAP at IoU 0.5, as the standard py-faster-rcnn ``voc_eval`` computes it.

Protocol (Everingham et al., "The PASCAL Visual Object Classes (VOC) Challenge", IJCV 2010; code of
py-faster-rcnn ``lib/datasets/voc_eval.py``, also used by ssd.pytorch and RobustDet):

- per class, all detections of the test set are ranked by score (descending; ties keep input order:
  image order, then order within the image);
- a detection is matched to the GT box of its class in its image with the largest IoU (difficult
  ones included). If that IoU is ``> iou_threshold``: a difficult GT makes the detection *ignored*
  (neither TP nor FP), an unclaimed GT makes it a TP and claims the GT, an already claimed GT makes
  it a FP (duplicate). Otherwise it is a FP;
- ``recall = cumTP / npos`` with ``npos`` the number of non-difficult GT,
  ``precision = cumTP / max(cumTP + cumFP, eps)``, and AP from :func:`voc_ap`;
- mAP is the mean AP over the classes with ``npos > 0``; classes without (non-difficult) GT are left
  out of the mean and reported as NaN.

IoU uses VOC's inclusive pixel convention: a box ``x1..x2`` is ``x2 - x1 + 1`` pixels wide, i.e.
``w = x2 - x1 + pixel_offset`` with ``pixel_offset=1.0`` (the VOC / voc_eval default). Use
``pixel_offset=0.0`` for continuous coordinates (torchvision / COCO convention).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["voc_ap", "voc_map", "voc_matches"]


def voc_ap(recall: Any, precision: Any, use_07_metric: bool = True) -> float:
    """Average precision from a ranked list's cumulative recall and precision arrays.

    ``use_07_metric=True`` (VOC2007 11-point rule): ``AP = 1/11 * sum_{t in {0, 0.1, ..., 1}}
    max_{recall >= t} precision`` (0 where no recall reaches ``t``). The thresholds are
    ``np.arange(0., 1.1, 0.1)`` exactly as in voc_eval, so e.g. ``t = 0.30000000000000004`` and a
    recall of exactly 3/10 does *not* reach it; this keeps results identical to published VOC07
    numbers.

    ``use_07_metric=False`` (VOC2010+ all-point rule): the area under the precision envelope
    ``p_interp(r) = max_{r' >= r} p(r')`` after adding the end points (0, 0) and (1, 0), summed
    over the points where recall changes.
    """
    rec = np.asarray(recall, dtype=np.float64).reshape(-1)
    prec = np.asarray(precision, dtype=np.float64).reshape(-1)
    if rec.shape != prec.shape:
        raise ValueError(f"recall and precision differ in length: {rec.shape} vs {prec.shape}")
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = 0.0 if np.sum(rec >= t) == 0 else float(np.max(prec[rec >= t]))
            ap = ap + p / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):  # precision envelope
        mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _np(x: Any, dtype, shape_tail: tuple = ()) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=dtype)
    if shape_tail:
        arr = arr.reshape(-1, *shape_tail)
    else:
        arr = arr.reshape(-1)
    return arr


def _iou_matrix(dt: np.ndarray, gt: np.ndarray, pixel_offset: float) -> np.ndarray:
    """(D, G) IoU with VOC's inclusive-pixel convention (``pixel_offset`` added to widths)."""
    ixmin = np.maximum(dt[:, None, 0], gt[None, :, 0])
    iymin = np.maximum(dt[:, None, 1], gt[None, :, 1])
    ixmax = np.minimum(dt[:, None, 2], gt[None, :, 2])
    iymax = np.minimum(dt[:, None, 3], gt[None, :, 3])
    iw = np.maximum(ixmax - ixmin + pixel_offset, 0.0)
    ih = np.maximum(iymax - iymin + pixel_offset, 0.0)
    inters = iw * ih
    area_dt = (dt[:, 2] - dt[:, 0] + pixel_offset) * (dt[:, 3] - dt[:, 1] + pixel_offset)
    area_gt = (gt[:, 2] - gt[:, 0] + pixel_offset) * (gt[:, 3] - gt[:, 1] + pixel_offset)
    return inters / (area_dt[:, None] + area_gt[None, :] - inters)


def voc_matches(
    gt: Sequence[Mapping[str, Any]],
    detections: Sequence[Mapping[str, Any]],
    num_classes: int,
    iou_threshold: float = 0.5,
    pixel_offset: float = 1.0,
) -> tuple[list, list, list, list, list, np.ndarray]:
    """The per-image half of :func:`voc_map`: every detection matched within its own image.

    Returns, per class ``c``, lists with one array per (image, class) that has detections: ``scores``,
    ``tp`` and ``fp`` flags (both 0 for a detection matched to a difficult GT: ignored), the global
    input order of the detections (the tie-break of the ranking) and the image index; and ``npos``, an
    ``(images, num_classes)`` int array of non-difficult GT per image. :func:`voc_map` ranks and
    accumulates these over the dataset; :mod:`advdet.metrics.bootstrap` re-weights them per image.
    """
    if len(gt) != len(detections):
        raise ValueError(f"gt has {len(gt)} images but detections has {len(detections)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")

    # Per class: flat lists over the dataset of (score, tp, fp) in ranked order, and npos.
    scores_c: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    tp_c: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    fp_c: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    order_c: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    img_c: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    npos = np.zeros((len(gt), num_classes), dtype=np.int64)
    offset = 0  # global detection index, for stable tie-breaking across images

    for img_idx, (g, d) in enumerate(zip(gt, detections)):
        g_boxes = _np(g["boxes"], np.float64, (4,))
        g_labels = _np(g["labels"], np.int64)
        g_diff = (
            _np(g["difficult"], bool) if g.get("difficult") is not None else np.zeros(len(g_labels), bool)
        )
        d_boxes = _np(d["boxes"], np.float64, (4,))
        d_scores = _np(d["scores"], np.float64)
        d_labels = _np(d["labels"], np.int64)
        if not (len(g_boxes) == len(g_labels) == len(g_diff)):
            raise ValueError(f"image {img_idx}: gt boxes, labels and difficult differ in length")
        if not (len(d_boxes) == len(d_scores) == len(d_labels)):
            raise ValueError(f"image {img_idx}: detection boxes, scores and labels differ in length")
        for name, labels in (("gt", g_labels), ("detection", d_labels)):
            if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
                raise ValueError(f"image {img_idx}: {name} label outside [0, {num_classes}): {labels.tolist()}")
        if not np.all(np.isfinite(d_scores)) or not np.all(np.isfinite(d_boxes)):
            raise ValueError(f"image {img_idx}: non-finite detection boxes or scores")
        np.add.at(npos[img_idx], g_labels[~g_diff], 1)

        for c in np.unique(d_labels):
            di = np.nonzero(d_labels == c)[0]
            # rank within the image exactly as the global stable ranking restricted to this image
            di = di[np.argsort(-d_scores[di], kind="stable")]
            gi = np.nonzero(g_labels == c)[0]
            tp = np.zeros(len(di))
            fp = np.zeros(len(di))
            if len(gi) == 0:
                fp[:] = 1.0
            else:
                ious = _iou_matrix(d_boxes[di], g_boxes[gi], pixel_offset)
                jmax = ious.argmax(axis=1)
                ovmax = ious[np.arange(len(di)), jmax]
                claimed = np.zeros(len(gi), dtype=bool)
                diff = g_diff[gi]
                for k in range(len(di)):
                    if ovmax[k] > iou_threshold:
                        j = jmax[k]
                        if not diff[j]:
                            if not claimed[j]:
                                tp[k] = 1.0
                                claimed[j] = True
                            else:
                                fp[k] = 1.0  # duplicate
                        # matched to a difficult GT: ignored
                    else:
                        fp[k] = 1.0
            scores_c[c].append(d_scores[di])
            tp_c[c].append(tp)
            fp_c[c].append(fp)
            order_c[c].append(di + offset)
            img_c[c].append(np.full(len(di), img_idx, dtype=np.int64))
        offset += len(d_labels)

    return scores_c, tp_c, fp_c, order_c, img_c, npos


def voc_map(
    gt: Sequence[Mapping[str, Any]],
    detections: Sequence[Mapping[str, Any]],
    num_classes: int,
    iou_threshold: float = 0.5,
    use_07_metric: bool = True,
    pixel_offset: float = 1.0,
) -> dict[str, Any]:
    """VOC mAP of ``detections`` against ``gt`` (see the module docstring for the protocol).

    Args:
        gt: one dict per image: ``boxes`` (N, 4) xyxy, ``labels`` (N,) in ``[0, num_classes)``,
            optional ``difficult`` (N,) bool (default all False). Tensors or arrays.
        detections: one dict per image, aligned with ``gt``: ``boxes`` (M, 4) xyxy, ``scores``
            (M,), ``labels`` (M,).
        num_classes: number of (foreground) classes; labels are contiguous from 0.
        iou_threshold: a detection matches when IoU ``>`` this (strict, as voc_eval).
        use_07_metric: the VOC07 11-point AP (default, the RobustDet/ssd.pytorch protocol) or
            the all-point area.
        pixel_offset: added to box widths/heights in IoU: 1.0 is VOC's inclusive pixel
            convention, 0.0 continuous coordinates.

    Returns:
        ``{"map": float, "ap_per_class": [float] * num_classes, "num_gt": [int] * num_classes}``;
        ``num_gt`` counts non-difficult GT, classes with ``num_gt == 0`` have AP NaN and are
        excluded from ``map`` (NaN when no class has GT).
    """
    scores_c, tp_c, fp_c, order_c, _, npos_img = voc_matches(gt, detections, num_classes, iou_threshold,
                                                             pixel_offset)
    npos = npos_img.sum(axis=0)

    ap_per_class = [float("nan")] * num_classes
    for c in range(num_classes):
        if npos[c] == 0:
            continue
        if not scores_c[c]:
            ap_per_class[c] = 0.0
            continue
        scores = np.concatenate(scores_c[c])
        order = np.lexsort((np.concatenate(order_c[c]), -scores))  # by score desc, then input order
        tp = np.cumsum(np.concatenate(tp_c[c])[order])
        fp = np.cumsum(np.concatenate(fp_c[c])[order])
        rec = tp / float(npos[c])
        prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        ap_per_class[c] = voc_ap(rec, prec, use_07_metric)

    valid = [ap for ap, n in zip(ap_per_class, npos) if n > 0]
    mean = float(np.mean(valid)) if valid else float("nan")
    return {"map": mean, "ap_per_class": ap_per_class, "num_gt": npos.tolist()}
