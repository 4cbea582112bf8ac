"""The rules of weighted layers (conv1d/2d/3d, conv_transpose1d/2d/3d, linear).

- **Input layer** (every conv/linear whose input is reached from ``x`` without crossing another
  conv/linear): the bounded **z^B rule**, bias ignored, bounds ``"minmax"`` (per image, reference) or
  ``"pixel"`` (the valid pixel range through the detector's normalisation).
- **Every other conv / linear**: **alpha1-beta0** with the full bias in the denominator (reference), or
  ``"zero"`` (LRP-0), ``"epsilon"``; divisions guard exact zeros (1e-7) and floor |z| at 1e4 sqrt(smallest
  normal) so the exact second derivative cannot overflow.

See :mod:`advdet.relevance.rules` for the formulas and why the normaliser ``z`` is not detached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from advdet.relevance.rules.adjoint import Adjoint, vjp_factory

if TYPE_CHECKING:
    from advdet.relevance.rules.context import LRPContext

_ZERO_GUARD = 1e-7

CONV_FUNCS = {torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d, torch.conv_transpose2d,
              torch.conv_transpose3d, F.linear}


def _bcast(scalar_per_image: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``scalar_per_image`` (B, 1, ..., 1) times ``t`` (1, ...), broadcast over ``t``'s own rank."""
    return scalar_per_image.reshape(-1, *([1] * (t.ndim - 1))) * t


def _stabilise(z: torch.Tensor, eps: float) -> torch.Tensor:
    if eps > 0:
        return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)
    # exact zeros -> 1e-7 (the reference); |z| below ~sqrt(smallest normal) -> +-that floor, so that the
    # derivative -R / z^2 of the exact second-order pass cannot overflow (0 * inf = NaN). The masks are
    # constants: only one ``where`` enters the graph (none on CPU when no |z| is that small).
    floor = _tiny_floor(z.dtype)
    with torch.no_grad():
        if z.device.type == "cpu" and not _any_abs_below(z, floor):
            return z
        small = z.abs() < floor
        repl = torch.where(z == 0, _ZERO_GUARD, torch.where(z < 0, -floor, floor)).to(z.dtype)
    return torch.where(small, repl, z)


def _any_abs_below(t: torch.Tensor, bound: float) -> bool:
    """``bool((t.abs() < bound).any())`` as one reduction (``any`` over a bool tensor is a slow, scalar
    loop on the CPU: about 5x the cost of the ``amin``); NaNs aside, the same answer."""
    return t.numel() > 0 and bool(t.abs().amin() < bound)


def _any_negative(t: torch.Tensor) -> bool:
    """``bool((t < 0).any())`` as one reduction (see :func:`_any_abs_below`)."""
    return t.numel() > 0 and bool(t.amin() < 0)


def _split_sign(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t.clamp(min=0), t.clamp(max=0))``, the same values, as ``relu(t)`` and ``t - relu(t)``: under
    ``create_graph`` their backward passes are one fused kernel each, where ``clamp``'s builds a mask and a
    ``where`` (on a channels-last [2, 8, 416, 416] tensor, forward and backward: 2.7 and 5.7 ms against 24.8
    and 17.3 ms, one CPU thread). The derivative differs only at t == 0 exactly (relu's is 0 there, clamp's
    1); a layer input that is exactly 0 after a ReLU has a zero derivative itself, so the product is the same."""
    pos = torch.relu(t)
    return pos, t - pos


def _tiny_floor(dtype: torch.dtype) -> float:
    """1e4 * sqrt(smallest normal number): 1e-15 in float32, 1.5e-150 in float64."""
    return 1e4 * torch.finfo(dtype).tiny ** 0.5


@dataclass
class LayerSpec:
    """One intercepted weighted call: ``f(inp, weight, bias)`` reproduces it."""

    f: Callable
    rule: str
    bias_in_z: bool
    eps: float
    has_neg: bool = True
    slope: torch.Tensor | None = None  # input layer: d(normalised input)/dx per element
    low: torch.Tensor | None = None    # "pixel" bounds (constants)
    high: torch.Tensor | None = None
    a_true: torch.Tensor | None = None  # exact mode: the same input from the plain forward pass
    vjp: Callable | None = None         # weight -> (g -> J^T g), if available
    w_true: torch.Tensor | None = None  # exact mode: x-dependent weight / bias of the plain pass
    b_true: torch.Tensor | None = None
    out_true: torch.Tensor | None = None  # exact mode: the plain pass's output of this call (same values)


def _rule_parts(spec: "LayerSpec", a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
    """(stabilised z, [(multiplier, weight), ...]) of a layer's LRP rule: the relevance at the input is
    ``sum_k multiplier_k * J(weight_k)^T (R / z)`` (see the module docstring for the rules)."""
    f = spec.f
    if spec.rule == "zB":
        wp, wn = _split_sign(w)
        if spec.low is not None:  # per-element bounds
            lo, hi = spec.low, spec.high
            z = f(a, w, None) - f(lo.expand_as(a), wp, None) - f(hi.expand_as(a), wn, None)
        else:  # per-image scalar bounds: f(l * 1, w+) = l * f(1, w+), one batch-1 conv for all images
            dims = tuple(range(1, a.ndim))
            lo, hi = a.amin(dim=dims, keepdim=True), a.amax(dim=dims, keepdim=True)
            ones = torch.ones_like(a[:1])
            z = f(a, w, None) - _bcast(lo, f(ones, wp, None)) - _bcast(hi, f(ones, wn, None))
        # sum_j (a w - l w+ - h w-) s_j = (a - l) J+^T s + (a - h) J-^T s, since J^T = J+^T + J-^T
        return _stabilise(z, spec.eps), [(a - lo, wp), (a - hi, wn)]
    if spec.rule == "alpha1beta0":
        bb = b if spec.bias_in_z else None
        if spec.has_neg:
            (wp, wn), (ap, an) = _split_sign(w), _split_sign(a)
            return _stabilise(f(ap, wp, bb) + f(an, wn, None), spec.eps), [(ap, wp), (an, wn)]
        wp, ap = torch.relu(w), torch.relu(a)
        return _stabilise(f(ap, wp, bb), spec.eps), [(ap, wp)]
    # "zero" / "epsilon"
    return _stabilise(f(a, w, b if spec.bias_in_z else None), spec.eps), [(a, w)]


def _channels_last(t: torch.Tensor) -> bool:
    """A 4-D tensor laid out channels-last (and not also contiguous, as 1 x 1 or single-channel ones are)."""
    return t.ndim == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


class RuleFn(torch.autograd.Function):
    """Forward: the layer's own output. Backward: the LRP rule of ``spec.rule`` applied to the incoming
    relevance, written with differentiable ops on the saved input (so the normaliser ``z`` is part of the
    graph when ``create_graph=True``)."""

    @staticmethod
    def forward(ctx, inp, weight, bias, spec):
        ctx.spec = spec
        ctx.has_bias = bias is not None
        first = inp if spec.a_true is None else inp.new_empty(0)
        ctx.save_for_backward(first, weight, bias) if bias is not None else ctx.save_for_backward(first, weight)
        if spec.out_true is not None:  # exact mode: the plain pass computed this very value already
            out, spec.out_true = spec.out_true, None
            return out
        return spec.f(inp, weight, bias)

    @staticmethod
    def backward(ctx, rel):
        spec: LayerSpec = ctx.spec
        saved = ctx.saved_tensors
        a = saved[0] if spec.a_true is None else spec.a_true
        w = saved[1].detach() if spec.w_true is None else spec.w_true
        b = (saved[2].detach() if spec.b_true is None else spec.b_true) if ctx.has_bias else None
        f = spec.f
        shape = a.shape

        def lin(weight):
            return lambda t: f(t, weight, None)

        mk = spec.vjp

        x_dependent_w = spec.w_true is not None and torch.is_grad_enabled()

        def _adj(fn_w, shp, g, _w=None):
            if x_dependent_w:  # the weight depends on x: an autograd vjp keeps d/dw in the graph
                with torch.enable_grad():
                    dummy = torch.zeros(shp, dtype=g.dtype, device=g.device, requires_grad=True)
                    return torch.autograd.grad(fn_w(dummy), dummy, g, create_graph=True)[0]
            return Adjoint.apply(g, fn_w, shp, 1.0, mk(_w) if (mk is not None and _w is not None) else None)

        # The normaliser z and the factors of each adjoint depend on the layer's input and weights only,
        # not on the relevance: computed once per node and reused when the same graph is propagated
        # again (RAD's reference head runs two LRP passes, A and B, through one trace).
        grad_mode = torch.is_grad_enabled()
        cache = getattr(ctx, "lrp_cache", None)
        if cache is not None and cache[0] == grad_mode:
            zs, terms = cache[1]
        else:
            zs, terms = _rule_parts(spec, a, w, b)
            ctx.lrp_cache = (grad_mode, (zs, terms))
        s = rel / zs
        out = None
        for mult, weight in terms:
            part = mult * _adj(lin(weight), shape, s, weight)
            out = part if out is None else out + part
        if spec.slope is not None:
            out = torch.where(spec.slope != 0, out / torch.where(spec.slope != 0, spec.slope, 1.0), 0.0)
        return out, None, None, None


def bind_weighted(args: tuple, kwargs: dict):
    """Split a conv / linear call into (input, weight, bias, f(inp, w, b))."""
    args, kwargs = list(args), dict(kwargs)
    inp = args.pop(0) if args else kwargs.pop("input")
    weight = args.pop(0) if args else kwargs.pop("weight")
    if args:
        bias = args.pop(0)
    else:
        bias = kwargs.pop("bias", None)
    rest = tuple(args)
    return inp, weight, bias, rest, kwargs


def weighted(ctx: "LRPContext", func, args, kwargs, true_inp=None):
    """A conv / linear call with the rule of its place: z^B-style input rule or the layer rule."""
    inp, weight, bias, rest, kw = bind_weighted(args, kwargs)
    true_params = None
    if true_inp is not None:
        true_inp, true_params = true_inp
    if not isinstance(inp, torch.Tensor) or not inp.requires_grad:
        return func(*args, **kwargs)

    def f(i, w, b, _func=func, _rest=rest, _kw=kw):
        return _func(i, w, b, *_rest, **_kw)

    r = ctx.rules
    name = getattr(func, "__name__", str(func))
    ctx.stats.weighted += 1
    ctx.stats.by_func[name] = ctx.stats.by_func.get(name, 0) + 1
    ctx.stats.weight_ids.add(id(weight))
    if ctx.reaches_input(inp):
        ctx.stats.input_layers += 1
        rule = r.input_rule
        slope, low, high = ctx.input_geometry(inp)
        spec = LayerSpec(f, rule, r.bias, r.epsilon, True, slope, low, high)
    else:
        rule = r.layer_rule
        has_neg = _any_negative(inp.detach()) if rule == "alpha1beta0" else True
        spec = LayerSpec(f, rule, r.bias, r.epsilon, has_neg)
    if rule == "epsilon" and r.epsilon == 0:
        spec.eps = 1e-6
    spec.a_true = true_inp
    if true_params is not None:
        # weights computed from x (RobustDet's dynamic convs): keep the plain pass's, attached, so the
        # derivative through them is exact; parameters (leaves) are constants
        tw, tb = true_params
        spec.w_true = tw if (tw.grad_fn is not None) else None
        spec.b_true = tb if (tb is not None and tb.grad_fn is not None) else None
    spec.vjp = vjp_factory(func, rest, kw, inp.shape, channels_last=_channels_last(inp))
    if true_params is not None and spec.w_true is None and spec.b_true is None:
        spec.out_true = ctx.true_output(inp)
    return RuleFn.apply(inp, weight, bias, spec)
