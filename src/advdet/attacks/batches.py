"""What an attack needs to know about its batch: where the letterbox's image lies (the valid mask),
micro-batches, padding, and targets on a device.

``valid_only`` (RAD's ``clip_valid``): only the letterboxed image, not its zero padding, is changed.
The mask is taken, in this order, from (1) the ``mask=`` argument of ``attack`` ((B, 1, H, W) or
(B, H, W) bool); (2) the ``letterbox`` entries of the targets (``LetterboxParams`` or its dict, as the
datasets of advdet yield them), which is exact even for black image content and is what RAD's code
uses (the letterbox's image region, ``val_image``); (3) a fallback when nothing says where the letterbox
is: the pixels where the clean image is nonzero in any channel (zero padding assumed).
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch

__all__ = ["letterbox_mask", "nonzero_mask", "knows_letterbox", "micro_batches", "padded", "targets_to"]


def _lb_get(p: Any, key: str):
    return p[key] if isinstance(p, dict) else getattr(p, key)


def letterbox_mask(params: Sequence[Any], h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """(B, 1, H, W) bool mask of the image area inside the letterbox canvas, from ``LetterboxParams``
    (or their ``as_dict()`` form)."""
    out = torch.zeros((len(params), 1, h, w), dtype=torch.bool, device=device)
    for i, p in enumerate(params):
        scale, oh, ow = float(_lb_get(p, "scale")), int(_lb_get(p, "orig_h")), int(_lb_get(p, "orig_w"))
        nh, nw = max(1, round(oh * scale)), max(1, round(ow * scale))
        py, px = int(_lb_get(p, "pad_y")), int(_lb_get(p, "pad_x"))
        out[i, :, py:py + nh, px:px + nw] = True
    return out


def nonzero_mask(x: torch.Tensor) -> torch.Tensor:
    """Fallback valid mask (no letterbox known): (B, 1, H, W) True where the image is nonzero in any channel."""
    return (x != 0).any(dim=1, keepdim=True)


def knows_letterbox(targets: Any, mask: torch.Tensor | None) -> bool:
    """Whether the caller says where the letterbox is: an explicit mask, or targets that all carry
    ``letterbox`` parameters (as every advdet dataset yields them)."""
    return mask is not None or (isinstance(targets, (list, tuple)) and bool(targets) and all(
        isinstance(t, dict) and t.get("letterbox") is not None for t in targets))


def micro_batches(x: torch.Tensor, targets: Any, mask: torch.Tensor | None, n: int) -> Iterator[tuple]:
    """``(x, targets, mask)`` of consecutive micro-batches of ``n`` images (targets sliced when a list)."""
    for i in range(0, x.shape[0], n):
        sl = slice(i, i + n)
        yield (x[sl], targets[sl] if isinstance(targets, (list, tuple)) else targets,
               None if mask is None else mask[sl])


def padded(x: torch.Tensor, mask: torch.Tensor, value: float) -> torch.Tensor:
    """``x`` with the pixels outside ``mask`` (the letterbox padding) set to ``value``."""
    return torch.where(mask, x, torch.full_like(x, float(value)))


def targets_to(targets: Any, device: torch.device) -> Any:
    """Move the tensors of a list of target dicts (or a tensor) to ``device``; other values untouched."""
    if targets is None:
        return None
    if isinstance(targets, torch.Tensor):
        return targets.to(device)
    return [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in t.items()} for t in targets]
