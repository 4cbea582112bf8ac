"""The update rules of the attack loop (``update=`` of :class:`advdet.attacks.base.Attack`): the per-image
step direction of a gradient.

Update rules (``update=``):
- ``"sign"``: PGD, ``x <- x + step * sign(g)``;
- ``"mean_abs"``: RAD eq. 5, ``d = g / mean|g|`` (mean over the C*H*W values of the image),
  ``x <- x + step * d`` (for an objective to ascend; RAD's ``x - alpha * d`` of a loss to descend);
- ``"linf"``: DAG, ``x <- x + step * g / max|g|``;
- ``"term_mean_abs"``: RAD's reference code (``utils.build_direction`` + ``calculate_direction``): every
  gradient term (each SI / DI copy, or the one gradient without input transforms) is divided by its
  own mean |g| *before* the average, and the average is the step direction **as it is** (not
  normalised again), so a step is shorter than ``step`` wherever the terms disagree.

``filter_terms=True`` (RAD's reference code): gradient filters (TI) act on every gradient term before its
normalisation instead of once on the average.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from advdet.attacks.transforms import per_image_mean_abs

__all__ = ["UPDATE_RULES", "GradFn", "direction", "TermNormalizer", "compose"]

UPDATE_RULES = ("sign", "mean_abs", "linf", "term_mean_abs")

GradFn = Callable[[torch.Tensor], torch.Tensor]


def direction(g: torch.Tensor, rule: str) -> torch.Tensor:
    """Per-image step direction of gradient ``g`` (B, ...) under an update rule (see module doc)."""
    if rule == "sign":
        return g.sign()
    if rule == "mean_abs":
        return g / per_image_mean_abs(g).clamp_min(torch.finfo(g.dtype).tiny)
    if rule == "term_mean_abs":  # the terms were normalised one by one in Attack.gradient
        return g
    if rule == "linf":
        m = g.flatten(1).abs().amax(1).view(-1, *([1] * (g.ndim - 1)))
        return g / m.clamp_min(torch.finfo(g.dtype).tiny)
    raise ValueError(f"unknown update rule {rule!r}; choose one of {UPDATE_RULES}")


class TermNormalizer:
    """g / mean|g| per image (the per-term normalisation of ``update="term_mean_abs"``)."""

    @staticmethod
    def process(g: torch.Tensor) -> torch.Tensor:
        return direction(g, "mean_abs")


def compose(fn: GradFn, processors: Sequence[Any]) -> GradFn:
    """``fn`` followed by each processor's ``process``, in order."""
    def composed(xi: torch.Tensor) -> torch.Tensor:
        g = fn(xi)
        for p in processors:
            g = p.process(g)
        return g

    return composed
