"""How detections fail under attack: disappearance, misclassification and hallucination rates.

All three are measured against the victim's own **clean predictions** (not the ground truth), so they
say what the attack changed, independently of how good the victim was. Only detections with score
``>= score_thresh`` (default 0.3) count, on both sides; boxes overlap when IoU ``>= iou`` (default 0.5).

For one image with clean detections C and adversarial detections A (both thresholded), every clean
detection c falls in exactly one class:

- **kept**: some a in A has IoU(c, a) >= 0.5 and the same label;
- **misclassified**: some a in A has IoU(c, a) >= 0.5, but none of those has c's label;
- **disappeared**: no a in A has IoU(c, a) >= 0.5.

An adversarial detection a is **hallucinated** when no clean detection has IoU(a, c) >= 0.5 (any label).
Matching is many-to-one (no one-to-one assignment): the rates describe boxes, not an AP-style matching.

Over a dataset (micro averages):

- ``disappearance = sum disappeared / sum |C|``, ``misclassification = sum misclassified / sum |C|``
  (so ``kept + misclassified + disappeared = 1``); ``None`` when there is no clean detection at all;
- ``hallucination = sum hallucinated / number of images`` (new false boxes per image).

Motivated by the qualitative failure modes of RAD sec. 4.2 / Fig. 6 (objects vanish, a non-existent
"bed" appears) and the issue's request for rates beyond mAP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torchvision.ops import box_iou

__all__ = ["DEFAULT_SCORE_THRESH", "DEFAULT_IOU", "FailureCounter", "failure_rates", "image_failure_counts",
           "threshold_detections"]

DEFAULT_SCORE_THRESH = 0.3
DEFAULT_IOU = 0.5


def threshold_detections(det: dict, score_thresh: float = DEFAULT_SCORE_THRESH) -> dict:
    """``{boxes (N, 4) float32, labels (N,) int64, scores (N,) float32}`` on the CPU, scores >= threshold."""
    boxes = torch.as_tensor(det["boxes"]).detach().cpu().float().reshape(-1, 4)
    scores = torch.as_tensor(det["scores"]).detach().cpu().float().reshape(-1)
    labels = torch.as_tensor(det["labels"]).detach().cpu().long().reshape(-1)
    if not (len(boxes) == len(scores) == len(labels)):
        raise ValueError(f"detections have {len(boxes)} boxes, {len(scores)} scores and {len(labels)} labels")
    keep = scores >= score_thresh
    return {"boxes": boxes[keep], "labels": labels[keep], "scores": scores[keep]}


def image_failure_counts(clean: dict, adv: dict, iou: float = DEFAULT_IOU) -> dict[str, int]:
    """Counts for one image from already thresholded detections (``threshold_detections``):
    ``clean, adv, kept, misclassified, disappeared, hallucinated``."""
    cb, cl = clean["boxes"], clean["labels"]
    ab, al = adv["boxes"], adv["labels"]
    nc, na = len(cb), len(ab)
    if nc == 0 or na == 0:
        return {"clean": nc, "adv": na, "kept": 0, "misclassified": 0, "disappeared": nc, "hallucinated": na}
    overlap = box_iou(cb, ab) >= iou                      # (nc, na)
    same = cl[:, None] == al[None, :]
    any_overlap = overlap.any(1)
    kept = (overlap & same).any(1)
    return {"clean": nc, "adv": na, "kept": int(kept.sum()), "misclassified": int((any_overlap & ~kept).sum()),
            "disappeared": int((~any_overlap).sum()), "hallucinated": int((~overlap.any(0)).sum())}


@dataclass
class FailureCounter:
    """Accumulates per-image counts; ``rates()`` gives the dataset rates (see the module docstring)."""

    score_thresh: float = DEFAULT_SCORE_THRESH
    iou: float = DEFAULT_IOU
    images: int = 0
    clean: int = 0
    adv: int = 0
    kept: int = 0
    misclassified: int = 0
    disappeared: int = 0
    hallucinated: int = 0

    def update(self, clean: dict, adv: dict, thresholded: bool = False) -> dict[str, int]:
        """Add one image (raw detections, or ``thresholded=True`` for ``threshold_detections`` output)."""
        if not thresholded:
            clean, adv = threshold_detections(clean, self.score_thresh), threshold_detections(adv, self.score_thresh)
        c = image_failure_counts(clean, adv, self.iou)
        self.images += 1
        for k, v in c.items():
            setattr(self, k, getattr(self, k) + v)
        return c

    def rates(self) -> dict[str, Any]:
        n = self.clean
        return {
            "disappearance": self.disappeared / n if n else None,
            "misclassification": self.misclassified / n if n else None,
            "kept": self.kept / n if n else None,
            "hallucination": self.hallucinated / self.images if self.images else None,
            "clean_detections": self.clean, "adv_detections": self.adv, "disappeared": self.disappeared,
            "misclassified": self.misclassified, "hallucinated": self.hallucinated, "images": self.images,
            "score_thresh": self.score_thresh, "iou": self.iou,
        }


def failure_rates(clean: Sequence[dict], adv: Sequence[dict], score_thresh: float = DEFAULT_SCORE_THRESH,
                  iou: float = DEFAULT_IOU) -> dict[str, Any]:
    """Rates over a dataset from per-image detections (``boxes``, ``scores``, ``labels``; the same image
    order on both sides, boxes in the same coordinates)."""
    if len(clean) != len(adv):
        raise ValueError(f"failure_rates: {len(clean)} clean but {len(adv)} adversarial images")
    counter = FailureCounter(score_thresh, iou)
    for c, a in zip(clean, adv):
        counter.update(c, a)
    return counter.rates()
