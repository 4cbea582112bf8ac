"""Builder by name: one spec table (:data:`BUILDERS`) of every detector builder this package knows (torchvision's
own, built without downloads, and our tiny ones), :func:`torchvision_detector` to build one (registered in the
hub as ``torchvision:BUILDER``, :func:`torchvision_model`), and :func:`wrap_torchvision` to put any torchvision
detection model behind the Detector contract."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.keypoint_rcnn import KeypointRCNN
from torchvision.models.detection.ssd import SSD

from advdet.models.hub import ModelInfo, register_model
from advdet.models.torchvision_adapter.base import TorchvisionDetector, eval_mode
from advdet.models.torchvision_adapter.checkpoint import load_state_dict_file
from advdet.models.torchvision_adapter.fcos import FCOSDetector
from advdet.models.torchvision_adapter.labels import (COCO_CATEGORY_IDS, COCO_CLASS_NAMES, COCO_NUM_TV_CLASSES,
                                                      tv_num_classes)
from advdet.models.torchvision_adapter.rcnn import FasterRCNNDetector, MaskRCNNDetector
from advdet.models.torchvision_adapter.retinanet import RetinaNetDetector
from advdet.models.torchvision_adapter.ssd import SSDDetector
from advdet.models.torchvision_adapter.tiny import (check_k, fasterrcnn_tiny, fcos_tiny, maskrcnn_tiny,
                                                    retinanet_tiny, ssd_tiny)

_FAMILY_CLASSES: list[tuple[type, type[TorchvisionDetector]]] = [
    (MaskRCNN, MaskRCNNDetector), (FasterRCNN, FasterRCNNDetector), (RetinaNet, RetinaNetDetector),
    (FCOS, FCOSDetector), (SSD, SSDDetector)]


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
    tv_nc = tv_num_classes(model)
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


@dataclass(frozen=True)
class BuilderSpec:
    """One detector builder by name: the family adapter it makes, our own builder (``tiny``; None: torchvision's
    builder of that name, built without downloads), the square input size it is made for (used when
    ``input_size`` is not given), and the FrozenBatchNorm eps torchvision uses with its COCO_V1 weights
    (``overwrite_eps(model, 0.0)``; None: the layer's own)."""

    name: str
    adapter: type[TorchvisionDetector]
    tiny: Callable[..., TorchvisionDetector] | None = None
    input_size: int = 800
    coco_v1_frozen_bn_eps: float | None = None

    @property
    def sigmoid(self) -> bool:
        """Sigmoid class columns without background (RetinaNet, FCOS), else softmax with background."""
        return not self.adapter.background


#: every builder by name: torchvision's detection builders (all but keypoint R-CNN), then our tiny ones
BUILDERS: dict[str, BuilderSpec] = {spec.name: spec for spec in (
    BuilderSpec("fasterrcnn_resnet50_fpn", FasterRCNNDetector, coco_v1_frozen_bn_eps=0.0),
    BuilderSpec("fasterrcnn_resnet50_fpn_v2", FasterRCNNDetector),
    BuilderSpec("fasterrcnn_mobilenet_v3_large_fpn", FasterRCNNDetector),
    BuilderSpec("fasterrcnn_mobilenet_v3_large_320_fpn", FasterRCNNDetector, input_size=320),
    BuilderSpec("maskrcnn_resnet50_fpn", MaskRCNNDetector, coco_v1_frozen_bn_eps=0.0),
    BuilderSpec("maskrcnn_resnet50_fpn_v2", MaskRCNNDetector),
    BuilderSpec("retinanet_resnet50_fpn", RetinaNetDetector, coco_v1_frozen_bn_eps=0.0),
    BuilderSpec("retinanet_resnet50_fpn_v2", RetinaNetDetector),
    BuilderSpec("fcos_resnet50_fpn", FCOSDetector),
    BuilderSpec("ssd300_vgg16", SSDDetector, input_size=300),
    BuilderSpec("ssdlite320_mobilenet_v3_large", SSDDetector, input_size=320),
    BuilderSpec("retinanet_tiny", RetinaNetDetector, retinanet_tiny, input_size=256),
    BuilderSpec("fcos_tiny", FCOSDetector, fcos_tiny, input_size=256),
    BuilderSpec("fasterrcnn_tiny", FasterRCNNDetector, fasterrcnn_tiny, input_size=256),
    BuilderSpec("maskrcnn_tiny", MaskRCNNDetector, maskrcnn_tiny, input_size=256),
    BuilderSpec("ssd_tiny", SSDDetector, ssd_tiny, input_size=256),
)}

#: our tiny builders, by name (a view of :data:`BUILDERS`)
TINY_BUILDERS: dict[str, Callable[..., TorchvisionDetector]] = {
    n: s.tiny for n, s in BUILDERS.items() if s.tiny is not None}

#: torchvision detection builders this module wraps (a view of :data:`BUILDERS`)
TORCHVISION_BUILDERS: tuple[str, ...] = tuple(n for n, s in BUILDERS.items() if s.tiny is None)


def torchvision_detector(builder_name: str, *, num_classes: int | None = None, input_size: int | None = None,
                         weights_path: str | os.PathLike | None = None, frozen_bn_eps: float | None = None,
                         **kwargs) -> TorchvisionDetector:
    """Build a torchvision detector by builder name (no download) and wrap it.

    Args:
        builder_name: a name of :data:`BUILDERS`: torchvision's (built with ``weights=None,
            weights_backbone=None``) or our tiny ones.
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
    spec = BUILDERS.get(builder_name)
    if spec is not None and spec.tiny is not None:
        if num_classes is None:
            raise ValueError(f"{builder_name} needs num_classes")
        det = spec.tiny(num_classes=num_classes, input_size=input_size or spec.input_size, **kwargs)
        if weights_path is not None:
            det.load_weights(weights_path)
        return det
    if spec is None:
        if builder_name.startswith("keypointrcnn"):
            raise ValueError("keypoint R-CNN is not supported (no keypoint targets in advdet)")
        raise ValueError(f"unknown detector builder {builder_name!r}; choose one of "
                         f"{sorted(TORCHVISION_BUILDERS) + sorted(TINY_BUILDERS)}")
    for bad in ("weights", "weights_backbone", "pretrained", "pretrained_backbone"):
        if kwargs.get(bad):
            raise ValueError(f"{bad}= would download weights; pass a local file as weights_path instead")
        kwargs.pop(bad, None)
    if input_size is None:
        input_size = spec.input_size
    if num_classes is None:
        tv_nc = COCO_NUM_TV_CLASSES
    else:
        tv_nc = check_k(num_classes) + (0 if spec.sigmoid else 1)
    builder = torchvision.models.get_model_builder(builder_name)
    if not builder_name.startswith("ssd"):
        kwargs = {"min_size": input_size, "max_size": input_size, **kwargs}
    model = builder(weights=None, weights_backbone=None, num_classes=tv_nc, **kwargs)
    if isinstance(model, SSD):
        _probe_ssd(model, builder_name, input_size)
    if weights_path is not None:
        eps = frozen_bn_eps if frozen_bn_eps is not None else spec.coco_v1_frozen_bn_eps
        load_state_dict_file(model, weights_path, frozen_bn_eps=eps)
    return wrap_torchvision(model, input_size=input_size, num_classes=num_classes)


def _listed() -> list[ModelInfo]:
    return [ModelInfo(f"torchvision:{n}", "tiny" if s.tiny else "torchvision", "detector", False, True,
                      f"{s.adapter.__name__} at {s.input_size} px" + (" (advdet's tiny builder)" if s.tiny else ""))
            for n, s in BUILDERS.items()]


@register_model("torchvision:", family="torchvision", names=_listed)
def torchvision_model(arch: str, *, weights: str | os.PathLike | None = None, pretrained: bool = True,
                      num_classes: int | None = None, input_size: int | None = None) -> TorchvisionDetector:
    """The hub's ``torchvision:BUILDER`` (:data:`BUILDERS`: torchvision's and the tiny ones): random, or with
    ``weights`` (a local state dict); :func:`torchvision_detector` with the hub's arguments."""
    kw = {k: v for k, v in (("num_classes", num_classes), ("input_size", input_size)) if v is not None}
    return torchvision_detector(arch, weights_path=weights, **kw)


def _probe_ssd(model: SSD, name: str, s: int) -> None:
    """SSD backbones have fixed-depth extra layers: fail early with a clear message when S is too small."""
    try:
        with torch.no_grad(), eval_mode(model):
            model.backbone(torch.zeros(1, 3, s, s))
    except RuntimeError as e:
        raise ValueError(f"{name} cannot run at input_size={s} (its extra layers run out of pixels; "
                         f"ssd300_vgg16 needs >= 268): {str(e).splitlines()[0]}") from e
