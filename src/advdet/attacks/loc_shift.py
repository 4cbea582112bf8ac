"""Loc: the localization attack of RAD Table 1 ("shift"), as a plain detection attack."""

from __future__ import annotations

import torch

from advdet.attacks.candidates import CleanBoxAttack
from advdet.attacks.losses import gather_candidates

__all__ = ["LocShift"]


class LocShift(CleanBoxAttack):
    """Shift the boxes detected on the clean image (RAD sec. 3.4 / Table 1, "Localization"; Zhang & Wang
    2019 show the localization loss is useful).

    Objective (ascended), per matched dense candidate: its centre displacement from the clean position,
    in units of the attacked box's width and height, projected on a fixed direction ``u``: the unit
    vector from the image centre to the attacked box's centre (boxes are pushed outwards; (1, 1)/sqrt 2
    for a box at the centre). A fixed direction gives a nonzero gradient at the clean image (a plain
    distance would not) and moves all candidates of a box coherently; it is deterministic, so batches
    give the same result as single images. Defaults (RAD sec. 4.1): eq. 5 update, eps=16, step=2,
    10 iterations.
    """

    name = "loc-shift"
    description = "Loc (RAD Table 1): shift the clean detections' boxes outwards (eps 16, step 2, 10 steps)"

    def candidate_objective(self, dense, state: dict) -> torch.Tensor:
        boxes = gather_candidates(dense.boxes, state["cand"])
        c = (boxes[..., :2] + boxes[..., 2:]) / 2
        b0, ref = state["boxes0"], state["ref_boxes"]
        c0 = (b0[..., :2] + b0[..., 2:]) / 2
        rc = (ref[..., :2] + ref[..., 2:]) / 2
        wh = (ref[..., 2:] - ref[..., :2]).clamp_min(1.0)
        h, w = state["image_size"]
        u = rc - torch.tensor([w / 2, h / 2], dtype=rc.dtype, device=rc.device)
        norm = u.norm(dim=-1, keepdim=True)
        u = torch.where(norm > 1e-6, u / norm.clamp_min(1e-6), torch.full_like(u, 2 ** -0.5))
        return ((c - c0) / wh * u).sum(-1)
