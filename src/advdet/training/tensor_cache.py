"""A detection dataset held in memory as letterboxed uint8 tensors, for fast training on a CPU."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from advdet.data.shapes import advdet_home

log = logging.getLogger(__name__)


class TensorCache:
    """All items of a ``CocoDetection``-like dataset as tensors: ``images`` (N, 3, S, S) uint8 and
    per-image ``boxes`` (float32 xyxy letterboxed pixels), ``labels`` (int64) and optional ``masks``.

    Built once (one decode per image) and saved under $ADVDET_HOME/cache, keyed by the annotation
    file's path, size and modification time, then reloaded with ``torch.load(weights_only=True)``.
    """

    def __init__(self, images: torch.Tensor, boxes: list[torch.Tensor], labels: list[torch.Tensor],
                 masks: list[torch.Tensor] | None = None):
        self.images, self.boxes, self.labels, self.masks = images, boxes, labels, masks

    def __len__(self) -> int:
        return self.images.shape[0]

    @classmethod
    def from_dataset(cls, dataset, with_masks: bool = False, cache: bool = True) -> "TensorCache":
        key = None
        if cache and hasattr(dataset, "ann_file"):
            ann = Path(dataset.ann_file).resolve()
            sig = f"{ann}|{ann.stat().st_mtime_ns}|{dataset.size}|{with_masks}|{len(dataset)}"
            key = advdet_home() / "cache" / f"tensors-{hashlib.sha1(sig.encode()).hexdigest()[:16]}.pt"
            if key.exists():
                d = torch.load(key, weights_only=True)
                return cls(d["images"], d["boxes"], d["labels"], d.get("masks"))
        log.info("decoding %d images into a tensor cache", len(dataset))
        if not with_masks and getattr(dataset, "with_masks", False):
            import copy

            dataset = copy.copy(dataset)
            dataset.with_masks = False  # skip mask decoding: boxes only
        images, boxes, labels, masks = [], [], [], []
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # per-image resizes are tiny: threading only adds overhead
        try:
            items = [dataset[i] for i in range(len(dataset))]
        finally:
            torch.set_num_threads(threads)
        for item in items:
            images.append((item["image"] * 255).round().to(torch.uint8))
            boxes.append(item["boxes"])
            labels.append(item["labels"])
            if with_masks:
                masks.append(item["masks"].bool())
        out = cls(torch.stack(images), boxes, labels, masks if with_masks else None)
        if key is not None:
            key.parent.mkdir(parents=True, exist_ok=True)
            tmp = key.with_suffix(f".{os.getpid()}.tmp")
            d = {"images": out.images, "boxes": out.boxes, "labels": out.labels}
            if with_masks:
                d["masks"] = out.masks
            torch.save(d, tmp)
            os.replace(tmp, key)
        return out
