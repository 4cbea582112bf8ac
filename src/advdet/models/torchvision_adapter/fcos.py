"""The FCOS adapter."""

from __future__ import annotations

import torch

from advdet.models.detector import DenseOutput, check_finite
from advdet.models.torchvision_adapter.base import OneStageDetector, _loss_mode, check_degenerate


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

    Capabilities: ``per_image_loss`` in one batched pass (FCOS normalises its losses by the foreground
    count of the whole batch, so the batch loss is not a mean of per-image losses: one backbone and head
    pass over the batch, then torchvision's ``compute_loss`` on each image's slice, as for that image
    alone); ``dense().box_deltas`` the raw l, t, r, b distances.
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
                           box_deltas=reg, extra=extra)

    def per_image_loss(self, x: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        """Each image's losses as if it were its own batch (name -> (B,)): ``FCOS.forward``'s training branch
        on the batch up to the head outputs, then ``compute_loss`` per image slice."""
        self.check_input(x)
        if len(targets) != x.shape[0]:
            raise ValueError(f"got {x.shape[0]} images but {len(targets)} targets")
        m = self.model
        tv_targets = [self._to_tv_target(t, x.device) for t in targets]
        with _loss_mode(m):
            images, tv_targets = m.transform(list(x), tv_targets)
            check_degenerate(tv_targets)
            feats = m.backbone(images.tensors)
            feats = list(feats.values()) if isinstance(feats, dict) else [feats]
            head = m.head(feats)
            anchors = m.anchor_generator(images, feats)
            per_level = [f.size(2) * f.size(3) for f in feats]
            parts = [m.compute_loss([tv_targets[i]], {k: v[i:i + 1] for k, v in head.items()}, [anchors[i]],
                                    per_level) for i in range(x.shape[0])]
        return {self.loss_names.get(k, k): torch.stack([p[k].reshape(()) for p in parts]) for k in parts[0]}

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
