"""Dfool (Lu et al., "Adversarial Examples that Fool Detectors", 2017) as RAD runs it (appendix E.3)."""

from __future__ import annotations

import torch

from advdet.attacks.candidates import CleanBoxAttack
from advdet.attacks.losses import gather_candidates

__all__ = ["Dfool"]


class Dfool(CleanBoxAttack):
    """Suppress the classification confidence of the boxes detected on the clean image: minimise the
    max foreground score (``DenseOutput.class_probs``, times objectness where the family has one) of the
    dense candidates matched to them (IoU >= 0.5 on the clean image; see ``CleanBoxAttack``).

    Defaults (RAD sec. 4.1): eq. 5 update, eps=16, step=2, 10 iterations.
    """

    name = "dfool"
    description = "Dfool (Lu et al. 2017): suppress the scores of the clean detections (eps 16, step 2, 10 steps)"

    def candidate_objective(self, dense, state: dict) -> torch.Tensor:
        return -gather_candidates(dense.class_probs(), state["cand"]).amax(-1)
