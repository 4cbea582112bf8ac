"""DAG as RobustDet evaluates it (the ``dag`` column of RobustDet Table 1; ALGORITHMS.md 1.6).

Registered as ``dag-robustdet``; the registry's ``dag`` is the original DAG of Xie et al. (attacks/dag.py).
"""

from __future__ import annotations

from typing import Any

import torch

from advdet.attacks.base import Attack
from advdet.attacks.update_rules import direction
from advdet.attacks.pgd import resolve_targets
from advdet.attacks.proposals import clean_proposals, dense_at
from advdet.models.box_ops import match_priors
from advdet.models.detector import DenseOutput, Detector


class RobustDetDAG(Attack):
    """DAG as RobustDet evaluates it (``attack/DAG.py`` of the reference code; ALGORITHMS.md 1.6, Table 1).

    - Labels: every dense candidate (prior) gets its label from ground-truth matching, background = 0
      (families with a fixed assignment: their own matching ``Detector.match_targets``, SSD: IoU 0.5; others: SSD
      matching of ``dense.anchors`` at IoU 0.5; two-stage detectors: the proposals of the clean image,
      kept fixed as ``advdet.attacks.proposals`` does for the registry's DAG). Ground truth = ``targets``, or the clean predictions
      (score >= 0.5, at least the top 1) when ``targets=None``.
    - Adversarial label of each prior: uniform over all labels except its own, background included
      (``y_adv = (y + U{1..K}) mod (K + 1)``, from ``self.generator``), so background priors get random
      object labels.
    - Active set: priors where ``argmax z != y_adv`` (z: logits with background column; for sigmoid
      families a zero background logit is prepended).
    - Objective (ascended): ``sum_active CE(z, y) - CE(z, y_adv) = sum_active z_{y_adv} - z_y``.
    - Step: ``r_t = gamma * g / ||g||_inf`` per image, gamma = 0.5 in 0-255 units, ``steps`` = 150
      iterations, no eps, no early stop; an empty active set gives a zero step (the reference divides by
      zero there).
    - ``accumulate=False`` (default, the reference's behaviour): the gradient of step t is taken at
      ``clip(x0 + r_{t-1})``, not at the accumulated image; the output is ``clip(x0 + sum_t r_t)``.
      ``accumulate=True`` takes it at ``clip(x0 + sum_{s<t} r_s)`` (a plain iterative attack).
    """

    name = "dag-robustdet"
    budget = "none"
    description = "DAG as RobustDet's Table 1 runs it: all priors, random labels, gamma 0.5, 150 steps, no eps"

    def __init__(self, model, *, steps: int = 150, gamma: float = 0.5, accumulate: bool = False,
                 iou_thresh: float = 0.5, valid_only: bool = False, transforms=(), seed: int = 0, device=None,
                 pseudo_thresh: float = 0.5, pseudo_min_k: int = 1):
        super().__init__(model, eps=None, step=gamma, steps=steps, update="linf", valid_only=valid_only,
                         transforms=transforms, seed=seed, device=device)
        self.accumulate = bool(accumulate)
        self.iou_thresh = float(iou_thresh)
        self.pseudo_thresh, self.pseudo_min_k = float(pseudo_thresh), int(pseudo_min_k)

    @staticmethod
    def _logits_with_background(dense: DenseOutput) -> torch.Tensor:
        """(B, N, K + 1) logits, column 0 = background (a zero logit for sigmoid families)."""
        if dense.score_mode == "softmax_bg":
            return dense.logits
        return torch.cat([dense.logits.new_zeros(dense.logits.shape[:2] + (1,)), dense.logits], -1)

    def prior_labels(self, x: torch.Tensor, targets: list[dict], dense: DenseOutput) -> torch.Tensor:
        """(B, N) label of every candidate from ground-truth matching, 0 = background, k + 1 = class k."""
        n = dense.logits.shape[1]
        labels = self.model.match_targets(targets) if isinstance(self.model, Detector) else None
        if labels is not None and labels.shape == (x.shape[0], n):  # the family's own matching
            return labels.to(x.device).long()
        out = []
        for i, t in enumerate(targets):
            gt = t["boxes"].to(dense.anchors)
            idx, pos = match_priors(gt, dense.anchors[i], self.iou_thresh)
            lab = torch.zeros(n, dtype=torch.long, device=x.device)
            if gt.numel():
                lab = torch.where(pos, t["labels"].to(x.device).long()[idx] + 1, lab)
            out.append(lab * dense.valid[i].long())  # padded candidates: background
        return torch.stack(out)

    def prepare(self, x: torch.Tensor, targets: Any) -> dict:
        tg = resolve_targets(self.model, x, targets, self.pseudo_thresh, self.pseudo_min_k)
        dense = self.model.dense(x)
        proposals = clean_proposals(self.model, dense)  # two-stage: keep the clean proposals fixed
        if proposals is not None:
            dense = dense_at(self.model, x, proposals)
        y = self.prior_labels(x, tg, dense)
        c = dense.num_classes + 1
        shift = torch.randint(1, c, y.shape, generator=self.generator).to(y.device)
        return {"targets": tg, "label": y, "adv": (y + shift) % c, "valid": dense.valid, "proposals": proposals,
                "active_counts": []}

    def on_step(self, t: int, x_adv: torch.Tensor, state: dict) -> None:
        z = self._logits_with_background(dense_at(self.model, x_adv, state["proposals"]))
        act = (z.argmax(-1) != state["adv"]) & state["valid"]
        state["prior_active"] = act
        state["active_counts"].append(act.sum(1).tolist())

    def objective(self, x_in: torch.Tensor, state: dict) -> torch.Tensor:
        z = self._logits_with_background(dense_at(self.model, x_in, state["proposals"]))
        z_adv = z.gather(-1, state["adv"][..., None])[..., 0]
        z_y = z.gather(-1, state["label"][..., None])[..., 0]
        return ((z_adv - z_y) * state["prior_active"]).sum(1)

    def _run(self, x: torch.Tensor, targets: Any, mask: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            state = self._prepare_state(x, targets, mask)
        self.last_state = state
        total = torch.zeros_like(x)
        last = torch.zeros_like(x)
        self.reset_transforms(x)
        for t in range(self.steps):
            point = self.project(x + (total if self.accumulate else last), x, mask)
            with torch.no_grad():
                self.on_step(t, point, state)
            g = self.gradient(point, state)
            r = self.step / 255.0 * direction(g, "linf")
            if mask is not None:
                r = r * mask
            total, last = total + r, r
        return self.project(x + total, x, mask)
