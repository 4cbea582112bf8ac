"""torchvision detection models behind the :class:`~advdet.models.detector.Detector` contract.

Families: RetinaNet, FCOS (one-stage, sigmoid scores), SSD / SSDlite (one-stage, softmax with background),
Faster R-CNN and Mask R-CNN (two-stage, softmax with background over RPN proposals).

How an adapter runs the wrapped torchvision model
-------------------------------------------------
- **Input**: float RGB in [0, 1], shape (B, 3, S, S) with S == ``input_size``. The model's own
  ``transform`` (``GeneralizedRCNNTransform``) is configured with ``min_size = max_size = S`` (SSD:
  ``fixed_size = (S, S)``), so the letterboxed image passes through unresized (a bilinear resample at
  scale 1, which is the identity) and is normalised with the family's own mean / std. Everything is
  differentiable, so gradients reach ``x``.
- ``dense(x)`` runs the model's own submodules (transform, backbone, head, anchor generator, box coder;
  two-stage: RPN head + ``filter_proposals``, then ``box_roi_pool`` / ``box_head`` / ``box_predictor``)
  and returns the pre-NMS :class:`DenseOutput`. It follows the module's current mode (call ``.eval()``
  for attacks; the two-stage RPN then keeps its ``*_test`` proposal counts).
- ``predict(x)`` is exactly the torchvision model's own eval forward ``model.eval()(list(x))`` (the mode
  of every submodule is restored afterwards) with labels mapped to contiguous ids 0..K-1.
- ``postprocess(dense)`` reproduces ``predict`` from a dense output using the family's own post-processing
  code (``postprocess_detections`` with the per-level split for RetinaNet / FCOS; the ROI heads'
  ``postprocess_detections`` over the unpadded proposals for R-CNNs; then ``transform.postprocess``).
- ``loss(x, targets)`` is torchvision's training forward ``model(list(x), targets)`` with the loss names
  mapped to ours (``cls``, ``loc`` and family terms, see each class).

Normalisation layers in ``loss`` (the BatchNorm choice)
-------------------------------------------------------
torchvision only computes losses when ``model.training`` is True. ``loss`` therefore switches every
submodule **except** normalisation / dropout layers to training mode for the call and restores all modes
afterwards. BatchNorm (and dropout) keep the mode of the wrapper: after ``detector.train()`` the loss is the
ordinary training loss (batch statistics, running stats updated); after ``detector.eval()`` (loss-based
attacks: A_cls, A_loc, CWA, MTD) BatchNorm uses its running statistics and nothing in the model changes,
so the loss is a deterministic function of ``x`` for the one-stage families. (R-CNN losses still sample
RPN anchors / ROI proposals at random, as torchvision does; seed torch for repeatable values.) Our tiny
backbones use plain ``nn.BatchNorm2d``; models loaded from COCO-pretrained files use
``FrozenBatchNorm2d`` where torchvision does (detected from the checkpoint), which has no mode.

Labels
------
Inside advdet labels are contiguous 0..K-1. torchvision's conventions:

- Faster / Mask R-CNN and SSD: softmax over ``num_classes`` columns, column 0 = background; a model trained
  by us has ``K + 1`` columns and torchvision label ``k + 1`` is our label ``k``.
- RetinaNet and FCOS: sigmoid over ``num_classes`` columns without background; a model trained by us has
  ``K`` columns and torchvision label ``k`` is our label ``k``.
- COCO-pretrained torchvision models (every family) have 91 columns whose index IS the COCO category id
  (``torchvision.models._meta._COCO_CATEGORIES``: 0 = ``__background__``, 10 ``N/A`` holes). Their
  adapters have K = 80: contiguous label ``k`` is torchvision index / COCO category id
  ``coco_category_ids[k]`` (:data:`COCO_CATEGORY_IDS`). ``dense`` logits keep the 80 real classes (softmax
  families: the background column is ``logsumexp`` of background and the ``N/A`` columns, so the softmax
  of the 81 columns equals torchvision's 91-column softmax on every real class); ``predict`` drops the
  (practically never produced) detections of ``N/A`` indices.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torchvision.models._meta import _COCO_CATEGORIES
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.keypoint_rcnn import KeypointRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import maskrcnn_inference
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.models.detection.ssd import SSD, SSDHead
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign

from .detector import Detector, DenseOutput, NMSConfig, check_finite
from .tiny_backbone import LEVEL_STRIDES, tiny_resnet_fpn
from .weights import CheckpointError, unsafe_pickle_error  # the project's one checkpoint error (message names the file)

log = logging.getLogger(__name__)

__all__ = [
    "COCO_CATEGORY_IDS", "COCO_CLASS_NAMES", "CheckpointError", "TorchvisionDetector", "RetinaNetDetector",
    "FCOSDetector", "SSDDetector", "FasterRCNNDetector", "MaskRCNNDetector", "retinanet_tiny", "fcos_tiny",
    "fasterrcnn_tiny", "maskrcnn_tiny", "ssd_tiny", "torchvision_detector", "wrap_torchvision",
    "load_state_dict_file", "TINY_BUILDERS", "TORCHVISION_BUILDERS",
]

#: the 80 COCO category ids, in contiguous-label order: contiguous label k <-> COCO id COCO_CATEGORY_IDS[k].
#: For torchvision's COCO-pretrained (91-column) models the torchvision label index IS the COCO category id.
COCO_CATEGORY_IDS: tuple[int, ...] = tuple(
    i for i, name in enumerate(_COCO_CATEGORIES) if name not in ("__background__", "N/A"))
#: the 80 COCO class names in contiguous-label order
COCO_CLASS_NAMES: tuple[str, ...] = tuple(_COCO_CATEGORIES[i] for i in COCO_CATEGORY_IDS)
COCO_NUM_TV_CLASSES = len(_COCO_CATEGORIES)  # 91

_NORM_OR_DROPOUT = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


# ----------------------------------------------------------------------------------------------------------
# mode helpers


@contextmanager
def _restore_modes(model: nn.Module) -> Iterator[None]:
    saved = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, t in saved:
            m.training = t


@contextmanager
def _loss_mode(model: nn.Module) -> Iterator[None]:
    """Training mode for everything except normalisation / dropout layers (they keep their mode)."""
    with _restore_modes(model):
        for m in model.modules():
            if not isinstance(m, _NORM_OR_DROPOUT):
                m.training = True
        yield


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    with _restore_modes(model):
        model.eval()
        yield


# ----------------------------------------------------------------------------------------------------------
# the adapters


class TorchvisionDetector(Detector):
    """Base adapter of a torchvision detection model (see the module docstring for the shared contract).

    Args:
        model: the torchvision model (``RetinaNet``, ``FCOS``, ``SSD``, ``FasterRCNN``, ``MaskRCNN``).
        input_size: S; inputs must be (B, 3, S, S). The model's transform is (re)configured for it.
        tv_label_of: (K,) torchvision label index of each contiguous label.
        tv_num_classes: number of class columns of the torchvision model (incl. background if any).
        coco_category_ids: dataset category id of each contiguous label (COCO layout), else None.
        class_names: optional names of the K classes.

    Attributes: ``family``, ``score_mode``, ``num_classes`` (K), ``input_size`` (S), ``model``,
    ``has_masks``, ``coco_category_ids`` (list of K ints or None), ``class_names``, ``tv_num_classes``,
    ``loss_names`` (torchvision loss name -> ours).
    """

    score_mode: str = "sigmoid"
    background: bool = False  # True when torchvision column 0 is background (softmax families)
    loss_names: dict[str, str] = {}

    def __init__(self, model: nn.Module, *, input_size: int, tv_label_of: Sequence[int], tv_num_classes: int,
                 coco_category_ids: Sequence[int] | None = None, class_names: Sequence[str] | None = None):
        super().__init__(model, len(tv_label_of), int(input_size))
        lab = torch.as_tensor(list(tv_label_of), dtype=torch.long)
        if lab.numel() == 0 or lab.min() < int(self.background) or lab.max() >= tv_num_classes:
            raise ValueError(f"bad label map for {tv_num_classes} torchvision classes: {lab.tolist()}")
        inv = torch.full((tv_num_classes,), -1, dtype=torch.long)
        inv[lab] = torch.arange(lab.numel())
        self.register_buffer("tv_label_of", lab, persistent=False)
        self.register_buffer("contig_of_tv", inv, persistent=False)
        self.tv_num_classes = int(tv_num_classes)
        # identity layout: our logit columns are torchvision's columns in the same order
        self._identity = tv_num_classes == lab.numel() + int(self.background) and bool(
            (lab == torch.arange(int(self.background), tv_num_classes)).all())
        if not self._identity:
            extra_cols = torch.ones(tv_num_classes, dtype=torch.bool)
            extra_cols[lab] = False  # background + unmapped (N/A) columns
            self.register_buffer("_bg_cols", extra_cols.nonzero().squeeze(1), persistent=False)
        self.coco_category_ids = list(coco_category_ids) if coco_category_ids is not None else None
        self.class_names = list(class_names) if class_names is not None else None
        configure_transform(model, self.input_size)

    # -- helpers -------------------------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        super().check_input(x)
        s = self.input_size
        if tuple(x.shape[-2:]) != (s, s):
            raise ValueError(f"{type(self).__name__} was built for {s}x{s} inputs (letterbox first), "
                             f"got {tuple(x.shape[-2:])}")
        if not x.is_floating_point():
            raise TypeError(f"{type(self).__name__} expects float images in [0, 1], got {x.dtype}")

    def _sizes(self, b: int) -> list[tuple[int, int]]:
        return [(self.input_size, self.input_size)] * b

    def _transform(self, x: torch.Tensor):
        self.check_input(x)
        images, _ = self.model.transform(list(x))
        return images

    def _ours_from_tv_logits(self, tv_logits: torch.Tensor) -> torch.Tensor:
        """torchvision class columns -> our columns (K, or K + 1 with background first)."""
        if self._identity:
            return tv_logits
        fg = tv_logits[..., self.tv_label_of]
        if not self.background:
            return fg
        bg = tv_logits[..., self._bg_cols].logsumexp(-1, keepdim=True)
        return torch.cat([bg, fg], -1)

    def _tv_logits(self, dense: DenseOutput) -> torch.Tensor:
        return dense.logits if self._identity else dense.extra["tv_logits"]

    def _to_contiguous(self, det: dict) -> dict:
        lab = self.contig_of_tv[det["labels"]]
        keep = lab >= 0
        out = {"boxes": det["boxes"][keep], "scores": det["scores"][keep], "labels": lab[keep]}
        if "masks" in det:
            m = det["masks"][keep]
            out["masks"] = m.squeeze(1) if m.ndim == 4 else m
        return out

    def _to_tv_target(self, t: dict, device: torch.device) -> dict:
        boxes = torch.as_tensor(t["boxes"], dtype=torch.float32, device=device).reshape(-1, 4)
        labels = torch.as_tensor(t["labels"], dtype=torch.long, device=device).reshape(-1)
        if labels.numel() != boxes.shape[0]:
            raise ValueError(f"target has {boxes.shape[0]} boxes but {labels.numel()} labels")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"target labels must be contiguous in 0..{self.num_classes - 1}, "
                             f"got {sorted(set(labels.tolist()))}")
        out = {"boxes": boxes, "labels": self.tv_label_of[labels]}
        if self.has_masks:
            if "masks" not in t:
                raise ValueError(f"{type(self).__name__}.loss needs target 'masks' (N, S, S)")
            masks = torch.as_tensor(t["masks"], device=device)
            if masks.is_floating_point():
                masks = masks > 0.5
            out["masks"] = masks.to(torch.uint8).reshape(-1, self.input_size, self.input_size)
        return out

    # -- the contract --------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> list[dict]:
        """The torchvision model's own eval forward; per image ``boxes`` (M, 4), ``scores`` (M,), ``labels``
        (M,) contiguous (and ``masks`` (M, S, S) probabilities for Mask R-CNN)."""
        self.check_input(x)
        with _eval_mode(self.model):
            out = self.model(list(x))
        dets = [self._to_contiguous(d) for d in out]
        for d in dets:
            check_finite(type(self).__name__, boxes=d["boxes"], scores=d["scores"])
        return dets

    def loss(self, x: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        """torchvision's training losses, renamed by ``loss_names`` (always ``cls`` and ``loc``)."""
        self.check_input(x)
        if len(targets) != x.shape[0]:
            raise ValueError(f"got {x.shape[0]} images but {len(targets)} targets")
        tv_targets = [self._to_tv_target(t, x.device) for t in targets]
        with _loss_mode(self.model):
            raw = self.model(list(x), tv_targets)
        return {self.loss_names.get(k, k): v for k, v in raw.items()}

    def postprocess(self, dense: DenseOutput, x: torch.Tensor | None = None) -> list[dict]:  # pragma: no cover
        """Reproduce ``predict(x)`` from ``dense(x)`` with the family's own post-processing code (``x`` is only
        used by Mask R-CNN, whose mask branch needs the features)."""
        raise NotImplementedError

    def nms_config(self) -> NMSConfig:
        """The model's current post-processing settings as an :class:`NMSConfig`."""
        m = self.model
        return NMSConfig(score_thresh=m.score_thresh, nms_thresh=m.nms_thresh, pre_nms_topk=m.topk_candidates,
                         max_detections=m.detections_per_img)

    def set_nms(self, cfg: NMSConfig) -> None:
        """Set the model's post-processing (used by ``predict`` and ``postprocess``)."""
        m = self.model
        m.score_thresh, m.nms_thresh = cfg.score_thresh, cfg.nms_thresh
        m.topk_candidates, m.detections_per_img = cfg.pre_nms_topk, cfg.max_detections

    def feature_layers(self) -> dict[str, nn.Module]:
        """The backbone body's output stages, the maps the neck (FPN) or the heads read, as mmdetection's
        backbones return them:

        - ResNet / MobileNet bodies (``BackboneWithFPN``: every family's tiny zoo model, the ResNet-50 and
          MobileNetV3 builders): the layers the body's ``IntermediateLayerGetter`` returns, e.g.
          ``model.backbone.body.layer1`` .. ``layer4`` (Faster / Mask R-CNN, P2-P6) or ``layer2`` ..
          ``layer4`` (RetinaNet, FCOS, SSD on the tiny P3-P7 backbone);
        - SSD300-VGG16: ``model.backbone.features`` (ReLU of conv4_3, before the L2 scale) and
          ``model.backbone.extra.0`` (ReLU of conv7 / fc7);
        - SSDlite: ``model.backbone.features.0`` and ``model.backbone.features.1`` (its two MobileNetV3
          stages before the extra blocks).

        Other backbones raise :class:`FeatureLayerError`."""
        from torchvision.models._utils import IntermediateLayerGetter
        from torchvision.models.detection.ssd import SSDFeatureExtractorVGG
        from torchvision.models.detection.ssdlite import SSDLiteFeatureExtractorMobileNet

        bb = self.model.backbone
        body = getattr(bb, "body", None)
        if isinstance(body, IntermediateLayerGetter):
            return {f"model.backbone.body.{n}": body[n] for n in body.return_layers}
        if isinstance(bb, SSDFeatureExtractorVGG):
            return {"model.backbone.features": bb.features, "model.backbone.extra.0": bb.extra[0]}
        if isinstance(bb, SSDLiteFeatureExtractorMobileNet):
            return {"model.backbone.features.0": bb.features[0], "model.backbone.features.1": bb.features[1]}
        return super().feature_layers()

    def load_weights(self, path: str | os.PathLike, *, strict: bool = True) -> None:
        """Load a local state dict (torch.load weights_only / safetensors) into ``self.model``.

        Accepts the bare model state dict, one saved from this wrapper (``model.`` prefix), a DDP one
        (``module.`` prefix) or a torchvision-reference checkpoint (``{"model": state_dict, ...}``). Raises
        :class:`CheckpointError` naming the file and the first missing / unexpected keys and shape mismatches.
        """
        load_state_dict_file(self.model, path, strict=strict)


class _OneStage(TorchvisionDetector):
    def _features(self, x: torch.Tensor):
        images = self._transform(x)
        feats = self.model.backbone(images.tensors)
        if isinstance(feats, torch.Tensor):
            feats = OrderedDict([("0", feats)])
        return images, list(feats.values())

    @staticmethod
    def _num_per_level(feats: list[torch.Tensor], total: int) -> list[int]:
        hw = [f.shape[-2] * f.shape[-1] for f in feats]
        a = total // sum(hw)
        return [n * a for n in hw]

    def _anchor_head_dense(self, x: torch.Tensor, num_per_level) -> DenseOutput:
        """Dense output of an anchor-based head (RetinaNet, SSD): decode the deltas on the anchors.

        ``num_per_level(feats, n)`` gives the candidates per feature level (for per-level post-processing).
        """
        m = self.model
        images, feats = self._features(x)
        ho = m.head(feats)
        anchors = torch.stack(m.anchor_generator(images, feats))
        tv_logits, reg = ho["cls_logits"], ho["bbox_regression"]
        b, n = tv_logits.shape[:2]
        boxes = m.box_coder.decode_single(reg.reshape(-1, 4), anchors.reshape(-1, 4)).reshape(b, n, 4)
        logits = self._ours_from_tv_logits(tv_logits)
        check_finite(type(self).__name__, logits=logits, boxes=boxes)
        extra = {"num_per_level": num_per_level(feats, n), "bbox_regression": reg}
        if not self._identity:
            extra["tv_logits"] = tv_logits
        return DenseOutput(logits=logits, boxes=boxes, anchors=anchors, score_mode=self.score_mode, extra=extra)

    def _finish(self, dets: list[dict], b: int) -> list[dict]:
        sizes = self._sizes(b)
        dets = self.model.transform.postprocess(dets, sizes, sizes)
        return [self._to_contiguous(d) for d in dets]


class RetinaNetDetector(_OneStage):
    """torchvision ``RetinaNet`` behind the Detector contract.

    Input: x float (B, 3, S, S) in [0, 1]. Outputs:

    - ``dense(x)``: ``score_mode="sigmoid"``; ``logits`` (B, N, K) with N = sum over levels of H*W*A;
      ``boxes`` (B, N, 4) decoded (unclipped) xyxy; ``anchors`` (B, N, 4); ``objectness`` None;
      ``extra``: ``num_per_level`` (list of ints), ``bbox_regression`` (B, N, 4) raw deltas,
      ``tv_logits`` (B, N, 91) for COCO-layout models.
    - ``predict(x)`` / ``postprocess(dense)``: torchvision's per-level top-k, class-wise NMS.
    - ``loss``: ``cls`` (focal loss, torchvision ``classification``), ``loc`` (L1, ``bbox_regression``).
    """

    family = "retinanet"
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


class FCOSDetector(_OneStage):
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


class SSDDetector(_OneStage):
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
    """

    family = "faster_rcnn"
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
        extra = {"class_boxes": class_boxes, "box_regression": pad(box_regression), "num_proposals": counts,
                 "proposal_scores": pad_sequence(prop_scores, batch_first=True), "rpn_objectness": rpn_obj}
        if not self._identity:
            extra["tv_logits"] = tv_logits
        return DenseOutput(logits=logits, boxes=boxes, anchors=anchors, score_mode="softmax_bg", valid=valid,
                           extra=extra)

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


# ----------------------------------------------------------------------------------------------------------
# transform configuration and checkpoints


def configure_transform(model: nn.Module, input_size: int) -> None:
    """Make the model's transform pass (S, S) inputs through unresized: min_size = max_size = S
    (SSD: also fixed_size = (S, S)). For SSD300 at S != 300 the anchor ``steps`` (tuned for 300) are
    dropped so that default-box centres follow the actual feature grids."""
    t = model.transform
    t.min_size = (int(input_size),)
    t.max_size = int(input_size)
    if isinstance(model, SSD):
        t.fixed_size = (int(input_size), int(input_size))
        ag = model.anchor_generator
        if ag.steps is not None and input_size != 300:
            log.info("SSD at %d px: default-box steps %s (tuned for 300 px) replaced by the feature grids",
                     input_size, ag.steps)
            ag.steps = None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise unsafe_pickle_error(path) from None
    except Exception as e:  # noqa: BLE001 - any reader failure is reported with the file name
        raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from e
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict (expected a mapping of parameter names to tensors)")
    return dict(obj)


def _strip_prefix(sd: dict, expected: set[str]) -> dict:
    for prefix in ("module.", "model."):
        if sd and all(k.startswith(prefix) for k in sd) and not any(k.startswith(prefix) for k in expected):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _bn_saved_frozen(model: nn.Module, sd: dict) -> list[str]:
    """Names of the BatchNorm2d layers whose checkpoint entry has no ``num_batches_tracked``: they were saved
    from torchvision ``FrozenBatchNorm2d`` layers (torchvision's pretrained detectors)."""
    return [name for name, m in model.named_modules()
            if type(m) is nn.BatchNorm2d and f"{name}.running_mean" in sd and f"{name}.num_batches_tracked" not in sd]


def _freeze_bn(model: nn.Module, names: list[str], eps: float | None) -> None:
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        bn = getattr(parent, child_name)
        frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps if eps is None else eps).to(bn.running_mean.device)
        setattr(parent, child_name, frozen)


def load_state_dict_file(model: nn.Module, path: str | os.PathLike, *, strict: bool = True,
                         frozen_bn_eps: float | None = None) -> None:
    """Load a local weights file into ``model`` with a clear error on mismatch.

    The file is read with ``torch.load(..., weights_only=True)`` (or safetensors for ``.safetensors``); a
    torchvision-reference checkpoint ``{"model": state_dict, ...}`` and ``module.`` / ``model.`` key prefixes
    are accepted. BatchNorm layers saved as torchvision ``FrozenBatchNorm2d`` (no ``num_batches_tracked``,
    as in torchvision's COCO files) become ``FrozenBatchNorm2d`` (eps ``frozen_bn_eps`` or the layer's own).
    torchvision's v1 RetinaNet head keys are upgraded as torchvision does. Raises :class:`CheckpointError`
    naming the file and the first missing / unexpected keys and shape mismatches (another architecture or
    class count); the model is left untouched then.
    """
    path = Path(path)
    expected = model.state_dict()
    sd = _strip_prefix(_read_state_dict(path), set(expected))
    if isinstance(model, RetinaNet):
        from torchvision.models.detection.retinanet import _v1_to_v2_weights

        for prefix in ("head.classification_head.", "head.regression_head."):
            if f"{prefix}conv.0.0.weight" in expected and f"{prefix}conv.0.weight" in sd:
                _v1_to_v2_weights(sd, prefix)
    frozen = _bn_saved_frozen(model, sd)
    dropped = {f"{n}.num_batches_tracked" for n in frozen}
    missing = [k for k in expected if k not in sd and k not in dropped]
    unexpected = [k for k in sd if k not in expected]
    shapes = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in expected.items()
              if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    problems = []
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es), first: " + "; ".join(
            f"{k}: file {s} vs model {e}" for k, s, e in shapes[:5]))
    if strict and missing:
        problems.append(f"{len(missing)} missing key(s), first: {missing[:5]}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), first: {unexpected[:5]}")
    if problems:
        hint = (" (a checkpoint for another architecture, or for another number of classes: K+1 columns for "
                "softmax families, K for RetinaNet/FCOS, 91 for torchvision's COCO models)")
        raise CheckpointError(f"{path}: does not fit {type(model).__name__}: " + " | ".join(problems) + hint)
    _freeze_bn(model, frozen, frozen_bn_eps)
    model.load_state_dict(sd, strict=strict)


# ----------------------------------------------------------------------------------------------------------
# builders

_FAMILY_CLASSES: list[tuple[type, type[TorchvisionDetector]]] = [
    (MaskRCNN, MaskRCNNDetector), (FasterRCNN, FasterRCNNDetector), (RetinaNet, RetinaNetDetector),
    (FCOS, FCOSDetector), (SSD, SSDDetector)]


def _tv_num_classes(model: nn.Module) -> int:
    if isinstance(model, FasterRCNN):
        return model.roi_heads.box_predictor.cls_score.out_features
    if isinstance(model, (RetinaNet, FCOS)):
        return model.head.classification_head.num_classes
    if isinstance(model, SSD):
        return model.head.classification_head.num_columns
    raise TypeError(f"unsupported model {type(model).__name__}")


def wrap_torchvision(model: nn.Module, *, input_size: int, num_classes: int | None = None,
                     class_names: Sequence[str] | None = None) -> TorchvisionDetector:
    """Wrap an existing torchvision detection model (RetinaNet, FCOS, SSD, FasterRCNN, MaskRCNN).

    Args:
        model: the torchvision model instance.
        input_size: S (inputs (B, 3, S, S)); the model's transform is configured for it (in place).
        num_classes: K contiguous foreground classes. None: inferred; a model with 91 class columns is
            taken to be in torchvision's COCO layout (K = 80, ``coco_category_ids`` set).
    Returns:
        the family's adapter (``RetinaNetDetector``, ``FCOSDetector``, ``SSDDetector``,
        ``FasterRCNNDetector`` or ``MaskRCNNDetector``).
    """
    if isinstance(model, KeypointRCNN):
        raise TypeError("KeypointRCNN is not supported (no keypoint targets in advdet)")
    cls = next((c for t, c in _FAMILY_CLASSES if isinstance(model, t)), None)
    if cls is None:
        raise TypeError(f"unsupported detection model {type(model).__name__}; expected one of "
                        f"{[t.__name__ for t, _ in _FAMILY_CLASSES]}")
    tv_nc = _tv_num_classes(model)
    off = int(cls.background)
    coco = tv_nc == COCO_NUM_TV_CLASSES and num_classes in (None, len(COCO_CATEGORY_IDS))
    if coco:
        return cls(model, input_size=input_size, tv_label_of=COCO_CATEGORY_IDS, tv_num_classes=tv_nc,
                   coco_category_ids=COCO_CATEGORY_IDS, class_names=COCO_CLASS_NAMES)
    k = tv_nc - off
    if num_classes is not None and num_classes != k:
        raise ValueError(f"{type(model).__name__} has {tv_nc} class columns, i.e. K = {k} contiguous classes, "
                         f"not num_classes={num_classes}")
    return cls(model, input_size=input_size, tv_label_of=range(off, tv_nc), tv_num_classes=tv_nc,
               class_names=class_names)


def _scaled(sizes: Sequence[float], input_size: int) -> list[float]:
    return [round(s * input_size / 256.0, 2) for s in sizes]


#: anchor base sizes for 256-px inputs with objects of ~10-180 px (scaled linearly with input_size)
TINY_ANCHOR_BASE = (12.0, 24.0, 48.0, 96.0, 192.0)


def _check_k(num_classes: int) -> int:
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int (foreground classes), got {num_classes!r}")
    return num_classes


def retinanet_tiny(*, num_classes: int, input_size: int = 256, fpn_channels: int = 64, group_norm_head: bool = False,
                   **kwargs) -> RetinaNetDetector:
    """RetinaNet on the tiny ResNet-FPN (P3-P7, plain BatchNorm), random init.

    Args (keyword-only): ``num_classes`` K; ``input_size`` S; ``fpn_channels`` (a multiple of 32 with the
    GroupNorm head); ``group_norm_head``: GroupNorm(32) after each head conv, as torchvision's RetinaNet v2
    (``retinanet_resnet50_fpn_v2``); off in the zoo entry: with the zoo recipe it reached shapes-val mAP50
    0.516, the v1 head 0.529 (FCOS, same backbone and recipe: 0.865); ``**kwargs`` go to
    ``torchvision.models.detection.RetinaNet`` (e.g. ``score_thresh``, ``nms_thresh``,
    ``detections_per_img`` (default 100 here), ``topk_candidates``).
    Anchors: 3 scales (x, x*2^(1/3), x*2^(2/3)) x 3 ratios per level, x = 12, 24, 48, 96, 192 px at S=256.
    Returns: :class:`RetinaNetDetector`: ``dense`` logits (B, N, K) sigmoid; labels 0..K-1.
    """
    from functools import partial

    from torchvision.models.detection.retinanet import RetinaNetHead

    k = _check_k(num_classes)
    base = _scaled(TINY_ANCHOR_BASE, input_size)
    sizes = tuple((s, s * 2 ** (1 / 3), s * 2 ** (2 / 3)) for s in base)
    ag = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    kwargs = {"detections_per_img": 100, **kwargs}
    norm = partial(nn.GroupNorm, 32) if group_norm_head else None
    head = RetinaNetHead(fpn_channels, ag.num_anchors_per_location()[0], k, norm_layer=norm)
    model = RetinaNet(tiny_resnet_fpn(levels="p3p7", fpn_channels=fpn_channels), k, min_size=input_size,
                      max_size=input_size, anchor_generator=ag, head=head, **kwargs)
    return RetinaNetDetector(model, input_size=input_size, tv_label_of=range(k), tv_num_classes=k)


def fcos_tiny(*, num_classes: int, input_size: int = 256, fpn_channels: int = 64, num_convs: int = 4,
              **kwargs) -> FCOSDetector:
    """FCOS on the tiny ResNet-FPN (P3-P7, strides 8..128), GroupNorm head, random init.

    Args (keyword-only): ``num_classes`` K; ``input_size`` S; ``fpn_channels`` (multiple of 32: the head
    uses GroupNorm(32)); ``num_convs`` per head tower; ``**kwargs`` go to ``FCOS`` (``score_thresh``,
    ``nms_thresh``, ``detections_per_img``, ``topk_candidates``, ``center_sampling_radius``).
    Returns: :class:`FCOSDetector`: ``dense`` logits (B, N, K) sigmoid + centerness objectness.
    """
    from torchvision.models.detection.fcos import FCOSHead

    k = _check_k(num_classes)
    strides = LEVEL_STRIDES["p3p7"]
    ag = AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides))
    backbone = tiny_resnet_fpn(levels="p3p7", fpn_channels=fpn_channels)
    head = FCOSHead(fpn_channels, 1, k, num_convs=num_convs)
    model = FCOS(backbone, k, min_size=input_size, max_size=input_size, anchor_generator=ag, head=head, **kwargs)
    return FCOSDetector(model, input_size=input_size, tv_label_of=range(k), tv_num_classes=k)


_TINY_RCNN_DEFAULTS = dict(rpn_pre_nms_top_n_train=1000, rpn_pre_nms_top_n_test=500, rpn_post_nms_top_n_train=500,
                           rpn_post_nms_top_n_test=300, rpn_batch_size_per_image=128, box_batch_size_per_image=128,
                           box_detections_per_img=100)


def _tiny_rcnn_parts(input_size: int, fpn_channels: int, num_classes: int, representation: int):
    backbone = tiny_resnet_fpn(levels="p2p6", fpn_channels=fpn_channels)
    sizes = tuple((s,) for s in _scaled(TINY_ANCHOR_BASE, input_size))
    ag = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    box_head = TwoMLPHead(fpn_channels * 7 * 7, representation)
    box_predictor = FastRCNNPredictor(representation, num_classes + 1)
    return backbone, ag, box_head, box_predictor


def fasterrcnn_tiny(*, num_classes: int, input_size: int = 256, fpn_channels: int = 64,
                    representation_size: int = 256, **kwargs) -> FasterRCNNDetector:
    """Faster R-CNN on the tiny ResNet-FPN (P2-P6), random init.

    Args (keyword-only): ``num_classes`` K (the box predictor has K + 1 columns); ``input_size`` S;
    ``fpn_channels``; ``representation_size`` of the two-MLP box head; ``**kwargs`` go to ``FasterRCNN``
    (``box_score_thresh``, ``box_nms_thresh``, ``rpn_*`` ...). Defaults here: RPN pre-NMS top-n 1000 / 500
    (train / test), post-NMS 500 / 300, 128 sampled anchors and ROIs per image, 100 detections per image.
    RPN anchors: one size per level (12, 24, 48, 96, 192 px at S=256) x ratios (0.5, 1, 2).
    Returns: :class:`FasterRCNNDetector`: ``dense`` logits (B, N, K + 1) softmax_bg over proposals.
    """
    k = _check_k(num_classes)
    backbone, ag, box_head, box_predictor = _tiny_rcnn_parts(input_size, fpn_channels, k, representation_size)
    kwargs = {**_TINY_RCNN_DEFAULTS, **kwargs}
    model = FasterRCNN(backbone, None, min_size=input_size, max_size=input_size, rpn_anchor_generator=ag,
                       box_head=box_head, box_predictor=box_predictor, **kwargs)
    return FasterRCNNDetector(model, input_size=input_size, tv_label_of=range(1, k + 1), tv_num_classes=k + 1)


def maskrcnn_tiny(*, num_classes: int, input_size: int = 256, fpn_channels: int = 64,
                  representation_size: int = 256, mask_layers: tuple[int, ...] = (64, 64),
                  **kwargs) -> MaskRCNNDetector:
    """Mask R-CNN on the tiny ResNet-FPN (P2-P6), random init: :func:`fasterrcnn_tiny` plus a mask head
    (14x14 ROIAlign, ``mask_layers`` 3x3 convs, 28x28 per-class mask logits).

    Returns: :class:`MaskRCNNDetector`: as Faster R-CNN; ``predict`` adds ``masks`` (M, S, S) in [0, 1].
    """
    k = _check_k(num_classes)
    backbone, ag, box_head, box_predictor = _tiny_rcnn_parts(input_size, fpn_channels, k, representation_size)
    mask_head = MaskRCNNHeads(fpn_channels, list(mask_layers), 1)
    mask_predictor = MaskRCNNPredictor(mask_layers[-1], mask_layers[-1], k + 1)
    kwargs = {**_TINY_RCNN_DEFAULTS, **kwargs}
    model = MaskRCNN(backbone, None, min_size=input_size, max_size=input_size, rpn_anchor_generator=ag,
                     box_head=box_head, box_predictor=box_predictor,
                     mask_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], 14, 2), mask_head=mask_head,
                     mask_predictor=mask_predictor, **kwargs)
    return MaskRCNNDetector(model, input_size=input_size, tv_label_of=range(1, k + 1), tv_num_classes=k + 1)


def ssd_tiny(*, num_classes: int, input_size: int = 256, fpn_channels: int = 64, **kwargs) -> SSDDetector:
    """torchvision ``SSD`` (SSD head, matcher, hard-negative-mining loss) on the tiny ResNet-FPN (P3-P7).

    A fast stand-in for SSD300-VGG16 with the same adapter code path (tests, smoke runs). Default boxes:
    scales 0.05, 0.1, 0.2, 0.4, 0.7 (and 1.0) of S, ratios [2] / [2, 3]. ``**kwargs`` go to ``SSD``
    (``score_thresh``, ``nms_thresh``, ``detections_per_img``, ``topk_candidates``).
    Returns: :class:`SSDDetector`: ``dense`` logits (B, N, K + 1) softmax_bg.
    """
    k = _check_k(num_classes)
    ratios = [[2], [2, 3], [2, 3], [2], [2]]
    ag = DefaultBoxGenerator(ratios, scales=[0.05, 0.1, 0.2, 0.4, 0.7, 1.0])
    head = SSDHead([fpn_channels] * len(ratios), ag.num_anchors_per_location(), k + 1)
    kwargs = {"detections_per_img": 100, **kwargs}
    model = SSD(tiny_resnet_fpn(levels="p3p7", fpn_channels=fpn_channels), ag, (input_size, input_size), k + 1,
                head=head, **kwargs)
    return SSDDetector(model, input_size=input_size, tv_label_of=range(1, k + 1), tv_num_classes=k + 1)


#: our tiny builders, by name
TINY_BUILDERS: dict[str, Callable[..., TorchvisionDetector]] = {
    "retinanet_tiny": retinanet_tiny, "fcos_tiny": fcos_tiny, "fasterrcnn_tiny": fasterrcnn_tiny,
    "maskrcnn_tiny": maskrcnn_tiny, "ssd_tiny": ssd_tiny}

#: torchvision detection builders this module wraps (all but keypoint R-CNN)
TORCHVISION_BUILDERS: tuple[str, ...] = (
    "fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn", "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2",
    "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn", "ssd300_vgg16",
    "ssdlite320_mobilenet_v3_large")

#: FrozenBatchNorm eps torchvision uses with its COCO_V1 weights (``overwrite_eps(model, 0.0)``)
_COCO_V1_FROZEN_EPS = {"fasterrcnn_resnet50_fpn": 0.0, "maskrcnn_resnet50_fpn": 0.0, "retinanet_resnet50_fpn": 0.0}


#: the square input size a torchvision builder is made for (used when ``input_size`` is not given)
NATIVE_INPUT_SIZE = {"ssd300_vgg16": 300, "ssdlite320_mobilenet_v3_large": 320,
                     "fasterrcnn_mobilenet_v3_large_320_fpn": 320}


def torchvision_detector(builder_name: str, *, num_classes: int | None = None, input_size: int | None = None,
                         weights_path: str | os.PathLike | None = None, frozen_bn_eps: float | None = None,
                         **kwargs) -> TorchvisionDetector:
    """Build a torchvision detector by builder name (no download) and wrap it.

    Args:
        builder_name: one of :data:`TORCHVISION_BUILDERS` (built with ``weights=None,
            weights_backbone=None``) or of :data:`TINY_BUILDERS`.
        num_classes: K contiguous foreground classes. None (torchvision builders only): torchvision's COCO
            layout, 91 class columns indexed by COCO category id, K = 80 and ``coco_category_ids`` set;
            this is what torchvision's COCO-pretrained files need. An int K builds K + 1 columns for the
            softmax families (R-CNN, SSD) and K for RetinaNet / FCOS.
        input_size: S; inputs are (B, 3, S, S). Default: the builder's own size (300 for SSD300, 320 for
            SSDlite320 and the 320 Faster R-CNN, 800 (torchvision's ``min_size``) for the others; tiny
            builders: 256). SSD300-VGG16 needs S >= 268.
        weights_path: optional local state dict (``torch.load(weights_only=True)`` or ``.safetensors``),
            e.g. torchvision's ``fasterrcnn_resnet50_fpn_coco-258fb6c6.pth`` from torch's cache. A file for
            another architecture or class count raises :class:`CheckpointError` naming the file and keys.
        frozen_bn_eps: eps of the FrozenBatchNorm layers a pretrained file implies; default: 0.0 for the
            v1 ResNet-50 Faster/Mask R-CNN and RetinaNet (as torchvision does for its COCO_V1 weights),
            else the layer's own eps.
        **kwargs: passed to the builder (e.g. ``box_score_thresh``, ``score_thresh``, ``nms_thresh``).
    Returns:
        the family's :class:`TorchvisionDetector`.
    """
    if builder_name in TINY_BUILDERS:
        if num_classes is None:
            raise ValueError(f"{builder_name} needs num_classes")
        det = TINY_BUILDERS[builder_name](num_classes=num_classes, input_size=input_size or 256, **kwargs)
        if weights_path is not None:
            det.load_weights(weights_path)
        return det
    if builder_name not in TORCHVISION_BUILDERS:
        if builder_name.startswith("keypointrcnn"):
            raise ValueError("keypoint R-CNN is not supported (no keypoint targets in advdet)")
        raise ValueError(f"unknown detector builder {builder_name!r}; choose one of "
                         f"{sorted(TORCHVISION_BUILDERS) + sorted(TINY_BUILDERS)}")
    for bad in ("weights", "weights_backbone", "pretrained", "pretrained_backbone"):
        if kwargs.get(bad):
            raise ValueError(f"{bad}= would download weights; pass a local file as weights_path instead")
        kwargs.pop(bad, None)
    if input_size is None:
        input_size = NATIVE_INPUT_SIZE.get(builder_name, 800)
    sigmoid = builder_name.startswith(("retinanet", "fcos"))
    if num_classes is None:
        tv_nc = COCO_NUM_TV_CLASSES
    else:
        tv_nc = _check_k(num_classes) + (0 if sigmoid else 1)
    builder = torchvision.models.get_model_builder(builder_name)
    if not builder_name.startswith("ssd"):
        kwargs = {"min_size": input_size, "max_size": input_size, **kwargs}
    model = builder(weights=None, weights_backbone=None, num_classes=tv_nc, **kwargs)
    if isinstance(model, SSD):
        _probe_ssd(model, builder_name, input_size)
    if weights_path is not None:
        eps = frozen_bn_eps if frozen_bn_eps is not None else _COCO_V1_FROZEN_EPS.get(builder_name)
        load_state_dict_file(model, weights_path, frozen_bn_eps=eps)
    return wrap_torchvision(model, input_size=input_size, num_classes=num_classes)


def _probe_ssd(model: SSD, name: str, s: int) -> None:
    """SSD backbones have fixed-depth extra layers: fail early with a clear message when S is too small."""
    try:
        with torch.no_grad(), _eval_mode(model):
            model.backbone(torch.zeros(1, 3, s, s))
    except RuntimeError as e:
        raise ValueError(f"{name} cannot run at input_size={s} (its extra layers run out of pixels; "
                         f"ssd300_vgg16 needs >= 268): {str(e).splitlines()[0]}") from e
