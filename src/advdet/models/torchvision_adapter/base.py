"""The adapter every torchvision family shares: :class:`TorchvisionDetector` (input checks, label mapping,
``predict`` / ``loss`` through the model's own forward, NMS settings, feature layers, weights), the
one-stage helpers (:class:`OneStageDetector`) and the model's transform configuration.

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
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torchvision.models.detection.ssd import SSD

from advdet.models.detector import Detector, DenseOutput, NMSConfig, check_finite
from advdet.models.torchvision_adapter.checkpoint import load_state_dict_file

log = logging.getLogger(__name__)

_NORM_OR_DROPOUT = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


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


def check_degenerate(tv_targets: list[dict]) -> None:
    """torchvision's training-forward check of the (transformed) target boxes, with its message; used by
    the batched per-image losses, which call the model's parts instead of its forward (one image each,
    so the index is 0 as in a forward on that image alone)."""
    for t in tv_targets:
        bad = (t["boxes"][:, 2:] <= t["boxes"][:, :2]).any(1)
        if bad.any():
            torch._assert(False, "All bounding boxes should have positive height and width. Found invalid box "
                                 f"{t['boxes'][bad][0].tolist()} for target at index 0.")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    with _restore_modes(model):
        model.eval()
        yield


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
        with eval_mode(self.model):
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


class OneStageDetector(TorchvisionDetector):
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
        return DenseOutput(logits=logits, boxes=boxes, anchors=anchors, score_mode=self.score_mode,
                           box_deltas=reg, extra=extra)

    def _finish(self, dets: list[dict], b: int) -> list[dict]:
        sizes = self._sizes(b)
        dets = self.model.transform.postprocess(dets, sizes, sizes)
        return [self._to_contiguous(d) for d in dets]
