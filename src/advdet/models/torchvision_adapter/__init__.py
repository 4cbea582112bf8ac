"""torchvision detection models behind the :class:`~advdet.models.detector.Detector` contract.

Families: RetinaNet, FCOS (one-stage, sigmoid scores), SSD / SSDlite (one-stage, softmax with background),
Faster R-CNN and Mask R-CNN (two-stage, softmax with background over RPN proposals).

Modules: :mod:`.base` (the shared adapter, mode handling in ``loss``), one adapter per family
(:mod:`.retinanet`, :mod:`.fcos`, :mod:`.ssd`, :mod:`.rcnn` for Faster / Mask R-CNN), :mod:`.labels`
(torchvision's class columns vs our contiguous labels, COCO layout), :mod:`.tiny` (our tiny-backbone
builders), :mod:`.checkpoint` (local state-dict files) and :mod:`.builders` (builder by name: one spec
table, :data:`BUILDERS`).

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
"""

from advdet.models.torchvision_adapter.base import TorchvisionDetector, configure_transform
from advdet.models.torchvision_adapter.builders import (BUILDERS, TINY_BUILDERS, TORCHVISION_BUILDERS, BuilderSpec,
                                                        torchvision_detector, wrap_torchvision)
from advdet.models.torchvision_adapter.checkpoint import CheckpointError, load_state_dict_file
from advdet.models.torchvision_adapter.fcos import FCOSDetector
from advdet.models.torchvision_adapter.labels import COCO_CATEGORY_IDS, COCO_CLASS_NAMES, COCO_NUM_TV_CLASSES
from advdet.models.torchvision_adapter.rcnn import FasterRCNNDetector, MaskRCNNDetector
from advdet.models.torchvision_adapter.retinanet import RetinaNetDetector
from advdet.models.torchvision_adapter.ssd import SSDDetector
from advdet.models.torchvision_adapter.tiny import (TINY_ANCHOR_BASE, fasterrcnn_tiny, fcos_tiny, maskrcnn_tiny,
                                                    retinanet_tiny, ssd_tiny)

__all__ = [
    "COCO_CATEGORY_IDS", "COCO_CLASS_NAMES", "CheckpointError", "TorchvisionDetector", "RetinaNetDetector",
    "FCOSDetector", "SSDDetector", "FasterRCNNDetector", "MaskRCNNDetector", "retinanet_tiny", "fcos_tiny",
    "fasterrcnn_tiny", "maskrcnn_tiny", "ssd_tiny", "torchvision_detector", "wrap_torchvision",
    "load_state_dict_file", "TINY_BUILDERS", "TORCHVISION_BUILDERS", "BUILDERS", "BuilderSpec",
    "COCO_NUM_TV_CLASSES", "TINY_ANCHOR_BASE", "configure_transform",
]
