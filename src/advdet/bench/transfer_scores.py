"""Scoring a transfer table: per victim the COCO metrics of a row, the row's aggregates (black-box
mean over the victims the row's surrogate does not contain, the white-box cell, the perturbation means)
as pure functions, and :class:`RowResult`, one row's typed result with ``to_json``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from advdet.bench.transfer_rows import RowSpec, ensemble_members
from advdet.metrics.coco_map import coco_map

if TYPE_CHECKING:
    from advdet.bench.pipeline import CraftedBatch

__all__ = ["mean_of", "black_box_victims", "black_box_mean", "white_box_cell", "perturbation_summary",
           "victim_metrics", "row_record", "RowResult"]

#: the COCO box numbers a row's aggregates are taken over
AGGREGATED = ("map", "map50", "map75")


def mean_of(vals: Sequence[float | None]) -> float | None:
    v = [x for x in vals if x is not None and x >= 0]
    return float(sum(v) / len(v)) if v else None


def black_box_victims(spec: RowSpec, victims: Sequence[str], det_surrogates: set[str]) -> list[str]:
    """The victims a row's black-box mean is over: leave-one-out rows the held-out victim alone; detector
    rows the victims that are not members of the surrogate; rows without a detector surrogate the victims
    other than any detector surrogate of the run (all victims when that leaves none)."""
    if spec.kind == "detector" and spec.held_out is not None:
        return [spec.held_out]  # leave-one-out: the held-out victim alone
    if spec.kind == "detector":
        members = ensemble_members(spec.surrogate)
        return [v for v in victims if v not in members]
    return [v for v in victims if v not in det_surrogates] or list(victims)


def black_box_mean(metrics: dict[str, dict], victims: Sequence[str]) -> dict:
    """``{"victims": victims, "map": mean, "map50": mean, "map75": mean}`` over ``victims`` (``mean_of``:
    missing and negative values, pycocotools' -1, are left out; None when nothing is left)."""
    return {"victims": list(victims), **{k: mean_of([metrics[v][k] for v in victims]) for k in AGGREGATED}}


def white_box_cell(spec: RowSpec, metrics: dict[str, dict]) -> dict | None:
    """A detector row's surrogate's own numbers when it is also a victim, else None."""
    if spec.kind == "detector" and spec.surrogate in metrics:
        return {"victim": spec.surrogate, **{k: metrics[spec.surrogate][k] for k in AGGREGATED}}
    return None


def perturbation_summary(rmse: Sequence[float], linf: Sequence[float]) -> dict:
    """Per-image RMSE and Linf (0-255) of a row's perturbation -> their means and the largest Linf; zeros
    for a row without images crafted (No Attack)."""
    if not len(rmse):
        return {"rmse": 0.0, "linf": 0.0, "linf_max": 0.0}
    return {"rmse": float(np.mean(rmse)), "linf": float(np.mean(linf)), "linf_max": float(np.max(linf))}


def victim_metrics(gt, results: list, image_ids: list[int], cat_name_by_id: dict, has_masks: bool) -> dict:
    """COCO box mAP (per class too, by class name) of one victim's results on one row; segm mAP for mask
    models (keys ``segm_*``)."""
    m = coco_map(gt, results, "bbox", image_ids=image_ids, per_class=True)
    apc = {cat_name_by_id[k]: val for k, val in m.pop("ap_per_class").items()}
    m["ap_per_class"] = apc
    if has_masks:
        segm = coco_map(gt, [r for r in results if "segmentation" in r], "segm", image_ids=image_ids)
        m.update({f"segm_{k}": val for k, val in segm.items()})
    return m


def row_record(spec: RowSpec, metrics: dict[str, dict], fail: dict[str, dict], victims: Sequence[str],
               det_surrogates: set[str], perturbation: dict, seconds: dict, diagnostics: Any = None) -> dict:
    """One row of the result: its spec, metrics and failure rates per victim, black-box mean, white-box
    cell, perturbation, timing and the attack's diagnostics."""
    black = black_box_mean(metrics, black_box_victims(spec, victims, det_surrogates))
    white = white_box_cell(spec, metrics)
    settings = {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v))
                for k, v in spec.kwargs.items()}
    return {"label": spec.label, "attack": spec.attack, "kind": spec.kind, "surrogate": spec.surrogate,
            "held_out": spec.held_out,
            "sweep": spec.sweep, "sweep_value": spec.sweep_value, "settings": settings,
            "metrics": metrics, "black_box": black, "white_box": white, "perturbation": perturbation,
            "failure": fail, "seconds": {k: round(v, 3) for k, v in seconds.items()},
            "diagnostics": diagnostics.as_dict() if diagnostics is not None else None}


@dataclass
class RowResult:
    """One row of a transfer table as it is measured: the per-image perturbation norms and the attack's
    diagnostics accumulated batch by batch (``add_crafted``), wall / CPU seconds of crafting and
    evaluation, and, once scored, the ``metrics`` and ``failure`` rates per victim. ``to_json`` is the
    row of the result (``row_record``)."""

    spec: RowSpec
    rmse: list[float] = field(default_factory=list)
    linf: list[float] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=lambda: {"craft": 0.0, "eval": 0.0, "craft_cpu": 0.0,
                                                               "eval_cpu": 0.0})
    diagnostics: Any = None
    metrics: dict[str, dict] = field(default_factory=dict)
    failure: dict[str, dict] = field(default_factory=dict)

    def add_crafted(self, batch: CraftedBatch) -> None:
        """A crafted batch's perturbation norms, crafting time and diagnostics (merged over batches)."""
        if batch.stats is not None:
            self.rmse += batch.stats["rmse"]
            self.linf += batch.stats["linf"]
        self.seconds["craft"] += batch.seconds
        self.seconds["craft_cpu"] += batch.cpu_seconds
        if batch.diagnostics is not None:  # RAD's (advdet.attacks.rad.RADDiagnostics)
            self.diagnostics = batch.diagnostics if self.diagnostics is None else \
                self.diagnostics.merge(batch.diagnostics)

    def add_eval(self, seconds: float, cpu_seconds: float) -> None:
        self.seconds["eval"] += seconds
        self.seconds["eval_cpu"] += cpu_seconds

    @property
    def perturbation(self) -> dict:
        return perturbation_summary(self.rmse, self.linf)

    def to_json(self, victims: Sequence[str], det_surrogates: set[str]) -> dict:
        return row_record(self.spec, self.metrics, self.failure, victims, det_surrogates, self.perturbation,
                          self.seconds, self.diagnostics)
