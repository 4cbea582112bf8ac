"""Evaluate a Detector on a COCO-format dataset: predictions in dataset coordinates, then COCO mAP."""

from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch.utils.data import DataLoader, Subset

from advdet.data.collate import collate_detection
from advdet.data.letterbox import unletterbox_boxes, unletterbox_masks
from advdet.metrics.coco_map import coco_map, detections_to_coco_results
from advdet.models.detector import Detector

log = logging.getLogger(__name__)


def predictions_to_coco(detector_outputs: list[dict], targets: list[dict], label_to_cat_id) -> list[dict]:
    """Map per-image predictions (letterboxed pixels, contiguous labels) to COCO results.

    Boxes (and masks) go back to the original image's pixels through the exact letterbox inverse;
    labels become the dataset's category ids.
    """
    results = []
    for det, t in zip(detector_outputs, targets):
        p = t["letterbox"]
        boxes = unletterbox_boxes(det["boxes"].detach().cpu().float(), p)
        masks = None
        if "masks" in det:
            masks = unletterbox_masks(det["masks"].detach().cpu().float(), p)
        results += detections_to_coco_results(int(t["image_id"]), boxes, det["scores"].detach().cpu(),
                                              det["labels"].detach().cpu(), label_to_cat_id, masks)
    return results


@torch.no_grad()
def predict_dataset(detector: Detector, dataset, batch_size: int = 8, limit: int | None = None,
                    progress: Iterable | None = None) -> tuple[list[dict], list[int]]:
    """Run ``detector.predict`` over ``dataset`` (first ``limit`` images); returns (COCO results, image ids)."""
    detector.eval()
    ds = Subset(dataset, range(min(limit, len(dataset)))) if limit else dataset
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate_detection)
    results, ids = [], []
    dev = detector.device
    for images, targets in loader:
        outs = detector.predict(images.to(dev))
        results += predictions_to_coco(outs, targets, dataset.label_to_cat_id)
        ids += [int(t["image_id"]) for t in targets]
    return results, ids


def evaluate_detector(detector: Detector, dataset, batch_size: int = 8, limit: int | None = None) -> dict:
    """Box (and, for mask models, segmentation) COCO mAP of ``detector`` on ``dataset``.

    Returns {map, map50, map75, map_small, map_medium, map_large, ar100[, segm_map, segm_map50, ...],
    images}.
    """
    results, ids = predict_dataset(detector, dataset, batch_size, limit)
    return score_results(dataset.coco_gt, results, ids, getattr(detector, "has_masks", False))


#: the note ``score_results`` returns when a mask model meets ground truth without masks
NO_MASK_GT_NOTE = ("mask mAP needs mask annotations: the ground truth has no 'segmentation' on {n} of its "
                   "{total} non-crowd annotations{kind}; box mAP only")


def gt_has_masks(gt: dict) -> tuple[int, int]:
    """(non-crowd annotations of ``gt`` without a segmentation, all non-crowd annotations)."""
    targets = [a for a in gt.get("annotations", []) if not a.get("iscrowd", 0)]
    segm = [a.get("segmentation") for a in targets]
    missing = sum(1 for m in segm if not (isinstance(m, dict) or (isinstance(m, list) and m)))
    return missing, len(targets)


def score_results(gt: dict, results: list[dict], ids: list[int], masks: bool) -> dict:
    """COCO box mAP of ``results`` on images ``ids`` (plus ``segm_*`` keys when ``masks``), and ``images``.

    A mask model on ground truth without masks (a detection-only COCO set) gets box mAP and a
    ``segm_note`` that says why there is no mask mAP, instead of failing inside pycocotools.
    """
    out = coco_map(gt, results, "bbox", image_ids=ids)
    if masks:
        missing, total = gt_has_masks(gt)
        if missing:
            out["segm_note"] = NO_MASK_GT_NOTE.format(n=missing, total=total,
                                                       kind=" (a detection-only dataset)" if missing == total else "")
            log.info(out["segm_note"])
        else:
            segm = coco_map(gt, [r for r in results if "segmentation" in r], "segm", image_ids=ids)
            out.update({f"segm_{k}": v for k, v in segm.items()})
    out["images"] = len(ids)
    return out
