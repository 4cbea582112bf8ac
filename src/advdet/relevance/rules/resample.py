"""Resampling layers: nearest-mode enlarging ``interpolate`` (``upsample="average"``, the RAD patch:
relevance average-pooled by the factor; ``"gradient"`` sums the children's relevance) and torchvision's
``roi_align`` (gradient routing, with a double backward of our own)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
import torchvision  # noqa: F401  (registers torch.ops.torchvision)

from advdet.relevance.rules.adjoint import routed

if TYPE_CHECKING:
    from advdet.relevance.rules.context import LRPContext

try:  # torchvision's compiled op (the Python wrapper dispatches to it)
    ROI_FUNCS = {torch.ops.torchvision.roi_align, torch.ops.torchvision.roi_align.default}
except (AttributeError, RuntimeError):  # pragma: no cover - torchvision without compiled ops
    ROI_FUNCS = set()


def interpolate(ctx: "LRPContext", args, kwargs):
    """``F.interpolate``: nearest-mode enlarging with ``upsample="average"`` gets the RAD patch."""
    inp = args[0] if args else kwargs["input"]
    out = F.interpolate(*args, **kwargs)
    if not (isinstance(inp, torch.Tensor) and inp.requires_grad):
        return out
    mode = kwargs.get("mode", args[3] if len(args) > 3 else "nearest")
    grow = out[0].numel() > inp[0].numel()
    if ctx.rules.upsample == "average" and grow and mode in ("nearest", "nearest-exact"):
        rest, kw = args[1:], {k: v for k, v in kwargs.items() if k != "input"}
        ctx.stats.upsamples += 1
        return routed(inp, lambda t: F.interpolate(t, *rest, **kw), inp[0].numel() / out[0].numel())
    return out


def route_roi(ctx: "LRPContext", func, args, kwargs):
    """``roi_align``: gradient routing through a twice-differentiable adjoint of our own."""
    inp = args[0] if args else kwargs["input"]
    if isinstance(inp, torch.Tensor) and inp.requires_grad:
        rest, kw = args[1:], {k: v for k, v in kwargs.items() if k != "input"}
        ctx.stats.routed += 1
        return routed(inp, lambda t: func(t, *rest, **kw), 1.0)
    return func(*args, **kwargs)

