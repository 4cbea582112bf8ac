"""Interception: :class:`LRPContext` swaps every weighted layer, normalisation, smooth activation and
resampling call of a forward pass for its rule (a ``TorchFunctionMode`` plus module hooks for norm-like
modules); :class:`LRPStats` says what it met."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from advdet.relevance.rules.activation import PASS_ACTIVATIONS, pass_activation
from advdet.relevance.rules.config import LRPRules
from advdet.relevance.rules.norm import NORM_FUNCS, PassThrough, default_passthrough_modules, pass_norm
from advdet.relevance.rules.resample import ROI_FUNCS, interpolate, route_roi
from advdet.relevance.rules.smooth import SMOOTH_FUNCS, first_tensor, shadow
from advdet.relevance.rules.weighted import CONV_FUNCS, RuleFn, bind_weighted, weighted

_PAIRED_FUNCS = CONV_FUNCS | SMOOTH_FUNCS | NORM_FUNCS


@dataclass
class LRPStats:
    """What one traced forward pass met: weighted calls (by kind), input layers, pass-throughs, upsamples."""

    weighted: int = 0
    input_layers: int = 0
    by_func: dict = field(default_factory=dict)
    weight_ids: set = field(default_factory=set, repr=False)  # id() of every weight tensor met
    norms: int = 0
    activations: int = 0  # smooth activations passed through (``activation="pass"``)
    upsamples: int = 0
    routed: int = 0


class Recorder(TorchFunctionMode):
    """The plain forward pass of exact mode: records the input of every call the LRP pass will pair with
    (weighted layers, normalisation, smooth ops), in call order."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[object, torch.Tensor | None, tuple | None]] = []
        #: per call of :attr:`calls`: (output, its version right after the call) for the weighted and
        #: normalisation calls whose output the traced pass may reuse (see :meth:`LRPContext.true_output`)
        self.outputs: list[tuple[torch.Tensor, int] | None] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in CONV_FUNCS:
            inp, weight, bias, _, _ = bind_weighted(args, kwargs)
            self.calls.append((func, inp, (weight, bias)))
        elif func in _PAIRED_FUNCS:
            self.calls.append((func, first_tensor(args, kwargs), None))
        else:
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        keep = (func in CONV_FUNCS or func in NORM_FUNCS) and isinstance(out, torch.Tensor)
        self.outputs.append((out, out._version) if keep else None)
        return out


class _LRPMode(TorchFunctionMode):
    def __init__(self, owner: "LRPContext"):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        o = self.owner
        if o.suspended:
            return func(*args, **kwargs)
        true_inp = o._pair(func, args, kwargs) if func in _PAIRED_FUNCS else None
        if not torch.is_grad_enabled():
            return func(*args, **kwargs)
        if func in CONV_FUNCS:
            return weighted(o, func, args, kwargs, true_inp)
        if func in PASS_ACTIVATIONS and o.rules.activation == "pass":
            return pass_activation(o, func, args, kwargs)
        if func in SMOOTH_FUNCS or (func in NORM_FUNCS and o.rules.norm == "gradient"):
            return shadow(o, func, args, kwargs, true_inp)
        if func in NORM_FUNCS and o.rules.norm == "pass":
            return pass_norm(o, func, args, kwargs, o.true_output(first_tensor(args, kwargs)) if true_inp is not None
                             else None)
        if func is F.interpolate:
            return interpolate(o, args, kwargs)
        if func in ROI_FUNCS:
            return route_roi(o, func, args, kwargs)
        return func(*args, **kwargs)


class LRPContext:
    """Trace a forward pass with LRP rules. Use::

        x = x.detach().requires_grad_()          # or any tensor with autograd history
        with LRPContext(model, x, rules) as ctx:  # ``x`` is the input the forward will see
            out = model(x)
        (rel,) = torch.autograd.grad(out, x, R_init)   # rel: input relevance (pixel grid of ``x``)

    ``x`` must be exactly the tensor passed to the forward (or the tensor its normalisation starts from);
    it must have a ``grad_fn`` or be a leaf requiring grad. ``module`` (optional) is searched for
    norm-like modules to pass through (FrozenBatchNorm2d, a detector's ``relevance_passthrough`` and
    ``rules.passthrough_modules``).
    ``true_calls``: exact mode, the calls recorded by a plain pass (use :func:`trace_forward`).
    The rules stay attached to the traced graph after the context exits, so the backward pass may run
    later; ``stats`` tells what was met.
    """

    def __init__(self, module: nn.Module | None, x: torch.Tensor, rules: LRPRules = LRPRules(),
                 true_calls: list | None = None, true_outputs: list | None = None):
        if not x.requires_grad:
            raise ValueError("LRPContext: x must require grad (use x.detach().requires_grad_())")
        self.module, self.x, self.rules = module, x, rules
        self.true_calls = true_calls
        self.true_outputs = true_outputs
        self._next = 0
        self.stats = LRPStats()
        self.suspended = False
        self._mode = _LRPMode(self)
        self._handles: list = []
        self._dead: dict[int, object] = {}
        self._x_node = x.grad_fn  # None for a leaf: then its AccumulateGrad node is matched

    # -- context ------------------------------------------------------------------------------------
    def __enter__(self) -> "LRPContext":
        if self.module is not None and self.rules.norm == "pass":
            types = default_passthrough_modules(self.module) + tuple(self.rules.passthrough_modules)
            for m in self.module.modules():
                if types and isinstance(m, types):
                    self._handles.append(m.register_forward_hook(self._passthrough_hook))
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._dead.clear()
        self.true_outputs = None  # the traced graph holds the outputs it reused; let go of the rest

    @contextlib.contextmanager
    def _suspend(self):
        prev, self.suspended = self.suspended, True
        try:
            yield
        finally:
            self.suspended = prev

    def _passthrough_hook(self, module, args, output):
        if self.suspended or not args or not isinstance(output, torch.Tensor):
            return None
        inp = args[0]
        if not (isinstance(inp, torch.Tensor) and inp.requires_grad and inp.shape == output.shape):
            return None
        self.stats.norms += 1
        with self._suspend():
            return PassThrough.apply(inp, output.detach())

    # -- input-layer detection ----------------------------------------------------------------------
    def _is_x_node(self, node) -> bool:
        if self._x_node is not None:
            return node is self._x_node
        return type(node).__name__ == "AccumulateGrad" and node.variable is self.x

    def reaches_input(self, t: torch.Tensor) -> bool:
        """Does ``t`` depend on ``x`` through a path that crosses no other conv / linear?"""
        if t is self.x:
            return True
        start = t.grad_fn
        if start is None:
            return False
        stack, seen = [start], {}
        rule_cls = RuleFn._backward_cls
        while stack:
            n = stack.pop()
            if n is None or id(n) in seen or id(n) in self._dead:
                continue
            if self._is_x_node(n):
                return True
            seen[id(n)] = n
            if isinstance(n, rule_cls):
                continue
            stack.extend(f for f, _ in n.next_functions)
        self._dead.update(seen)
        return False

    def input_geometry(self, a: torch.Tensor):
        """Per element of the input layer's input ``a``: slope J 1 of x -> a and, for "pixel" bounds,
        l = a - J x and h = l + J 1 (exact for an element-wise affine normalisation)."""
        v = torch.zeros_like(a, requires_grad=True)
        (gx,) = torch.autograd.grad(a, self.x, v, create_graph=True, retain_graph=True)
        slope = torch.autograd.grad(gx, v, torch.ones_like(gx), retain_graph=True)[0]
        low = high = None
        if self.rules.bounds == "pixel":
            jx = torch.autograd.grad(gx, v, self.x.detach())[0]
            low = (a.detach() - jx).detach()
            high = (low + slope).detach()
        return slope.detach(), low, high

    # -- intercepted calls ---------------------------------------------------------------------------
    def _pair(self, func, args, kwargs) -> torch.Tensor | None:
        """Exact mode: the input of the same call in the plain forward pass."""
        if self.true_calls is None:
            return None
        inp = first_tensor(args, kwargs)
        if self._next >= len(self.true_calls):
            raise RuntimeError("LRP exact mode: the traced forward makes more calls than the plain one "
                               "(non-deterministic control flow in the model?)")
        f, t, params = self.true_calls[self._next]
        self._next += 1
        if f is not func or (t is None) != (inp is None) or (t is not None and t.shape != inp.shape):
            raise RuntimeError(f"LRP exact mode: call {self._next} differs between the two forward passes "
                               f"({getattr(f, '__name__', f)} vs {getattr(func, '__name__', func)})")
        return t if params is None else (t, params)

    def true_output(self, inp: torch.Tensor) -> torch.Tensor | None:
        """Exact mode: the output of the plain pass's call that the last :meth:`_pair` matched, when the
        traced call may return it instead of computing it again: a weighted or normalisation call whose
        output the plain pass did not modify in place afterwards (its version is unchanged, so the same
        code does not modify the traced one either) and whose input has the same values, which holds
        because every rule returns the plain value of its op (so the two passes compute the same numbers
        in the same order). None otherwise."""
        if self.true_outputs is None or self._next == 0 or self._next > len(self.true_outputs):
            return None
        rec = self.true_outputs[self._next - 1]
        if rec is None:
            return None
        out, version = rec
        if out._version != version or out.dtype != inp.dtype or out.device != inp.device:
            return None
        return out.detach()
