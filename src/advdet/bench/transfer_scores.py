"""Scoring a transfer table: per victim the COCO metrics of a row, and the row's aggregates (black-box
mean over the victims the row's surrogate does not contain, the white-box cell) as pure functions."""

from __future__ import annotations

from typing import Any, Sequence

from advdet.bench.transfer_rows import RowSpec, ensemble_members
from advdet.metrics.coco_map import coco_map


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
    bb = black_box_victims(spec, victims, det_surrogates)
    black = {"victims": bb}
    for key in ("map", "map50", "map75"):
        black[key] = mean_of([metrics[v][key] for v in bb])
    white = None
    if spec.kind == "detector" and spec.surrogate in metrics:
        white = {"victim": spec.surrogate, **{k: metrics[spec.surrogate][k] for k in ("map", "map50", "map75")}}
    settings = {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v))
                for k, v in spec.kwargs.items()}
    return {"label": spec.label, "attack": spec.attack, "kind": spec.kind, "surrogate": spec.surrogate,
            "held_out": spec.held_out,
            "sweep": spec.sweep, "sweep_value": spec.sweep_value, "settings": settings,
            "metrics": metrics, "black_box": black, "white_box": white, "perturbation": perturbation,
            "failure": fail, "seconds": {k: round(v, 3) for k, v in seconds.items()},
            "diagnostics": diagnostics.as_dict() if diagnostics is not None else None}
