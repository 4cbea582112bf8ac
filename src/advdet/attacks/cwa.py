"""CWA: the class-wise attack of CWAT (Chen et al., "Class-Aware Robust Adversarial Training for Object
Detection", CVPR 2021), as RobustDet's code runs it (ALGORITHMS.md 1.6)."""

from __future__ import annotations

import torch

from advdet.attacks.losses import cwa_loss
from advdet.attacks.pgd import PGD

__all__ = ["CWA"]


class CWA(PGD):
    """Class-wise attack: PGD on the per-class average of per-positive losses, averaged over the classes
    present in the image (``losses.cwa_loss``).

    SSD-VGG: loss per positive prior = CE(conf) + sum Smooth-L1(loc), negatives unused, grouped by the
    matched ground-truth class. Other families: approximated by the family's ``cls + loc`` losses
    computed with the targets of one class at a time, averaged over the classes present (one forward
    pass per image and class). Defaults eps=8, step=8, 20 steps, sign, no random start; targets = ground
    truth, or the clean predictions (score >= 0.5, at least the top 1) when ``targets=None``.
    """

    name = "cwa"
    description = "CWA (CWAT/RobustDet): PGD on the class-wise averaged per-positive loss (eps 8, step 8, 20 steps)"
    loss_keys = None

    def objective(self, x_in: torch.Tensor, state: dict) -> torch.Tensor:
        return cwa_loss(self.model, x_in, state["targets"])
