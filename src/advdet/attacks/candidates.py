"""Shared base of the attacks on the boxes detected on the clean image (Dfool, Loc, Size; RAD
Table 1/3 and appendix E.3): the dense candidates that produce those detections, fixed on the clean
image."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from advdet.attacks.base import Attack
from advdet.attacks.losses import gather_candidates, match_candidates, pseudo_targets, top_candidates
from advdet.attacks.proposals import clean_proposals, dense_at
from advdet.attacks.transforms import GradientTransform

__all__ = ["CleanBoxAttack"]


class CleanBoxAttack(Attack):
    """Base of Dfool / LocShift / Size. ``prepare`` fixes, on the clean image:

    - the boxes to attack: the clean detections with score >= ``pseudo_thresh`` = 0.5 (an image with
      none keeps its ``pseudo_min_k`` = 1 best detection); with ``use_targets=True`` the given targets;
    - the ``num_candidates`` = 3000 dense candidates with the highest max foreground score (two-stage
      detectors: the clean image's RPN proposals are kept fixed, ``advdet.attacks.proposals``);
    - the matched candidates: those whose clean decoded box has IoU >= ``match_iou`` = 0.5 with an
      attacked box (each attacked box keeps at least its best candidate).

    State: ``cand`` (B, n) indices, ``proposals`` (two-stage: the clean proposals, else None),
    ``matched`` (B, n) bool, ``boxes0`` (B, n, 4) clean decoded boxes,
    ``ref_boxes`` (B, n, 4) the attacked box each candidate matched. Subclasses implement
    ``candidate_objective(dense, state) -> (B, n)`` (per candidate, to ascend); the objective is its
    mean over the matched candidates of each image (0 for an image without any).

    Defaults: RAD's setting for every attack of its Table 3 (sec. 4.1): eq. 5 update (``mean_abs``),
    eps=16, step=2, 10 iterations.
    """

    def __init__(self, model, *, eps: float | None = 16.0, step: float = 2.0, steps: int = 10,
                 update: str = "mean_abs", random_start: bool = False, valid_only: bool = False,
                 transforms: Sequence[GradientTransform] = (), seed: int = 0, device=None,
                 num_candidates: int = 3000, match_iou: float = 0.5, use_targets: bool = False,
                 pseudo_thresh: float = 0.5, pseudo_min_k: int = 1):
        super().__init__(model, eps=eps, step=step, steps=steps, update=update, random_start=random_start,
                         valid_only=valid_only, transforms=transforms, seed=seed, device=device)
        self.num_candidates = int(num_candidates)
        self.match_iou = float(match_iou)
        self.use_targets = bool(use_targets)
        self.pseudo_thresh, self.pseudo_min_k = float(pseudo_thresh), int(pseudo_min_k)

    def prepare(self, x: torch.Tensor, targets: Any) -> dict:
        if self.use_targets and targets is not None:
            ref = list(targets)
        else:
            ref = pseudo_targets(self.model, x, self.pseudo_thresh, self.pseudo_min_k)
        dense = self.model.dense(x)
        proposals = clean_proposals(self.model, dense)
        idx = top_candidates(dense, self.num_candidates)
        boxes0 = gather_candidates(dense.boxes, idx)
        valid = gather_candidates(dense.valid, idx)
        b, n = idx.shape
        matched = torch.zeros((b, n), dtype=torch.bool, device=x.device)
        ref_boxes = boxes0.clone()
        for i in range(b):
            rb = ref[i]["boxes"].to(boxes0)
            which, m = match_candidates(boxes0[i], rb, self.match_iou)
            matched[i] = m & valid[i]
            if rb.numel():
                ref_boxes[i] = rb[which]
        return {"attacked": ref, "cand": idx, "proposals": proposals, "matched": matched, "boxes0": boxes0, "ref_boxes": ref_boxes,
                "image_size": (x.shape[-2], x.shape[-1])}

    def candidate_objective(self, dense, state: dict) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def objective(self, x_in: torch.Tensor, state: dict) -> torch.Tensor:
        per = self.candidate_objective(dense_at(self.model, x_in, state["proposals"]), state)
        m = state["matched"].to(per.dtype)
        return (per * m).sum(1) / m.sum(1).clamp_min(1)
