"""Letterbox: resize so the long side is S, zero-pad to S x S (RAD appendix E.1), its inverse, and
:func:`reletterbox` (a letterboxed canvas to another size)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LetterboxParams:
    """How an (H, W) image was placed on the S x S canvas: x' = x * scale + pad_x (same for y)."""

    scale: float
    pad_x: int
    pad_y: int
    size: int
    orig_h: int
    orig_w: int

    @property
    def content_hw(self) -> tuple[int, int]:
        """Height and width of the resized image inside the canvas."""
        return (max(1, round(self.orig_h * self.scale)), max(1, round(self.orig_w * self.scale)))

    def as_dict(self) -> dict:
        return asdict(self)


def letterbox_params(orig_h: int, orig_w: int, size: int) -> LetterboxParams:
    """Parameters of the letterbox of an (orig_h, orig_w) image onto a size x size canvas."""
    scale = size / max(orig_h, orig_w)
    new_h, new_w = max(1, round(orig_h * scale)), max(1, round(orig_w * scale))
    return LetterboxParams(scale, (size - new_w) // 2, (size - new_h) // 2, size, orig_h, orig_w)


def letterbox(image: torch.Tensor, size: int) -> tuple[torch.Tensor, LetterboxParams]:
    """Letterbox a (C, H, W) float image onto a zero (C, size, size) canvas, centred.

    Bilinear resize with antialiasing; returns the canvas and the parameters for the inverse.
    """
    c, h, w = image.shape
    p = letterbox_params(h, w, size)
    nh, nw = p.content_hw
    resized = image
    if (nh, nw) != (h, w):
        resized = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear",
                                align_corners=False, antialias=True)[0]
    canvas = torch.zeros((c, size, size), dtype=resized.dtype, device=image.device)
    canvas[:, p.pad_y:p.pad_y + nh, p.pad_x:p.pad_x + nw] = resized
    return canvas, p


def letterbox_boxes(boxes: torch.Tensor, p: LetterboxParams) -> torch.Tensor:
    """Map (N, 4) xyxy boxes from original-image pixels to letterboxed pixels."""
    offset = torch.tensor([p.pad_x, p.pad_y, p.pad_x, p.pad_y], dtype=boxes.dtype, device=boxes.device)
    return boxes * p.scale + offset


def unletterbox_boxes(boxes: torch.Tensor, p: LetterboxParams, clip: bool = True) -> torch.Tensor:
    """Exact inverse of ``letterbox_boxes``: letterboxed pixels back to original-image pixels."""
    offset = torch.tensor([p.pad_x, p.pad_y, p.pad_x, p.pad_y], dtype=boxes.dtype, device=boxes.device)
    out = (boxes - offset) / p.scale
    if clip:
        out = torch.stack([out[:, 0].clamp(0, p.orig_w), out[:, 1].clamp(0, p.orig_h),
                           out[:, 2].clamp(0, p.orig_w), out[:, 3].clamp(0, p.orig_h)], dim=1)
    return out


def letterbox_masks(masks: torch.Tensor, p: LetterboxParams) -> torch.Tensor:
    """Map (N, H, W) binary masks onto the letterbox canvas, zero padding.

    Antialiased bilinear resize thresholded at 0.5 (pixel-centre aligned like the boxes; plain
    ``nearest`` would shift masks by up to a source pixel towards the bottom right).
    """
    n = masks.shape[0]
    nh, nw = p.content_hw
    out = torch.zeros((n, p.size, p.size), dtype=torch.uint8, device=masks.device)
    if n:
        r = F.interpolate((masks[:, None] > 0).float(), size=(nh, nw), mode="bilinear",
                          align_corners=False, antialias=True)[:, 0]
        out[:, p.pad_y:p.pad_y + nh, p.pad_x:p.pad_x + nw] = (r > 0.5).to(torch.uint8)
    return out


def unletterbox_masks(masks: torch.Tensor, p: LetterboxParams) -> torch.Tensor:
    """Map (N, S, S) masks (binary or soft) on the canvas back to (N, orig_h, orig_w) binary masks."""
    nh, nw = p.content_hw
    crop = masks[:, p.pad_y:p.pad_y + nh, p.pad_x:p.pad_x + nw].float()
    if crop.shape[0] == 0:
        return torch.zeros((0, p.orig_h, p.orig_w), dtype=torch.uint8, device=masks.device)
    r = F.interpolate(crop[:, None], size=(p.orig_h, p.orig_w), mode="bilinear", align_corners=False)[:, 0]
    return (r > 0.5).to(torch.uint8)


def reletterbox(images_u8: torch.Tensor, params: Sequence[LetterboxParams], size: int) -> tuple[torch.Tensor, list]:
    """Letterboxed uint8 canvases (B, 3, S, S) -> float canvases (B, 3, size, size) in [0, 1] for a model of
    another input size: the image content is cut out, resized (bilinear, antialiased) to the content size
    of a ``size`` letterbox of the original image, and placed on a zero canvas. Returns the canvases and
    their ``LetterboxParams`` (relative to the original image, for mapping predictions back)."""
    b = images_u8.shape[0]
    out = torch.zeros((b, 3, size, size), dtype=torch.float32, device=images_u8.device)
    new_params = []
    for i, p in enumerate(params):
        nh, nw = p.content_hw
        crop = images_u8[i:i + 1, :, p.pad_y:p.pad_y + nh, p.pad_x:p.pad_x + nw].float() / 255.0
        q = letterbox_params(p.orig_h, p.orig_w, size)
        th, tw = q.content_hw
        if (th, tw) != (nh, nw):
            crop = F.interpolate(crop, size=(th, tw), mode="bilinear", align_corners=False, antialias=True)
        out[i, :, q.pad_y:q.pad_y + th, q.pad_x:q.pad_x + tw] = crop[0].clamp(0, 1)
        new_params.append(q)
    return out, new_params
