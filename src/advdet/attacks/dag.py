"""DAG: Dense Adversary Generation (Xie et al., "Adversarial Examples for Semantic Segmentation and
Object Detection", ICCV 2017), after the reference code cihangxie/DAG (ALGORITHMS.md 2.5), on the dense
candidates of any Detector; and the eps-bounded variant RAD's Table 3 uses (RAD appendix E.3).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torchvision.ops import box_iou, nms

from advdet.attacks.base import Attack, eval_mode
from advdet.attacks.losses import gather_candidates, top_candidates
from advdet.attacks.pgd import resolve_targets
from advdet.attacks.proposals import clean_proposals, dense_at, is_two_stage, rpn_settings
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
    """DAG (Xie et al., ICCV 2017) as its paper defines it, with the reference code's settings
    (ALGORITHMS.md 2.5), on the dense candidates of any Detector.

    - Candidates: the ``num_candidates`` = 3000 dense candidates with the highest max foreground score
      on the clean image (``Detector.dense``), fixed for the whole attack. One-stage detectors: the
      dense boxes (anchors / priors). Two-stage detectors: the reference's proposals, i.e. the RPN run
      once on the clean image with NMS ``rpn_nms`` = 0.9 and up to ``num_candidates`` proposals, then
      kept fixed (``dense(x, proposals=...)``; see ``advdet.attacks.proposals``).
    - Targets: candidate n gets ground truth i if IoU(box n, box i) > ``iou_thresh`` = 0.1 and its
      clean probability of class(i) > ``prob_thresh`` = 0.1 (largest IoU if several); the others are
      ignored. Box n is the proposal (two-stage) or the clean decoded box (one-stage). Ground truth =
      ``targets``, or the clean predictions (score >= 0.5, at least the top 1) when ``targets=None``.
    - Adversarial labels: a random injective map from the image's classes to absent classes
      (``adversarial_label_map``, seeded), shared by all candidates of a class.
    - Objective (ascended): sum over active candidates of ``z_adv - z_orig`` on pre-softmax logits
      (the reference's ``r = sum grad z_adv - grad z_orig``); active = assigned and still predicted as its
      original label (the paper's T_m; the prediction is the argmax over all columns, background
      included, for softmax models, the argmax class for sigmoid models).
    - Step: ``r <- r + gamma * g / ||g||_inf`` per image with gamma = 0.5 in 0-255 units
      (``update="linf"``), no eps; unlike the reference, the iterate is clipped to [0, 1] every step.
    - Stop: per image when no candidate is active (the image stops changing), at most 150 iterations.
      ``strong=True`` adds the reference code's "strong" check: the candidates already predicted as
      their adversarial label are NMS-ed at 0.35 (on their boxes, by that label's probability) and any
      kept one with probability < 0.8 counts as still predicted as its original label.
    """

    name = "dag"
    description = "DAG (Xie et al. 2017): dense adversarial labels, gamma 0.5, up to 150 steps, no eps"

    def __init__(self, model, *, steps: int = 150, gamma: float = 0.5, eps: float | None = None,
                 update: str = "linf", num_candidates: int = 3000, iou_thresh: float = 0.1,
                 prob_thresh: float = 0.1, early_stop: bool = True, strong: bool = False,
                 strong_nms: float = 0.35, strong_score: float = 0.8, rpn_nms: float | None = 0.9,
                 random_start: bool = False, valid_only: bool = False,
                 transforms: Sequence[GradientTransform] = (), seed: int = 0, device=None,
                 pseudo_thresh: float = 0.5, pseudo_min_k: int = 1):
        super().__init__(model, eps=eps, step=gamma, steps=steps, update=update, random_start=random_start,
                         valid_only=valid_only, transforms=transforms, seed=seed, device=device)
        if num_candidates < 1:
            raise ValueError(f"{type(self).__name__}: num_candidates must be >= 1, got {num_candidates}")
        self.num_candidates = int(num_candidates)
        self.iou_thresh, self.prob_thresh = float(iou_thresh), float(prob_thresh)
        self.early_stop = bool(early_stop)
        self.strong, self.strong_nms, self.strong_score = bool(strong), float(strong_nms), float(strong_score)
        self.rpn_nms = None if rpn_nms is None else float(rpn_nms)
        self.pseudo_thresh, self.pseudo_min_k = float(pseudo_thresh), int(pseudo_min_k)

    def clean_dense(self, x: torch.Tensor):
        """The dense output of the clean batch; two-stage: with the reference's RPN settings."""
        current = self.model.proposal_settings() if is_two_stage(self.model) else None
        pre = None if current is None else max(current.pre_nms_top_n, self.num_candidates)
        with rpn_settings(self.model, nms_thresh=self.rpn_nms, pre_nms_top_n=pre,
                          post_nms_top_n=self.num_candidates):
            return self.model.dense(x)

    def prepare(self, x: torch.Tensor, targets: Any) -> dict:
        tg = resolve_targets(self.model, x, targets, self.pseudo_thresh, self.pseudo_min_k)
        dense = self.clean_dense(x)
        proposals = clean_proposals(self.model, dense)
        k = dense.num_classes
        idx = top_candidates(dense, self.num_candidates)
        probs = gather_candidates(dense.class_probs(), idx)
        boxes = gather_candidates(dense.anchors if proposals is not None else dense.boxes, idx)
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
        return {"targets": tg, "cand": idx, "proposals": proposals, "boxes0": boxes, "orig": orig, "adv": adv,
                "label_maps": maps, "assigned": orig >= 0,
                "offset": 1 if dense.score_mode == "softmax_bg" else 0}

    def predicted(self, x_in: torch.Tensor, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, n) current predicted class of each candidate (-1: background) and its probability."""
        dense = dense_at(self.model, x_in, state["proposals"])
        if dense.score_mode == "softmax_bg":
            p = gather_candidates(dense.logits, state["cand"]).softmax(-1)
            score, pred = p.max(-1)
            return pred - 1, score
        score, pred = gather_candidates(dense.class_probs(), state["cand"]).max(-1)
        return pred, score

    def still_original(self, x_in: torch.Tensor, state: dict) -> torch.Tensor:
        """(B, n) assigned candidates still predicted as their original label (T_m of the paper; with
        ``strong``, also the weak adversarial ones of the reference's check)."""
        pred, score = self.predicted(x_in, state)
        assigned = state["assigned"]
        still = assigned & (pred == state["orig"])
        if self.strong:
            fooled = assigned & (pred == state["adv"])
            for i in range(fooled.shape[0]):
                idx = fooled[i].nonzero().squeeze(1)
                if idx.numel() == 0:
                    continue
                keep = idx[nms(state["boxes0"][i][idx].float(), score[i][idx].float(), self.strong_nms)]
                still[i, keep[score[i][keep] < self.strong_score]] = True
        return still

    def on_step(self, t: int, x_adv: torch.Tensor, state: dict) -> None:
        cand_active = self.still_original(x_adv, state)
        state["cand_active"] = cand_active
        if self.early_stop:
            state["active"] = cand_active.any(1)

    def objective(self, x_in: torch.Tensor, state: dict) -> torch.Tensor:
        z = gather_candidates(dense_at(self.model, x_in, state["proposals"]).logits, state["cand"])  # (B, n, C)
        off = state["offset"]
        act = state.get("cand_active", state["assigned"])
        z_adv = z.gather(-1, (state["adv"].clamp_min(0) + off)[..., None])[..., 0]
        z_org = z.gather(-1, (state["orig"].clamp_min(0) + off)[..., None])[..., 0]
        return ((z_adv - z_org) * act).sum(1)

    def fooled_fraction(self, x_adv: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        """(B,) fraction of assigned candidates no longer predicted as their original label."""
        state = self.last_state if state is None else state
        with torch.no_grad(), eval_mode(self.model):
            still = self.still_original(x_adv.to(state["x"].device), state)
        n = state["assigned"].sum(1)
        return torch.where(n > 0, 1 - still.sum(1) / n.clamp_min(1), torch.ones_like(n, dtype=torch.float))


class DAGEps(DAG):
    """DAG as RAD's Table 3 runs it (RAD appendix E.3): the DAG objective on the 3000 most confident
    dense candidates, with RAD's update (eq. 5, ``d = g / mean|g|``), eps=16, step=2, 10 iterations;
    stops early when no candidate is still predicted as its original label."""

    name = "dag-eps"
    fixed_options = ("gamma",)  # DAG's step size, set from ``step``: the attack spec refuses it
    description = "DAG with RAD's eps-bounded update (eq. 5): eps 16, step 2, 10 steps"

    def __init__(self, model, *, eps: float | None = 16.0, step: float = 2.0, steps: int = 10,
                 update: str = "mean_abs", **kw):
        """RAD's settings (eps 16, step 2 as DAG's gamma, 10 steps, eq. 5 update); every other keyword is
        :class:`DAG`'s, with its defaults; DAG's ``gamma`` is ``step`` here (``fixed_options``)."""
        super().__init__(model, steps=steps, gamma=step, eps=eps, update=update, **kw)
