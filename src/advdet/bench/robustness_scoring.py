"""The evaluation data of a robustness table and the mAP50 of each column: VOC07 11-point AP (VOC data,
difficult objects ignored, ssd.pytorch's 1-based pixels) or COCO AP@0.5, and its bootstrap samples."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from advdet.data.letterbox import unletterbox_boxes

__all__ = ["METRICS", "load_eval_dataset", "resolve_metric", "is_voc", "Column", "voc_gt", "voc_det", "score_column",
           "boot_samples"]

METRICS = ("auto", "voc07", "coco50")


def _voc_root(path: Path) -> Path | None:
    for root in (path, path / "VOC2007"):
        if (root / "ImageSets" / "Main").is_dir() and (root / "Annotations").is_dir():
            return root
    return None


def load_eval_dataset(data: str | os.PathLike, ann: str | os.PathLike | None = None, *, size: int = 256,
                      voc_split: str = "test", skip_bad: bool = False):
    """The evaluation dataset for ``data``: a Pascal VOC folder (``ImageSets/Main`` + ``Annotations``,
    or a VOCdevkit folder holding ``VOC2007``) as ``VOCDetection(split=voc_split)``, anything else through
    ``advdet.data.registry.build_dataset`` (``shapes-val``, a COCO-format folder, images + ``ann``)."""
    path = Path(str(data)).expanduser()
    if ann is None and path.is_dir():
        root = _voc_root(path)
        if root is not None:
            from advdet.data.voc import VOCDetection

            return VOCDetection(root, split=voc_split, size=size, skip_bad=skip_bad)
    from advdet.data.registry import build_dataset

    return build_dataset(data, ann, size=size, skip_bad=skip_bad, with_masks=False)


def is_voc(ds: Any) -> bool:
    from advdet.data.voc import VOCDetection

    return isinstance(ds, VOCDetection)


def resolve_metric(metric: str, dataset: Any) -> str:
    """``auto`` -> ``voc07`` for a VOC dataset, ``coco50`` otherwise; checks the name."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if metric == "auto":
        return "voc07" if is_voc(dataset) else "coco50"
    if metric == "coco50" and not hasattr(dataset, "coco_gt"):
        raise ValueError(f"metric coco50 needs a COCO-format dataset; {type(dataset).__name__} has no "
                         "COCO ground truth (use --metric voc07)")
    return metric


@dataclass
class Column:
    """One evaluated condition: an attack (or clean) at a step count, with its collected detections."""

    key: str
    attack: str
    steps: int | None
    coco_results: list
    voc_dets: list
    seconds: float = 0.0
    settings: dict | None = None


def voc_gt(t: dict, voc: bool) -> dict:
    boxes = unletterbox_boxes(t["boxes"].float(), t["letterbox"])
    if voc:  # back to VOC's 1-based inclusive pixels (the reader made them continuous 0-based)
        boxes = boxes + torch.tensor([1.0, 1.0, 0.0, 0.0])
    diff = t.get("difficult")
    return {"boxes": boxes, "labels": t["labels"], "difficult": diff if diff is not None else None}


def voc_det(det: dict, t: dict, voc: bool) -> dict:
    boxes = unletterbox_boxes(det["boxes"].detach().cpu().float(), t["letterbox"])
    if voc:  # ssd.pytorch writes detections 1-based
        boxes = boxes + 1.0
    return {"boxes": boxes, "scores": det["scores"].detach().cpu(), "labels": det["labels"].detach().cpu()}


def score_column(metric: str, ds: Any, col: Column, ids: list[int], gts: list[dict]) -> dict:
    if metric == "coco50":
        from advdet.models.evaluate import score_results

        out = score_results(ds.coco_gt, col.coco_results, ids, False)
        return {"map50": float(out["map50"]), "map": float(out["map"]), "map75": float(out["map75"])}
    from advdet.metrics.voc_map import voc_map

    voc = is_voc(ds)
    res = voc_map(gts, col.voc_dets, ds.num_classes, iou_threshold=0.5, use_07_metric=True,
                  pixel_offset=1.0 if voc else 0.0)
    m = res["map"]
    return {"map50": None if math.isnan(m) else float(m),
            "ap_per_class": [None if math.isnan(a) else float(a) for a in res["ap_per_class"]]}


def boot_samples(metric: str, ds: Any, col: Column, ids: list[int], gts: list[dict], indices) -> Any:
    """mAP50 of ``col`` on every bootstrap resample ``indices`` (the same protocol as ``score_column``)."""
    from advdet.metrics.bootstrap import bootstrap_map, coco_image_matches, voc_image_matches

    if metric == "coco50":
        matches = coco_image_matches(ds.coco_gt, col.coco_results, ids)
    else:
        matches = voc_image_matches(gts, col.voc_dets, ds.num_classes, iou_threshold=0.5, use_07_metric=True,
                                    pixel_offset=1.0 if is_voc(ds) else 0.0, image_ids=ids)
    return bootstrap_map(matches, indices)
