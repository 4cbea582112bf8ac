"""The two-stage adapters: Faster R-CNN and Mask R-CNN (softmax with background over RPN proposals)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch.nn.utils.rnn import pad_sequence
from torchvision.models.detection.roi_heads import fastrcnn_loss, maskrcnn_inference, maskrcnn_loss
from torchvision.models.detection.rpn import concat_box_prediction_layers

from advdet.models.detector import DenseOutput, NMSConfig, ProposalSettings, check_finite
from advdet.models.torchvision_adapter.base import TorchvisionDetector, _loss_mode, check_degenerate, eval_mode


class FasterRCNNDetector(TorchvisionDetector):
    """torchvision ``FasterRCNN`` behind the Detector contract.

    Input: x float (B, 3, S, S) in [0, 1]. Outputs:

    - ``dense(x)``: the box predictor over the RPN proposals, padded to the batch's largest proposal count
      N: ``score_mode="softmax_bg"``; ``logits`` (B, N, K + 1), column 0 background; ``boxes`` (B, N, 4) the
      class-specific decoded (unclipped) box of each proposal's argmax foreground class; ``anchors``
      (B, N, 4) the proposals; ``valid`` (B, N) False on padding; ``extra``: ``class_boxes`` (B, N, K, 4)
      decoded boxes of every class, ``box_regression`` (B, N, C*4) raw deltas (C torchvision columns),
      ``num_proposals`` (list of ints), ``proposal_scores`` (B, N) RPN objectness probabilities of the
      proposals (detached, as torchvision), ``rpn_objectness`` (B, A) RPN objectness logits of every anchor
      (differentiable), ``tv_logits`` (B, N, 91) for COCO-layout models. Proposals are detached (as in
      torchvision); gradients reach ``x`` through the ROI features.
    - ``predict(x)`` / ``postprocess(dense)``: torchvision's ``roi_heads.postprocess_detections``.
    - ``loss``: ``cls`` (``loss_classifier``), ``loc`` (``loss_box_reg``), ``rpn_obj`` (``loss_objectness``),
      ``rpn_loc`` (``loss_rpn_box_reg``) [, ``mask`` (``loss_mask``)].

    Capabilities: ``two_stage`` (``dense(x, proposals=...)``, ``proposal_settings`` /
    ``use_proposal_settings`` on the RPN's eval-mode settings); ``loss_is_batch_mean`` (means over the same
    number of sampled anchors and ROIs per image, 128 by default, which every image fills in practice);
    ``dense().box_deltas`` (B, N, K + 1, 4): the raw deltas of each logits column.
    """

    family = "faster_rcnn"
    two_stage = True
    loss_is_batch_mean = True
    score_mode = "softmax_bg"
    background = True
    loss_names = {"loss_classifier": "cls", "loss_box_reg": "loc", "loss_objectness": "rpn_obj",
                  "loss_rpn_box_reg": "rpn_loc", "loss_mask": "mask"}

    def _backbone(self, x: torch.Tensor):
        images = self._transform(x)
        feats = self.model.backbone(images.tensors)
        if isinstance(feats, torch.Tensor):
            feats = OrderedDict([("0", feats)])
        return images, feats

    def _rpn(self, images, feats):
        """``RegionProposalNetwork.forward`` without the losses, also returning the anchor logits."""
        rpn = self.model.rpn
        fl = list(feats.values())
        objectness, deltas = rpn.head(fl)
        anchors = rpn.anchor_generator(images, fl)
        b = len(anchors)
        num_anchors_per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(b, -1, 4)
        boxes, scores = rpn.filter_proposals(proposals, objectness, images.image_sizes, num_anchors_per_level)
        return boxes, scores, objectness.view(b, -1)

    def dense(self, x: torch.Tensor, proposals: Sequence[torch.Tensor] | None = None) -> DenseOutput:
        """``proposals``: optional per-image (n_i, 4) boxes used instead of the RPN's, e.g. the proposals of
        the clean image that attacks keep fixed (DAG); ``extra["proposal_scores"]`` is then 0."""
        m = self.model
        rh = m.roi_heads
        images, feats = self._backbone(x)
        rpn_proposals, prop_scores, rpn_obj = self._rpn(images, feats)
        if proposals is None:
            proposals = rpn_proposals
        else:
            if len(proposals) != x.shape[0]:
                raise ValueError(f"{len(proposals)} proposal sets for a batch of {x.shape[0]} images")
            proposals = [p.detach().to(rpn_proposals[0]).reshape(-1, 4) for p in proposals]
            prop_scores = [p.new_zeros(p.shape[0]) for p in proposals]
        bf = rh.box_head(rh.box_roi_pool(feats, proposals, images.image_sizes))
        class_logits, box_regression = rh.box_predictor(bf)
        counts = [p.shape[0] for p in proposals]
        c = class_logits.shape[-1]
        decoded = rh.box_coder.decode(box_regression, proposals).reshape(-1, c, 4)  # (sumN, C, 4)

        def pad(t: torch.Tensor) -> torch.Tensor:
            return pad_sequence(list(t.split(counts, 0)), batch_first=True)

        tv_logits = pad(class_logits)
        logits = self._ours_from_tv_logits(tv_logits)
        class_boxes = pad(decoded)[..., self.tv_label_of, :]  # (B, N, K, 4)
        best = logits[..., int(self.background):].argmax(-1)
        boxes = class_boxes.gather(2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(2)
        anchors = pad_sequence(proposals, batch_first=True)
        n = anchors.shape[1]
        valid = torch.arange(n, device=x.device)[None] < torch.tensor(counts, device=x.device)[:, None]
        check_finite(type(self).__name__, logits=logits, boxes=boxes)
        padded_reg = pad(box_regression)
        cols = torch.cat([self.tv_label_of.new_zeros(1), self.tv_label_of])  # our logits columns, bg first
        box_deltas = padded_reg.view(*padded_reg.shape[:2], c, 4)[:, :, cols]  # (B, N, K + 1, 4)
        extra = {"class_boxes": class_boxes, "box_regression": padded_reg, "num_proposals": counts,
                 "proposal_scores": pad_sequence(prop_scores, batch_first=True), "rpn_objectness": rpn_obj}
        if not self._identity:
            extra["tv_logits"] = tv_logits
        return DenseOutput(logits=logits, boxes=boxes, anchors=anchors, score_mode="softmax_bg", valid=valid,
                           box_deltas=box_deltas, extra=extra)

    @torch.no_grad()
    def postprocess(self, dense: DenseOutput, x: torch.Tensor | None = None) -> list[dict]:
        """torchvision's ``roi_heads.postprocess_detections`` over the unpadded proposals of ``dense``.

        For Mask R-CNN pass the input ``x`` too to get ``masks`` (the mask branch needs the features).
        """
        rh = self.model.roi_heads
        valid = dense.valid
        b = valid.shape[0]
        cl = self._tv_logits(dense).detach()[valid]
        br = dense.extra["box_regression"].detach()[valid]
        proposals = [dense.anchors[i].detach()[valid[i]] for i in range(b)]
        sizes = self._sizes(b)
        boxes, scores, labels = rh.postprocess_detections(cl, br, proposals, sizes)
        dets = [{"boxes": bx, "labels": lb, "scores": sc} for bx, sc, lb in zip(boxes, scores, labels)]
        if self.has_masks and x is not None:
            self._add_masks(x, dets)
        dets = self.model.transform.postprocess(dets, sizes, sizes)
        return [self._to_contiguous(d) for d in dets]

    def _add_masks(self, x: torch.Tensor, dets: list[dict]) -> None:
        rh = self.model.roi_heads
        images, feats = self._backbone(x)
        mf = rh.mask_head(rh.mask_roi_pool(feats, [d["boxes"] for d in dets], images.image_sizes))
        probs = maskrcnn_inference(rh.mask_predictor(mf), [d["labels"] for d in dets])
        for p, d in zip(probs, dets):
            d["masks"] = p

    def per_image_loss(self, x: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        """Each image's losses as if it were its own batch (name -> (B,)): one backbone and RPN-head pass over
        the batch (proposals included); then, image by image, torchvision's steps that draw at random
        (transform, RPN anchor sampling and loss, ROI sampling), in the order one ``loss`` call per image
        makes them, so the random anchor / ROI sampling draws exactly what it draws; then the box head once
        over every image's sampled ROIs, the mask head per image, and each image's normalised ROI losses."""
        self.check_input(x)
        if len(targets) != x.shape[0]:
            raise ValueError(f"got {x.shape[0]} images but {len(targets)} targets")
        m = self.model
        tv_targets = [self._to_tv_target(t, x.device) for t in targets]
        with _loss_mode(m):
            with eval_mode(m.transform):  # no random size draw here: the per-image transforms below draw
                images = m.transform(list(x))[0]
            feats = m.backbone(images.tensors)
            if isinstance(feats, torch.Tensor):
                feats = OrderedDict([("0", feats)])
            # RegionProposalNetwork.forward up to its losses, on the batch (no random draw before the losses)
            rpn, fl, b = m.rpn, list(feats.values()), x.shape[0]
            objectness, deltas = rpn.head(fl)
            anchors = rpn.anchor_generator(images, fl)
            per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
            objectness, deltas = concat_box_prediction_layers(objectness, deltas)  # image-major rows
            decoded = rpn.box_coder.decode(deltas.detach(), anchors).view(b, -1, 4)
            proposals, _ = rpn.filter_proposals(decoded, objectness, images.image_sizes, per_level)
            a = objectness.shape[0] // b
            rh, samples, rpn_losses, tv_sized = m.roi_heads, [], [], []
            for i in range(b):  # the random draws, in the order of one loss call per image: RPN, then ROI
                img_i, tgt_i = m.transform([x[i]], [tv_targets[i]])
                check_degenerate(tgt_i)
                labels, matched = rpn.assign_targets_to_anchors([anchors[i]], tgt_i)
                reg_targets = rpn.box_coder.encode(matched, [anchors[i]])
                rows = slice(i * a, (i + 1) * a)
                rpn_losses.append(rpn.compute_loss(objectness[rows], deltas[rows], labels, reg_targets))
                samples.append(rh.select_training_samples([proposals[i]], tgt_i))
                tv_sized.append(tgt_i[0])
            parts = self._roi_losses(feats, images.image_sizes, samples, tv_sized)
            for part, (l_obj, l_reg) in zip(parts, rpn_losses):
                part.update(loss_objectness=l_obj, loss_rpn_box_reg=l_reg)  # GeneralizedRCNN's order
        parts = [{self.loss_names.get(k, k): v for k, v in raw.items()} for raw in parts]
        return {k: torch.stack([p[k].reshape(()) for p in parts]) for k in parts[0]}

    def _roi_losses(self, feats: OrderedDict, image_sizes: list, samples: list, targets: list[dict]) -> list[dict]:
        """torchvision's ROI-head losses of each image (its sampled ROIs ``samples[i]``, from
        ``select_training_samples``): the box head runs once over the whole batch, the mask head per image."""
        rh = self.model.roi_heads
        props = [s[0][0] for s in samples]
        counts = [p.shape[0] for p in props]
        class_logits, box_regression = rh.box_predictor(rh.box_head(rh.box_roi_pool(feats, props, image_sizes)))
        parts = []
        for (_, _, labels, reg_targets), cl, br in zip(samples, class_logits.split(counts),
                                                        box_regression.split(counts)):
            l_cls, l_box = fastrcnn_loss(cl, br, labels, reg_targets)
            parts.append({"loss_classifier": l_cls, "loss_box_reg": l_box})
        if rh.has_mask():  # image by image: batched over the batch's ROIs the mask head is memory-bound, slower
            for i, (part, (p, matched, labels, _), t) in enumerate(zip(parts, samples, targets)):
                q = torch.where(labels[0] > 0)[0]
                feats_i = OrderedDict((k, v[i:i + 1]) for k, v in feats.items())
                ml = rh.mask_predictor(rh.mask_head(rh.mask_roi_pool(feats_i, [p[0][q]], image_sizes[i:i + 1])))
                part["loss_mask"] = maskrcnn_loss(ml, [p[0][q]], [t["masks"]], [t["labels"]], [matched[0][q]])
        return parts

    def proposal_settings(self) -> ProposalSettings:
        """The RPN's eval-mode settings (``pre_nms_top_n`` is per feature level, torchvision's convention)."""
        rpn = self.model.rpn
        return ProposalSettings(nms_thresh=float(rpn.nms_thresh), pre_nms_top_n=int(rpn._pre_nms_top_n["testing"]),
                                post_nms_top_n=int(rpn._post_nms_top_n["testing"]))

    @contextmanager
    def use_proposal_settings(self, *, nms_thresh: float | None = None, pre_nms_top_n: int | None = None,
                              post_nms_top_n: int | None = None) -> Iterator[None]:
        """Temporarily change the RPN's eval-mode settings (None: keep), restored on exit."""
        rpn = self.model.rpn
        saved = (rpn.nms_thresh, rpn._pre_nms_top_n["testing"], rpn._post_nms_top_n["testing"])
        try:
            if nms_thresh is not None:
                rpn.nms_thresh = float(nms_thresh)
            if pre_nms_top_n is not None:
                rpn._pre_nms_top_n["testing"] = int(pre_nms_top_n)
            if post_nms_top_n is not None:
                rpn._post_nms_top_n["testing"] = int(post_nms_top_n)
            yield
        finally:
            rpn.nms_thresh, rpn._pre_nms_top_n["testing"], rpn._post_nms_top_n["testing"] = saved

    def nms_config(self) -> NMSConfig:
        rh = self.model.roi_heads
        return NMSConfig(score_thresh=rh.score_thresh, nms_thresh=rh.nms_thresh,
                         pre_nms_topk=self.model.rpn._post_nms_top_n["testing"], max_detections=rh.detections_per_img)

    def set_nms(self, cfg: NMSConfig) -> None:
        """Set the ROI heads' score threshold, NMS IoU and output cap (``pre_nms_topk`` is not used: the RPN
        proposal counts stay as configured)."""
        rh = self.model.roi_heads
        rh.score_thresh, rh.nms_thresh, rh.detections_per_img = cfg.score_thresh, cfg.nms_thresh, cfg.max_detections


class MaskRCNNDetector(FasterRCNNDetector):
    """torchvision ``MaskRCNN`` behind the Detector contract: as :class:`FasterRCNNDetector` plus masks.

    ``predict(x)`` adds ``masks`` (M, S, S) float probabilities (torchvision's pasted masks, squeezed);
    ``postprocess(dense, x)`` adds them when ``x`` is given; ``loss`` needs target ``masks`` (N, S, S) and
    adds ``mask`` (``loss_mask``).
    """

    family = "mask_rcnn"
    has_masks = True
    #: the mask loss is averaged over the positive ROIs of the whole batch: not a mean of per-image losses
    loss_is_batch_mean = False
