"""The FCOS adapter."""

from __future__ import annotations

import torch

from advdet.models.detector import DenseOutput, check_finite
from advdet.models.torchvision_adapter.base import OneStageDetector


class FCOSDetector(OneStageDetector):
    """torchvision ``FCOS`` behind the Detector contract.

    Input: x float (B, 3, S, S) in [0, 1]. Outputs:

    - ``dense(x)``: ``score_mode="sigmoid"``; ``logits`` (B, N, K) with N = sum of H*W over levels;
      ``objectness`` (B, N) centerness logits (torchvision's score is sqrt(sigmoid(cls) * sigmoid(ctr)));
      ``boxes`` (B, N, 4) decoded xyxy; ``anchors`` (B, N, 4) the stride-sized point boxes; ``extra``:
      ``num_per_level``, ``bbox_regression`` (B, N, 4) raw ltrb, ``tv_logits`` for COCO-layout models.
    - ``predict(x)`` / ``postprocess(dense)``: torchvision's per-level top-k, class-wise NMS.
    - ``loss``: ``cls`` (focal, ``classification``), ``loc`` (GIoU, ``bbox_regression``), ``ctrness``
      (BCE, ``bbox_ctrness``).
    """

    family = "fcos"
    score_mode = "sigmoid"
    background = False
    loss_names = {"classification": "cls", "bbox_regression": "loc", "bbox_ctrness": "ctrness"}

    def dense(self, x: torch.Tensor) -> DenseOutput:
        m = self.model
        images, feats = self._features(x)
        ho = m.head(feats)
        anchors = torch.stack(m.anchor_generator(images, feats))
        tv_logits, reg = ho["cls_logits"], ho["bbox_regression"]
        ctr = ho["bbox_ctrness"].squeeze(-1)
        boxes = m.box_coder.decode(reg, anchors)
        logits = self._ours_from_tv_logits(tv_logits)
        check_finite(type(self).__name__, logits=logits, boxes=boxes, objectness=ctr)
        extra = {"num_per_level": self._num_per_level(feats, tv_logits.shape[1]), "bbox_regression": reg}
        if not self._identity:
            extra["tv_logits"] = tv_logits
        return DenseOutput(logits=logits, boxes=boxes, anchors=anchors, score_mode="sigmoid", objectness=ctr,
                           extra=extra)

    @torch.no_grad()
    def postprocess(self, dense: DenseOutput, x: torch.Tensor | None = None) -> list[dict]:
        """torchvision's ``FCOS.postprocess_detections`` on the dense output (per-level split)."""
        npl = dense.extra["num_per_level"]
        split = {"cls_logits": list(self._tv_logits(dense).detach().split(npl, 1)),
                 "bbox_regression": list(dense.extra["bbox_regression"].detach().split(npl, 1)),
                 "bbox_ctrness": list(dense.objectness.detach()[..., None].split(npl, 1))}
        anchors = [list(a.split(npl)) for a in dense.anchors.detach()]
        b = dense.logits.shape[0]
        return self._finish(self.model.postprocess_detections(split, anchors, self._sizes(b)), b)
