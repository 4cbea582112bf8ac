"""What the dataset readers (COCO, VOC) share: image files (size from the header, a full decode checked
against the annotations, letterboxed tensors, the names of converted formats) and box clipping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from advdet.data.errors import DatasetError
from advdet.data.io import read_image_rgb
from advdet.data.letterbox import LetterboxParams, letterbox

__all__ = ["MODE_NAMES", "clip_boxes", "image_size", "load_checked", "load_letterboxed"]

#: PIL modes as a user knows them (the report lists each converted image with its original format)
MODE_NAMES = {"I;16": "16-bit", "I;16B": "16-bit", "I;16L": "16-bit", "I;16N": "16-bit", "I": "32-bit integer",
               "F": "32-bit float", "RGBA": "RGBA (alpha dropped)", "LA": "grayscale+alpha (alpha dropped)",
               "PA": "palette+alpha (alpha dropped)", "P": "palette", "CMYK": "CMYK", "L": "grayscale",
               "1": "1-bit", "YCbCr": "YCbCr", "LAB": "LAB", "HSV": "HSV", "RGBX": "RGBX"}


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
