"""Our tiny-backbone builders (random init) of every torchvision family: the zoo's detectors and the
tests' fast stand-ins. Each takes keyword-only ``num_classes`` K and ``input_size`` S."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.ssd import SSD, SSDHead
from torchvision.ops import MultiScaleRoIAlign

from advdet.models.tiny_backbone import LEVEL_STRIDES, tiny_resnet_fpn
from advdet.models.torchvision_adapter.fcos import FCOSDetector
from advdet.models.torchvision_adapter.rcnn import FasterRCNNDetector, MaskRCNNDetector
from advdet.models.torchvision_adapter.retinanet import RetinaNetDetector
from advdet.models.torchvision_adapter.ssd import SSDDetector


def _scaled(sizes: Sequence[float], input_size: int) -> list[float]:
    return [round(s * input_size / 256.0, 2) for s in sizes]


#: anchor base sizes for 256-px inputs with objects of ~10-180 px (scaled linearly with input_size)
TINY_ANCHOR_BASE = (12.0, 24.0, 48.0, 96.0, 192.0)


def check_k(num_classes: int) -> int:
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

    k = check_k(num_classes)
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

    k = check_k(num_classes)
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
    k = check_k(num_classes)
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
    k = check_k(num_classes)
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
    k = check_k(num_classes)
    ratios = [[2], [2, 3], [2, 3], [2], [2]]
    ag = DefaultBoxGenerator(ratios, scales=[0.05, 0.1, 0.2, 0.4, 0.7, 1.0])
    head = SSDHead([fpn_channels] * len(ratios), ag.num_anchors_per_location(), k + 1)
    kwargs = {"detections_per_img": 100, **kwargs}
    model = SSD(tiny_resnet_fpn(levels="p3p7", fpn_channels=fpn_channels), ag, (input_size, input_size), k + 1,
                head=head, **kwargs)
    return SSDDetector(model, input_size=input_size, tv_label_of=range(1, k + 1), tv_num_classes=k + 1)
