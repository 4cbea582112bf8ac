"""MTD: the multi-task attack of "Towards Adversarially Robust Object Detection" (Zhang & Wang, ICCV
2019), used to train and evaluate the MTD baseline of RobustDet (ALGORITHMS.md 1.5-1.6)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from advdet.attacks.update_rules import direction
from advdet.attacks.losses import CLS_KEYS, LOC_KEYS, sum_keys, total_losses
from advdet.attacks.pgd import PGD, ClsAttack, LocAttack
from advdet.attacks.transforms import GradientTransform

__all__ = ["MTD"]

MODES = ("per_image", "per_step")


class MTD(PGD):
    """Per image, the stronger of the A_cls and A_loc examples by total loss ``L_cls + L_loc``.

    ``mode="per_image"`` (default, the paper's rule): run the full A_cls and A_loc attacks, keep per
    image the example with the larger total loss (ties: A_cls). ``mode="per_step"`` (RobustDet's code):
    at every step take one cls-step and one loc-step from the current image and keep the one with the
    larger total loss; RobustDet compares the batch-mean loss, here the choice is per image (identical
    for its batch-1 evaluation, and batch-independent); momentum (MI) is not supported in this mode.
    Defaults eps=8, step=8, 20 steps, sign, no random start; the objective of ``objective_values`` is the
    total loss.
    """

    name = "mtd"
    description = "MTD: per image the stronger of A_cls and A_loc by total loss (eps 8, step 8, 20 steps)"
    loss_keys = CLS_KEYS + LOC_KEYS

    def __init__(self, model, *, eps: float | None = 8.0, step: float = 8.0, steps: int = 20,
                 mode: str = "per_image", update: str = "sign", random_start: bool = False,
                 valid_only: bool = False, transforms: Sequence[GradientTransform] = (), seed: int = 0,
                 device=None, pseudo_thresh: float = 0.5, pseudo_min_k: int = 1):
        if mode not in MODES:
            raise ValueError(f"MTD: mode must be one of {MODES}, got {mode!r}")
        if mode == "per_step" and any(t.stage == 2 for t in transforms):
            raise ValueError("MTD: momentum transforms are not supported with mode='per_step'")
        super().__init__(model, eps=eps, step=step, steps=steps, update=update, random_start=random_start,
                         valid_only=valid_only, transforms=transforms, seed=seed, device=device,
                         pseudo_thresh=pseudo_thresh, pseudo_min_k=pseudo_min_k)
        self.mode = mode

    def _sub(self, cls: type[PGD]) -> PGD:
        sub = cls(self.model, eps=self.eps, step=self.step, steps=self.steps, update=self.update,
                  random_start=self.random_start, valid_only=self.valid_only, transforms=self.transforms,
                  seed=self.seed, device=self.device, pseudo_thresh=self.pseudo_thresh,
                  pseudo_min_k=self.pseudo_min_k)
        sub.generator = self.generator  # one random stream for the whole attack
        return sub

    def _run(self, x: torch.Tensor, targets: Any, mask: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            state = self._prepare_state(x, targets, mask)
        self.last_state = state
        tg = state["targets"]
        if self.mode == "per_image":
            x_cls = self._sub(ClsAttack)._run(x, tg, mask)
            x_loc = self._sub(LocAttack)._run(x, tg, mask)
            with torch.no_grad():
                pick_cls = self.objective(x_cls, state) >= self.objective(x_loc, state)
            return torch.where(pick_cls.view(-1, 1, 1, 1), x_cls, x_loc)

        # batch totals (0-dim): the gradient of each step; the choice uses the per-image ``objective``
        cls_obj = lambda xi, st: sum_keys(total_losses(self.model, xi, st["targets"]), CLS_KEYS)  # noqa: E731
        loc_obj = lambda xi, st: sum_keys(total_losses(self.model, xi, st["targets"]), LOC_KEYS)  # noqa: E731
        x_adv = self.start_point(x, mask)
        self.reset_transforms(x)
        for _ in range(self.steps):
            cand = []
            for obj in (cls_obj, loc_obj):
                g = self.gradient(x_adv, state, objective=obj)
                cand.append(self.project(x_adv + self.step / 255.0 * direction(g, self.update), x, mask))
            with torch.no_grad():
                pick_cls = self.objective(cand[0], state) >= self.objective(cand[1], state)
            x_adv = torch.where(pick_cls.view(-1, 1, 1, 1), cand[0], cand[1])
        return x_adv
