"""DAG: Dense Adversary Generation (Xie et al., "Adversarial Examples for Semantic Segmentation and
Object Detection", ICCV 2017), after the reference code cihangxie/DAG (ALGORITHMS.md 2.5), on the dense
candidates of any Detector; and the eps-bounded variant RAD's Table 3 uses (RAD appendix E.3).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torchvision.ops import box_iou

from advdet.attacks.base import Attack
from advdet.attacks.losses import gather_candidates, top_candidates
from advdet.attacks.pgd import resolve_targets
from advdet.attacks.transforms import GradientTransform

log = logging.getLogger(__name__)

__all__ = ["DAG", "DAGEps", "adversarial_label_map"]


def adversarial_label_map(present: Sequence[int], num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """DAG's adversarial labels: a random injective map from the classes ``present`` in an image to
    foreground classes *not* present. Returns a (K,) lookup (-1 for classes not present).

    If there are fewer absent than present classes, the classes left over get a random other class
    (not injective then; ``DAG`` logs a warning)."""
    present = sorted({int(c) for c in present})
    absent = [c for c in range(num_classes) if c not in present]
    lut = torch.full((num_classes,), -1, dtype=torch.long)
    perm = torch.randperm(len(absent), generator=generator).tolist()
    order = torch.randperm(len(present), generator=generator).tolist()  # which classes get absent targets
    for j, pi in enumerate(order):
        c = present[pi]
        if j < len(absent):
            lut[c] = absent[perm[j]]
        else:
            others = [k for k in range(num_classes) if k != c]
            if not others:
                raise ValueError("DAG needs at least 2 classes")
            lut[c] = others[int(torch.randint(len(others), (1,), generator=generator))]
    return lut


class DAG(Attack):
    """DAG (Xie et al., ICCV 2017), reference-code settings (ALGORITHMS.md 2.5) on dense candidates.

    - Candidates: the ``num_candidates`` = 3000 dense candidates with the highest max foreground score
      on the clean image (``Detector.dense``), fixed for the attack (the reference fixes its 3000 RPN
      proposals; for one-stage models the candidates are the dense boxes, for two-stage adapters the
      candidate slots).
    - Targets: candidate n gets ground truth i if IoU(clean box n, box i) > ``iou_thresh`` = 0.1 and
      its probability of class(i) > ``prob_thresh`` = 0.1 (largest IoU if several); the others are
      ignored. Ground truth = ``targets``, or the clean predictions (score >= 0.5, at least the top 1)
      when ``targets=None``.
    - Adversarial labels: a random injective map from the image's classes to absent classes
      (``adversarial_label_map``, seeded), shared by all candidates of a class.
    - Objective (ascended): sum over active candidates of ``z_adv - z_orig`` on pre-softmax logits;
      active = assigned and still predicted as its original label (the paper's rule; the prediction
      is the argmax over all columns, background included, for softmax models).
    - Step: ``r <- r + gamma * g / ||g||_inf`` per image with gamma = 0.5 in 0-255 units
      (``update="linf"``), no eps; unlike the reference, the iterate is clipped to [0, 1] every step.
    - Stop: per image when no candidate is active (the image stops changing), at most 150 iterations.
      The reference's "strong" NMS check is not implemented.
    """

    name = "dag"
    description = "DAG (Xie et al. 2017): dense adversarial labels, gamma 0.5, up to 150 steps, no eps"

    def __init__(self, model, *, steps: int = 150, gamma: float = 0.5, eps: float | None = None,
                 update: str = "linf", num_candidates: int = 3000, iou_thresh: float = 0.1,
                 prob_thresh: float = 0.1, early_stop: bool = True, random_start: bool = False,
                 valid_only: bool = False, transforms: Sequence[GradientTransform] = (), seed: int = 0,
                 device=None, pseudo_thresh: float = 0.5, pseudo_min_k: int = 1):
        super().__init__(model, eps=eps, step=gamma, steps=steps, update=update, random_start=random_start,
                         valid_only=valid_only, transforms=transforms, seed=seed, device=device)
        self.num_candidates = int(num_candidates)
        self.iou_thresh, self.prob_thresh = float(iou_thresh), float(prob_thresh)
        self.early_stop = bool(early_stop)
        self.pseudo_thresh, self.pseudo_min_k = float(pseudo_thresh), int(pseudo_min_k)

    def prepare(self, x: torch.Tensor, targets: Any) -> dict:
        tg = resolve_targets(self.model, x, targets, self.pseudo_thresh, self.pseudo_min_k)
        dense = self.model.dense(x)
        k = dense.num_classes
        idx = top_candidates(dense, self.num_candidates)
        probs = gather_candidates(dense.class_probs(), idx)
        boxes = gather_candidates(dense.boxes, idx)
        valid = gather_candidates(dense.valid, idx)
        b, n = idx.shape
        orig = torch.full((b, n), -1, dtype=torch.long, device=x.device)
        adv = torch.full((b, n), -1, dtype=torch.long, device=x.device)
        maps, not_injective = [], 0
        for i in range(b):
            gt_boxes = tg[i]["boxes"].to(boxes)
            gt_labels = tg[i]["labels"].to(x.device).long()
            lut = adversarial_label_map(gt_labels.tolist(), k, self.generator).to(x.device)
            maps.append(lut)
            not_injective += int(2 * gt_labels.unique().numel() > k)
            if gt_labels.numel() == 0:
                continue
            iou = box_iou(boxes[i], gt_boxes)                          # (n, G)
            p = probs[i][:, gt_labels]                                 # (n, G)
            ok = (iou > self.iou_thresh) & (p > self.prob_thresh)
            best = iou.masked_fill(~ok, -1.0).argmax(1)
            assigned = ok.any(1) & valid[i]
            orig[i] = torch.where(assigned, gt_labels[best], -1)
            adv[i] = torch.where(assigned, lut[gt_labels[best]], -1)
        if not_injective:
            log.warning("DAG: %d image(s) have more classes present than absent (K = %d); their adversarial "
                        "label maps are not injective", not_injective, k)
        return {"targets": tg, "cand": idx, "orig": orig, "adv": adv, "label_maps": maps,
                "assigned": orig >= 0, "offset": 1 if dense.score_mode == "softmax_bg" else 0}

    def predicted(self, x_in: torch.Tensor, state: dict) -> torch.Tensor:
        """(B, n) current predicted foreground class of each candidate (-1: background)."""
        dense = self.model.dense(x_in)
        if dense.score_mode == "softmax_bg":
            pred = gather_candidates(dense.logits, state["cand"]).argmax(-1) - 1
        else:
            pred = gather_candidates(dense.class_probs(), state["cand"]).argmax(-1)
        return pred

    def on_step(self, t: int, x_adv: torch.Tensor, state: dict) -> None:
        cand_active = state["assigned"] & (self.predicted(x_adv, state) == state["orig"])
        state["cand_active"] = cand_active
        if self.early_stop:
            state["active"] = cand_active.any(1)

    def objective(self, x_in: torch.Tensor, state: dict) -> torch.Tensor:
        z = gather_candidates(self.model.dense(x_in).logits, state["cand"])  # (B, n, C)
        off = state["offset"]
        act = state.get("cand_active", state["assigned"])
        z_adv = z.gather(-1, (state["adv"].clamp_min(0) + off)[..., None])[..., 0]
        z_org = z.gather(-1, (state["orig"].clamp_min(0) + off)[..., None])[..., 0]
        return ((z_adv - z_org) * act).sum(1)

    def fooled_fraction(self, x_adv: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        """(B,) fraction of assigned candidates no longer predicted as their original label."""
        state = self.last_state if state is None else state
        with torch.no_grad():
            still = state["assigned"] & (self.predicted(x_adv.to(state["x"].device), state) == state["orig"])
        n = state["assigned"].sum(1)
        return torch.where(n > 0, 1 - still.sum(1) / n.clamp_min(1), torch.ones_like(n, dtype=torch.float))


class DAGEps(DAG):
    """DAG as RAD's Table 3 runs it (RAD appendix E.3): the DAG objective on the 3000 most confident
    dense candidates, with RAD's update (eq. 5, ``d = g / mean|g|``), eps=16, step=2, 10 iterations;
    stops early when no candidate is still predicted as its original label."""

    name = "dag-eps"
    description = "DAG with RAD's eps-bounded update (eq. 5): eps 16, step 2, 10 steps"

    def __init__(self, model, *, eps: float | None = 16.0, step: float = 2.0, steps: int = 10,
                 update: str = "mean_abs", num_candidates: int = 3000, iou_thresh: float = 0.1,
                 prob_thresh: float = 0.1, early_stop: bool = True, random_start: bool = False,
                 valid_only: bool = False, transforms: Sequence[GradientTransform] = (), seed: int = 0,
                 device=None, pseudo_thresh: float = 0.5, pseudo_min_k: int = 1):
        super().__init__(model, steps=steps, gamma=step, eps=eps, update=update, num_candidates=num_candidates,
                         iou_thresh=iou_thresh, prob_thresh=prob_thresh, early_stop=early_stop,
                         random_start=random_start, valid_only=valid_only, transforms=transforms, seed=seed,
                         device=device, pseudo_thresh=pseudo_thresh, pseudo_min_k=pseudo_min_k)
