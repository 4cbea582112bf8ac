"""The victims of a transfer table: every victim predicts on every row's images at its own input size;
per row and victim the COCO results and the failure counts against the victim's clean predictions.

Row 0 (No Attack) reads each victim's own letterboxed copy of the data (``VictimSet.clean``); the other
rows give every victim the row's quantised images (``VictimSet.attacked``), re-letterboxed to the
victim's size when it differs from the crafting size.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from advdet.bench.failure_rates import FailureCounter, threshold_detections
from advdet.bench.loading import LoadedModel
from advdet.bench.pipeline import CraftedBatch, DatasetsBySize
from advdet.bench.transfer_scores import victim_metrics
from advdet.data.letterbox import reletterbox
from advdet.models.evaluate import predictions_to_coco

__all__ = ["VictimSet"]


class VictimSet:
    """The victims ``names`` (loaded detectors), the per-size ``datasets`` they read and, filled row by
    row, ``results[(row, victim)]`` (COCO detection results, dataset ids via ``label_to_cat_id``),
    ``failure[(row, victim)]`` (``FailureCounter``) and ``clean_ref[victim]`` (the thresholded clean
    predictions per image, the failure rates' reference)."""

    def __init__(self, names: Sequence[str], loaded: Mapping[str, LoadedModel], datasets: DatasetsBySize, device,
                 label_to_cat_id: Any, score_thresh: float, iou: float) -> None:
        self.names = list(names)
        self.loaded, self.datasets, self.device = loaded, datasets, device
        self.label_to_cat_id, self.score_thresh, self.iou = label_to_cat_id, score_thresh, iou
        self.results: dict[tuple[int, str], list] = {}
        self.failure: dict[tuple[int, str], FailureCounter] = {}
        self.clean_ref: dict[str, list[dict]] = {v: [] for v in self.names}

    @torch.no_grad()
    def predict(self, victim: str, x: torch.Tensor) -> list[dict]:
        return self.loaded[victim].model.predict(x.to(self.device))

    def start_row(self, row: int) -> None:
        for v in self.names:
            self.results[(row, v)] = []
            self.failure[(row, v)] = FailureCounter(self.score_thresh, self.iou)

    def clean(self, victim: str, indices: list[int]) -> None:
        """Row 0: ``victim`` on the clean images ``indices`` at its own input size; keeps its thresholded
        predictions as the reference of every later row's failure rates."""
        x, targets = self.datasets.batch(self.loaded[victim].input_size, indices)
        outs = self.predict(victim, x)
        self.results[(0, victim)] += predictions_to_coco(outs, targets, self.label_to_cat_id)
        for o in outs:
            c = threshold_detections(o, self.score_thresh)
            self.clean_ref[victim].append(c)
            self.failure[(0, victim)].update(c, c, thresholded=True)

    def attacked(self, row: int, batch: CraftedBatch) -> tuple[dict[str, list[dict]], dict[str, list]]:
        """Every victim on the batch's quantised images (``batch.adv``, uint8 at the crafting size):
        (predictions, letterbox parameters) per victim."""
        size = batch.size
        preds, params_v = {}, {}
        for v in self.names:
            sv = self.loaded[v].input_size
            if sv == size:
                xv, pv = batch.adv.float() / 255.0, batch.params
            else:
                xv, pv = reletterbox(batch.adv, batch.params, sv)
            outs = self.predict(v, xv)
            preds[v], params_v[v] = outs, pv
            tv = [{"letterbox": p, "image_id": t["image_id"]} for p, t in zip(pv, batch.targets)]
            self.results[(row, v)] += predictions_to_coco(outs, tv, self.label_to_cat_id)
            for j, o in enumerate(outs):
                self.failure[(row, v)].update(self.clean_ref[v][batch.indices[j]],
                                              threshold_detections(o, self.score_thresh), thresholded=True)
        return preds, params_v

    def scores(self, row: int, gt, image_ids: list[int], cat_name_by_id: dict) -> tuple[dict, dict]:
        """(COCO metrics, failure rates) per victim of ``row``."""
        metrics = {v: victim_metrics(gt, self.results[(row, v)], image_ids, cat_name_by_id, self.loaded[v].has_masks)
                   for v in self.names}
        return metrics, {v: self.failure[(row, v)].rates() for v in self.names}
