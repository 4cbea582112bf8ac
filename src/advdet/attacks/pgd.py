"""Loss-based PGD attacks on detectors: PGD on the total loss, A_cls and A_loc (MTD / RobustDet).

Objective: the detector's own training losses (``Detector.loss``) computed per image
(``losses.per_image_losses``: each image normalised as if it were alone, summed over the batch), with
the ground-truth ``targets`` or, when ``targets=None``, the clean predictions as pseudo ground truth
(score >= ``pseudo_thresh`` = 0.5; an image with no such detection keeps its ``pseudo_min_k`` = 1 best
detection). The gradient comes from the batch total (``losses.total_losses``: one batched pass where
the family's loss allows it), the per-image values from ``objective``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch

from advdet.attacks.base import Attack
from advdet.attacks.losses import CLS_KEYS, LOC_KEYS, per_image_losses, pseudo_targets, sum_keys, total_losses
from advdet.attacks.transforms import GradientTransform

__all__ = ["PGD", "ClsAttack", "LocAttack", "resolve_targets"]


def resolve_targets(model: Any, x: torch.Tensor, targets: Any, pseudo_thresh: float, pseudo_min_k: int) -> list[dict]:
    """``targets`` when given, else the clean predictions as pseudo ground truth."""
    if targets is None:
        return pseudo_targets(model, x, pseudo_thresh, pseudo_min_k)
    if not isinstance(targets, (list, tuple)) or len(targets) != x.shape[0]:
        raise ValueError(f"targets must be a list of {x.shape[0]} dicts (boxes, labels) or None")
    return list(targets)


class PGD(Attack):
    """PGD (Madry et al., ICLR 2018) on the sum of all the detector's training losses (``loss_keys``).

    Defaults as RobustDet's evaluation (ALGORITHMS.md 1.6): eps=8, step=8, 20 steps, sign update, no
    random start; targets = ground truth, or the clean predictions (score >= 0.5, at least the top 1)
    when ``targets=None``. Losses are per image (each normalised by its own positives) and summed over
    the batch, so batch size does not change the result.
    """

    name: ClassVar[str] = "pgd"
    budget: ClassVar[str] = "eps=step"  # the robustness table's eps = step = 8 (pgd, cls, loc, cwa, mtd)
    description: ClassVar[str] = "PGD on the detector's total training loss (eps 8, step 8, 20 steps, sign)"
    loss_keys: ClassVar[tuple[str, ...] | None] = None  # None: every loss term

    def __init__(self, model, *, eps: float | None = 8.0, step: float = 8.0, steps: int = 20,
                 update: str = "sign", random_start: bool = False, valid_only: bool = False,
                 transforms: Sequence[GradientTransform] = (), seed: int = 0, device=None,
                 pseudo_thresh: float = 0.5, pseudo_min_k: int = 1):
        super().__init__(model, eps=eps, step=step, steps=steps, update=update, random_start=random_start,
                         valid_only=valid_only, transforms=transforms, seed=seed, device=device)
        self.pseudo_thresh = float(pseudo_thresh)
        self.pseudo_min_k = int(pseudo_min_k)

    def prepare(self, x: torch.Tensor, targets: Any) -> dict:
        return {"targets": resolve_targets(self.model, x, targets, self.pseudo_thresh, self.pseudo_min_k)}

    def losses(self, x_in: torch.Tensor, state: dict) -> dict[str, torch.Tensor]:
        """Per-image losses (name -> (B,)) at ``x_in``."""
        return per_image_losses(self.model, x_in, state["targets"])

    def objective(self, x_in: torch.Tensor, state: dict) -> torch.Tensor:
        return sum_keys(self.losses(x_in, state), self.loss_keys)

    def total_objective(self, x_in: torch.Tensor, state: dict) -> torch.Tensor:
        """The batch total of the losses (one batched pass where the family allows it); a subclass that
        overrides ``objective`` or ``losses`` (e.g. CWA) gets the sum of its own per-image values."""
        if type(self).objective is not PGD.objective or type(self).losses is not PGD.losses:
            return super().total_objective(x_in, state)
        return sum_keys(total_losses(self.model, x_in, state["targets"]), self.loss_keys)


class ClsAttack(PGD):
    """A_cls (MTD, Zhang & Wang, ICCV 2019; RobustDet eq. 1): maximise the classification loss (SSD:
    L_conf with hard negatives / N_pos; YOLO: ``cls + obj``; Faster R-CNN: ``cls + rpn_obj``).
    Defaults eps=8, step=8, 20 steps, sign, no random start (ALGORITHMS.md 1.6)."""

    name = "cls"
    description = "A_cls (MTD/RobustDet): PGD on the classification loss (eps 8, step 8, 20 steps)"
    loss_keys = CLS_KEYS


class LocAttack(PGD):
    """A_loc (MTD, Zhang & Wang, ICCV 2019; RobustDet eq. 1): maximise the localization loss (SSD:
    Smooth-L1 on positives / N_pos; Faster R-CNN also ``rpn_loc``). Defaults eps=8, step=8, 20 steps,
    sign, no random start (ALGORITHMS.md 1.6)."""

    name = "loc"
    description = "A_loc (MTD/RobustDet): PGD on the localization loss (eps 8, step 8, 20 steps)"
    loss_keys = LOC_KEYS
