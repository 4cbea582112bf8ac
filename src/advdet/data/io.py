"""File I/O shared by every layer: atomic writes and strict RGB image reading."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from advdet.data.errors import DatasetError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder, then rename.

    A reader never sees a half-written file, and a killed writer leaves only a ``.tmp`` file behind.
    The file gets the usual permissions (0666 minus the umask), not mkstemp's private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> None:
    """Serialise ``obj`` as JSON and write it atomically."""
    atomic_write_bytes(path, json.dumps(obj, indent=indent, sort_keys=False).encode("utf-8"))


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a missing or malformed file raises ``DatasetError`` naming it."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise DatasetError(path, "file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(path, f"malformed JSON: {err}") from None


def image_to_rgb_array(img: Image.Image, path: str | os.PathLike = "<image>") -> np.ndarray:
    """Convert any PIL image to an (H, W, 3) uint8 RGB array.

    Grayscale (L, 1), palette (P), RGBA/LA (alpha dropped onto black) and 16-bit (I;16, I) images
    are converted; anything else raises ``DatasetError``.
    """
    mode = img.mode
    if mode == "RGB":
        arr = np.asarray(img, dtype=np.uint8)
    elif mode in ("I;16", "I;16B", "I;16L", "I", "I;16N"):
        a = np.asarray(img).astype(np.float64)
        peak = 65535.0 if a.max(initial=0) > 255 or mode.startswith("I;16") else 255.0
        a = np.clip(np.round(a / peak * 255.0), 0, 255).astype(np.uint8)
        arr = np.repeat(a[..., None], 3, axis=2)
    elif mode == "F":
        a = np.asarray(img, dtype=np.float64)
        scale = 255.0 if a.max(initial=0) <= 1.0 else 1.0
        arr = np.repeat(np.clip(np.round(a * scale), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    elif mode in ("L", "1", "P", "RGBA", "LA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "PA"):
        if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            arr4 = np.asarray(img, dtype=np.float32)
            alpha = arr4[..., 3:4] / 255.0
            arr = np.round(arr4[..., :3] * alpha).astype(np.uint8)
        else:
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    else:
        raise DatasetError(path, f"unsupported image mode {mode!r}")
    return np.ascontiguousarray(arr)


def read_image_rgb(path: str | os.PathLike) -> tuple[np.ndarray, str]:
    """Read an image file as (H, W, 3) uint8 RGB; returns (array, original PIL mode).

    A missing, unreadable or truncated file raises ``DatasetError`` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "image file not found")
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            return image_to_rgb_array(img, path), mode
    except DatasetError:
        raise
    except (OSError, SyntaxError, ValueError) as err:
        raise DatasetError(path, f"unreadable or truncated image: {err}") from None
