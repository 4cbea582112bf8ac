"""The SSD adapter (SSD300-VGG16, SSDlite320-MobileNetV3, any torchvision SSD)."""

from __future__ import annotations

import torch

from advdet.models.detector import DenseOutput
from advdet.models.torchvision_adapter.base import OneStageDetector


class SSDDetector(OneStageDetector):
    """torchvision ``SSD`` (SSD300-VGG16, SSDlite320-MobileNetV3, or any SSD) behind the Detector contract.

    Input: x float (B, 3, S, S) in [0, 1]. Outputs:

    - ``dense(x)``: ``score_mode="softmax_bg"``; ``logits`` (B, N, K + 1), column 0 background; ``boxes``
      (B, N, 4) decoded (unclipped) xyxy; ``anchors`` (B, N, 4) default boxes in pixels; ``extra``:
      ``num_per_level``, ``bbox_regression`` (B, N, 4), ``tv_logits`` for COCO-layout models.
    - ``predict(x)`` / ``postprocess(dense)``: torchvision's per-class top-k and class-wise NMS.
    - ``loss``: ``cls`` (softmax CE with 3:1 hard negative mining, ``classification``), ``loc`` (smooth L1,
      ``bbox_regression``).
    """

    family = "ssd"
    score_mode = "softmax_bg"
    background = True
    loss_names = {"classification": "cls", "bbox_regression": "loc"}

    def dense(self, x: torch.Tensor) -> DenseOutput:
        per_loc = self.model.anchor_generator.num_anchors_per_location()
        return self._anchor_head_dense(
            x, lambda feats, n: [f.shape[-2] * f.shape[-1] * a for f, a in zip(feats, per_loc)])

    @torch.no_grad()
    def postprocess(self, dense: DenseOutput, x: torch.Tensor | None = None) -> list[dict]:
        """torchvision's ``SSD.postprocess_detections`` on the dense output."""
        ho = {"cls_logits": self._tv_logits(dense).detach(),
              "bbox_regression": dense.extra["bbox_regression"].detach()}
        b = dense.logits.shape[0]
        return self._finish(self.model.postprocess_detections(ho, list(dense.anchors.detach()), self._sizes(b)), b)
