"""Ensembles of surrogate detectors: sign-PGD on their detection losses, each member's gradient
L1-normalised per image, then summed (so no member dominates by the scale of its loss).

:class:`SurrogateEnsemble` holds the members (detectors of one input size) as one module; it is a
``Detector`` so the benchmarks accept it wherever a surrogate goes (``models={"loo-yolov3": ens}``), but
only :class:`EnsemblePGD` (``ens-pgd``) attacks it. Its ``predict`` is its first member's (used only for
reporting); ``loss`` is the sum of the members' losses by name.

:class:`EnsemblePGD` (``ens-pgd``): defaults eps 16, step 2, 10 steps, sign update (RAD's budget); targets:
the ground truth when given, else each member's own clean predictions (score >= 0.5, at least its best
one) as its pseudo ground truth. The ascended total is ``sum_m L_m(N(x))`` where ``N`` is the identity
whose backward divides each image's gradient by its mean absolute value, i.e. the update direction is
``sign(sum_m g_m / mean|g_m|)``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from advdet.attacks.base import Attack
from advdet.attacks.losses import per_image_losses, pseudo_targets, sum_keys, total_losses
from advdet.models.detector import Detector

__all__ = ["SurrogateEnsemble", "EnsemblePGD", "l1_normalised"]


class _L1Normalise(torch.autograd.Function):
    """Identity forward; backward divides each image's gradient by its mean absolute value."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # noqa: D102
        scale = g.abs().flatten(1).mean(1).clamp_min(1e-20).view(-1, *([1] * (g.ndim - 1)))
        return g / scale


def l1_normalised(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself; gradients flowing back through it are L1-normalised per image (mean |g| = 1)."""
    return _L1Normalise.apply(x)


class SurrogateEnsemble(Detector):
    """Detectors of one input size as one surrogate; ``names``: their labels (default ``m0``, ``m1``, ...)."""

    family = "ensemble"

    def __init__(self, members: Sequence[Detector], names: Sequence[str] | None = None):
        members = list(members)
        if not members:
            raise ValueError("an ensemble needs at least one member")
        sizes = {int(m.input_size) for m in members}
        if len(sizes) != 1:
            raise ValueError(f"ensemble members must share one input size, got {sorted(sizes)}")
        super().__init__(nn.ModuleList(members), members[0].num_classes, sizes.pop())
        self.names = list(names) if names is not None else [f"m{i}" for i in range(len(members))]
        if len(self.names) != len(members):
            raise ValueError(f"{len(self.names)} names for {len(members)} members")

    @property
    def members(self) -> list[Detector]:
        return list(self.model)

    def dense(self, x: torch.Tensor):  # pragma: no cover - not meaningful for an ensemble
        raise NotImplementedError("an ensemble has no single dense output; attack it with ens-pgd")

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> list[dict]:
        return self.members[0].predict(x)

    def loss(self, x: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for m in self.members:
            for k, v in m.loss(x, targets).items():
                out[k] = out[k] + v if k in out else v
        return out


class EnsemblePGD(Attack):
    """Sign-PGD on the summed detection losses of an ensemble (see the module docstring).

    ``model``: a :class:`SurrogateEnsemble` (a single detector is treated as an ensemble of one).
    """

    name: ClassVar[str] = "ens-pgd"
    description: ClassVar[str] = ("PGD on an ensemble's detection losses, each member's gradient L1-normalised "
                                  "(eps 16, step 2, 10 steps, sign)")

    def __init__(self, model, *, eps: float | None = 16.0, step: float = 2.0, steps: int = 10,
                 update: str = "sign", random_start: bool = False, valid_only: bool = False, seed: int = 0,
                 device=None, pseudo_thresh: float = 0.5, pseudo_min_k: int = 1):
        super().__init__(model, eps=eps, step=step, steps=steps, update=update, random_start=random_start,
                         valid_only=valid_only, seed=seed, device=device)
        self.pseudo_thresh = float(pseudo_thresh)
        self.pseudo_min_k = int(pseudo_min_k)

    @property
    def members(self) -> list:
        return self.model.members if isinstance(self.model, SurrogateEnsemble) else [self.model]

    def prepare(self, x: torch.Tensor, targets: Any) -> dict:
        if targets is not None:
            return {"member_targets": [list(targets)] * len(self.members)}
        return {"member_targets": [pseudo_targets(m, x, self.pseudo_thresh, self.pseudo_min_k)
                                   for m in self.members]}

    def objective(self, x_in: torch.Tensor, state: dict) -> torch.Tensor:
        """Per image: the sum over members of their total detection loss (not normalised; diagnostics)."""
        return sum(sum_keys(per_image_losses(m, x_in, t), None)
                   for m, t in zip(self.members, state["member_targets"]))

    def total_objective(self, x_in: torch.Tensor, state: dict) -> torch.Tensor:
        return sum(sum_keys(total_losses(m, l1_normalised(x_in), t), None)
                   for m, t in zip(self.members, state["member_targets"]))
