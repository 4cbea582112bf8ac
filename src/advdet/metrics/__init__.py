"""The metrics layer: COCO mAP (box and mask), Pascal VOC mAP@0.5, perturbation norms.

- :func:`coco_map` - COCO AP/AR (faster-coco-eval, agrees with pycocotools), and
  :func:`detections_to_coco_results` to turn per-image model outputs into COCO result dicts.
- :func:`voc_map` / :func:`voc_ap` - VOC07 11-point (or all-point) AP at IoU 0.5, as py-faster-rcnn.
- :func:`perturbation_stats` - RMSE, L2 and Linf between clean and adversarial images, in 0-255.
"""

from advdet.metrics.coco_map import COCO_METRIC_KEYS, coco_map, detections_to_coco_results
from advdet.metrics.perturbation import perturbation_stats
from advdet.metrics.voc_map import voc_ap, voc_map

__all__ = [
    "COCO_METRIC_KEYS",
    "coco_map",
    "detections_to_coco_results",
    "perturbation_stats",
    "voc_ap",
    "voc_map",
]
