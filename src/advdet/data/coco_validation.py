"""Validation of a COCO instances JSON: the file's structure, its categories, images and annotations (keys,
unknown category, orphan annotation, negative width or height, a box entirely outside its image, malformed
segmentations), parsed into per-image records for :class:`advdet.data.coco.CocoDetection`."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from advdet.data.errors import DatasetError
from advdet.data.reading import clip_boxes, image_size

log = logging.getLogger(__name__)

__all__ = ["ImageRecord", "ParsedCoco", "parse_coco", "is_int", "is_number", "has_segmentation",
           "segmentation_problem"]


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def has_segmentation(ann: dict) -> bool:
    segm = ann.get("segmentation")
    return isinstance(segm, dict) or (isinstance(segm, list) and len(segm) > 0)


def segmentation_problem(segm: Any, height: int, width: int) -> str | None:
    """Why ``segm`` is not a valid COCO segmentation for an (H, W) image, or None when it is."""
    if isinstance(segm, list):
        if not segm:
            return "empty segmentation"
        for poly in segm:
            if not isinstance(poly, list) or not all(is_number(v) for v in poly):
                return "polygon is not a list of finite numbers"
            if len(poly) < 6 or len(poly) % 2:
                return f"polygon has {len(poly)} coordinates (needs an even number >= 6)"
        return None
    if isinstance(segm, dict):
        size, counts = segm.get("size"), segm.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(is_int(v) for v in size)):
            return "RLE without a valid 'size'"
        if list(size) != [height, width]:
            return f"RLE size {size} differs from image size [{height}, {width}]"
        if isinstance(counts, list):
            if not all(is_int(v) and v >= 0 for v in counts) or sum(counts) != height * width:
                return "uncompressed RLE counts do not cover the image"
            return None
        if isinstance(counts, (str, bytes)):
            return None
        return "RLE without 'counts'"
    return f"segmentation of type {type(segm).__name__}"


@dataclass
class ImageRecord:
    """One image of the file: its id, file, size and (after parsing) its targets."""

    image_id: int
    file_name: str
    path: Path
    height: int | None
    width: int | None
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    segms: list = field(default_factory=list)


@dataclass
class ParsedCoco:
    """What :func:`parse_coco` found: categories sorted by id and the label maps (contiguous labels 0..K-1),
    the image records by id, whether masks are on, and per image the accepted annotations
    ``(index in the file, annotation, clipped xyxy box, clipped?, positive area?)``."""

    categories: list[dict]
    cat_id_to_label: dict[int, int]
    label_to_cat_id: dict[int, int]
    records: dict[int, ImageRecord]
    with_masks: bool
    targets: dict[int, list[tuple[int, dict, np.ndarray, bool, bool]]]


def parse_coco(raw: Any, ann_file: Path, images_dir: Path, with_masks: bool | None,
               bad: Callable[..., None]) -> ParsedCoco:
    """Check a COCO instances JSON and parse what it holds (images, categories, annotations).

    ``bad(item, problem, image_path=None)`` is called for every bad item (it raises, or records the item and
    returns when bad items are skipped); structural problems (top level, categories) always raise
    ``DatasetError`` naming ``ann_file``.
    """
    if not isinstance(raw, dict):
        raise DatasetError(ann_file, f"top level is {type(raw).__name__}, expected an object")
    for key in ("images", "annotations", "categories"):
        if key not in raw:
            raise DatasetError(ann_file, f"missing key {key!r}")
        if not isinstance(raw[key], list):
            raise DatasetError(ann_file, f"{key!r} is not a list")

    # categories: strict, a dataset cannot be used without them
    cats = []
    for k, cat in enumerate(raw["categories"]):
        if not (isinstance(cat, dict) and is_int(cat.get("id")) and isinstance(cat.get("name"), str)):
            raise DatasetError(ann_file,
                               f"category #{k} needs an integer 'id' and a string 'name'")
        cats.append(cat)
    ids = [c["id"] for c in cats]
    if len(set(ids)) != len(ids):
        raise DatasetError(ann_file, "duplicate category ids")
    categories: list[dict] = sorted(cats, key=lambda c: c["id"])
    cat_id_to_label: dict[int, int] = {c["id"]: i for i, c in enumerate(categories)}
    label_to_cat_id: dict[int, int] = {i: c["id"] for i, c in enumerate(categories)}

    # images
    records: dict[int, ImageRecord] = {}
    dropped_images: set[int] = set()
    first_file: dict[int, str] = {}  # image id -> file_name of its first entry (duplicate messages)
    for k, img in enumerate(raw["images"]):
        iid = img.get("id") if isinstance(img, dict) else None
        item = f"image {iid if is_int(iid) else '#' + str(k)}"
        if not isinstance(img, dict):
            bad(item, "entry is not an object")
            continue
        if not is_int(iid):
            bad(item, "missing or non-integer 'id'")
            continue
        fname = img.get("file_name")
        if iid in first_file:
            bad(item, f"duplicate image id {iid}: {first_file[iid]!r} and {fname!r} (their "
                            "annotations cannot be told apart, so neither image can be used)")
            dropped_images.add(iid)
            records.pop(iid, None)
            continue
        first_file[iid] = fname if isinstance(fname, str) else repr(fname)
        if not isinstance(fname, str) or not fname:
            bad(item, "missing 'file_name'")
            dropped_images.add(iid)
            continue
        h, w = img.get("height"), img.get("width")
        if (h is not None or w is not None) and not (
                is_int(h) and is_int(w) and h > 0 and w > 0):
            bad(f"{item} ({fname})", f"invalid height/width {h!r}/{w!r}")
            dropped_images.add(iid)
            continue
        records[iid] = ImageRecord(iid, fname, images_dir / fname, h, w)

    # sizes missing from the JSON come from the image headers
    for iid, rec in list(records.items()):
        if rec.height is None:
            try:
                rec.height, rec.width = image_size(rec.path)
            except DatasetError as err:
                bad(str(rec.path), err.problem, rec.path)
                dropped_images.add(iid)
                del records[iid]

    anns = raw["annotations"]
    if with_masks is None:
        targets = [a for a in anns if isinstance(a, dict) and not a.get("iscrowd", 0)]
        lacking = sum(1 for a in targets if not has_segmentation(a))
        with_masks = bool(targets) and lacking == 0
        if not with_masks and lacking < len(targets):
            log.warning("%s: %d of %d annotations lack a segmentation, so the targets are loaded without masks "
                        "(mask losses off; evaluation reads the segmentations from the file)", ann_file, lacking,
                        len(targets))
    with_masks = bool(with_masks)

    # annotations: validated now, counted in _finish for images that survive
    targets: dict[int, list[tuple[int, dict, np.ndarray, bool, bool]]] = {}
    seen_ids: set[int] = set()
    for k, ann in enumerate(anns):
        aid = ann.get("id") if isinstance(ann, dict) else None
        item = f"annotation {aid if aid is not None else '#' + str(k)}"
        if not isinstance(ann, dict):
            bad(item, "entry is not an object")
            continue
        if aid is not None:
            if not is_int(aid) or aid in seen_ids:
                bad(item, "duplicate or non-integer annotation id")
                continue
            seen_ids.add(aid)
        missing = [key for key in ("image_id", "category_id", "bbox") if key not in ann]
        if missing:
            bad(item, f"missing key(s) {', '.join(map(repr, missing))}")
            continue
        iid = ann["image_id"]
        if is_int(iid) and iid in dropped_images:
            continue  # its image was skipped and recorded
        item = f"{item} (image {iid})"
        if not is_int(iid) or iid not in records:
            bad(item, f"image id {iid!r} is not in 'images'")
            continue
        if not is_int(ann["category_id"]) or ann["category_id"] not in cat_id_to_label:
            bad(item, f"unknown category id {ann['category_id']!r}")
            continue
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(is_number(v) for v in bbox)):
            bad(item, f"bbox {bbox!r} is not 4 finite numbers [x, y, w, h]")
            continue
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1):
            bad(item, f"iscrowd {crowd!r} is not 0 or 1")
            continue
        rec = records[iid]
        if with_masks and (not crowd or ann.get("segmentation") not in (None, [])):
            if not has_segmentation(ann):
                bad(item, "no segmentation but masks were requested")
                continue
            problem = segmentation_problem(ann["segmentation"], rec.height, rec.width)
            if problem:
                bad(item, f"malformed segmentation: {problem}")
                continue
        x, y, w, h = (float(v) for v in bbox)
        if w < 0 or h < 0:
            bad(item, f"bbox {bbox!r} has a negative width or height (COCO boxes are [x, y, w, h])")
            continue
        box, changed, positive = clip_boxes(np.array([[x, y, x + w, y + h]]), rec.width, rec.height)
        if w > 0 and h > 0 and not positive[0]:
            bad(item, f"bbox {bbox!r} lies entirely outside the {rec.width}x{rec.height} image "
                            f"({rec.file_name})")
            continue
        targets.setdefault(iid, []).append((k, ann, box[0], bool(changed[0]), bool(positive[0])))
    return ParsedCoco(categories, cat_id_to_label, label_to_cat_id, records, with_masks, targets)
