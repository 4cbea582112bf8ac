"""Resolve a `--data` argument: `shapes-train`, `shapes-val`, or a COCO-format folder (with `--ann`)."""

from __future__ import annotations

import os
from pathlib import Path

from advdet.data.errors import DatasetError

SHAPES_NAMES = ("shapes-train", "shapes-val")


def resolve_dataset(data: str | os.PathLike, ann: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Return (images_dir, instances_json) for a `--data` value.

    - ``shapes-train`` / ``shapes-val``: the default shapes copy, generated on first use in $ADVDET_HOME;
    - a folder written by advdet (``DIR/images`` + ``DIR/instances.json``), or any images folder
      together with ``ann`` (a COCO instances JSON, e.g. COCO val2017 with instances_val2017.json).
    """
    data = str(data)
    if data in SHAPES_NAMES:
        from advdet.data.shapes import ensure_default_shapes

        root = ensure_default_shapes() / data.split("-", 1)[1]
        return root / "images", root / "instances.json"
    path = Path(data).expanduser()
    if not path.exists():
        raise DatasetError(path, f"no such dataset folder (expected {' or '.join(SHAPES_NAMES)} or a folder)")
    if ann is not None:
        ann = Path(ann).expanduser()
        if not ann.is_file():
            raise DatasetError(ann, "annotation file not found")
        return path, ann
    if (path / "instances.json").is_file():
        images = path / "images" if (path / "images").is_dir() else path
        return images, path / "instances.json"
    raise DatasetError(path, "no instances.json in this folder; pass the annotation file with --ann")


def build_dataset(data: str | os.PathLike, ann: str | os.PathLike | None = None, size: int = 256,
                  skip_bad: bool = False, with_masks: bool | None = None):
    """A ``CocoDetection`` for a `--data` value (see ``resolve_dataset``)."""
    from advdet.data.coco import CocoDetection

    images, ann_file = resolve_dataset(data, ann)
    return CocoDetection(images, ann_file, size=size, skip_bad=skip_bad, with_masks=with_masks)
