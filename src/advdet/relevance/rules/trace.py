"""Entry points: :func:`trace_forward` (a forward pass with the rules attached, exact mode included),
:func:`lrp_backward` (its input relevance) and :func:`lrp` (both for any network)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from advdet.relevance.rules.config import LRPRules
from advdet.relevance.rules.context import LRPContext, Recorder


def lrp_backward(outputs: torch.Tensor | list[torch.Tensor], x: torch.Tensor,
                 init: torch.Tensor | list[torch.Tensor], *, create_graph: bool = False,
                 retain_graph: bool | None = None) -> torch.Tensor:
    """Input relevance of a forward traced under :class:`LRPContext` (call it after the context has
    exited): ``autograd.grad`` with the initial relevance ``init`` as grad_outputs; zeros where nothing
    reaches ``x``. For ``create_graph=True`` the trace must be exact (:func:`trace_forward`)."""
    outs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    inits = init if isinstance(init, (list, tuple)) else [init]
    if not create_graph:
        inits = [i.detach() for i in inits]
    with torch.enable_grad():
        (g,) = torch.autograd.grad(outs, x, inits, create_graph=create_graph, retain_graph=retain_graph,
                                   allow_unused=True)
    return torch.zeros_like(x) if g is None else g


@dataclass
class Traced:
    """A forward pass traced for LRP. ``xr``: the tensor relevance is taken w.r.t. (the caller's x, or a
    leaf copy); ``out``: the traced output (backpropagate the initial relevance through it);
    ``out_true``: the same output from a plain forward pass in exact mode (compute the initial relevance
    and anything else that must be differentiated from it), else ``out`` itself; ``ctx`` the context."""

    xr: torch.Tensor
    out: object
    out_true: object
    ctx: LRPContext


def trace_forward(fn: Callable[[torch.Tensor], object], x: torch.Tensor, *, rules: LRPRules = LRPRules(),
                  module: nn.Module | None = None, exact: bool = False) -> Traced:
    """Run ``fn(x)`` with the LRP rules attached.

    ``exact=True`` (needed for ``create_graph=True``): ``fn`` runs twice, plainly and traced; every rule
    uses the inputs of the plain pass in its backward, so the input relevance is an ordinary
    differentiable function of ``x`` whose derivative follows the true Jacobians (with one pass the
    derivative of the activations would itself go through the modified backward). The traced pass takes
    the outputs of its weighted and normalisation calls from the plain pass instead of computing them
    again (:meth:`LRPContext.true_output`: the same values, so the result is bitwise the same).
    """
    xr = x if x.requires_grad else x.detach().requires_grad_()
    true_calls, true_outputs, out_true = None, None, None
    with torch.enable_grad():
        if exact:
            with Recorder() as rec:
                out_true = fn(xr * 1.0)
            true_calls, true_outputs = rec.calls, rec.outputs
        xin = xr * 1.0  # a node of our own: the graph walk stops here
        with LRPContext(module, xin, rules, true_calls, true_outputs) as ctx:
            out = fn(xin)
    if exact and ctx._next != len(true_calls):
        raise RuntimeError("LRP exact mode: the traced forward made fewer calls than the plain one")
    return Traced(xr, out, out_true if exact else out, ctx)


def lrp(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, init: Callable | torch.Tensor | None = None,
        *, rules: LRPRules = LRPRules(), module: nn.Module | None = None,
        create_graph: bool = False) -> torch.Tensor:
    """LRP of ``fn`` (any network returning one tensor) at ``x``: input relevance, same shape as ``x``.

    ``init``: initial relevance over ``fn(x)``: a tensor, a callable ``out -> R`` (given the output of the
    plain pass, so it may depend on x differentiably), or None (R = the output itself, classic LRP).
    With ``create_graph=True`` the result is differentiable w.r.t. ``x`` (exact second derivative).
    """
    mod = module if module is not None else (fn if isinstance(fn, nn.Module) else None)
    tr = trace_forward(fn, x, rules=rules, module=mod, exact=create_graph)
    if init is None:
        r = tr.out_true
    elif callable(init):
        r = init(tr.out_true)
    else:
        r = init
    return lrp_backward(tr.out, tr.xr, r, create_graph=create_graph)
