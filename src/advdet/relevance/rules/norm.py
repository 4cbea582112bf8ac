"""Normalisation layers (BatchNorm, FrozenBatchNorm, GroupNorm, LayerNorm, InstanceNorm, and the norm-like
modules a detector declares in ``Detector.relevance_passthrough``, e.g. SSD's L2Norm):
relevance passed through unchanged (``norm="pass"``, the reference) or routed by the gradient
(``norm="gradient"``, see :mod:`.smooth`). Functionals are intercepted by the context; norm-like modules
written as plain arithmetic are hooked by module type (:func:`default_passthrough_modules`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from advdet.relevance.rules.context import LRPContext

NORM_FUNCS = {F.batch_norm, F.group_norm, F.layer_norm, F.instance_norm}


class PassThrough(torch.autograd.Function):
    """Forward: a given value (the layer's output). Backward: relevance passed to the input unchanged."""

    @staticmethod
    def forward(ctx, inp, value):
        return value.clone()

    @staticmethod
    def backward(ctx, rel):
        return rel, None


def default_passthrough_modules(module: object = None) -> tuple[type, ...]:
    """Norm-like module types passed through for any network (torchvision's ``FrozenBatchNorm2d``), plus
    those declared by the detectors in ``module`` (``Detector.relevance_passthrough``, e.g. SSD's L2Norm;
    ``module`` itself or, for an ensemble, its members)."""
    from advdet.models.detector import Detector

    types: list[type] = []
    try:
        from torchvision.ops import FrozenBatchNorm2d
        types.append(FrozenBatchNorm2d)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(module, torch.nn.Module):
        for m in module.modules():
            if isinstance(m, Detector):
                types.extend(t for t in m.relevance_passthrough if t not in types)
    return tuple(types)


def _updates_state(func, args, kwargs) -> bool:
    """Whether the call updates running statistics (train-mode batch norm, instance norm): then the
    traced pass computes it again, as the model would."""
    if func is F.batch_norm:
        return bool(kwargs.get("training", args[5] if len(args) > 5 else False))
    return func is F.instance_norm


def pass_norm(ctx: "LRPContext", func, args, kwargs, true_out: torch.Tensor | None = None):
    """A normalisation functional under ``norm="pass"``: its value, relevance passed to its input unchanged.
    ``true_out``: exact mode, the same call's output in the plain pass (the same values: used instead of
    computing the normalisation again)."""
    inp = args[0] if args else kwargs["input"]
    reuse = true_out is not None and true_out.shape == inp.shape and not _updates_state(func, args, kwargs)
    out = true_out if reuse else func(*args, **kwargs)
    if isinstance(inp, torch.Tensor) and inp.requires_grad and out.shape == inp.shape:
        ctx.stats.norms += 1
        return PassThrough.apply(inp, out.detach())
    return out
