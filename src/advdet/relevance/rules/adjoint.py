"""Twice-differentiable linear adjoints shared by the rules: ``J^T g`` of a linear map whose own backward is
``J G`` again, so every rule stays differentiable to any order whatever the op's own double backward
(torchvision's roi_align has none)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def _vjp_of_linear(fn: Callable[[torch.Tensor], torch.Tensor], shape, like: torch.Tensor,
                   g: torch.Tensor) -> torch.Tensor:
    """J^T g for a linear ``fn`` (its Jacobian does not depend on the input), no graph kept."""
    with torch.enable_grad():
        dummy = torch.zeros(shape, dtype=like.dtype, device=like.device, requires_grad=True)
        out = fn(dummy)
        (res,) = torch.autograd.grad(out, dummy, g.detach())
    return res


class Adjoint(torch.autograd.Function):
    """``scale * J^T g`` of a linear map ``fn`` (J its Jacobian), differentiable w.r.t. ``g``: its
    backward is ``scale * J G = scale * fn(G)``. Used for every vjp inside the rules, so the rules are
    twice differentiable whatever the op's own double backward (roi_align has none). ``vjp``: an optional
    direct ``g -> J^T g`` (convolutions, linear), else it is taken by autograd through ``fn``."""

    @staticmethod
    def forward(ctx, g, fn, in_shape, scale, vjp=None):
        ctx.fn, ctx.scale = fn, scale
        res = vjp(g) if vjp is not None else _vjp_of_linear(fn, in_shape, g, g)
        return res * scale if scale != 1.0 else res

    @staticmethod
    def backward(ctx, gg):
        out = _Linear.apply(gg, ctx.fn, ctx.scale, ctx.scale)
        return out, None, None, None, None


class _Linear(torch.autograd.Function):
    """``scale * fn(x)`` for a linear ``fn`` whose backward is ``scale * J^T`` via :class:`Adjoint`
    (hence differentiable to any order). With ``scale`` != 1 this is a modified-gradient op: the forward
    value is ``fn(x)``, the backward ``scale * J^T``."""

    @staticmethod
    def forward(ctx, x, fn, scale, value_scale=None):
        ctx.fn, ctx.scale, ctx.shape = fn, scale, x.shape
        out = fn(x)
        s = scale if value_scale is None else value_scale
        return out * s if s != 1.0 else out

    @staticmethod
    def backward(ctx, g):
        return Adjoint.apply(g, ctx.fn, ctx.shape, ctx.scale), None, None, None


def routed(x: torch.Tensor, fn: Callable, grad_scale: float) -> torch.Tensor:
    """``fn(x)`` in value, ``grad_scale * J^T`` in backward, twice differentiable."""
    return _Linear.apply(x, fn, grad_scale, 1.0)


def _tuple(v, n: int) -> list[int]:
    if isinstance(v, int):
        return [v] * n
    v = list(v)
    return v * n if len(v) == 1 else v


def vjp_factory(func, rest: tuple, kw: dict, in_shape, channels_last: bool = False) -> Callable | None:
    """``weight -> (g -> J^T g)`` without a forward pass, for conv1d/2d/3d with numeric padding and for
    linear; None otherwise (the generic autograd vjp is used). ``channels_last``: the layer's input is
    channels-last, and so is ``J^T g`` (the rules multiply it with that input: on the CPU element-wise ops
    on mixed layouts are about twice as slow)."""
    if func is F.linear:
        return lambda w: (lambda g: g @ w)
    dims = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}.get(func)
    if dims is None:
        return None
    names = ("stride", "padding", "dilation", "groups")
    defaults = (1, 0, 1, 1)
    vals = dict(zip(names, defaults))
    vals.update(zip(names, rest))
    vals.update({k: v for k, v in kw.items() if k in names})
    if isinstance(vals["padding"], str):
        return None
    stride, padding, dilation = (_tuple(vals[k], dims) for k in ("stride", "padding", "dilation"))
    groups = int(vals["groups"])

    def make(w):
        def vjp(g):
            # the input only tells convolution_backward the shape and the layout: an expanded scalar, or an
            # uninitialised channels-last tensor (allocated, never read)
            dummy = (torch.empty(in_shape, dtype=g.dtype, device=g.device, memory_format=torch.channels_last)
                     if channels_last else g.new_empty(1).expand(in_shape))
            return torch.ops.aten.convolution_backward(g, dummy, w, None, stride, padding, dilation, False,
                                                       [0] * dims, groups, (True, False, False))[0]
        return vjp
    return make
