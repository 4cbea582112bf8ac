"""The ``Attack`` base class: one iterative loop that every attack of advdet (and RAD) plugs into.

Usage (torchattacks-like)::

    atk = build_attack("cls", detector, eps=8, step=8, steps=20)   # hyper-parameters in __init__
    x_adv = atk(x, targets)                                         # or atk.attack(x, targets)

Conventions
-----------
- ``x``: float (B, 3, S, S) RGB in [0, 1] (letterboxed for detectors); ``x_adv`` has the same shape,
  dtype and device as ``x``.
- Budgets ``eps`` and ``step`` are in 0-255 pixel units (divided by 255 internally); ``eps=None``
  means no Linf ball (DAG). After every step ``x_adv`` is projected onto the Linf ball of radius
  ``eps`` around ``x`` and onto [0, 1].
- The base owns the device (``device=None``: the model's device) and puts the model in eval mode for
  the attack, restoring every submodule's mode afterwards.
- Every random choice (random start, DI, DAG labels, Gaussian noise) draws from ``self.generator``, a
  CPU ``torch.Generator`` seeded with ``seed``; it advances from call to call. ``manual_seed(s)``
  resets it; every crafting command resets it per batch with
  :func:`advdet.attacks.seeding.seed_batch` (the one seed policy).
- Batches: objectives are *per image* ((B,) tensors) and the loop only ever sums them, and every
  normalisation (sign, mean |g|, max |g|, MI's L1 norm) is per image, so a deterministic attack gives
  the same result for an image whether it is attacked alone or in a batch.

``valid_only`` (RAD's ``clip_valid``): only the letterboxed image, not its zero padding, is changed; where
the mask comes from: :mod:`advdet.attacks.batches`.

Update rules (``update=``: ``sign``, ``mean_abs``, ``linf``, ``term_mean_abs``): :mod:`advdet.attacks.update_rules`
(also ``filter_terms``).

Extension point (how RAD and every attack here are written)
-----------------------------------------------------------
A subclass implements

- ``prepare(x, targets) -> dict``: run once on the clean batch (no grad); returns the state, e.g.
  pseudo ground truth, candidate boxes fixed on the clean image. The base adds ``state["x"]`` (clean
  batch), ``state["targets"]`` (as given, on the device) unless ``prepare`` set it, and ``state["mask"]``.
- ``objective(x_in, state) -> (B,)``: the per-image scalar to **ascend**, differentiable w.r.t. ``x_in``.
  Under SI/DI it is evaluated on transformed copies of the current image, so it must only depend on
  ``x_in`` and ``state`` (select nodes/candidates in ``on_step``, not here).
- ``total_objective(x_in, state) -> ()`` (optional): the sum of ``objective`` over the batch, the scalar
  whose gradient the loop follows. The default sums ``objective``; override it when the sum has a
  cheaper form than the per-image values (e.g. one batched loss call instead of one per image, see
  ``pgd.PGD``). ``objective`` itself is then only used for diagnostics and per-image choices (MTD).
- ``on_step(t, x_adv, state)`` (optional, no grad): run before step ``t`` on the current image; it may
  set ``state["active"]`` ((B,) bool): images that are False are not changed at this step, and the
  loop stops when no image is active (DAG's stopping rule). RAD re-selects its node set here.

Compound attacks (MTD, Gaussian noise) override ``_run(x, targets, mask)`` instead; it gets the clean
batch on the device with the model in eval mode and returns ``x_adv``.

A sketch of RAD on this framework (minimise the relevance of the top nodes, eq. 5 update, SI)::

    class RAD(Attack):
        name = "rad"
        description = "RAD: relevance attack on detectors (eps 16, step 2, 10 steps, SI)"

        def __init__(self, model, *, eps=16.0, step=2.0, steps=10, update="mean_abs",
                     transforms=None, **kw):
            super().__init__(model, eps=eps, step=step, steps=steps, update=update,
                             transforms=[SI()] if transforms is None else transforms, **kw)

        def prepare(self, x, targets):          # once, clean image: the top-3000 boxes
            return {"top": top_candidates(self.model.dense(x), 3000)}

        def on_step(self, t, x_adv, state):     # every step, current image: the m = 20 nodes
            state["nodes"] = select_nodes(self.model.dense(x_adv), m=20)

        def objective(self, x_in, state):       # ascended, so minus the RAD loss, per image
            return -rad_loss(self.model, x_in, state["nodes"], state["top"])

    register_attack(RAD)   # advdet.attacks.registry

Transforms hold state (MI's momentum): give every attack its own instances.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch
from torch import nn

from advdet.attacks.batches import letterbox_mask, nonzero_mask, targets_to
from advdet.attacks.transforms import GradientTransform
from advdet.attacks.update_rules import UPDATE_RULES, GradFn, TermNormalizer, compose, direction

log = logging.getLogger(__name__)

__all__ = ["Attack", "eval_mode"]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode; restore every submodule's own mode afterwards."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, t in saved:
            m.training = t


class Attack:
    """Base of every attack: hyper-parameters in ``__init__`` (keyword-only), ``attack(x, targets)``.

    Args (shared by the subclasses):
        model: a ``Detector`` (detector attacks) or an ``nn.Module`` mapping [0, 1] images to logits.
        eps: Linf budget in 0-255 units (``None``: unbounded, only [0, 1] clipping).
        step: step length in 0-255 units (alpha).
        steps: number of iterations.
        update: ``"sign"``, ``"mean_abs"`` (RAD eq. 5), ``"linf"`` (DAG) or ``"term_mean_abs"`` (RAD's
            code: each term normalised, the average used as it is).
        random_start: start from a uniform point of the eps ball (needs ``eps``).
        valid_only: change only the non-padding pixels (see module doc for the mask).
        transforms: gradient transforms (``SI()``, ``DI()``, ``TI()``, ``MI()``), stackable; input
            transforms (SI, DI) nest in list order (first = outermost), then gradient filters (TI), then
            momentum (MI), whatever their order in the list.
        filter_terms: apply gradient filters (TI) to every gradient term before its normalisation (RAD's
            code) instead of once to the average.
        seed: seed of ``self.generator``.
        device: run on this device (``None``: the model's device, else the input's).
    """

    name: ClassVar[str] = "attack"
    description: ClassVar[str] = ""
    #: what the attack's ``model`` is: ``"detector"`` (a Detector, or an ensemble of them),
    #: ``"classifier"`` (an image classifier; transfer tables craft it on the zoo classifier) or
    #: ``"none"`` (no model: the Gaussian ablation)
    surrogate_kind: ClassVar[str] = "detector"
    #: how a table's budget applies: ``"eps"`` (an Linf ``eps`` with the attack's own step: RAD's
    #: protocol, transfer tables set eps), ``"eps=step"`` (RobustDet's PGD protocol: robustness tables set
    #: eps and step = eps) or ``"none"`` (no Linf budget: a table sets only ``steps``)
    budget: ClassVar[str] = "eps"

    def __init__(self, model: nn.Module, *, eps: float | None = 8.0, step: float = 2.0, steps: int = 10,
                 update: str = "sign", random_start: bool = False, valid_only: bool = False,
                 transforms: Sequence[GradientTransform] = (), seed: int = 0,
                 device: str | torch.device | None = None, filter_terms: bool = False):
        if update not in UPDATE_RULES:
            raise ValueError(f"{type(self).__name__}: unknown update rule {update!r}; choose one of {UPDATE_RULES}")
        if eps is not None and eps < 0:
            raise ValueError(f"{type(self).__name__}: eps must be >= 0 (0-255 units), got {eps}")
        if steps < 0:
            raise ValueError(f"{type(self).__name__}: steps must be >= 0, got {steps}")
        if random_start and eps is None:
            raise ValueError(f"{type(self).__name__}: random_start needs a finite eps")
        for t in transforms:
            if not isinstance(t, GradientTransform):
                raise TypeError(f"{type(self).__name__}: transforms must be GradientTransform instances, got {t!r}")
        self.model = model
        self.eps = None if eps is None else float(eps)
        self.step = float(step)
        self.steps = int(steps)
        self.update = update
        self.random_start = bool(random_start)
        self.valid_only = bool(valid_only)
        self.transforms = list(transforms)
        self.filter_terms = bool(filter_terms)
        self.seed = int(seed)
        self.device = None if device is None else torch.device(device)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.last_state: dict | None = None

    # ------------------------------------------------------------------ public API
    def manual_seed(self, seed: int) -> "Attack":
        """Reset ``self.generator`` to ``seed``; returns self."""
        self.seed = int(seed)
        self.generator.manual_seed(self.seed)
        return self

    def __call__(self, x: torch.Tensor, targets: Any = None, *, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.attack(x, targets, mask=mask)

    def attack(self, x: torch.Tensor, targets: Any = None, *, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The adversarial batch for ``x`` (B, 3, H, W) in [0, 1].

        ``targets``: per-image target dicts (``boxes``, ``labels``[, ``letterbox``]) for detectors, a (B,)
        label tensor for classifiers, or None (the attack's documented fallback, usually the model's
        clean predictions). ``mask``: optional explicit valid mask (used only with ``valid_only``).
        """
        self._check_input(x)
        dev = self._device(x)
        out_device, out_dtype = x.device, x.dtype
        xd = x.detach().to(dev)
        tg = targets_to(targets, dev)
        m = self.valid_mask(xd, tg, mask) if self.valid_only else None
        with eval_mode(self.model):
            x_adv = self._run(xd, tg, m)
        return x_adv.detach().to(device=out_device, dtype=out_dtype)

    def valid_mask(self, x: torch.Tensor, targets: Any = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1, H, W) bool mask of the pixels the attack may change (see module doc)."""
        b, _, h, w = x.shape
        if mask is not None:
            m = mask.to(x.device).bool()
            if m.ndim == 3:
                m = m[:, None]
            if m.shape[0] != b or m.shape[-2:] != (h, w):
                raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit images {tuple(x.shape)}")
            return m.expand(b, 1, h, w) if m.shape[1] == 1 else m.any(1, keepdim=True)
        if isinstance(targets, (list, tuple)) and targets and all(
                isinstance(t, dict) and t.get("letterbox") is not None for t in targets):
            return letterbox_mask([t["letterbox"] for t in targets], h, w, x.device)
        return nonzero_mask(x)

    def objective_values(self, x: torch.Tensor, x_adv: torch.Tensor, targets: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image objective (B,) at the clean and at the adversarial batch, with one state prepared on
        the clean batch (and ``on_step(0, x)``); a diagnostic for deterministic attacks."""
        dev = self._device(x)
        xd, xa = x.detach().to(dev), x_adv.detach().to(dev)
        tg = targets_to(targets, dev)
        with eval_mode(self.model), torch.no_grad():
            state = self._prepare_state(xd, tg, None)
            self.on_step(0, xd, state)
            return self.objective(xd, state).detach(), self.objective(xa, state).detach()

    # ------------------------------------------------------------------ hooks for subclasses
    def prepare(self, x: torch.Tensor, targets: Any) -> dict:
        """Run once on the clean batch (no grad); returns the attack state."""
        return {}

    def objective(self, x_in: torch.Tensor, state: dict) -> torch.Tensor:  # pragma: no cover - abstract
        """Per-image scalar (B,) to ascend, differentiable w.r.t. ``x_in``."""
        raise NotImplementedError

    def total_objective(self, x_in: torch.Tensor, state: dict) -> torch.Tensor:
        """Scalar: the sum over the batch of ``objective(x_in, state)``; its gradient drives the loop."""
        return self._checked(self.objective(x_in, state), x_in).sum()

    def on_step(self, t: int, x_adv: torch.Tensor, state: dict) -> None:
        """Per-iteration hook (no grad), before the gradient of step ``t``; may set ``state["active"]``."""

    # ------------------------------------------------------------------ the loop
    def _run(self, x: torch.Tensor, targets: Any, mask: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            state = self._prepare_state(x, targets, mask)
        self.last_state = state
        x_adv = self.start_point(x, mask)
        self.reset_transforms(x)
        for t in range(self.steps):
            with torch.no_grad():
                self.on_step(t, x_adv, state)
            active = state.get("active")
            if active is not None and not bool(active.any()):
                log.debug("%s: no active image left after %d steps", self.name, t)
                break
            g = self.gradient(x_adv, state)
            d = direction(g, self.update)
            x_new = self.project(x_adv + self.step / 255.0 * d, x, mask)
            x_adv = x_new if active is None else torch.where(active.view(-1, 1, 1, 1), x_new, x_adv)
        return x_adv

    def _prepare_state(self, x: torch.Tensor, targets: Any, mask: torch.Tensor | None) -> dict:
        state = self.prepare(x, targets)
        state.setdefault("targets", targets)
        state["x"] = x
        state["mask"] = mask
        return state

    def start_point(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The first iterate: ``x``, or a uniform point of the eps ball with ``random_start``."""
        if not self.random_start or self.eps is None:
            return x.clone()
        u = torch.rand(x.shape, generator=self.generator, dtype=x.dtype).to(x.device)
        return self.project(x + (2 * u - 1) * self.eps / 255.0, x, mask)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Onto the Linf ball of ``eps`` around ``x`` (if any) and [0, 1]; padding reset to ``x``."""
        if self.eps is not None:
            e = self.eps / 255.0
            x_adv = torch.minimum(torch.maximum(x_adv, x - e), x + e)
        x_adv = x_adv.clamp(0.0, 1.0)
        if mask is not None:
            x_adv = torch.where(mask, x_adv, x)
        return x_adv

    def _checked(self, obj: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
        if obj.ndim != 1 or obj.shape[0] != x_in.shape[0]:
            raise ValueError(f"{type(self).__name__}.objective must return one value per image "
                             f"(shape ({x_in.shape[0]},)), got {tuple(obj.shape)}")
        return obj

    def raw_gradient(self, x_in: torch.Tensor, state: dict,
                     objective: Callable[[torch.Tensor, dict], torch.Tensor] | None = None) -> torch.Tensor:
        """d sum(objective(x_in)) / d x_in (zeros where the objective does not depend on the input).

        ``objective``: a per-image function ((B,) values) or a batch total (a 0-dim tensor); default
        ``self.total_objective``."""
        xr = x_in.detach().requires_grad_(True)
        with torch.enable_grad():
            if objective is None:
                total = self.total_objective(xr, state)
            else:
                obj = objective(xr, state)
                total = obj if obj.ndim == 0 else self._checked(obj, x_in).sum()
            if total.ndim != 0:
                raise ValueError(f"{type(self).__name__}.total_objective must return a scalar, "
                                 f"got shape {tuple(total.shape)}")
            if not total.requires_grad:
                return torch.zeros_like(x_in)
            (g,) = torch.autograd.grad(total, xr, allow_unused=True)
        return torch.zeros_like(x_in) if g is None else g.detach()

    def gradient(self, x_adv: torch.Tensor, state: dict,
                 objective: Callable[[torch.Tensor, dict], torch.Tensor] | None = None,
                 transforms: Sequence[GradientTransform] | None = None) -> torch.Tensor:
        """The transformed gradient at ``x_adv``: input transforms (SI, DI) nested in list order, then
        gradient filters (TI), then momentum (MI). With ``filter_terms`` the filters act on every term
        before the input transforms average them; with ``update="term_mean_abs"`` every term is
        normalised by its mean |g| before the average (RAD's code)."""
        transforms = self.transforms if transforms is None else transforms
        filters = [t for t in transforms if t.stage == 1]
        fn: GradFn = lambda xi: self.raw_gradient(xi, state, objective)  # noqa: E731
        if self.filter_terms and filters:
            fn = compose(fn, filters)
            filters = []
        if self.update == "term_mean_abs":
            fn = compose(fn, [TermNormalizer()])
        for i, tr in enumerate(reversed([t for t in transforms if t.stage == 0])):
            fn = tr.wrap(fn, self.generator, deterministic=i == 0)  # only the innermost wraps a pure gradient
        g = fn(x_adv)
        for tr in filters + [t for t in transforms if t.stage == 2]:
            g = tr.process(g)
        return g

    def reset_transforms(self, x: torch.Tensor) -> None:
        for t in self.transforms:
            t.reset(x)

    # ------------------------------------------------------------------ helpers
    def _device(self, x: torch.Tensor) -> torch.device:
        if self.device is not None:
            return self.device
        p = next(iter(self.model.parameters()), None) if isinstance(self.model, nn.Module) else None
        return p.device if p is not None else x.device

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(f"{type(self).__name__}: x must be a float (B, 3, H, W) tensor in [0, 1], got "
                             f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
        if x.numel() and (not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1):
            raise ValueError(f"{type(self).__name__}: x must be finite and in [0, 1] "
                             f"(got [{x.min().item():.4g}, {x.max().item():.4g}])")

    def hyperparameters(self) -> dict:
        """The attack's settings, for logs and model cards."""
        hp = {k: v for k, v in vars(self).items()
              if k not in ("model", "generator", "last_state", "transforms") and not k.startswith("_")}
        hp["transforms"] = [repr(t) for t in self.transforms]
        return hp

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({hp})"
