"""Label layout: torchvision's class columns vs advdet's contiguous labels.

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

from torch import nn
from torchvision.models._meta import _COCO_CATEGORIES
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.ssd import SSD

#: the 80 COCO category ids, in contiguous-label order: contiguous label k <-> COCO id COCO_CATEGORY_IDS[k].
#: For torchvision's COCO-pretrained (91-column) models the torchvision label index IS the COCO category id.
COCO_CATEGORY_IDS: tuple[int, ...] = tuple(
    i for i, name in enumerate(_COCO_CATEGORIES) if name not in ("__background__", "N/A"))

#: the 80 COCO class names in contiguous-label order
COCO_CLASS_NAMES: tuple[str, ...] = tuple(_COCO_CATEGORIES[i] for i in COCO_CATEGORY_IDS)

COCO_NUM_TV_CLASSES = len(_COCO_CATEGORIES)  # 91


def tv_num_classes(model: nn.Module) -> int:
    if isinstance(model, FasterRCNN):
        return model.roi_heads.box_predictor.cls_score.out_features
    if isinstance(model, (RetinaNet, FCOS)):
        return model.head.classification_head.num_classes
    if isinstance(model, SSD):
        return model.head.classification_head.num_columns
    raise TypeError(f"unsupported model {type(model).__name__}")
