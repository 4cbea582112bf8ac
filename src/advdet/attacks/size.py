"""Size: the size attack of RAD Table 1 and appendix E.3, as a plain detection attack."""

from __future__ import annotations

import torch

from advdet.attacks.candidates import CleanBoxAttack
from advdet.attacks.losses import gather_candidates

__all__ = ["Size"]


class Size(CleanBoxAttack):
    """Shrink the boxes detected on the clean image (RAD sec. 3.4 / Table 1, "Size"; appendix E.3:
    "suppress the width and height of the original bounding boxes").

    Objective (ascended), per matched dense candidate: ``-(log(w / w0) + log(h / h0))`` of its decoded
    box relative to its clean box (width and height floored at 1e-3 px). Defaults (RAD sec. 4.1): eq. 5
    update, eps=16, step=2, 10 iterations.
    """

    name = "size"
    description = "Size (RAD Table 1): shrink width and height of the clean detections (eps 16, step 2, 10 steps)"

    def candidate_objective(self, dense, state: dict) -> torch.Tensor:
        boxes = gather_candidates(dense.boxes, state["cand"])
        wh = (boxes[..., 2:] - boxes[..., :2]).clamp_min(1e-3)
        wh0 = (state["boxes0"][..., 2:] - state["boxes0"][..., :2]).clamp_min(1e-3)
        return -torch.log(wh / wh0).sum(-1)
