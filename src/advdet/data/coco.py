"""COCO-format detection / instance-segmentation dataset, letterboxed to S x S (the file is checked by
:mod:`advdet.data.coco_validation`)."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from advdet.data.coco_validation import ImageRecord, has_segmentation, is_int, parse_coco
from advdet.data.errors import DataReport, DatasetError
from advdet.data.io import read_json
from advdet.data.letterbox import letterbox_boxes, letterbox_masks
from advdet.data.reading import MODE_NAMES, load_checked, load_letterboxed

log = logging.getLogger(__name__)

__all__ = ["CocoDetection", "decode_segmentation"]


def decode_segmentation(segm: Any, height: int, width: int) -> np.ndarray:
    """Decode a COCO segmentation (polygons, uncompressed or compressed RLE) to an (H, W) uint8 mask."""
    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    elif isinstance(segm.get("counts"), list):
        rle = mask_utils.frPyObjects(segm, height, width)
    else:
        rle = segm
    return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)


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
        parsed = parse_coco(self._raw, self.ann_file, self.images_dir, with_masks, self._bad)
        self.categories: list[dict] = parsed.categories
        self.cat_id_to_label: dict[int, int] = parsed.cat_id_to_label
        self.label_to_cat_id: dict[int, int] = parsed.label_to_cat_id
        self._records: dict[int, ImageRecord] = parsed.records
        self.with_masks = parsed.with_masks
        self._anns = parsed.targets
        if self.skip_bad if validate_images is None else validate_images:
            self._validate_images()
        self._finish()
        self._coco_gt: dict | None = None

    # ----------------------------------------------------------------------- checks

    def _bad(self, item: str, problem: str, image_path: Path | None = None) -> None:
        """Raise ``DatasetError`` naming the JSON (or the image), or record the item when skipping."""
        if not self.skip_bad:
            raise (DatasetError(image_path, problem) if image_path is not None
                   else DatasetError(self.ann_file, f"{item}: {problem}"))
        self.report.skipped.append((item, problem))
        log.warning("skipping %s: %s", item, problem)

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

    def _note_converted(self, rec: ImageRecord, mode: str) -> None:
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
                if isinstance(img, dict) and is_int(img.get("id")) and img["id"] in kept:
                    rec = self._records[img["id"]]
                    gt["images"].append({**img, "height": rec.height, "width": rec.width})
            used = {a.get("id") for a, _ in self._kept_anns}
            next_id = max([i for i in used if is_int(i)], default=0) + 1
            anns = []
            for ann, box in self._kept_anns:
                ann = copy.deepcopy(ann)
                if box is not None:  # clipped
                    x1, y1, x2, y2 = (float(v) for v in box)
                    ann["bbox"] = [x1, y1, x2 - x1, y2 - y1]
                if not is_int(ann.get("id")):
                    ann["id"] = next_id
                    next_id += 1
                ann.setdefault("iscrowd", 0)
                if "area" not in ann:
                    if self.with_masks and has_segmentation(ann):
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
