"""Write a COCO-format dataset: PNG images plus an instances JSON, every file atomically."""

from __future__ import annotations

import io
import os
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from advdet.data.io import atomic_write_bytes, atomic_write_json, read_json

__all__ = ["CocoWriter", "to_uint8_hwc", "encode_mask"]


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def to_uint8_hwc(image: Any) -> np.ndarray:
    """An image as (H, W, 3) uint8: uint8 input is (H, W, 3) or (H, W); float input is (3, H, W)
    or (H, W) in [0, 1] and is rounded to the nearest 1/255 step."""
    arr = _to_numpy(image)
    if arr.dtype == np.uint8:
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"uint8 image must be (H, W, 3) or (H, W), got {arr.shape}")
        return np.ascontiguousarray(arr)
    if np.issubdtype(arr.dtype, np.floating):
        if arr.ndim == 2:
            arr = arr[None].repeat(3, axis=0)
        if arr.ndim != 3 or arr.shape[0] != 3:
            raise ValueError(f"float image must be (3, H, W) or (H, W), got {arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError("float image has non-finite values")
        lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
        if lo < -1e-4 or hi > 1 + 1e-4:
            raise ValueError(f"float image must be in [0, 1], got [{lo:.4g}, {hi:.4g}]")
        out = np.clip(np.round(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(out.transpose(1, 2, 0))
    raise ValueError(f"unsupported image dtype {arr.dtype} (use uint8 HWC or float CHW in [0, 1])")


def encode_mask(mask: np.ndarray) -> dict:
    """Binary (H, W) mask -> COCO compressed RLE with ``counts`` as str (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


class CocoWriter:
    """Write ``out_dir/images/<name>.png`` and ``out_dir/instances.json`` (COCO instances format).

    Images are PNG uint8, each written atomically when added; the JSON is written atomically by
    ``write_json()`` / ``close()`` (or on leaving a ``with`` block without an exception).

    Args:
        out_dir: output folder.
        categories: COCO category dicts (``id``, ``name``, optional ``supercategory``) or names
            (given ids 1..K in order).
        info: the JSON's ``info`` object.
        resume: continue an existing ``instances.json`` in ``out_dir`` (its images and ids kept).
    """

    def __init__(self, out_dir: str | os.PathLike, categories: Iterable[dict | str],
                 info: dict | None = None, *, resume: bool = False):
        self.out_dir = Path(out_dir)
        self.images_dir = self.out_dir / "images"
        self.ann_file = self.out_dir / "instances.json"
        cats = []
        for k, cat in enumerate(categories):
            if isinstance(cat, str):
                cat = {"id": k + 1, "name": cat}
            if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
                raise ValueError(f"category #{k} needs 'id' and 'name': {cat!r}")
            cats.append(dict(cat))
        if len({c["id"] for c in cats}) != len(cats):
            raise ValueError("duplicate category ids")
        self.categories = sorted(cats, key=lambda c: c["id"])
        self._cat_ids = {c["id"] for c in self.categories}
        self.info = dict(info) if info is not None else {}
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self._image_ids: set[int] = set()
        self._file_names: set[str] = set()
        if resume and self.ann_file.is_file():
            old = read_json(self.ann_file)
            self.images, self.annotations = list(old["images"]), list(old["annotations"])
            self._image_ids = {img["id"] for img in self.images}
            self._file_names = {img["file_name"] for img in self.images}

    def __len__(self) -> int:
        return len(self.images)

    def __contains__(self, file_name: str) -> bool:
        """Whether an image with this name (its ``.png`` form) was already added."""
        return self._png_name(file_name) in self._file_names

    @staticmethod
    def _png_name(file_name: str) -> str:
        p = PurePosixPath(str(file_name).replace("\\", "/"))
        if not p.name or p.is_absolute() or ".." in p.parts:
            raise ValueError(f"file_name must be a relative path inside images/: {file_name!r}")
        return str(p.with_suffix(".png"))

    def add(self, file_name: str, image: Any, boxes: Any = None, category_ids: Any = None,
            masks: Any = None, *, image_id: int | None = None, image_info: dict | None = None) -> int:
        """Save one image and its annotations; returns the image id.

        Args:
            file_name: name under ``images/``; the suffix becomes ``.png``.
            image: uint8 (H, W, 3) or float (3, H, W) in [0, 1] (numpy or torch).
            boxes: (N, 4) xyxy in the saved image's pixels; clipped to the image.
            category_ids: (N,) dataset category ids (not contiguous labels).
            masks: optional (N, H, W) masks (nonzero / > 0.5 is foreground), stored as compressed RLE.
            image_id: explicit id; default the largest id so far + 1 (starting at 1).
            image_info: extra fields for the image entry (e.g. the source image id).
        """
        name = self._png_name(file_name)
        if name in self._file_names:
            raise ValueError(f"duplicate file_name {name!r}")
        if image_id is None:
            image_id = max(self._image_ids, default=0) + 1
        image_id = int(image_id)
        if image_id in self._image_ids:
            raise ValueError(f"duplicate image_id {image_id}")
        arr = to_uint8_hwc(image)
        h, w = arr.shape[:2]

        b = _to_numpy(boxes if boxes is not None else np.zeros((0, 4))).astype(np.float64).reshape(-1, 4)
        c = _to_numpy(category_ids if category_ids is not None else np.zeros((0,))).reshape(-1)
        if len(c) != len(b):
            raise ValueError(f"{len(b)} boxes but {len(c)} category ids")
        if not np.isfinite(b).all():
            raise ValueError("boxes have non-finite values")
        b = np.clip(b, 0.0, np.array([w, h, w, h], dtype=np.float64))
        if ((b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])).any():
            raise ValueError("boxes must have positive width and height inside the image")
        cids = [int(v) for v in c]
        unknown = sorted(set(cids) - self._cat_ids)
        if unknown:
            raise ValueError(f"unknown category ids {unknown}")
        m = None
        if masks is not None:
            m = _to_numpy(masks)
            if m.ndim != 3 or m.shape[0] != len(b) or m.shape[1:] != (h, w):
                raise ValueError(f"masks must be ({len(b)}, {h}, {w}), got {m.shape}")
            m = m > 0.5

        atomic_write_bytes(self.images_dir / name, _png_bytes(arr))

        next_ann = max((a["id"] for a in self.annotations), default=0) + 1
        for j, (box, cid) in enumerate(zip(b, cids)):
            x1, y1, x2, y2 = (round(float(v), 3) for v in box)
            bw, bh = round(x2 - x1, 3), round(y2 - y1, 3)
            ann = {"id": next_ann + j, "image_id": image_id, "category_id": cid,
                   "bbox": [x1, y1, bw, bh], "area": round(bw * bh, 3), "iscrowd": 0}
            if m is not None:
                ann["segmentation"] = encode_mask(m[j])
                ann["area"] = float(m[j].sum())
            self.annotations.append(ann)
        entry = {"id": image_id, "file_name": name, "height": int(h), "width": int(w)}
        entry.update(image_info or {})
        self.images.append(entry)
        self._image_ids.add(image_id)
        self._file_names.add(name)
        return image_id

    def to_dict(self) -> dict:
        """The instances JSON as a dict."""
        return {"info": self.info, "licenses": [], "images": self.images,
                "annotations": self.annotations, "categories": self.categories}

    def write_json(self) -> Path:
        """Write ``instances.json`` atomically; returns its path."""
        atomic_write_json(self.ann_file, self.to_dict())
        return self.ann_file

    def close(self) -> Path:
        return self.write_json()

    def __enter__(self) -> "CocoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.write_json()

