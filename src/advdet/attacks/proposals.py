"""Candidates fixed on the clean image for two-stage detectors (ALGORITHMS.md 2.5: DAG computes its RPN
proposals once on the clean image and keeps them).

For one-stage detectors candidate ``n`` of ``Detector.dense`` is always the same anchor / prior, so an
index fixed on the clean image names the same box at every step. For two-stage detectors (Faster / Mask
R-CNN adapters) the candidates are the RPN proposals of the *current* input, re-ranked and re-filtered at
every call; attacks that fix candidates on the clean image (DAG, Dfool, Loc, Size) therefore keep the
clean proposals (``clean_proposals``) and evaluate the box head on them (``dense_at``), which the adapter
supports with ``dense(x, proposals=...)``.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import torch

from advdet.models.detector import DenseOutput, Detector

__all__ = ["is_two_stage", "clean_proposals", "dense_at", "rpn_settings"]


def is_two_stage(detector: Any) -> bool:
    """True for detectors whose dense candidates are input-dependent proposals (``Detector.two_stage``)."""
    return isinstance(detector, Detector) and detector.two_stage


def clean_proposals(detector: Any, dense: DenseOutput) -> list[torch.Tensor] | None:
    """The per-image proposals (n_i, 4) behind a two-stage ``dense`` output (padding removed), to pass
    back as ``dense(x, proposals=...)``; None for one-stage detectors."""
    if not is_two_stage(detector):
        return None
    return [a[v].detach() for a, v in zip(dense.anchors, dense.valid)]


def dense_at(detector: Any, x: torch.Tensor, proposals: list[torch.Tensor] | None) -> DenseOutput:
    """``detector.dense(x)``, with the two-stage proposals fixed to ``proposals`` when given."""
    return detector.dense(x) if proposals is None else detector.dense(x, proposals=proposals)


@contextmanager
def rpn_settings(detector: Any, *, nms_thresh: float | None = None, pre_nms_top_n: int | None = None,
                 post_nms_top_n: int | None = None) -> Iterator[None]:
    """Temporarily change the eval-mode proposal settings of a two-stage detector
    (``Detector.use_proposal_settings``; a no-op for one-stage detectors): DAG's reference computes 3000
    proposals with NMS 0.9 (ALGORITHMS.md 2.5). ``pre_nms_top_n`` is per feature level (torchvision's
    convention)."""
    ctx = (detector.use_proposal_settings(nms_thresh=nms_thresh, pre_nms_top_n=pre_nms_top_n,
                                          post_nms_top_n=post_nms_top_n)
           if is_two_stage(detector) else nullcontext())
    with ctx:
        yield
