"""The RetinaNet adapter."""

from __future__ import annotations

import torch

from advdet.models.detector import DenseOutput
from advdet.models.torchvision_adapter.base import OneStageDetector


class RetinaNetDetector(OneStageDetector):
    """torchvision ``RetinaNet`` behind the Detector contract.

    Input: x float (B, 3, S, S) in [0, 1]. Outputs:

    - ``dense(x)``: ``score_mode="sigmoid"``; ``logits`` (B, N, K) with N = sum over levels of H*W*A;
      ``boxes`` (B, N, 4) decoded (unclipped) xyxy; ``anchors`` (B, N, 4); ``objectness`` None;
      ``extra``: ``num_per_level`` (list of ints), ``bbox_regression`` (B, N, 4) raw deltas,
      ``tv_logits`` (B, N, 91) for COCO-layout models.
    - ``predict(x)`` / ``postprocess(dense)``: torchvision's per-level top-k, class-wise NMS.
    - ``loss``: ``cls`` (focal loss, torchvision ``classification``), ``loc`` (L1, ``bbox_regression``).

    Capabilities: ``loss_is_batch_mean`` (per-image focal / L1 sums over that image's foreground, averaged
    over the images); ``dense().box_deltas`` the raw deltas.
    """

    family = "retinanet"
    loss_is_batch_mean = True
    score_mode = "sigmoid"
    background = False
    loss_names = {"classification": "cls", "bbox_regression": "loc"}

    def dense(self, x: torch.Tensor) -> DenseOutput:
        return self._anchor_head_dense(x, lambda feats, n: self._num_per_level(feats, n))

    @torch.no_grad()
    def postprocess(self, dense: DenseOutput, x: torch.Tensor | None = None) -> list[dict]:
        """torchvision's ``RetinaNet.postprocess_detections`` on the dense output (per-level split)."""
        npl = dense.extra["num_per_level"]
        split = {"cls_logits": list(self._tv_logits(dense).detach().split(npl, 1)),
                 "bbox_regression": list(dense.extra["bbox_regression"].detach().split(npl, 1))}
        anchors = [list(a.split(npl)) for a in dense.anchors.detach()]
        b = dense.logits.shape[0]
        return self._finish(self.model.postprocess_detections(split, anchors, self._sizes(b)), b)
