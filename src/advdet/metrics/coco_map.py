"""COCO mAP for boxes and masks, computed with faster-coco-eval.

The numbers are those of the official COCO protocol (Lin et al., "Microsoft COCO: Common Objects in
Context", ECCV 2014; the ``pycocotools`` ``COCOeval``): for each category ``k`` and IoU threshold
``t`` in {0.50, 0.55, ..., 0.95}, AP is the mean over 101 recall points ``r`` in {0, 0.01, ..., 1}
of the interpolated precision ``p_interp(r) = max_{r' >= r} p(r')``; ``map`` is the mean over
categories and thresholds, ``map50``/``map75`` fix ``t``, ``map_small``/``_medium``/``_large``
restrict to GT area < 32², 32²..96², > 96², and ``ar100`` is the recall with at most 100 detections
per image, averaged over thresholds and categories.

Evaluation runs on faster-coco-eval's C++ ``COCOeval_faster``, which agrees with pycocotools to
1e-4 (checked by ``tests/test_coco_map.py``) and is 10x or more faster on COCO-sized inputs.

Averaging and the ``-1`` convention: COCO marks the AP of a category that has no (non-crowd) GT in
an area range as ``-1`` and leaves it out of the mean, so every value here is the mean over the
categories that *do* have GT; a category with GT but no detections counts as 0. When no category at
all has GT in a bucket (e.g. a dataset without small objects gives ``map_small``), the value is
``-1.0``, exactly as pycocotools reports it. An empty detection list is not an error: it gives 0.0
for every bucket that has GT (and ``-1.0`` for the empty buckets, as above).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from advdet.data.io import read_json

logger = logging.getLogger(__name__)

__all__ = ["COCO_METRIC_KEYS", "coco_map", "detections_to_coco_results"]

#: The keys of the dict returned by :func:`coco_map` (all floats).
COCO_METRIC_KEYS = ("map", "map50", "map75", "map_small", "map_medium", "map_large", "ar100")

# COCOeval_faster.stats_as_dict label -> our key (for the default maxDets [1, 10, 100]).
_STAT_LABELS = {
    "map": "AP_all",
    "map50": "AP_50",
    "map75": "AP_75",
    "map_small": "AP_small",
    "map_medium": "AP_medium",
    "map_large": "AP_large",
    "ar100": "AR_third",
}


def _load_gt(gt: Mapping | str | os.PathLike) -> dict:
    if isinstance(gt, (str, os.PathLike)):
        gt = read_json(gt)
    if not isinstance(gt, Mapping):
        raise TypeError(f"gt must be a COCO instances dict or a path to one, got {type(gt).__name__}")
    for key in ("images", "categories"):
        if key not in gt:
            raise ValueError(f"COCO ground truth has no '{key}' list")
    # Shallow copies: the COCO API adds keys ('ignore', 'rle', ...) to every annotation dict, and the
    # caller's data must not change.
    out = dict(gt)
    out["annotations"] = [dict(a) for a in gt.get("annotations", [])]
    return out


def _load_detections(detections: Sequence[Mapping] | str | os.PathLike) -> Sequence[Mapping]:
    if isinstance(detections, (str, os.PathLike)):
        path = detections
        detections = read_json(path)
        if not isinstance(detections, list):
            raise ValueError(f"{path}: a COCO results file must hold a JSON list of detections")
    return detections


def _build_results(dets: Sequence[Mapping], gt: dict, iou_type: str) -> list[dict]:
    """Validated result annotations, as ``COCO.loadRes`` would build them, in one pass.

    New dicts (the caller's are not touched) with ``id``, ``area`` and ``iscrowd = 0`` added. As
    in pycocotools' ``loadRes``: a detection with a ``bbox`` gets ``area = w * h`` (also for segm);
    a segm detection without one gets the mask's area and bounding box. Unlike ``loadRes``, no
    polygon is made up for box-only results (box IoU never reads it), which is the costly part.
    """
    if not dets:
        return []
    try:
        out = [{**d, "id": i, "iscrowd": 0} for i, d in enumerate(dets, 1)]
        det_imgs = {d["image_id"] for d in out}
        det_cats = {d["category_id"] for d in out}
        scores = np.asarray([d["score"] for d in out], dtype=np.float64)
    except KeyError as err:
        raise ValueError(f"every detection needs image_id, category_id and score; one lacks {err}") from None
    except (TypeError, ValueError):
        raise ValueError("detection scores must be numbers") from None
    unknown = det_imgs - {img["id"] for img in gt["images"]}
    if unknown:
        raise ValueError(f"detections refer to image ids not in the ground truth: {sorted(unknown)[:10]}")
    unknown = det_cats - {cat["id"] for cat in gt["categories"]}
    if unknown:
        raise ValueError(f"detections refer to category ids not in the ground truth: {sorted(unknown)[:10]}")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} detection scores are not finite")

    if iou_type == "segm":
        from faster_coco_eval.core import mask as mask_utils

        missing = sum(1 for d in out if "segmentation" not in d)
        if missing:
            raise ValueError(f"segm evaluation needs a 'segmentation' RLE in every detection; {missing} lack it")
        mask_area = {}
        for i, d in enumerate(out):
            if "bbox" not in d:
                mask_area[i] = float(mask_utils.area(d["segmentation"]))
                d["bbox"] = [float(v) for v in mask_utils.toBbox(d["segmentation"])]
    try:
        boxes = np.asarray([d["bbox"] for d in out], dtype=np.float64)
    except KeyError:
        raise ValueError("bbox evaluation needs a 'bbox' [x, y, w, h] in every detection") from None
    except (TypeError, ValueError):
        raise ValueError("every detection 'bbox' must be 4 numbers [x, y, w, h]") from None
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"detection boxes must be [x, y, w, h]; got shape {boxes.shape}")
    if not np.all(np.isfinite(boxes)):
        raise ValueError(f"{int((~np.isfinite(boxes).all(1)).sum())} detection boxes are not finite")
    for d, area in zip(out, (boxes[:, 2] * boxes[:, 3]).tolist()):
        d["area"] = area
    if iou_type == "segm":
        for i, area in mask_area.items():
            out[i]["area"] = area
    return out


def coco_map(
    gt: Mapping | str | os.PathLike,
    detections: Sequence[Mapping] | str | os.PathLike,
    iou_type: str = "bbox",
    image_ids: Sequence[int] | None = None,
    *,
    verbose: bool = False,
    per_class: bool = False,
) -> dict[str, Any]:
    """COCO AP/AR of ``detections`` against ``gt`` (see the module docstring for the protocol).

    Args:
        gt: a COCO instances dict (``images``, ``annotations``, ``categories``) or a path to its
            JSON. Not modified.
        detections: COCO result dicts ``{image_id, category_id, bbox [x, y, w, h], score[,
            segmentation RLE]}`` or a path to a results JSON. Not modified. May be empty.
        iou_type: ``"bbox"`` or ``"segm"`` (mask IoU; detections need ``segmentation``).
        image_ids: evaluate on these images only (default: every image of ``gt``). Images without
            detections count as misses for their GT.
        verbose: print the libraries' progress lines and the standard COCO summary; otherwise that output is
            silenced (and sent to the ``logging`` debug level).
        per_class: also return ``ap_per_class``: ``{category_id: AP@[.50:.95]}`` with ``-1.0`` for
            categories without GT.

    Returns:
        ``{map, map50, map75, map_small, map_medium, map_large, ar100}`` as floats in [0, 1] (or
        ``-1.0`` where undefined, COCO convention), plus ``ap_per_class`` when asked. For ``segm``
        the keys are the same; callers add a prefix.
    """
    from faster_coco_eval import COCO, COCOeval_faster

    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    gt_dict = _load_gt(gt)
    results = _build_results(_load_detections(detections), gt_dict, iou_type)

    if verbose:
        print_function = print
        quiet: contextlib.AbstractContextManager = contextlib.nullcontext()
    else:
        print_function = logger.debug
        quiet = contextlib.redirect_stdout(io.StringIO())

    with quiet:
        coco_gt = COCO(gt_dict, print_function=print_function)
        coco_dt = COCO(print_function=print_function)
        coco_dt.dataset = {"images": gt_dict["images"], "categories": gt_dict["categories"], "annotations": results}
        coco_dt.createIndex()
        evaluator = COCOeval_faster(coco_gt, coco_dt, iou_type, print_function=print_function)
        if image_ids is not None:
            ids = [int(i) for i in image_ids]
            unknown = set(ids) - set(coco_gt.getImgIds())
            if unknown:
                raise ValueError(f"image_ids not in the ground truth: {sorted(unknown)[:10]}")
            evaluator.params.imgIds = sorted(set(ids))
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()

    stats = evaluator.stats_as_dict
    out: dict[str, Any] = {key: float(stats[label]) for key, label in _STAT_LABELS.items()}
    if per_class:
        # precision: [T iou thresholds, R recall points, K categories, A area ranges, M maxDets]
        precision = np.asarray(evaluator.eval["precision"])
        ap_per_class = {}
        for k, cat_id in enumerate(evaluator.params.catIds):
            p = precision[:, :, k, 0, -1]
            ap_per_class[int(cat_id)] = float(p[p > -1].mean()) if (p > -1).any() else -1.0
        out["ap_per_class"] = ap_per_class
    return out


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _encode_masks(masks: np.ndarray, mask_threshold: float) -> list[dict]:
    from faster_coco_eval.core import mask as mask_utils

    if masks.ndim == 4:
        if masks.shape[1] != 1:
            raise ValueError(f"masks must be (N, H, W) or (N, 1, H, W), got {masks.shape}")
        masks = masks[:, 0]
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W) or (N, 1, H, W), got {masks.shape}")
    binary = masks > mask_threshold if masks.dtype.kind == "f" else masks.astype(bool)
    if len(binary) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        if isinstance(rle["counts"], bytes):  # JSON-friendly
            rle["counts"] = rle["counts"].decode("ascii")
    return rles


def detections_to_coco_results(
    image_id: int,
    boxes_xyxy: Any,
    scores: Any,
    labels: Any,
    label_to_cat_id: Mapping[int, int] | Sequence[int],
    masks: Any | None = None,
    *,
    mask_threshold: float = 0.5,
) -> list[dict]:
    """Turn one image's detections into COCO result dicts.

    Args:
        image_id: the COCO image id.
        boxes_xyxy: (N, 4) boxes ``x1, y1, x2, y2`` in absolute pixels (tensor or array); written
            as ``[x1, y1, x2 - x1, y2 - y1]``.
        scores: (N,) confidences.
        labels: (N,) contiguous class ids.
        label_to_cat_id: contiguous label -> dataset category id (a dict, or a sequence indexed by
            label).
        masks: optional (N, H, W) or (N, 1, H, W) masks in image pixels; boolean/integer masks are
            taken as binary, float masks (e.g. Mask R-CNN probabilities) are thresholded at
            ``mask_threshold``. Each is stored as a compressed RLE with ``counts`` as a str.

    Returns:
        A list of N dicts ``{image_id, category_id, bbox, score[, segmentation]}``.
    """
    boxes = _as_numpy(boxes_xyxy).astype(np.float64).reshape(-1, 4)
    scores_np = _as_numpy(scores).astype(np.float64).reshape(-1)
    labels_np = _as_numpy(labels).astype(np.int64).reshape(-1)
    n = len(boxes)
    if len(scores_np) != n or len(labels_np) != n:
        raise ValueError(f"boxes ({n}), scores ({len(scores_np)}) and labels ({len(labels_np)}) differ in length")
    xywh = boxes.copy()
    xywh[:, 2:] -= xywh[:, :2]
    try:
        cat_ids = [int(label_to_cat_id[int(lab)]) for lab in labels_np]
    except (KeyError, IndexError) as err:
        raise ValueError(f"label {err} has no category id in label_to_cat_id") from None
    rles = None
    if masks is not None:
        rles = _encode_masks(_as_numpy(masks), mask_threshold)
        if len(rles) != n:
            raise ValueError(f"{len(rles)} masks for {n} boxes")
    results = []
    for i, (box, score, cat_id) in enumerate(zip(xywh.tolist(), scores_np.tolist(), cat_ids)):
        res = {"image_id": int(image_id), "category_id": cat_id, "bbox": box, "score": score}
        if rles is not None:
            res["segmentation"] = rles[i]
        results.append(res)
    return results
