"""LRP rules per layer type, as a modified, twice-differentiable backward pass.

How it works
------------
Relevance is propagated in the *gradient slot* of autograd (as iNNvestigate and zennit do): the model
runs its ordinary forward pass inside :class:`LRPContext`, which swaps selected operations for
``torch.autograd.Function``\\ s whose forward value is unchanged and whose backward maps the relevance of
the output to the relevance of the input by the layer's LRP rule. Every other operation keeps its ordinary
gradient, which is exactly the "gradient routing" the reference uses for everything that is not a
weighted layer. ``torch.autograd.grad(outputs, x, R_init)`` then returns the input relevance.

Interception is by function, not by module: a :class:`torch.overrides.TorchFunctionMode` catches
``conv1d/2d/3d``, ``conv_transpose1d/2d/3d``, ``linear``, the normalisation functionals,
``interpolate`` and ``torchvision.ops.roi_align`` wherever they are called (``nn.Conv2d``, ``F.conv2d``
inside a custom module, the dynamic grouped convs of RobustDet, torchvision heads), so the rules reach
every conv / linear that ``dense(x)`` runs, whatever the module structure. Module forward hooks add the
normalisation modules that are plain arithmetic (torchvision's ``FrozenBatchNorm2d``, SSD's ``L2Norm``).

Rules (ALGORITHMS.md 2.2, iNNvestigate 1.0.8 ``BoundedDeepTaylor`` as RAD uses it)
--------------------------------------------------------------------------------
- **Input layer** (every conv/linear whose input is reached from ``x`` without crossing another
  conv/linear; found by walking the autograd graph): the bounded **z^B rule**, bias ignored,
  ``R_i = sum_j (x_i w_ij - l_i w+_ij - h_i w-_ij) / z_j * R_j``. Bounds ``bounds="minmax"`` (default, the
  reference): l = min, h = max of the layer's current input, scalars **per image** (the reference takes
  them over the whole batch tensor; per image keeps images of a batch independent), not detached.
  ``bounds="pixel"``: the valid pixel range [0, 1] mapped through the detector's own normalisation,
  per element (l = norm(0), h = norm(1); computed from the graph as ``a - J x`` and ``a + J (1 - x)``).
- **Every other conv / linear**: **alpha1-beta0** with the full bias in the denominator
  ``z_j = sum_i (x+_i w+_ij + x-_i w-_ij) + b_j``, ``R_i = x+_i sum_j w+_ij R_j / z_j + x-_i sum_j w-_ij R_j / z_j``
  (z+ on non-negative inputs). Division guards only exact zeros (1e-7), as the reference, plus a floor at
  |z| >= 1e4 sqrt(smallest normal) (1e-15 in float32) so the exact second derivative cannot overflow
  (untrained heads with 0.01-std weights reach |z| ~ 1e-20); ``epsilon > 0``
  adds a signed stabiliser. ``z`` is **not** detached, so the map is exactly differentiable.
  Options for tests and ablations: ``"zero"`` (LRP-0), ``"epsilon"``, ``bias=False``.
- **Activations** (ReLU, LeakyReLU, SiLU, sigmoid, ...): relevance x local derivative = their gradient.
- **Pooling** (max, avg, adaptive), **residual adds** (relevance copied to each branch, not halved),
  **concatenation, reshape, permute, padding, slicing, RoIAlign**: gradient routing.
- **Normalisation** (BatchNorm, FrozenBatchNorm, GroupNorm, LayerNorm, InstanceNorm, SSD's L2Norm):
  **passed through unchanged** (``norm="pass"``, default), as the reference does for BatchNorm. Why not
  fold BN into the preceding conv (zennit canonizers)? (1) it is what RAD's surrogate maps were computed
  with, (2) folding only exists for conv->BN and would leave GroupNorm / L2Norm / BN-before-conv unhandled,
  whereas pass-through is uniform and conserves relevance, (3) the detector's own modules stay untouched
  (no weight copies, no risk of leaving a model modified). ``norm="gradient"`` routes by the gradient instead.
- **Upsampling** (``interpolate`` in nearest mode that enlarges): ``upsample="average"`` (default, the
  RAD patch: relevance average-pooled by the factor = gradient x in_size/out_size); ``"gradient"`` sums
  the children's relevance instead (conserving). Other resizes use the gradient.
- **Pixels**: the input layer's relevance lives in the normalised space the first conv sees. It is
  carried back to the [0, 1] pixel grid unchanged (divided by the normalisation's per-element slope
  ``J 1`` before it flows back through the normalisation), so the map is relevance, not gradient.

Exact derivative of the map (``create_graph=True``)
--------------------------------------------------
With one traced pass, differentiating the map w.r.t. x would be wrong: the activations the rules use
(and the outputs the initial relevance is computed from) have the *modified* backward in their own
history, so their derivative w.r.t. x would go through LRP instead of the true Jacobians. Exact mode
(:func:`trace_forward` with ``exact=True``) therefore runs the forward twice: a plain pass (recorded by
:class:`_Recorder`) and the traced pass. Calls are paired by order; every rule uses the plain pass's
input in its backward, smooth ops on the relevance path (sigmoid, SiLU, tanh, exp, softmax, logsumexp,
GELU, ...; gradient-mode norms) get their vjp evaluated at the plain pass's input (:class:`_ShadowFn`),
and the initial relevance is computed from the plain outputs. Weights computed from x (RobustDet's
dynamic convs, whose kernels are mixed by the AID's pi(x)) are taken from the plain pass too, attached,
so the derivative through pi(x) is included (relevance itself never flows into the weight branch: the
rules return no gradient for weights). Piecewise-linear ops (ReLU, LeakyReLU,
max-pool, add, cat, reshape, routing) need nothing: their vjp does not depend on x. What is not
covered: products of two x-dependent tensors on the relevance path (e.g. a hand-written ``x *
sigmoid(x)``, attention), whose second derivative would go through the modified backward; none of the
zoo's or torchvision's detectors has one between its input layer and its outputs.

Why not zennit's hooks
----------------------
zennit 0.5.1 implements rules through module backward hooks, which (a) only see ``nn.Module`` layers
(functional convs are missed), (b) its ``AlphaBeta`` puts only the positive part of the bias in the
alpha denominator, which differs from the reference's full-bias rule (its ``ZBox`` cancels the bias, as
the reference's z^B ignores it), (c) has no rule
for the RAD upsampling patch nor z^B bounds taken from the current input, and (d) its double
differentiability through the hook mechanism is not guaranteed (in-place clones, hooks on ``grad_fn``).
The rules here are custom ``autograd.Function``\\ s whose backward is written with differentiable ops on
tensors saved with their history, and linear adjoints (:class:`_Adjoint`) are themselves differentiable,
so ``create_graph=True`` gives the exact second derivative (checked by ``gradcheck`` in the tests; zennit,
with the full-bias alpha1-beta0 written as a ``BasicHook``, is the independent cross-check of the
first-order rules in ``tests/test_lrp_reference.py``). This also gives double backward
through ``roi_align``, whose torchvision kernel has none.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
import torch.nn.functional as F
import torchvision  # noqa: F401  (registers torch.ops.torchvision)
from torch import nn
from torch.overrides import TorchFunctionMode

InputRule = Literal["zB", "alpha1beta0", "zero", "epsilon"]
LayerRule = Literal["alpha1beta0", "zero", "epsilon"]

_ZERO_GUARD = 1e-7


@dataclass(frozen=True)
class LRPRules:
    """Which LRP rule each layer type gets (defaults: the reference, ALGORITHMS.md 2.2).

    input_rule: rule of the input layer(s): ``"zB"`` (bounded, reference), or any layer rule.
    layer_rule: rule of every other conv / linear: ``"alpha1beta0"`` (reference), ``"zero"`` (LRP-0),
        ``"epsilon"`` (LRP-0 with the stabiliser ``epsilon``).
    bias: include the bias in the denominator of the layer rule (reference: True; z^B always ignores it).
    epsilon: signed stabiliser added to every denominator; 0 only guards exact zeros (reference).
    bounds: z^B bounds, ``"minmax"`` (per-image min / max of the layer input, reference) or ``"pixel"``
        ([0, 1] mapped through the detector's normalisation).
    upsample: ``"average"`` (RAD patch) or ``"gradient"``, for nearest-mode enlarging ``interpolate``.
    norm: ``"pass"`` (normalisation layers pass relevance through unchanged, reference) or ``"gradient"``.
    passthrough_modules: extra module types whose output relevance is passed to their (single) input
        unchanged (norm-like modules written as plain arithmetic).
    """

    input_rule: InputRule = "zB"
    layer_rule: LayerRule = "alpha1beta0"
    bias: bool = True
    epsilon: float = 0.0
    bounds: Literal["minmax", "pixel"] = "minmax"
    upsample: Literal["average", "gradient"] = "average"
    norm: Literal["pass", "gradient"] = "pass"
    passthrough_modules: tuple[type, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.input_rule not in ("zB", "alpha1beta0", "zero", "epsilon"):
            raise ValueError(f"unknown input_rule {self.input_rule!r}")
        if self.layer_rule not in ("alpha1beta0", "zero", "epsilon"):
            raise ValueError(f"unknown layer_rule {self.layer_rule!r}")
        if self.bounds not in ("minmax", "pixel"):
            raise ValueError(f"bounds must be 'minmax' or 'pixel', got {self.bounds!r}")
        if self.upsample not in ("average", "gradient"):
            raise ValueError(f"upsample must be 'average' or 'gradient', got {self.upsample!r}")
        if self.norm not in ("pass", "gradient"):
            raise ValueError(f"norm must be 'pass' or 'gradient', got {self.norm!r}")
        if self.epsilon < 0:
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")


# ---------------------------------------------------------------------------------------------- adjoints
def _vjp_of_linear(fn: Callable[[torch.Tensor], torch.Tensor], shape, like: torch.Tensor,
                   g: torch.Tensor) -> torch.Tensor:
    """J^T g for a linear ``fn`` (its Jacobian does not depend on the input), no graph kept."""
    with torch.enable_grad():
        dummy = torch.zeros(shape, dtype=like.dtype, device=like.device, requires_grad=True)
        out = fn(dummy)
        (res,) = torch.autograd.grad(out, dummy, g.detach())
    return res


class _Adjoint(torch.autograd.Function):
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
    """``scale * fn(x)`` for a linear ``fn`` whose backward is ``scale * J^T`` via :class:`_Adjoint`
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
        return _Adjoint.apply(g, ctx.fn, ctx.shape, ctx.scale), None, None, None


def _routed(x: torch.Tensor, fn: Callable, grad_scale: float) -> torch.Tensor:
    """``fn(x)`` in value, ``grad_scale * J^T`` in backward, twice differentiable."""
    return _Linear.apply(x, fn, grad_scale, 1.0)


def _adj(fn: Callable, in_shape, g: torch.Tensor, vjp: Callable | None = None) -> torch.Tensor:
    return _Adjoint.apply(g, fn, in_shape, 1.0, vjp)


def _tuple(v, n: int) -> list[int]:
    if isinstance(v, int):
        return [v] * n
    v = list(v)
    return v * n if len(v) == 1 else v


def _vjp_factory(func, rest: tuple, kw: dict, in_shape) -> Callable | None:
    """``weight -> (g -> J^T g)`` without a forward pass, for conv1d/2d/3d with numeric padding and for
    linear; None otherwise (the generic autograd vjp is used)."""
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
            dummy = g.new_empty(1).expand(in_shape)
            return torch.ops.aten.convolution_backward(g, dummy, w, None, stride, padding, dilation, False,
                                                       [0] * dims, groups, (True, False, False))[0]
        return vjp
    return make


# ---------------------------------------------------------------------------------------------- the rules
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
        small = z.abs() < floor
        if z.device.type == "cpu" and not bool(small.any()):
            return z
        repl = torch.where(z == 0, _ZERO_GUARD, torch.where(z < 0, -floor, floor)).to(z.dtype)
    return torch.where(small, repl, z)


def _tiny_floor(dtype: torch.dtype) -> float:
    """1e4 * sqrt(smallest normal number): 1e-15 in float32, 1.5e-150 in float64."""
    return 1e4 * torch.finfo(dtype).tiny ** 0.5


@dataclass
class _LayerSpec:
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


def _rule_parts(spec: "_LayerSpec", a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
    """(stabilised z, [(multiplier, weight), ...]) of a layer's LRP rule: the relevance at the input is
    ``sum_k multiplier_k * J(weight_k)^T (R / z)`` (see the module docstring for the rules)."""
    f = spec.f
    if spec.rule == "zB":
        wp, wn = w.clamp(min=0), w.clamp(max=0)
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
        wp = w.clamp(min=0)
        bb = b if spec.bias_in_z else None
        ap = a.clamp(min=0)
        if spec.has_neg:
            wn, an = w.clamp(max=0), a.clamp(max=0)
            return _stabilise(f(ap, wp, bb) + f(an, wn, None), spec.eps), [(ap, wp), (an, wn)]
        return _stabilise(f(ap, wp, bb), spec.eps), [(ap, wp)]
    # "zero" / "epsilon"
    return _stabilise(f(a, w, b if spec.bias_in_z else None), spec.eps), [(a, w)]


class _RuleFn(torch.autograd.Function):
    """Forward: the layer's own output. Backward: the LRP rule of ``spec.rule`` applied to the incoming
    relevance, written with differentiable ops on the saved input (so the normaliser ``z`` is part of the
    graph when ``create_graph=True``)."""

    @staticmethod
    def forward(ctx, inp, weight, bias, spec):
        ctx.spec = spec
        ctx.has_bias = bias is not None
        first = inp if spec.a_true is None else inp.new_empty(0)
        ctx.save_for_backward(first, weight, bias) if bias is not None else ctx.save_for_backward(first, weight)
        return spec.f(inp, weight, bias)

    @staticmethod
    def backward(ctx, rel):
        spec: _LayerSpec = ctx.spec
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
            return _Adjoint.apply(g, fn_w, shp, 1.0, mk(_w) if (mk is not None and _w is not None) else None)

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


class _ShadowFn(torch.autograd.Function):
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


class _PassThrough(torch.autograd.Function):
    """Forward: a given value (the layer's output). Backward: relevance passed to the input unchanged."""

    @staticmethod
    def forward(ctx, inp, value):
        return value.clone()

    @staticmethod
    def backward(ctx, rel):
        return rel, None


# ---------------------------------------------------------------------------------------------- interception
_CONV_FUNCS = {torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d, torch.conv_transpose2d,
               torch.conv_transpose3d, F.linear}
_NORM_FUNCS = {F.batch_norm, F.group_norm, F.layer_norm, F.instance_norm}
# smooth element-wise / row-wise ops whose gradient depends on their input: shadowed in exact mode
_SMOOTH_FUNCS = {torch.sigmoid, torch.Tensor.sigmoid, torch.tanh, torch.Tensor.tanh, torch.exp, torch.Tensor.exp,
                 F.silu, F.gelu, F.softplus, F.elu, F.selu, F.celu, F.mish, F.hardswish, F.hardsigmoid,
                 F.logsigmoid, torch.logsumexp, torch.Tensor.logsumexp, torch.softmax, torch.Tensor.softmax,
                 F.softmax, F.log_softmax, torch.log_softmax, torch.Tensor.log_softmax}
try:  # torchvision's compiled op (the Python wrapper dispatches to it)
    _ROI_FUNCS = {torch.ops.torchvision.roi_align, torch.ops.torchvision.roi_align.default}
except (AttributeError, RuntimeError):  # pragma: no cover - torchvision without compiled ops
    _ROI_FUNCS = set()


_PAIRED_FUNCS = _CONV_FUNCS | _SMOOTH_FUNCS | _NORM_FUNCS


def _bind_weighted(args: tuple, kwargs: dict):
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


def _default_passthrough_modules() -> tuple[type, ...]:
    types: list[type] = []
    try:
        from torchvision.ops import FrozenBatchNorm2d
        types.append(FrozenBatchNorm2d)
    except ImportError:  # pragma: no cover
        pass
    try:
        from advdet.models.ssd_vgg import L2Norm
        types.append(L2Norm)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


@dataclass
class LRPStats:
    """What one traced forward pass met: weighted calls (by kind), input layers, pass-throughs, upsamples."""

    weighted: int = 0
    input_layers: int = 0
    by_func: dict = field(default_factory=dict)
    weight_ids: set = field(default_factory=set, repr=False)  # id() of every weight tensor met
    norms: int = 0
    upsamples: int = 0
    routed: int = 0


def _first_tensor(args, kwargs):
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    return kwargs.get("input")


class _Recorder(TorchFunctionMode):
    """The plain forward pass of exact mode: records the input of every call the LRP pass will pair with
    (weighted layers, normalisation, smooth ops), in call order."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[object, torch.Tensor | None, tuple | None]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CONV_FUNCS:
            inp, weight, bias, _, _ = _bind_weighted(args, kwargs)
            self.calls.append((func, inp, (weight, bias)))
        elif func in _PAIRED_FUNCS:
            self.calls.append((func, _first_tensor(args, kwargs), None))
        return func(*args, **kwargs)


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
        if func in _CONV_FUNCS:
            return o._weighted(func, args, kwargs, true_inp)
        if func in _SMOOTH_FUNCS or (func in _NORM_FUNCS and o.rules.norm == "gradient"):
            return o._smooth(func, args, kwargs, true_inp)
        if func in _NORM_FUNCS and o.rules.norm == "pass":
            out = func(*args, **kwargs)
            inp = args[0] if args else kwargs["input"]
            if isinstance(inp, torch.Tensor) and inp.requires_grad and out.shape == inp.shape:
                o.stats.norms += 1
                return _PassThrough.apply(inp, out.detach())
            return out
        if func is F.interpolate:
            return o._interpolate(args, kwargs)
        if func in _ROI_FUNCS:
            inp = args[0] if args else kwargs["input"]
            if isinstance(inp, torch.Tensor) and inp.requires_grad:
                rest, kw = args[1:], {k: v for k, v in kwargs.items() if k != "input"}
                o.stats.routed += 1
                return _routed(inp, lambda t: func(t, *rest, **kw), 1.0)
        return func(*args, **kwargs)


class LRPContext:
    """Trace a forward pass with LRP rules. Use::

        x = x.detach().requires_grad_()          # or any tensor with autograd history
        with LRPContext(model, x, rules) as ctx:  # ``x`` is the input the forward will see
            out = model(x)
        (rel,) = torch.autograd.grad(out, x, R_init)   # rel: input relevance (pixel grid of ``x``)

    ``x`` must be exactly the tensor passed to the forward (or the tensor its normalisation starts from);
    it must have a ``grad_fn`` or be a leaf requiring grad. ``module`` (optional) is searched for
    norm-like modules to pass through (FrozenBatchNorm2d, L2Norm and ``rules.passthrough_modules``).
    ``true_calls``: exact mode, the calls recorded by a plain pass (use :func:`trace_forward`).
    The rules stay attached to the traced graph after the context exits, so the backward pass may run
    later; ``stats`` tells what was met.
    """

    def __init__(self, module: nn.Module | None, x: torch.Tensor, rules: LRPRules = LRPRules(),
                 true_calls: list | None = None):
        if not x.requires_grad:
            raise ValueError("LRPContext: x must require grad (use x.detach().requires_grad_())")
        self.module, self.x, self.rules = module, x, rules
        self.true_calls = true_calls
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
            types = _default_passthrough_modules() + tuple(self.rules.passthrough_modules)
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
            return _PassThrough.apply(inp, output.detach())

    # -- input-layer detection ----------------------------------------------------------------------
    def _is_x_node(self, node) -> bool:
        if self._x_node is not None:
            return node is self._x_node
        return type(node).__name__ == "AccumulateGrad" and node.variable is self.x

    def _reaches_input(self, t: torch.Tensor) -> bool:
        """Does ``t`` depend on ``x`` through a path that crosses no other conv / linear?"""
        if t is self.x:
            return True
        start = t.grad_fn
        if start is None:
            return False
        stack, seen = [start], {}
        rule_cls = _RuleFn._backward_cls
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

    def _input_geometry(self, a: torch.Tensor):
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
        inp = _first_tensor(args, kwargs)
        if self._next >= len(self.true_calls):
            raise RuntimeError("LRP exact mode: the traced forward makes more calls than the plain one "
                               "(non-deterministic control flow in the model?)")
        f, t, params = self.true_calls[self._next]
        self._next += 1
        if f is not func or (t is None) != (inp is None) or (t is not None and t.shape != inp.shape):
            raise RuntimeError(f"LRP exact mode: call {self._next} differs between the two forward passes "
                               f"({getattr(f, '__name__', f)} vs {getattr(func, '__name__', func)})")
        return t if params is None else (t, params)

    def _smooth(self, func, args, kwargs, true_inp):
        inp = _first_tensor(args, kwargs)
        if true_inp is None or inp is None or not inp.requires_grad:
            return func(*args, **kwargs)
        others = [a for a in list(args[1:]) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        if any(a.requires_grad for a in others if a is not inp):
            return func(*args, **kwargs)
        rest = args[1:] if args and args[0] is inp else args
        kw = {k: v for k, v in kwargs.items() if k != "input"}
        return _ShadowFn.apply(inp, lambda t: func(t, *rest, **kw), true_inp)

    def _weighted(self, func, args, kwargs, true_inp=None):
        inp, weight, bias, rest, kw = _bind_weighted(args, kwargs)
        true_params = None
        if true_inp is not None:
            true_inp, true_params = true_inp
        if not isinstance(inp, torch.Tensor) or not inp.requires_grad:
            return func(*args, **kwargs)

        def f(i, w, b, _func=func, _rest=rest, _kw=kw):
            return _func(i, w, b, *_rest, **_kw)

        r = self.rules
        name = getattr(func, "__name__", str(func))
        self.stats.weighted += 1
        self.stats.by_func[name] = self.stats.by_func.get(name, 0) + 1
        self.stats.weight_ids.add(id(weight))
        if self._reaches_input(inp):
            self.stats.input_layers += 1
            rule = r.input_rule
            slope, low, high = self._input_geometry(inp)
            spec = _LayerSpec(f, rule, r.bias, r.epsilon, True, slope, low, high)
        else:
            rule = r.layer_rule
            has_neg = bool((inp < 0).any()) if rule == "alpha1beta0" else True
            spec = _LayerSpec(f, rule, r.bias, r.epsilon, has_neg)
        if rule == "epsilon" and r.epsilon == 0:
            spec.eps = 1e-6
        spec.a_true = true_inp
        if true_params is not None:
            # weights computed from x (RobustDet's dynamic convs): keep the plain pass's, attached, so the
            # derivative through them is exact; parameters (leaves) are constants
            tw, tb = true_params
            spec.w_true = tw if (tw.grad_fn is not None) else None
            spec.b_true = tb if (tb is not None and tb.grad_fn is not None) else None
        spec.vjp = _vjp_factory(func, rest, kw, inp.shape)
        return _RuleFn.apply(inp, weight, bias, spec)

    def _interpolate(self, args, kwargs):
        inp = args[0] if args else kwargs["input"]
        out = F.interpolate(*args, **kwargs)
        if not (isinstance(inp, torch.Tensor) and inp.requires_grad):
            return out
        mode = kwargs.get("mode", args[3] if len(args) > 3 else "nearest")
        grow = out[0].numel() > inp[0].numel()
        if self.rules.upsample == "average" and grow and mode in ("nearest", "nearest-exact"):
            rest, kw = args[1:], {k: v for k, v in kwargs.items() if k != "input"}
            self.stats.upsamples += 1
            return _routed(inp, lambda t: F.interpolate(t, *rest, **kw), inp[0].numel() / out[0].numel())
        return out


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
    derivative of the activations would itself go through the modified backward).
    """
    xr = x if x.requires_grad else x.detach().requires_grad_()
    true_calls, out_true = None, None
    with torch.enable_grad():
        if exact:
            with _Recorder() as rec:
                out_true = fn(xr * 1.0)
            true_calls = rec.calls
        xin = xr * 1.0  # a node of our own: the graph walk stops here
        with LRPContext(module, xin, rules, true_calls) as ctx:
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
