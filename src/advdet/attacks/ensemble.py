"""Ensembles of surrogate detectors, for every attack that runs the ``Attack`` loop (RAD included).

Names: ``parse_ensemble("yolov3+fasterrcnn+fcos")`` -> the member names; ``a+b+c`` is ONE surrogate
(an ensemble), while a comma list (``a,b``) stays several separate surrogates.

:class:`SurrogateEnsemble` holds the members (detectors of one input size; members of another size are
refused with a one-line error: resize them to one letterbox size first, the zoo is all 256 px) as one
module. It is a ``Detector`` so the benchmarks accept it wherever a surrogate goes; ``predict`` is its
first member's (reporting only), ``loss`` the sum of the members' losses by name, ``dense`` undefined.

:class:`EnsembleAttack` is the composite that attacks it: ``build_attack(name, ensemble, **kw)`` (any
registered detector attack ``name`` whose class keeps the base loop) builds one instance of ``name`` per
member with the same hyper-parameters ``kw`` and runs ONE loop (the first member's eps, step, steps,
update rule, transforms, valid_only) whose hooks call every member's:

- ``prepare``: each member prepares its own state on the clean batch (its own pseudo ground truth,
  candidates, nodes, ...); ``last_state["members"]`` keeps them;
- ``on_step``: each member's ``on_step`` on the current image; an image stays active while any member
  keeps it active (DAG's stopping rule);
- the gradient: per image, ``g = sum_m w_m * N(g_m)`` with ``g_m`` the gradient of member ``m``'s own
  objective (its ``total_objective``), ``N`` the division by the image's mean ``|g_m|`` (an L1
  normalisation, the default: no member dominates by the scale of its loss) or, with ``normalize=False``
  and by default with ``weights="loss"``, the identity (the gradient of the weighted sum of the members'
  objectives), and
  ``w`` the weights, summing to 1 per image. The members' graphs are built one after the other, so the
  memory is one member's. Input transforms (SI, DI) wrap the whole sum, filters (TI) and momentum (MI)
  act on it, as for one surrogate;
- ``objective`` (diagnostics): the weighted mean of the members' per-image objectives.

Weights (``weights=``), after EBAD (Cai et al., "Ensemble-based blackbox attacks on dense prediction",
CVPR 2023, sec. 3.2: without balancing, the member with the largest loss dominates the ensemble):

- ``"equal"`` (default): ``w_m = 1 / M``;
- ``"loss"``: at every step, per image, ``w_m`` proportional to ``1 / |J_m(x_t)|``, the inverse of the
  magnitude of member ``m``'s objective at the current image (so every weighted term has the same
  magnitude); costs one extra evaluation of every member's objective per step. EBAD's victim-query
  weight search is not implemented: the attacker here never queries the victim;
- a list of M numbers: fixed user weights (normalised to sum 1), e.g. ``--set weights=[2,1,1]``.

With identical members and equal weights the ensemble gives the single surrogate's images (the mean of
M equal gradients is that gradient, rescaled per image when normalised, and every update rule is blind to
a per-image scale: sign, or the L1-normalised step). All members draw from one random stream, the composite's
``generator`` (``manual_seed`` resets it). RAD members see the letterbox padding at their ``pad_value``
as RAD does alone, and RAD's micro-batches (``micro_batch``) are kept. Attacks that run their own loop
(``mtd``, ``dag-robustdet``, ``gaussian``) and classifier attacks have no ensemble form and are refused.

:class:`EnsemblePGD` (``ens-pgd``) is ``pgd`` on an ensemble with ``normalize=True`` and RAD's budget
(eps 16, step 2, 10 steps, sign update): the update direction is ``sign(sum_m g_m / mean|g_m|)``;
targets: the ground truth when given, else each member's own clean predictions (score >= 0.5, at least
its best one).
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from advdet.attacks.base import Attack
from advdet.attacks.batches import knows_letterbox, micro_batches, padded
from advdet.data.errors import OptionError, UnknownNameError
from advdet.models.detector import Detector

__all__ = ["SurrogateEnsemble", "EnsembleAttack", "EnsemblePGD", "EnsembleError", "l1_normalised",
           "parse_ensemble", "is_ensemble_name", "WEIGHTINGS", "ENSEMBLE_OPTIONS"]

#: the named weightings of ``EnsembleAttack(weights=...)`` (a list of numbers is the third form)
WEIGHTINGS = ("equal", "loss")
#: the options of an ensemble, given next to the attack's own (``--set rad.weights=loss``)
ENSEMBLE_OPTIONS = ("weights", "normalize")
_TINY = 1e-12


class EnsembleError(OptionError):
    """An ensemble that cannot be built as asked (a bad name, members of different input sizes, an
    attack without an ensemble form, bad weights); one line naming the ensemble and the problem."""


def is_ensemble_name(name: str) -> bool:
    """True for ``a+b`` surrogate names (one ensemble)."""
    return "+" in str(name)


def parse_ensemble(name: str) -> list[str]:
    """``"yolov3+fasterrcnn+fcos"`` -> ``["yolov3", "fasterrcnn", "fcos"]`` (a name without ``+`` is a
    one-member list). Empty members (``a++b``, ``+a``) raise :class:`EnsembleError`."""
    parts = [p.strip() for p in str(name).split("+")]
    if not parts or any(not p for p in parts):
        raise EnsembleError(f"ensemble {name!r}: empty member name (write members as a+b+c)")
    return parts


def _per_image_l1(g: torch.Tensor) -> torch.Tensor:
    return g / g.abs().flatten(1).mean(1).clamp_min(1e-20).view(-1, *([1] * (g.ndim - 1)))


class _L1Normalise(torch.autograd.Function):
    """Identity forward; backward divides each image's gradient by its mean absolute value."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return _per_image_l1(g)


def l1_normalised(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself; gradients flowing back through it are L1-normalised per image (mean |g| = 1)."""
    return _L1Normalise.apply(x)


class SurrogateEnsemble(Detector):
    """Detectors of one input size as one surrogate; ``names``: their labels (default ``m0``, ``m1``, ...)."""

    family = "ensemble"

    def __init__(self, members: Sequence[Detector], names: Sequence[str] | None = None):
        members = list(members)
        if not members:
            raise EnsembleError("an ensemble needs at least one member")
        names = list(names) if names is not None else [f"m{i}" for i in range(len(members))]
        if len(names) != len(members):
            raise EnsembleError(f"{len(names)} names for {len(members)} members")
        sizes = {n: int(m.input_size) for n, m in zip(names, members)}
        if len(set(sizes.values())) != 1:
            raise EnsembleError(f"ensemble {'+'.join(names)}: members must share one input size, got "
                                + ", ".join(f"{n} {s} px" for n, s in sizes.items()))
        super().__init__(nn.ModuleList(members), members[0].num_classes, next(iter(sizes.values())))
        self.names = names

    @property
    def members(self) -> list[Detector]:
        return list(self.model)

    def dense(self, x: torch.Tensor):  # pragma: no cover - not meaningful for an ensemble
        raise NotImplementedError("an ensemble has no single dense output; attack it through build_attack "
                                  "(EnsembleAttack), which calls each member's hooks")

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> list[dict]:
        return self.members[0].predict(x)

    def loss(self, x: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for m in self.members:
            for k, v in m.loss(x, targets).items():
                out[k] = out[k] + v if k in out else v
        return out




def _fixed_weights(weights: Any, m: int, label: str) -> list[float] | None:
    """The user's fixed weights (normalised to sum 1), None for a named weighting; bad input raises."""
    if isinstance(weights, str):
        w = weights.strip()
        if w in WEIGHTINGS:
            return None
        try:
            weights = [float(v) for v in w.strip("[]()").split(",") if v.strip()]
        except ValueError:
            raise EnsembleError(f"ensemble {label}: weights must be one of {', '.join(WEIGHTINGS)} or a list of "
                                f"{m} numbers, got {w!r}") from None
    try:
        vals = [float(v) for v in weights]
    except (TypeError, ValueError):
        raise EnsembleError(f"ensemble {label}: weights must be one of {', '.join(WEIGHTINGS)} or a list of "
                            f"{m} numbers, got {weights!r}") from None
    if len(vals) != m:
        raise EnsembleError(f"ensemble {label}: {len(vals)} weights for {m} members")
    if any(not v >= 0 for v in vals) or sum(vals) <= 0:
        raise EnsembleError(f"ensemble {label}: weights must be >= 0 with a positive sum, got {vals}")
    s = sum(vals)
    return [v / s for v in vals]


class EnsembleAttack(Attack):
    """One attack averaged over the members of a :class:`SurrogateEnsemble` (see the module docstring).

    Args:
        model: a :class:`SurrogateEnsemble` (a single detector is an ensemble of one).
        attack: the registry name of the attack run on every member (``pgd``, ``rad``, ``dag-eps``, ...).
        weights: ``"equal"`` (default), ``"loss"`` (EBAD-style balancing: per step and image, ``w_m``
            proportional to ``1 / |objective_m|``) or a list of one number per member (fixed, normalised).
        normalize: divide each member's gradient by its per-image mean absolute value before weighting
            (``ens-pgd``'s L1 normalisation). ``False`` sums the raw gradients: then the member with the
            largest gradients steers the attack (measured on the zoo: yolov3's, docs/attacks.md), unless
            the weights balance them. Default (None): ``True``, except with ``weights="loss"`` (EBAD weights
            the raw objectives).
        **kw: the attack's own hyper-parameters, given to every member; the loop settings (eps, step,
            steps, update, transforms, valid_only, random_start, filter_terms) are the first member's.

    ``last_state``: ``members`` (each member's state), ``weights`` ((B, M), the last step's weights).
    """

    name: ClassVar[str] = "ensemble"
    description: ClassVar[str] = "any detector attack averaged over an ensemble of surrogates (a+b+c)"
    #: ``build_attack`` hands an ensemble to this class as it is (no second wrapping)
    ensemble_native: ClassVar[bool] = True

    def __init__(self, model, *, attack: str, weights: Any = "equal", normalize: bool | None = None, **kw: Any):
        from advdet.attacks.rad import RAD
        from advdet.attacks.registry import ATTACKS, build_attack

        ens = model if isinstance(model, SurrogateEnsemble) else SurrogateEnsemble([model], ["m0"])
        label = "+".join(ens.names)
        if attack not in ATTACKS:
            raise UnknownNameError(f"ensemble {label}: unknown attack {attack!r}; known: {', '.join(ATTACKS)}")
        cls = ATTACKS[attack]
        if cls.surrogate_kind != "detector":
            what = "an image classifier" if cls.surrogate_kind == "classifier" else "no model"
            raise EnsembleError(f"ensemble {label}: {attack!r} attacks {what}; an ensemble of detectors takes "
                                f"detector attacks")
        if getattr(cls, "ensemble_native", False):
            raise EnsembleError(f"ensemble {label}: {attack!r} is itself an ensemble attack; name the attack "
                                f"to average (e.g. pgd)")
        if cls._run is not Attack._run and not issubclass(cls, RAD):
            raise EnsembleError(f"ensemble {label}: {attack!r} runs its own loop and has no ensemble form "
                                f"(ensembles average attacks that use the Attack loop)")
        members = [build_attack(attack, m, **kw) for m in ens.members]
        m0 = members[0]
        super().__init__(ens, eps=m0.eps, step=m0.step, steps=m0.steps, update=m0.update,
                         random_start=m0.random_start, valid_only=m0.valid_only, transforms=m0.transforms,
                         seed=m0.seed, device=m0.device, filter_terms=m0.filter_terms)
        self.attack_name = attack
        self.member_names = list(ens.names)
        self._fixed = _fixed_weights(weights, len(members), label)
        self.weights = weights.strip() if self._fixed is None else list(self._fixed)
        # default: L1-normalised members, except under EBAD's loss weights, which balance the raw objectives
        self.normalize = self.weights != "loss" if normalize is None else bool(normalize)
        self._members = members
        for m in members:
            m.generator = self.generator  # one random stream for the whole attack
        self._knows_letterbox = False

    @property
    def members(self) -> list[Attack]:
        """One attack instance per member model, in the ensemble's order."""
        return list(self._members)

    def manual_seed(self, seed: int) -> "EnsembleAttack":
        super().manual_seed(seed)
        for m in self._members:
            m.seed = self.seed
        return self

    def hyperparameters(self) -> dict:
        hp = self._members[0].hyperparameters()
        hp.update(attack=self.attack_name, members=list(self.member_names), weights=self.weights,
                  normalize=self.normalize)
        return hp

    # ------------------------------------------------------------------ batches and padding (RAD's, kept)
    def attack(self, x: torch.Tensor, targets: Any = None, *, mask: torch.Tensor | None = None) -> torch.Tensor:
        """As :meth:`Attack.attack`; in micro-batches when the member attack has them (RAD's
        ``chunk_size``). ``last_state`` is the last micro-batch's, ``last_state["chunks"]`` all of them."""
        chunk = getattr(self._members[0], "chunk_size", None)
        n = chunk(x) if chunk is not None and isinstance(x, torch.Tensor) and x.ndim == 4 else None
        if n is None or x.shape[0] <= n:
            return self._attack_one(x, targets, mask)
        outs, states = [], []
        for xs, ts, ms in micro_batches(x, targets, mask, n):
            outs.append(self._attack_one(xs, ts, ms))
            states.append(self.last_state)
        self.last_state = {**states[-1], "chunks": states}
        return torch.cat(outs)

    def _attack_one(self, x: torch.Tensor, targets: Any, mask: torch.Tensor | None) -> torch.Tensor:
        self._knows_letterbox = knows_letterbox(targets, mask)
        return super().attack(x, targets, mask=mask)

    def _run(self, x: torch.Tensor, targets: Any, mask: torch.Tensor | None) -> torch.Tensor:
        """The base loop; members with a ``pad_value`` (RAD) see the padding at that value, as alone."""
        pad = getattr(self._members[0], "pad_value", None)
        repad = pad is not None and mask is not None and self._knows_letterbox
        x_in = padded(x, mask, pad) if repad else x
        x_adv = super()._run(x_in, targets, mask)
        if repad:
            x_adv = torch.where(mask, x_adv, x)
        for m, ms in zip(self._members, self.last_state["members"]):
            m.last_state = ms
            record = getattr(m, "_record_perturbation", None)  # RAD's diagnostics
            if record is not None and ms.get("diagnostics") is not None:
                record(x, x_adv, mask)
        return x_adv

    # ------------------------------------------------------------------ the hooks
    def _prepare_state(self, x: torch.Tensor, targets: Any, mask: torch.Tensor | None) -> dict:
        """Every member prepares its own state on the clean batch (with the mask, as alone)."""
        states = [m._prepare_state(x, targets, mask) for m in self._members]
        b, k = x.shape[0], len(self._members)
        if self._fixed is not None:
            w = torch.tensor(self._fixed, dtype=x.dtype, device=x.device).expand(b, k).clone()
        else:
            w = torch.full((b, k), 1.0 / k, dtype=x.dtype, device=x.device)
        return {"members": states, "weights": w, "targets": targets, "x": x, "mask": mask}

    def on_step(self, t: int, x_adv: torch.Tensor, state: dict) -> None:
        """Each member's ``on_step``; an image is active while any member keeps it active; ``"loss"``
        weights from the members' objectives at ``x_adv``."""
        actives = []
        for m, ms in zip(self._members, state["members"]):
            m.on_step(t, x_adv, ms)
            if ms.get("active") is not None:
                actives.append(ms["active"].bool())
        if actives:
            state["active"] = torch.stack(actives).any(0)
        if self._fixed is None and self.weights == "loss":
            mag = torch.stack([m._checked(m.objective(x_adv, ms), x_adv).detach().abs()
                               for m, ms in zip(self._members, state["members"])], 1).to(x_adv.dtype)
            inv = 1.0 / mag.clamp_min(_TINY)
            state["weights"] = inv / inv.sum(1, keepdim=True)

    def objective(self, x_in: torch.Tensor, state: dict) -> torch.Tensor:
        """Per image: the weighted mean of the members' objectives (diagnostics; the step follows
        :meth:`raw_gradient`)."""
        w = state["weights"].to(x_in)
        return sum(w[:, i] * m._checked(m.objective(x_in, ms), x_in)
                   for i, (m, ms) in enumerate(zip(self._members, state["members"])))

    def start_point(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self._members[0].start_point(x, mask)  # the member's own rule (OSFD's), the shared generator

    def raw_gradient(self, x_in: torch.Tensor, state: dict, objective=None) -> torch.Tensor:
        """``sum_m w_m * N(g_m)``: each member's gradient of its own objective (one member's graph at a
        time), L1-normalised per image with ``normalize``, weighted per image."""
        if objective is not None:
            return super().raw_gradient(x_in, state, objective)
        w = state["weights"].to(x_in)
        g = torch.zeros_like(x_in)
        for i, (m, ms) in enumerate(zip(self._members, state["members"])):
            gi = m.raw_gradient(x_in, ms)
            if self.normalize:
                gi = _per_image_l1(gi)
            g = g + w[:, i].view(-1, *([1] * (g.ndim - 1))) * gi
        return g


class EnsemblePGD(EnsembleAttack):
    """``ens-pgd``: ``pgd`` on an ensemble, each member's gradient L1-normalised, RAD's budget (eps 16,
    step 2, 10 steps, sign). ``model``: a :class:`SurrogateEnsemble` or one detector."""

    name: ClassVar[str] = "ens-pgd"
    description: ClassVar[str] = ("PGD on an ensemble's detection losses, each member's gradient L1-normalised "
                                  "(eps 16, step 2, 10 steps, sign)")

    def __init__(self, model, *, eps: float | None = 16.0, step: float = 2.0, steps: int = 10,
                 update: str = "sign", random_start: bool = False, valid_only: bool = False, seed: int = 0,
                 device=None, pseudo_thresh: float = 0.5, pseudo_min_k: int = 1, transforms: Sequence = (),
                 weights: Any = "equal", normalize: bool = True):
        super().__init__(model, attack="pgd", weights=weights, normalize=normalize, eps=eps, step=step,
                         steps=steps, update=update, random_start=random_start, valid_only=valid_only, seed=seed,
                         device=device, pseudo_thresh=pseudo_thresh, pseudo_min_k=pseudo_min_k,
                         transforms=transforms)
