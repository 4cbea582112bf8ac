"""Classification attacks whose examples are tested on detectors (RAD Table 3, "Classification
Attack"): PGD, SI-PGD, MI-DI-PGD, MI-TI-PGD on an image classifier, with its clean prediction as the
label (RAD sec. 4.3)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from advdet.attacks.base import Attack
from advdet.attacks.transforms import DI, MI, SI, TI, GradientTransform

__all__ = ["ClassifierPGD", "ClassifierSIPGD", "ClassifierMIDIPGD", "ClassifierMITIPGD"]


def _detection_targets(targets: Any) -> bool:
    return isinstance(targets, (list, tuple)) and len(targets) > 0 and all(isinstance(t, dict) for t in targets)


class ClassifierPGD(Attack):
    """PGD (Madry et al., 2018) on a classifier: maximise the cross-entropy of the label, which is the
    classifier's clean prediction (RAD sec. 4.3) unless ``targets`` is a (B,) label tensor.

    ``model``: any ``nn.Module`` mapping (B, 3, S, S) in [0, 1] to logits (B, classes). Defaults (RAD sec.
    4.1): eps=16, step=2, 10 iterations, sign update, no random start, no transforms. Detection target
    dicts (as a detection dataset yields them) are not labels: the clean prediction is used then.
    """

    name = "cls-pgd"
    surrogate_kind = "classifier"
    description = "classifier PGD (RAD Table 3) with the clean prediction as label (eps 16, step 2, 10 steps)"

    def __init__(self, model, *, eps: float | None = 16.0, step: float = 2.0, steps: int = 10,
                 update: str = "sign", random_start: bool = False, valid_only: bool = False,
                 transforms: Sequence[GradientTransform] | None = None, seed: int = 0, device=None):
        super().__init__(model, eps=eps, step=step, steps=steps, update=update, random_start=random_start,
                         valid_only=valid_only,
                         transforms=self.default_transforms() if transforms is None else transforms,
                         seed=seed, device=device)

    @staticmethod
    def default_transforms() -> list[GradientTransform]:
        return []

    def prepare(self, x: torch.Tensor, targets: Any) -> dict:
        if targets is None or _detection_targets(targets):
            # RAD sec. 4.3: the label is the classifier's clean prediction; the boxes of a detection
            # dataset's targets are not labels of the image (their ``letterbox`` still feeds valid_only)
            labels = self.model(x).argmax(1)
        else:
            labels = torch.as_tensor(targets, device=x.device).long().reshape(-1)
            if labels.shape[0] != x.shape[0]:
                raise ValueError(f"{self.name}: {labels.shape[0]} labels for {x.shape[0]} images")
        return {"labels": labels, "targets": labels}

    def objective(self, x_in: torch.Tensor, state: dict) -> torch.Tensor:
        return F.cross_entropy(self.model(x_in), state["labels"], reduction="none")


class ClassifierSIPGD(ClassifierPGD):
    """SI-PGD (Lin et al., ICLR 2020): PGD with the scale-invariant gradient of SIM,
    ``SI(scales=5, extra_unscaled=False, normalize_terms=False)`` (x / 2^i, i = 0..4)."""

    name = "cls-si-pgd"
    description = "classifier SI-PGD (RAD Table 3): scale copies x/2^i, i=0..4 (eps 16, step 2, 10 steps)"

    @staticmethod
    def default_transforms() -> list[GradientTransform]:
        return [SI(scales=5, extra_unscaled=False, normalize_terms=False)]


class ClassifierMIDIPGD(ClassifierPGD):
    """MI-DI-PGD (Dong et al. 2018 + Xie et al. 2019): diverse inputs as RAD appendix E.2 (original + 4
    copies resized by U(0.9, 1) and pasted on a zero canvas, p = 1, gradients mapped back), then momentum
    mu = 1 over L1-normalised gradients, sign update."""

    name = "cls-mi-di-pgd"
    description = "classifier MI-DI-PGD (RAD Table 3): momentum 1 + diverse inputs (eps 16, step 2, 10 steps)"

    @staticmethod
    def default_transforms() -> list[GradientTransform]:
        return [DI(normalize_terms=False), MI(mu=1.0)]


class ClassifierMITIPGD(ClassifierPGD):
    """MI-TI-PGD (Dong et al. 2018 + Dong et al. 2019): 15x15 Gaussian smoothing of the gradient, then
    momentum mu = 1 over L1-normalised gradients, sign update."""

    name = "cls-mi-ti-pgd"
    description = "classifier MI-TI-PGD (RAD Table 3): momentum 1 + 15x15 translation kernel (eps 16, step 2, 10 steps)"

    @staticmethod
    def default_transforms() -> list[GradientTransform]:
        return [TI(size=15), MI(mu=1.0)]
