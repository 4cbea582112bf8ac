"""Adversarial training: SSD-AT (A_cls / A_loc), MTD, CWAT and RobustDet as ``step_fn`` plugs of
:func:`advdet.training.standard.train_detector`.

Batch layout (ALGORITHMS.md 1.5: "batch 32 = 16 clean + 16 adversarial ... the clean and adversarial
halves are different images"): of the B images the loop draws per update, the first B/2 are trained on
clean and the last B/2 are the *source* of the adversarial half; one detector forward runs on the
concatenation ``[x_clean; x_adv]`` (B images), so the multibox loss is normalised by the positives of
both halves together, as in the reference's ``train_adv.py`` / ``train_robust.py``.

Adversarial examples (:class:`AdversarialExamples`) are PGD examples (eps 8, step 8, sign gradient, no
random start, ground-truth targets; ALGORITHMS.md 1.5) of a loss-based attack of
:mod:`advdet.attacks` (``cls`` = A_cls, ``loc`` = A_loc, ``mtd``, ``cwa``, ``pgd`` = L_cls + L_loc),
generated with the detector in eval mode (the attacks switch modes and restore them; training continues
in train mode). Two schedules:

- ``"interleaved"`` (default, the reference code, ALGORITHMS.md 1.5): one PGD step per update. Every
  ``steps`` updates the current adversarial source half becomes the new batch to attack; after each PGD
  step on it (against the current weights) one update is made, so the t-th update of a cycle trains on
  t-step PGD examples. The batch being attacked is carried across updates (and through checkpoints). The
  source halves of the other updates are not used (the reference draws adversarial batches from a second
  loader, one per cycle).
- ``"plain"``: a full ``steps``-step PGD on the source half of every update (Madry-style adversarial
  training; (1 + steps/2) times the cost of a clean update instead of about 1.5 times).

MTD (Zhang & Wang, ICCV 2019): per image the stronger of the A_cls and A_loc examples by the total loss
``L_cls + L_loc``. ``plain`` runs both full attacks and picks per image (the original MTD);
``interleaved`` takes one cls-step and one loc-step from the current image at every step and keeps, per
image, the one with the larger total loss (RobustDet's code does this per batch; see
:class:`advdet.attacks.mtd.MTD`, ``mode="per_step"``).
"""

from __future__ import annotations

from typing import Any

import torch

from advdet.attacks.base import Attack, eval_mode
from advdet.attacks.update_rules import direction
from advdet.attacks.losses import CLS_KEYS, LOC_KEYS, sum_keys
from advdet.attacks.mtd import MTD
from advdet.attacks.registry import build_attack
from advdet.models.aid_triplet import AID_MARGIN
from advdet.models.robustdet import A_AID, B_RE, BETA, C_KLD, require_robustdet, robustdet_loss

SCHEDULES = ("interleaved", "plain")
TRAINING_ATTACKS = ("cls", "loc", "pgd", "mtd", "cwa")


Batch = tuple[torch.Tensor, list[dict], torch.Tensor, list[dict]]


def split_halves(images: torch.Tensor, targets: list[dict]) -> Batch:
    """(clean images, clean targets, adversarial-source images, their targets): first and second half."""
    b = images.shape[0]
    if b < 2 or b % 2:
        raise ValueError(f"adversarial training needs an even batch (half clean, half adversarial), got {b} "
                         "images per update (per rank)")
    h = b // 2
    return images[:h], list(targets[:h]), images[h:], list(targets[h:])


def _targets_cpu(targets: list[dict]) -> list[dict]:
    return [{k: v.detach().cpu() for k, v in t.items() if isinstance(v, torch.Tensor)} for t in targets]


class AdversarialExamples:
    """The adversarial half of each update (see the module docstring).

    Args:
        attack: a loss-based detector attack: ``cls``, ``loc``, ``pgd``, ``mtd`` or ``cwa``.
        schedule: ``"interleaved"`` (one PGD step per update, the batch carried across updates) or
            ``"plain"`` (full PGD per update).
        steps: PGD steps per adversarial batch (20 in the papers).
        eps, alpha: Linf budget and step in 0-255 pixel units (8 and 8).
        seed: seed of the attack's generator (unused by these deterministic attacks, kept for the card).

    ``__call__(detector, x_src, t_src) -> (x_adv, x_clean, targets)``: the adversarial images, the clean
    images they were made from, and their targets. ``last`` holds the same triple after a call.
    """

    def __init__(self, attack: str = "mtd", *, schedule: str = "interleaved", steps: int = 20, eps: float = 8.0,
                 alpha: float = 8.0, seed: int = 0):
        if attack not in TRAINING_ATTACKS:
            raise ValueError(f"unknown training attack {attack!r}; choose one of {TRAINING_ATTACKS}")
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
        if steps < 1:
            raise ValueError(f"PGD steps must be >= 1, got {steps}")
        if eps < 0 or alpha <= 0:
            raise ValueError(f"need eps >= 0 and alpha > 0 (0-255 units), got eps={eps}, alpha={alpha}")
        self.attack, self.schedule, self.steps = attack, schedule, int(steps)
        self.eps, self.alpha, self.seed = float(eps), float(alpha), int(seed)
        self._atk: Attack | None = None
        self._state: dict | None = None
        self.t = 0  # interleaved: PGD steps done on the batch being attacked
        self.cycles = 0  # interleaved: adversarial batches started so far
        self.x0: torch.Tensor | None = None
        self.x_adv: torch.Tensor | None = None
        self.targets: list[dict] | None = None
        self.last: tuple[torch.Tensor, torch.Tensor, list[dict]] | None = None

    def config(self) -> dict:
        return {"attack": self.attack, "schedule": self.schedule, "steps": self.steps, "eps": self.eps,
                "alpha": self.alpha}

    def attack_for(self, detector: Any) -> Attack:
        """The attack object on ``detector`` (built once)."""
        if self._atk is None or self._atk.model is not detector:
            kw: dict = dict(eps=self.eps, step=self.alpha, steps=self.steps, seed=self.seed)
            if self.attack == "mtd":
                kw["mode"] = "per_image" if self.schedule == "plain" else "per_step"
            self._atk = build_attack(self.attack, detector, **kw)
            self._state = None
        return self._atk

    def __call__(self, detector: Any, x_src: torch.Tensor,
                 t_src: list[dict]) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
        atk = self.attack_for(detector)
        if self.schedule == "plain":
            x_adv = atk(x_src.detach(), t_src)
            self.last = (x_adv, x_src.detach(), list(t_src))
            return self.last
        if self.x0 is None or self.t >= self.steps:
            self.x0, self.x_adv = x_src.detach().clone(), x_src.detach().clone()
            self.targets, self.t, self._state = list(t_src), 0, None
            self.cycles += 1
        dev = x_src.device
        if self.x0.device != dev:
            self.x0, self.x_adv = self.x0.to(dev), self.x_adv.to(dev)
            self.targets = [{k: v.to(dev) for k, v in t.items()} for t in self.targets]
            self._state = None
        self.x_adv = self._one_step(detector, atk)
        self.t += 1
        self.last = (self.x_adv, self.x0, list(self.targets))
        return self.last

    def _one_step(self, detector: Any, atk: Attack) -> torch.Tensor:
        """One PGD step on ``self.x_adv`` around ``self.x0`` (model in eval mode)."""
        with eval_mode(detector):
            if self._state is None:
                with torch.no_grad():
                    state = atk.prepare(self.x0, self.targets)
                state.setdefault("targets", self.targets)
                state.update(x=self.x0, mask=None)
                self._state = state
            st = self._state
            with torch.no_grad():
                atk.on_step(self.t, self.x_adv, st)
            if isinstance(atk, MTD):  # per image, the better of one cls-step and one loc-step
                cand = []
                for keys in (CLS_KEYS, LOC_KEYS):
                    g = atk.gradient(self.x_adv, st, objective=lambda xi, s, k=keys: sum_keys(atk.losses(xi, s), k))
                    cand.append(atk.project(self.x_adv + atk.step / 255.0 * direction(g, atk.update), self.x0, None))
                with torch.no_grad():
                    pick_cls = atk.objective(cand[0], st) >= atk.objective(cand[1], st)
                x_new = torch.where(pick_cls.view(-1, 1, 1, 1), cand[0], cand[1])
            else:
                g = atk.gradient(self.x_adv, st)
                x_new = atk.project(self.x_adv + atk.step / 255.0 * direction(g, atk.update), self.x0, None)
        return x_new.detach()

    def state_dict(self) -> dict:
        """The carried adversarial batch (interleaved) on the CPU; empty for ``plain``."""
        if self.schedule == "plain" or self.x0 is None:
            return {"t": self.t, "cycles": self.cycles}
        return {"t": self.t, "cycles": self.cycles, "x0": self.x0.detach().cpu(), "x_adv": self.x_adv.detach().cpu(),
                "targets": _targets_cpu(self.targets)}

    def load_state_dict(self, state: dict) -> None:
        self.t, self.cycles = int(state.get("t", 0)), int(state.get("cycles", 0))
        self._state = None
        if "x0" in state:
            self.x0, self.x_adv = state["x0"].clone(), state["x_adv"].clone()
            self.targets = [dict(t) for t in state["targets"]]
        else:
            self.x0 = self.x_adv = self.targets = None


class AdversarialTrainingStep:
    """SSD-AT (``cls`` / ``loc``), MTD (``mtd``) and CWAT (``cwa``) updates (ALGORITHMS.md 1.5, baselines).

    ``L = sum of the detector's losses on [x_clean; x_adv]`` (SSD: L_loc + L_conf), one forward; returns
    ``{"loss": L, <each loss, detached>}``. Works for any detector family with a ``loss``.
    """

    def __init__(self, examples: AdversarialExamples):
        self.examples = examples

    def config(self) -> dict:
        return self.examples.config()

    def __call__(self, detector: Any, images: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        xc, tc, xs, ts = split_halves(images, targets)
        x_adv, _, ta = self.examples(detector, xs, ts)
        losses = detector.loss(torch.cat([xc, x_adv]), tc + ta)
        out = {"loss": sum(losses.values())}
        out.update({k: v.detach() for k, v in losses.items()})
        return out

    def state_dict(self) -> dict:
        return self.examples.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.examples.load_state_dict(state)


class RobustDetStep(AdversarialTrainingStep):
    """The RobustDet update (paper eq. 5, ALGORITHMS.md 1.5) on a :class:`~advdet.models.robustdet.RobustSSD`.

    ``L = beta (L_det + a L_aid) + (b L_re + c L_kld) / cfr_divisor`` on ``[x_clean; x_adv]`` through
    :func:`~advdet.models.robustdet.robustdet_loss`: one AID + detector forward of both halves, the AID
    triplet loss with labels clean 0 / adversarial 1 (``triplet="code"``: JS mining, squared-L2 hinge, the
    reference; ``"paper"``: JS in both, eq. 2), ``aid_ce`` the weight of the optional AID cross-entropy (0,
    not in the paper), and with CFR the reconstruction of the *clean* images (for
    the adversarial half: the images before the attack). Defaults: beta 0.75, a 3, b 0.16, c 5 (Sec. 5.1)
    and ``cfr_divisor=255`` (the reference code's scaling of the CFR terms). ``adc=True`` adds the
    reference's clean-with-adversarial-pi branch (off by default: it is not in the paper).

    Returns ``{"loss", "det", "cls", "loc", "aid", "n_triplets", "pi_gap"[, "ce"][, "re", "kld"]}`` (all but
    ``loss`` detached); ``pi_gap`` = L1 distance between the mean AID outputs of the two halves.
    Checkpointing (``state_dict``) is the base class's: the state of the adversarial examples.
    """

    def __init__(self, examples: AdversarialExamples, *, triplet: str = "code", margin: float = AID_MARGIN,
                 beta: float = BETA, a: float = A_AID, b: float = B_RE, c: float = C_KLD,
                 cfr_divisor: float = 255.0, adc: bool = False, aid_ce: float = 0.0):
        if triplet not in ("code", "paper"):
            raise ValueError(f"triplet must be 'code' or 'paper', got {triplet!r}")
        if cfr_divisor <= 0:
            raise ValueError(f"cfr_divisor must be > 0, got {cfr_divisor}")
        super().__init__(examples)
        self.triplet, self.margin, self.adc = triplet, float(margin), bool(adc)
        self.beta, self.a, self.b, self.c = float(beta), float(a), float(b), float(c)
        self.cfr_divisor = float(cfr_divisor)
        if aid_ce < 0:
            raise ValueError(f"aid_ce must be >= 0, got {aid_ce}")
        self.aid_ce = float(aid_ce)

    def config(self) -> dict:
        return {**self.examples.config(), "triplet": self.triplet, "margin": self.margin, "beta": self.beta,
                "a": self.a, "b": self.b, "c": self.c, "cfr_divisor": self.cfr_divisor, "adc": self.adc,
                "aid_ce": self.aid_ce}

    def __call__(self, detector: Any, images: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        require_robustdet(detector, "RobustDet training")
        xc, tc, xs, ts = split_halves(images, targets)
        x_adv, x0, ta = self.examples(detector, xs, ts)
        out = robustdet_loss(detector, xc, tc, x_adv, ta, triplet=self.triplet, margin=self.margin,
                             beta=self.beta, a=self.a, b=self.b, c=self.c, cfr_divisor=self.cfr_divisor,
                             x_adv_clean=x0 if detector.has_cfr else None, adc=self.adc, aid_ce=self.aid_ce)
        pi = out["pi"]
        h = xc.shape[0]
        res = {"loss": out["loss"]}
        for k in ("det", "cls", "loc", "aid", "ce", "re", "kld"):
            if k in out:
                res[k] = out[k].detach()
        res["n_triplets"] = out["n_triplets"].float()
        res["pi_gap"] = (pi[:h].mean(0) - pi[h:].mean(0)).abs().sum()
        return res
