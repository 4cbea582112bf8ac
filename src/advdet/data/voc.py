"""Pascal VOC detection dataset (Annotations/, ImageSets/Main/, JPEGImages/), letterboxed to S x S."""

from __future__ import annotations

import logging
import math
import os
import xml.etree.ElementTree as ET  # local trusted files; defusedxml is not a dependency
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from advdet.data.errors import DataReport, DatasetError
from advdet.data.letterbox import letterbox_boxes
from advdet.data.reading import MODE_NAMES, clip_boxes, image_size, load_checked, load_letterboxed

log = logging.getLogger(__name__)

__all__ = ["VOC_CLASSES", "VOCDetection"]

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)


@dataclass
class _Record:
    image_id: int
    name: str
    file_name: str
    path: Path
    xml: Path
    height: int
    width: int
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray
    clipped: int = 0
    dropped: int = 0
    dropped_items: list = field(default_factory=list)  # (item, problem) of each zero-area box left out


class VOCDetection(Dataset):
    """Pascal VOC detection, items shaped like ``CocoDetection``'s plus ``difficult`` bool (N,).

    Reads ``root/ImageSets/Main/<split>.txt``, ``root/Annotations/<id>.xml`` and
    ``root/JPEGImages/<id>.jpg`` (``root/VOC<year>`` when ``year`` is given and that folder
    exists). Labels are 0..19 in the standard ``VOC_CLASSES`` order; ``categories`` gives them
    COCO-style ids 1..20. VOC boxes are 1-based and inclusive, so (xmin, ymin, xmax, ymax) becomes
    (xmin - 1, ymin - 1, xmax, ymax) in 0-based continuous pixels before letterboxing.
    ``image_id`` is the numeric file id when all ids are unique integers (VOC2007), else the
    position in the split file.

    All XMLs are parsed at construction (stdlib ElementTree: fine for local files, not hardened
    against hostile XML). A missing/malformed XML, an unknown class name or a malformed box raises
    ``DatasetError`` naming the XML; with ``skip_bad=True`` the image (XML problems) or the object
    (class/box problems) is skipped and recorded in ``report.skipped``. Boxes are clipped to the
    image and zero-area boxes dropped, both counted in ``report``. Image files are decoded at
    construction when ``validate_images`` (default: ``skip_bad``), one full decode per image.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "test",
        year: str | int | None = None,
        size: int = 256,
        keep_difficult: bool = True,
        skip_bad: bool = False,
        *,
        validate_images: bool | None = None,
    ):
        root = Path(root)
        if year is not None and (root / f"VOC{year}").is_dir():
            root = root / f"VOC{year}"
        self.root = root
        self.split = split
        self.size = int(size)
        self.keep_difficult = bool(keep_difficult)
        self.skip_bad = bool(skip_bad)
        self.report = DataReport()
        self._converted: set[int] = set()
        self.categories: list[dict] = [{"id": k + 1, "name": n} for k, n in enumerate(VOC_CLASSES)]
        self.cat_id_to_label = {k + 1: k for k in range(len(VOC_CLASSES))}
        self.label_to_cat_id = {k: k + 1 for k in range(len(VOC_CLASSES))}

        split_file = root / "ImageSets" / "Main" / f"{split}.txt"
        if not split_file.is_file():
            raise DatasetError(split_file, "split file not found")
        names = [ln.split()[0] for ln in split_file.read_text().splitlines() if ln.strip()]
        if len(set(names)) != len(names):
            raise DatasetError(split_file, "duplicate image ids")
        numeric = all(n.isdigit() for n in names) and len({int(n) for n in names}) == len(names)

        self._records: list[_Record] = []
        for k, name in enumerate(names):
            image_id = int(name) if numeric else k
            try:
                rec = self._parse_xml(name, image_id)
            except DatasetError as err:
                self._bad(err.path, err.problem, err)
                continue
            if self.skip_bad if validate_images is None else validate_images:
                try:
                    _, mode = load_checked(rec.path, (rec.height, rec.width), rec.xml.name)
                except DatasetError as err:
                    self._bad(err.path, err.problem, err)
                    continue
                if mode != "RGB":
                    self._note_converted(rec, mode)
            self._records.append(rec)
        self.report.converted_images = len(self._converted)
        for rec in self._records:
            self.report.clipped_boxes += rec.clipped
            self.report.dropped_zero_area += rec.dropped
            self.report.dropped += rec.dropped_items
        self.image_ids: list[int] = [r.image_id for r in self._records]

    def _note_converted(self, rec: _Record, mode: str) -> None:
        """Count and list an image that was not 8-bit RGB (once per image)."""
        self._converted.add(rec.image_id)
        self.report.converted_images = len(self._converted)
        self.report.converted.append((str(rec.path), f"{MODE_NAMES.get(mode, mode)} converted to 8-bit RGB"))

    def _bad(self, item: str | os.PathLike, problem: str, err: DatasetError | None = None) -> None:
        if not self.skip_bad:
            raise err if err is not None else DatasetError(item, problem)
        self.report.skipped.append((str(item), problem))
        log.warning("skipping %s: %s", item, problem)

    def _parse_xml(self, name: str, image_id: int) -> _Record:
        xml = self.root / "Annotations" / f"{name}.xml"
        if not xml.is_file():
            raise DatasetError(xml, "annotation file not found")
        try:
            tree = ET.parse(xml).getroot()
        except ET.ParseError as err:
            raise DatasetError(xml, f"malformed XML: {err}") from None
        path = self.root / "JPEGImages" / f"{name}.jpg"
        fname = (tree.findtext("filename") or "").strip()
        if not path.is_file() and fname and (self.root / "JPEGImages" / fname).is_file():
            path = self.root / "JPEGImages" / fname
        try:
            w = int(float(tree.findtext("size/width") or 0))
            h = int(float(tree.findtext("size/height") or 0))
        except ValueError:
            raise DatasetError(xml, "malformed <size>") from None
        if w <= 0 or h <= 0:
            h, w = image_size(path)

        boxes, labels, difficult, items = [], [], [], []
        for j, obj in enumerate(tree.findall("object")):
            cls = (obj.findtext("name") or "").strip()
            item = f"{xml} object #{j} ({cls or '?'})"
            if cls not in VOC_CLASSES:
                self._bad(item, f"unknown class name {cls!r}",
                          DatasetError(xml, f"object #{j}: unknown class name {cls!r}"))
                continue
            try:
                diff = bool(int(obj.findtext("difficult") or 0))
                bb = obj.find("bndbox")
                if bb is None:
                    raise ValueError("no <bndbox>")
                x1, y1, x2, y2 = (float(bb.findtext(t) or "nan")
                                  for t in ("xmin", "ymin", "xmax", "ymax"))
                if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
                    raise ValueError("missing or non-numeric coordinate")
            except ValueError as err:
                self._bad(item, f"malformed object: {err}",
                          DatasetError(xml, f"object #{j}: malformed: {err}"))
                continue
            if diff and not self.keep_difficult:
                continue
            boxes.append([x1 - 1.0, y1 - 1.0, x2, y2])
            items.append((item, (x1, y1, x2, y2)))
            labels.append(VOC_CLASSES.index(cls))
            difficult.append(diff)

        clipped, changed, positive = clip_boxes(np.array(boxes, dtype=np.float64), w, h)
        dropped_items = [(item, f"box {tuple(float(v) for v in xyxy)} has no area inside the {w}x{h} image: "
                                "not a target") for (item, xyxy), keep in zip(items, positive) if not keep]
        return _Record(image_id, name, path.name, path, xml, h, w,
                       clipped[positive].astype(np.float32),
                       np.asarray(labels, dtype=np.int64).reshape(-1)[positive],
                       np.asarray(difficult, dtype=bool).reshape(-1)[positive],
                       clipped=int(changed.sum()), dropped=int((~positive).sum()), dropped_items=dropped_items)

    @property
    def num_classes(self) -> int:
        return len(VOC_CLASSES)

    @property
    def classes(self) -> tuple[str, ...]:
        return VOC_CLASSES

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self._records[index]
        arr, mode = load_checked(rec.path, (rec.height, rec.width), rec.xml.name)
        if mode != "RGB" and rec.image_id not in self._converted:
            self._note_converted(rec, mode)
        image, params = load_letterboxed(arr, self.size)
        return {
            "image": image,
            "boxes": letterbox_boxes(torch.from_numpy(rec.boxes.copy()), params).float(),
            "labels": torch.from_numpy(rec.labels.copy()),
            "difficult": torch.from_numpy(rec.difficult.copy()),
            "image_id": rec.image_id,
            "orig_size": (rec.height, rec.width),
            "letterbox": params,
            "file_name": rec.file_name,
        }

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
                f"images={len(self)})")
