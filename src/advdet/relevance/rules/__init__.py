"""LRP rules per layer type, as a modified, twice-differentiable backward pass.

One module per layer type: :mod:`.weighted` (conv / linear: z^B, alpha1-beta0, LRP-0, epsilon),
:mod:`.norm` (normalisation pass-through), :mod:`.smooth` (smooth activations in exact mode),
:mod:`.resample` (upsampling, RoIAlign); :mod:`.adjoint` holds the twice-differentiable linear adjoints they
share, :mod:`.config` the choice of rules (:class:`LRPRules`), :mod:`.context` the interception
(:class:`LRPContext`) and :mod:`.trace` the entry points (:func:`lrp`, :func:`trace_forward`).

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
  ``activation="pass"`` passes the smooth activations (SiLU, GELU, Mish, Hardswish, ELU, softplus) and the
  softmax through unchanged instead, as the ReLU gate does (:mod:`.activation`; conserving).
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
:class:`.context.Recorder`) and the traced pass. Calls are paired by order; every rule uses the plain pass's
input in its backward, smooth ops on the relevance path (sigmoid, SiLU, tanh, exp, softmax, logsumexp,
GELU, ...; gradient-mode norms) get their vjp evaluated at the plain pass's input (:class:`.smooth.ShadowFn`),
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
tensors saved with their history, and linear adjoints (:class:`.adjoint.Adjoint`) are themselves differentiable,
so ``create_graph=True`` gives the exact second derivative (checked by ``gradcheck`` in the tests; zennit,
with the full-bias alpha1-beta0 written as a ``BasicHook``, is the independent cross-check of the
first-order rules in ``tests/test_lrp_reference.py``). This also gives double backward
through ``roi_align``, whose torchvision kernel has none.
"""

from advdet.relevance.rules.config import InputRule, LayerRule, LRPRules
from advdet.relevance.rules.context import LRPContext, LRPStats
from advdet.relevance.rules.trace import Traced, lrp, lrp_backward, trace_forward

__all__ = ["InputRule", "LayerRule", "LRPContext", "LRPRules", "LRPStats", "Traced", "lrp", "lrp_backward",
           "trace_forward"]
