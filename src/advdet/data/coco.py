"""COCO-format detection / instance-segmentation dataset, letterboxed to S x S."""

from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from advdet.data.errors import DataReport, DatasetError
from advdet.data.io import read_image_rgb, read_json
from advdet.data.letterbox import LetterboxParams, letterbox, letterbox_boxes, letterbox_masks

log = logging.getLogger(__name__)

__all__ = ["CocoDetection", "clip_boxes", "load_letterboxed", "decode_segmentation"]


# --------------------------------------------------------------------------- shared helpers


def clip_boxes(boxes: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clip (N, 4) xyxy boxes to [0, W] x [0, H].

    Returns (clipped boxes, bool (N,) which boxes changed, bool (N,) which boxes keep positive area).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    lim = np.array([width, height, width, height], dtype=np.float64)
    clipped = np.clip(boxes, 0.0, lim)
    changed = np.any(clipped != boxes, axis=1)
    positive = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    return clipped, changed, positive


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image file from its header only; raises ``DatasetError`` naming the file."""
    if not path.is_file():
        raise DatasetError(path, "image file not found")
    try:
        with Image.open(path) as img:
            w, h = img.size
    except (OSError, SyntaxError, ValueError) as err:
        raise DatasetError(path, f"unreadable image: {err}") from None
    return h, w


def load_checked(path: Path, expected_hw: tuple[int, int] | None, source: str) -> tuple[np.ndarray, str]:
    """Fully decode an image as (H, W, 3) uint8 RGB and check its size against the annotation file.

    Returns (array, original PIL mode). Any problem raises ``DatasetError`` naming the image.
    """
    arr, mode = read_image_rgb(path)
    if expected_hw is not None and tuple(arr.shape[:2]) != tuple(expected_hw):
        h, w = expected_hw
        raise DatasetError(
            path, f"image is {arr.shape[1]}x{arr.shape[0]} (WxH) but {source} says {w}x{h}")
    return arr, mode


def load_letterboxed(arr: np.ndarray, size: int) -> tuple[torch.Tensor, LetterboxParams]:
    """(H, W, 3) uint8 array -> letterboxed float32 (3, S, S) tensor in [0, 1] and its parameters."""
    if not arr.flags.writeable:
        arr = arr.copy()
    img = torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)
    canvas, params = letterbox(img, size)
    return canvas.clamp_(0.0, 1.0).contiguous(), params


def decode_segmentation(segm: Any, height: int, width: int) -> np.ndarray:
    """Decode a COCO segmentation (polygons, uncompressed or compressed RLE) to an (H, W) uint8 mask."""
    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    elif isinstance(segm.get("counts"), list):
        rle = mask_utils.frPyObjects(segm, height, width)
    else:
        rle = segm
    return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _has_segmentation(ann: dict) -> bool:
    segm = ann.get("segmentation")
    return isinstance(segm, dict) or (isinstance(segm, list) and len(segm) > 0)


def _segmentation_problem(segm: Any, height: int, width: int) -> str | None:
    """Why ``segm`` is not a valid COCO segmentation for an (H, W) image, or None when it is."""
    if isinstance(segm, list):
        if not segm:
            return "empty segmentation"
        for poly in segm:
            if not isinstance(poly, list) or not all(_is_number(v) for v in poly):
                return "polygon is not a list of finite numbers"
            if len(poly) < 6 or len(poly) % 2:
                return f"polygon has {len(poly)} coordinates (needs an even number >= 6)"
        return None
    if isinstance(segm, dict):
        size, counts = segm.get("size"), segm.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
            return "RLE without a valid 'size'"
        if list(size) != [height, width]:
            return f"RLE size {size} differs from image size [{height}, {width}]"
        if isinstance(counts, list):
            if not all(_is_int(v) and v >= 0 for v in counts) or sum(counts) != height * width:
                return "uncompressed RLE counts do not cover the image"
            return None
        if isinstance(counts, (str, bytes)):
            return None
        return "RLE without 'counts'"
    return f"segmentation of type {type(segm).__name__}"


#: PIL modes as a user knows them (the report lists each converted image with its original format)
MODE_NAMES = {"I;16": "16-bit", "I;16B": "16-bit", "I;16L": "16-bit", "I;16N": "16-bit", "I": "32-bit integer",
               "F": "32-bit float", "RGBA": "RGBA (alpha dropped)", "LA": "grayscale+alpha (alpha dropped)",
               "PA": "palette+alpha (alpha dropped)", "P": "palette", "CMYK": "CMYK", "L": "grayscale",
               "1": "1-bit", "YCbCr": "YCbCr", "LAB": "LAB", "HSV": "HSV", "RGBX": "RGBX"}


@dataclass
class _Record:
    image_id: int
    file_name: str
    path: Path
    height: int | None
    width: int | None
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    segms: list = field(default_factory=list)


# --------------------------------------------------------------------------- dataset


class CocoDetection(Dataset):
    """A COCO instances JSON plus its image folder, as letterboxed detection samples.

    Each item is a dict: ``image`` float32 (3, S, S) in [0, 1]; ``boxes`` float32 (N, 4) xyxy in
    letterboxed pixels; ``labels`` int64 (N,) contiguous 0..K-1 (no background; categories sorted
    by id); ``masks`` uint8 (N, S, S) when masks are on; ``image_id`` int; ``orig_size`` (H, W);
    ``letterbox`` LetterboxParams; ``file_name`` str. ``iscrowd=1`` annotations are not targets.

    Args:
        images_dir: folder the ``file_name`` entries are relative to.
        ann_file: the COCO instances JSON.
        size: side S of the letterbox canvas.
        skip_bad: skip bad images/annotations and record them in ``report.skipped`` instead of
            raising ``DatasetError``.
        with_masks: None = masks when every non-crowd annotation has a segmentation; True = require
            them; False = never.
        validate_images: decode every image at construction (default: ``skip_bad``), so that bad
            images are found up front and ``len()`` counts only good ones. This costs one full
            decode per image; fine for the small datasets used here, slow for all of COCO.

    Annotation-level checks (keys, unknown category, orphan annotation, negative width or height,
    a box entirely outside its image, box clipping and zero-area boxes) always run at construction.
    A bad item raises ``DatasetError`` naming the file and the item, or with ``skip_bad`` is left out
    and listed in ``report.skipped``; a zero-width or zero-height box is no target and is counted and
    listed in ``report.dropped``. Without image validation, a missing, truncated or wrongly sized image
    raises in ``__getitem__`` and ``report.converted`` lists the images converted so far in this
    process.
    """

    def __init__(
        self,
        images_dir: str | os.PathLike,
        ann_file: str | os.PathLike,
        size: int = 256,
        skip_bad: bool = False,
        with_masks: bool | None = None,
        *,
        validate_images: bool | None = None,
    ):
        self.images_dir = Path(images_dir)
        self.ann_file = Path(ann_file)
        self.size = int(size)
        self.skip_bad = bool(skip_bad)
        self.report = DataReport()
        self._converted: set[int] = set()
        self._raw = read_json(self.ann_file)
        self._parse(self._raw, with_masks)
        if self.skip_bad if validate_images is None else validate_images:
            self._validate_images()
        self._finish()
        self._coco_gt: dict | None = None

    # ----------------------------------------------------------------------- parsing

    def _bad(self, item: str, problem: str, image_path: Path | None = None) -> None:
        """Raise ``DatasetError`` naming the JSON (or the image), or record the item when skipping."""
        if not self.skip_bad:
            raise (DatasetError(image_path, problem) if image_path is not None
                   else DatasetError(self.ann_file, f"{item}: {problem}"))
        self.report.skipped.append((item, problem))
        log.warning("skipping %s: %s", item, problem)

    def _parse(self, raw: Any, with_masks: bool | None) -> None:
        if not isinstance(raw, dict):
            raise DatasetError(self.ann_file, f"top level is {type(raw).__name__}, expected an object")
        for key in ("images", "annotations", "categories"):
            if key not in raw:
                raise DatasetError(self.ann_file, f"missing key {key!r}")
            if not isinstance(raw[key], list):
                raise DatasetError(self.ann_file, f"{key!r} is not a list")

        # categories: strict, a dataset cannot be used without them
        cats = []
        for k, cat in enumerate(raw["categories"]):
            if not (isinstance(cat, dict) and _is_int(cat.get("id")) and isinstance(cat.get("name"), str)):
                raise DatasetError(self.ann_file,
                                   f"category #{k} needs an integer 'id' and a string 'name'")
            cats.append(cat)
        ids = [c["id"] for c in cats]
        if len(set(ids)) != len(ids):
            raise DatasetError(self.ann_file, "duplicate category ids")
        self.categories: list[dict] = sorted(cats, key=lambda c: c["id"])
        self.cat_id_to_label: dict[int, int] = {c["id"]: i for i, c in enumerate(self.categories)}
        self.label_to_cat_id: dict[int, int] = {i: c["id"] for i, c in enumerate(self.categories)}

        # images
        self._records: dict[int, _Record] = {}
        dropped_images: set[int] = set()
        first_file: dict[int, str] = {}  # image id -> file_name of its first entry (duplicate messages)
        for k, img in enumerate(raw["images"]):
            iid = img.get("id") if isinstance(img, dict) else None
            item = f"image {iid if _is_int(iid) else '#' + str(k)}"
            if not isinstance(img, dict):
                self._bad(item, "entry is not an object")
                continue
            if not _is_int(iid):
                self._bad(item, "missing or non-integer 'id'")
                continue
            fname = img.get("file_name")
            if iid in first_file:
                self._bad(item, f"duplicate image id {iid}: {first_file[iid]!r} and {fname!r} (both left out: "
                                "their annotations cannot be told apart)")
                dropped_images.add(iid)
                self._records.pop(iid, None)
                continue
            first_file[iid] = fname if isinstance(fname, str) else repr(fname)
            if not isinstance(fname, str) or not fname:
                self._bad(item, "missing 'file_name'")
                dropped_images.add(iid)
                continue
            h, w = img.get("height"), img.get("width")
            if (h is not None or w is not None) and not (
                    _is_int(h) and _is_int(w) and h > 0 and w > 0):
                self._bad(f"{item} ({fname})", f"invalid height/width {h!r}/{w!r}")
                dropped_images.add(iid)
                continue
            self._records[iid] = _Record(iid, fname, self.images_dir / fname, h, w)

        # sizes missing from the JSON come from the image headers
        for iid, rec in list(self._records.items()):
            if rec.height is None:
                try:
                    rec.height, rec.width = image_size(rec.path)
                except DatasetError as err:
                    self._bad(str(rec.path), err.problem, rec.path)
                    dropped_images.add(iid)
                    del self._records[iid]

        anns = raw["annotations"]
        if with_masks is None:
            targets = [a for a in anns if isinstance(a, dict) and not a.get("iscrowd", 0)]
            with_masks = bool(targets) and all(_has_segmentation(a) for a in targets)
            if not with_masks and any(_has_segmentation(a) for a in targets):
                log.warning("%s: some annotations lack a segmentation; masks are off", self.ann_file)
        self.with_masks = bool(with_masks)

        # annotations: validated now, counted in _finish for images that survive
        self._anns: dict[int, list[tuple[int, dict, np.ndarray, bool, bool]]] = {}
        seen_ids: set[int] = set()
        for k, ann in enumerate(anns):
            aid = ann.get("id") if isinstance(ann, dict) else None
            item = f"annotation {aid if aid is not None else '#' + str(k)}"
            if not isinstance(ann, dict):
                self._bad(item, "entry is not an object")
                continue
            if aid is not None:
                if not _is_int(aid) or aid in seen_ids:
                    self._bad(item, "duplicate or non-integer annotation id")
                    continue
                seen_ids.add(aid)
            missing = [key for key in ("image_id", "category_id", "bbox") if key not in ann]
            if missing:
                self._bad(item, f"missing key(s) {', '.join(map(repr, missing))}")
                continue
            iid = ann["image_id"]
            if _is_int(iid) and iid in dropped_images:
                continue  # its image was skipped and recorded
            item = f"{item} (image {iid})"
            if not _is_int(iid) or iid not in self._records:
                self._bad(item, f"image id {iid!r} is not in 'images'")
                continue
            if not _is_int(ann["category_id"]) or ann["category_id"] not in self.cat_id_to_label:
                self._bad(item, f"unknown category id {ann['category_id']!r}")
                continue
            bbox = ann["bbox"]
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
                self._bad(item, f"bbox {bbox!r} is not 4 finite numbers [x, y, w, h]")
                continue
            crowd = ann.get("iscrowd", 0)
            if crowd not in (0, 1):
                self._bad(item, f"iscrowd {crowd!r} is not 0 or 1")
                continue
            rec = self._records[iid]
            if self.with_masks and (not crowd or ann.get("segmentation") not in (None, [])):
                if not _has_segmentation(ann):
                    self._bad(item, "no segmentation but masks were requested")
                    continue
                problem = _segmentation_problem(ann["segmentation"], rec.height, rec.width)
                if problem:
                    self._bad(item, f"malformed segmentation: {problem}")
                    continue
            x, y, w, h = (float(v) for v in bbox)
            if w < 0 or h < 0:
                self._bad(item, f"bbox {bbox!r} has a negative width or height (COCO boxes are [x, y, w, h])")
                continue
            box, changed, positive = clip_boxes(np.array([[x, y, x + w, y + h]]), rec.width, rec.height)
            if w > 0 and h > 0 and not positive[0]:
                self._bad(item, f"bbox {bbox!r} lies entirely outside the {rec.width}x{rec.height} image "
                                f"({rec.file_name})")
                continue
            self._anns.setdefault(iid, []).append((k, ann, box[0], bool(changed[0]), bool(positive[0])))

    def _validate_images(self) -> None:
        """Decode every image once (the cost of ``validate_images``) and skip/raise the bad ones."""
        for iid, rec in list(self._records.items()):
            try:
                _, mode = load_checked(rec.path, (rec.height, rec.width), self.ann_file.name)
            except DatasetError as err:
                n = len(self._anns.get(iid, [])) if self.skip_bad else 0
                note = f" ({n} annotations skipped with it)" if n else ""
                self._bad(str(rec.path), err.problem + note, rec.path)
                del self._records[iid]
                self._anns.pop(iid, None)
                continue
            if mode != "RGB":
                self._note_converted(rec, mode)

    def _finish(self) -> None:
        """Build per-image targets and the report counts for the images kept."""
        kept: list[tuple[int, dict, np.ndarray | None]] = []
        for iid, rec in self._records.items():
            boxes, labels, segms = [], [], []
            for k, ann, box, changed, positive in self._anns.get(iid, []):
                self.report.clipped_boxes += int(changed)
                if not positive:
                    self.report.dropped_zero_area += 1
                    self.report.dropped.append((f"annotation {ann.get('id', '#' + str(k))} (image {iid})",
                                                f"zero-area bbox {ann['bbox']!r}: not a target"))
                    continue
                kept.append((k, ann, box if changed else None))
                if ann.get("iscrowd", 0):
                    continue
                boxes.append(box)
                labels.append(self.cat_id_to_label[ann["category_id"]])
                segms.append(ann.get("segmentation"))
            rec.boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
            rec.labels = np.asarray(labels, dtype=np.int64)
            rec.segms = segms if self.with_masks else []
        self._kept_anns = [(ann, box) for _, ann, box in sorted(kept, key=lambda t: t[0])]
        self.image_ids: list[int] = sorted(self._records)
        del self._anns

    def _note_converted(self, rec: _Record, mode: str) -> None:
        """Count and list an image that was not 8-bit RGB (once per image)."""
        self._converted.add(rec.image_id)
        self.report.converted_images = len(self._converted)
        self.report.converted.append((str(rec.path), f"{MODE_NAMES.get(mode, mode)} converted to 8-bit RGB"))
        log.info("%s: %s image converted to 8-bit RGB", rec.path, mode)

    def note_formats(self, indices: list[int] | None = None) -> None:
        """Count and list the images (of ``indices``, default all) that are not 8-bit RGB, from their
        headers only (no decode). A report written after images were loaded in other processes
        (DataLoader workers, torchrun ranks) lists every conversion this way."""
        for i in range(len(self)) if indices is None else indices:
            rec = self._records[self.image_ids[i]]
            if rec.image_id in self._converted:
                continue
            try:
                with Image.open(rec.path) as img:
                    mode = img.mode
            except (OSError, SyntaxError, ValueError):
                continue  # a bad image is reported where it is decoded
            if mode != "RGB":
                self._note_converted(rec, mode)

    # ----------------------------------------------------------------------- public API

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def coco_gt(self) -> dict:
        """Ground truth as a COCO dict for metrics.

        The file's content restricted to the images and annotations kept here (crowd ones
        included), boxes clipped as in the targets, ``id``/``area``/``iscrowd`` filled in where
        missing. Identical to the raw JSON when the file was clean.
        """
        if self._coco_gt is None:
            gt = {k: v for k, v in self._raw.items() if k not in ("images", "annotations")}
            kept = set(self.image_ids)
            gt["images"] = []
            for img in self._raw["images"]:
                if isinstance(img, dict) and _is_int(img.get("id")) and img["id"] in kept:
                    rec = self._records[img["id"]]
                    gt["images"].append({**img, "height": rec.height, "width": rec.width})
            used = {a.get("id") for a, _ in self._kept_anns}
            next_id = max([i for i in used if _is_int(i)], default=0) + 1
            anns = []
            for ann, box in self._kept_anns:
                ann = copy.deepcopy(ann)
                if box is not None:  # clipped
                    x1, y1, x2, y2 = (float(v) for v in box)
                    ann["bbox"] = [x1, y1, x2 - x1, y2 - y1]
                if not _is_int(ann.get("id")):
                    ann["id"] = next_id
                    next_id += 1
                ann.setdefault("iscrowd", 0)
                if "area" not in ann:
                    if self.with_masks and _has_segmentation(ann):
                        rec = self._records[ann["image_id"]]
                        segm = decode_segmentation(ann["segmentation"], rec.height, rec.width)
                        ann["area"] = float(segm.sum())
                    else:
                        ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
                anns.append(ann)
            gt["annotations"] = anns
            self._coco_gt = gt
        return self._coco_gt

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self._records[self.image_ids[index]]
        arr, mode = load_checked(rec.path, (rec.height, rec.width), self.ann_file.name)
        if mode != "RGB" and rec.image_id not in self._converted:
            self._note_converted(rec, mode)
        image, params = load_letterboxed(arr, self.size)
        item: dict[str, Any] = {
            "image": image,
            "boxes": letterbox_boxes(torch.from_numpy(rec.boxes.copy()), params).float(),
            "labels": torch.from_numpy(rec.labels.copy()),
        }
        if self.with_masks:
            masks = np.zeros((len(rec.segms), rec.height, rec.width), dtype=np.uint8)
            for j, segm in enumerate(rec.segms):
                masks[j] = decode_segmentation(segm, rec.height, rec.width)
            item["masks"] = letterbox_masks(torch.from_numpy(masks), params)
        item.update(image_id=rec.image_id, orig_size=(rec.height, rec.width), letterbox=params,
                    file_name=rec.file_name)
        return item

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(ann_file={str(self.ann_file)!r}, images={len(self)}, "
                f"classes={self.num_classes}, size={self.size}, masks={self.with_masks})")
