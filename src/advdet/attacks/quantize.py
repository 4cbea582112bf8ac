"""Quantisation-safe saving of adversarial images (DESIGN.md, Conventions).

A saved adversarial image is PNG uint8 and its Linf distance to the clean uint8 image never exceeds
``eps`` (0-255 units) after rounding: ``quantize_adv`` projects the float image onto the eps ball
around the clean uint8 image and onto [0, 255], rounds, and projects again (onto the integer budget
``floor(eps)``, so a fractional eps is also safe). PNG is lossless, so ``load_png(save_png(q)) == q``.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from advdet.data.io import atomic_write_bytes, read_image_rgb

__all__ = ["to_uint8", "quantize_adv", "save_png", "load_png", "save_adversarial_png"]


def _as_tensor(a: Any) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu()
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a)))


def to_uint8(x: Any) -> torch.Tensor:
    """Float image(s) in [0, 1] (any shape) -> uint8 by rounding ``x * 255`` to the nearest integer;
    uint8 input is returned as it is."""
    t = _as_tensor(x)
    if t.dtype == torch.uint8:
        return t
    if not t.is_floating_point():
        raise TypeError(f"to_uint8: expected a float image in [0, 1] or uint8, got {t.dtype}")
    if t.numel() and not torch.isfinite(t).all():
        raise ValueError("to_uint8: non-finite values")
    return (t.to(torch.float64) * 255.0).round().clamp(0, 255).to(torch.uint8)


def quantize_adv(x_adv: Any, clean: Any, eps: float | None, mask: Any | None = None) -> torch.Tensor:
    """uint8 adversarial image with ``|q - clean_uint8| <= eps`` everywhere (0-255 units).

    Args:
        x_adv: float adversarial image(s) in [0, 1] (values outside are clipped), e.g. (3, H, W) or
            (B, 3, H, W); tensor or array.
        clean: the clean image in the same layout, uint8 (0-255) or float in [0, 1] (rounded with
            ``to_uint8``).
        eps: Linf budget in 0-255 units; None: no budget (only rounding and [0, 255]).
        mask: optional bool mask broadcastable to the image; where False the clean value is kept.

    Returns a uint8 tensor of ``x_adv``'s shape: project, round, re-project.
    """
    a = _as_tensor(x_adv)
    if not a.is_floating_point():
        raise TypeError(f"quantize_adv: x_adv must be a float image in [0, 1], got {a.dtype}")
    if a.numel() and not torch.isfinite(a).all():
        raise ValueError("quantize_adv: x_adv has non-finite values")
    c = to_uint8(clean).to(torch.float64)
    if c.shape != a.shape:
        raise ValueError(f"quantize_adv: clean image {tuple(c.shape)} and x_adv {tuple(a.shape)} differ in shape")
    a = a.to(torch.float64) * 255.0
    if eps is None:
        lo, hi = torch.zeros_like(c), torch.full_like(c, 255.0)
    else:
        if eps < 0 or not math.isfinite(eps):
            raise ValueError(f"quantize_adv: eps must be finite and >= 0, got {eps}")
        e = float(math.floor(eps))  # the integer budget that survives rounding
        lo, hi = (c - e).clamp(0, 255), (c + e).clamp(0, 255)
    q = torch.minimum(torch.maximum(a, lo), hi)          # project
    q = q.round()                                          # quantise
    q = torch.minimum(torch.maximum(q, lo), hi)            # re-project
    if mask is not None:
        q = torch.where(_as_tensor(mask).bool(), q, c)
    return q.to(torch.uint8)


def _hwc(img: Any) -> np.ndarray:
    t = _as_tensor(img)
    if t.dtype != torch.uint8:
        raise TypeError(f"save_png: expected a uint8 image (use quantize_adv / to_uint8 first), got {t.dtype}")
    if t.ndim == 3 and t.shape[0] == 3:  # channels-first, the library's layout (also for 3 x W x 3)
        t = t.permute(1, 2, 0)
    if t.ndim != 3 or t.shape[-1] != 3:
        raise ValueError(f"save_png: expected (3, H, W) or (H, W, 3), got {tuple(t.shape)}")
    return np.ascontiguousarray(t.numpy())


def save_png(path: str | os.PathLike, image: Any) -> Path:
    """Write a uint8 RGB image ((3, H, W) tensor, the library's layout, or (H, W, 3)) as PNG, atomically."""
    arr = _hwc(image)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_png(path: str | os.PathLike) -> torch.Tensor:
    """Read an image file back as a uint8 (3, H, W) tensor (the exact bytes written by ``save_png``)."""
    arr, _ = read_image_rgb(path)
    return torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1).contiguous()


def save_adversarial_png(path: str | os.PathLike, x_adv: Any, clean: Any, eps: float | None,
                         mask: Any | None = None) -> torch.Tensor:
    """``quantize_adv`` one (3, H, W) image and save it as PNG; returns the saved uint8 image."""
    q = quantize_adv(x_adv, clean, eps, mask)
    save_png(path, q)
    return q
