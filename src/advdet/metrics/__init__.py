"""The metrics layer: COCO mAP (box and mask), Pascal VOC mAP@0.5, perturbation norms.

- :func:`coco_map` - COCO AP/AR (faster-coco-eval, agrees with pycocotools), and
  :func:`detections_to_coco_results` to turn per-image model outputs into COCO result dicts.
- :func:`voc_map` / :func:`voc_ap` - VOC07 11-point (or all-point) AP at IoU 0.5, as py-faster-rcnn.
- :func:`perturbation_stats` - RMSE, L2 and Linf between clean and adversarial images, in 0-255.
- :mod:`advdet.metrics.bootstrap` - percentile bootstrap intervals of mAP50 over images and paired
  differences (:func:`coco_image_matches` / :func:`voc_image_matches`, :func:`resample_indices`,
  :func:`bootstrap_map`, :func:`interval`, :func:`paired_interval`).
"""

from advdet.metrics.bootstrap import (bootstrap_map, coco_image_matches, interval, paired_interval,
                                      resample_indices, voc_image_matches)
from advdet.metrics.coco_map import COCO_METRIC_KEYS, coco_map, detections_to_coco_results
from advdet.metrics.perturbation import perturbation_stats
from advdet.metrics.voc_map import voc_ap, voc_map

__all__ = [
    "COCO_METRIC_KEYS",
    "bootstrap_map",
    "coco_image_matches",
    "coco_map",
    "detections_to_coco_results",
    "interval",
    "paired_interval",
    "perturbation_stats",
    "resample_indices",
    "voc_ap",
    "voc_image_matches",
    "voc_map",
]
