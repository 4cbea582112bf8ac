"""Smooth activations on the relevance path (sigmoid, SiLU, tanh, exp, softmax, logsumexp, GELU, ...):
relevance x local derivative, i.e. their gradient. In exact mode the vjp is evaluated at the plain pass's
input (:class:`ShadowFn`) so the second derivative follows the true Jacobians."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from advdet.relevance.rules.context import LRPContext

# smooth element-wise / row-wise ops whose gradient depends on their input: shadowed in exact mode
SMOOTH_FUNCS = {torch.sigmoid, torch.Tensor.sigmoid, torch.tanh, torch.Tensor.tanh, torch.exp, torch.Tensor.exp,
                F.silu, F.gelu, F.softplus, F.elu, F.selu, F.celu, F.mish, F.hardswish, F.hardsigmoid,
                F.logsigmoid, torch.logsumexp, torch.Tensor.logsumexp, torch.softmax, torch.Tensor.softmax,
                F.softmax, F.log_softmax, torch.log_softmax, torch.Tensor.log_softmax}


class ShadowFn(torch.autograd.Function):
    """Exact mode, smooth ops on the relevance path: forward ``fn(t)``; backward the ordinary vjp of
    ``fn`` but evaluated at ``t_true`` (the same tensor from the plain forward pass), so that its second
    derivative follows the true Jacobians."""

    @staticmethod
    def forward(ctx, t, fn, t_true):
        ctx.fn, ctx.t_true = fn, t_true
        return fn(t)

    @staticmethod
    def backward(ctx, rel):
        create = torch.is_grad_enabled()
        with torch.enable_grad():
            tt = ctx.t_true
            if not (create and tt.requires_grad):
                tt = tt.detach().requires_grad_()
            (g,) = torch.autograd.grad(ctx.fn(tt), tt, rel, create_graph=create)
        return g, None, None


def first_tensor(args, kwargs):
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    return kwargs.get("input")


def shadow(ctx: "LRPContext", func, args, kwargs, true_inp):
    """Exact mode: a smooth op whose vjp is evaluated at the plain pass's input (else the call itself)."""
    inp = first_tensor(args, kwargs)
    if true_inp is None or inp is None or not inp.requires_grad:
        return func(*args, **kwargs)
    others = [a for a in list(args[1:]) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
    if any(a.requires_grad for a in others if a is not inp):
        return func(*args, **kwargs)
    rest = args[1:] if args and args[0] is inp else args
    kw = {k: v for k, v in kwargs.items() if k != "input"}
    return ShadowFn.apply(inp, lambda t: func(t, *rest, **kw), true_inp)
