"""Bootstrap confidence intervals for the benchmarks' tables (``bench transfer``, ``bench robustness``).

The statistics are :mod:`advdet.metrics.bootstrap`; this module applies them to a benchmark's collected
detections and lays the intervals out as JSON blocks and table cells:

- :func:`transfer_intervals`: every (row, victim) cell's box mAP50, every row's black-box mean, and
  the paired differences between each row of the ``reference`` attack (RAD) and each baseline row;
- :func:`grid_intervals`: every (model, column) cell of the robustness table and the paired difference
  of every model to the first one (the table's arrows).

One set of resamples (``resample_indices(images, n_boot, seed)``) serves every cell of a table, so any
two cells can be compared pairwise. The black-box mean of a resample is the mean of the black-box
victims' mAP50 on that resample.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import numpy as np

from advdet.metrics.bootstrap import (DEFAULT_LEVEL, DEFAULT_N_BOOT, bootstrap_map, coco_image_matches, interval,
                                      paired_interval, resample_indices)

log = logging.getLogger(__name__)

__all__ = ["METHOD", "transfer_intervals", "paired_baselines", "grid_intervals", "fmt_interval",
           "transfer_interval_table", "transfer_paired_table", "robustness_interval_table",
           "robustness_paired_table", "sweep_interval_table", "interval_note"]

METHOD = "percentile bootstrap over images"


def _settings(n_images: int, n_boot: int, seed: int, level: float) -> dict:
    return {"method": METHOD, "metric": "map50", "images": int(n_images), "n_boot": int(n_boot), "seed": int(seed),
            "level": float(level)}


def _nanmean_rows(stack: list[np.ndarray]) -> np.ndarray:
    """Per-resample mean over models, leaving out models undefined on that resample (NaN)."""
    a = np.vstack(stack)
    ok = ~np.isnan(a)
    n = ok.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.where(ok, a, 0.0).sum(axis=0) / np.maximum(n, 1), np.nan)


def _value(v: float | None) -> float | None:
    return None if v is None or (isinstance(v, float) and (math.isnan(v) or v < 0)) else float(v)


def _check_point(what: str, evaluator: float | None, table: float) -> None:
    if evaluator is not None and not math.isnan(table) and abs(evaluator - table) > 1e-6:
        log.warning("bootstrap: %s: mAP50 from the per-image matches %.6f differs from the evaluator's %.6f",
                    what, table, evaluator)


# ------------------------------------------------------------------------------------------- transfer
def paired_baselines(rows: Sequence[Mapping], reference: str = "rad") -> list[tuple[int, int]]:
    """(reference row, baseline row) index pairs: every row of attack ``reference`` against every row of
    another attack that saw the same conditions: No Attack, Ablation and classifier rows always; detector
    rows only when crafted on the same surrogate; of a sweep, only rows at the same sweep value (rows
    outside the sweep pair with every value)."""
    pairs = []
    for i, r in enumerate(rows):
        if r.get("attack") != reference:
            continue
        for j, b in enumerate(rows):
            if j == i or b.get("attack") == reference:
                continue
            if b.get("kind") == "detector" and b.get("surrogate") != r.get("surrogate"):
                continue
            if r.get("sweep_value") is not None and b.get("sweep_value") is not None and \
                    (r.get("sweep"), r.get("sweep_value")) != (b.get("sweep"), b.get("sweep_value")):
                continue
            pairs.append((i, j))
    return pairs


def transfer_intervals(rows: Sequence[Mapping], results: Mapping[tuple[int, str], list], gt: Mapping,
                       image_ids: Sequence[int], victims: Sequence[str], *, n_boot: int = DEFAULT_N_BOOT,
                       seed: int = 0, level: float = DEFAULT_LEVEL, reference: str = "rad",
                       samples_out: dict | None = None) -> dict:
    """Intervals of a transfer table (the ``bootstrap`` block of ``transfer_matrix``'s result).

    Args:
        rows: the result's rows (``label``, ``attack``, ``kind``, ``surrogate``, ``sweep``,
            ``sweep_value``, ``metrics`` per victim, ``black_box.victims``).
        results: per (row index, victim) the COCO results the cell was scored from.
        gt, image_ids: the COCO ground truth and the evaluated images.
        reference: the attack whose rows are compared, pairwise, to every baseline row.
        samples_out: when given, filled with ``indices`` (the resamples, (n_boot, images)) and
            ``cells`` {(row index, victim): mAP50 per resample}, for statistics derived later on the same
            resamples (ratios, thresholds).

    Returns ``{method, metric, images, n_boot, seed, level, reference, rows, paired}``: ``rows[i]``
    (aligned with the table's rows) holds ``cells`` {victim: {value, lo, hi}} and ``black_box``
    {value, lo, hi}; ``paired`` lists {``row``, ``baseline`` (labels), ``victims`` (the reference row's
    black-box victims), ``black_box`` and ``cells``: intervals of reference - baseline}. Values are in
    [0, 1], like the table's metrics; None where undefined.
    """
    indices = resample_indices(len(image_ids), n_boot, seed)
    samples: dict[tuple[int, str], np.ndarray] = {}
    for ri, r in enumerate(rows):
        for v in victims:
            mt = coco_image_matches(gt, results[(ri, v)], image_ids)
            _check_point(f"{r['label']} / {v}", _value(r["metrics"][v].get("map50")), mt.map())
            samples[(ri, v)] = bootstrap_map(mt, indices)
    if samples_out is not None:
        samples_out.update(indices=indices, cells=samples)

    def point(ri: int, v: str) -> float | None:
        return _value(rows[ri]["metrics"][v].get("map50"))

    def bb_point(ri: int, bb: Sequence[str]) -> float | None:
        vals = [x for x in (point(ri, v) for v in bb) if x is not None]
        return float(sum(vals) / len(vals)) if vals else None

    out_rows = []
    for ri, r in enumerate(rows):
        bb = list(r["black_box"]["victims"])
        out_rows.append({
            "label": r["label"],
            "cells": {v: interval(point(ri, v), samples[(ri, v)], level) for v in victims},
            "black_box": interval(bb_point(ri, bb), _nanmean_rows([samples[(ri, v)] for v in bb]), level)
            if bb else None,
        })
    paired = []
    for i, j in paired_baselines(rows, reference):
        bb = list(rows[i]["black_box"]["victims"])
        entry: dict[str, Any] = {"row": rows[i]["label"], "baseline": rows[j]["label"], "victims": bb}
        entry["black_box"] = paired_interval(
            bb_point(i, bb), bb_point(j, bb), _nanmean_rows([samples[(i, v)] for v in bb]),
            _nanmean_rows([samples[(j, v)] for v in bb]), level) if bb else None
        entry["cells"] = {v: paired_interval(point(i, v), point(j, v), samples[(i, v)], samples[(j, v)], level)
                          for v in victims}
        paired.append(entry)
    return {**_settings(len(image_ids), n_boot, seed, level), "reference": reference, "rows": out_rows,
            "paired": paired}


# ------------------------------------------------------------------------------------------- robustness
def grid_intervals(points: Mapping[str, Mapping[str, float | None]],
                   samples: Mapping[str, Mapping[str, np.ndarray]], models: Sequence[str], *, n_images: int,
                   n_boot: int, seed: int, level: float = DEFAULT_LEVEL) -> dict:
    """Intervals of a (model x column) grid of mAP50 values whose ``samples`` were all drawn on the same
    resamples: ``{method, ..., baseline, map50: {model: {column: {value, lo, hi}}}, paired: {model:
    {column: interval of model - baseline}}}`` with ``baseline`` the first model (the table's arrows)."""
    base = models[0]
    cells = {m: {k: interval(_value(points[m][k]), samples[m][k], level) for k in samples[m]} for m in models}
    paired = {m: {k: paired_interval(_value(points[m][k]), _value(points[base][k]), samples[m][k],
                                     samples[base][k], level)
                  for k in samples[m] if k in samples[base]}
              for m in models[1:]}
    return {**_settings(n_images, n_boot, seed, level), "baseline": base, "map50": cells, "paired": paired}


# ------------------------------------------------------------------------------------------- presentation
def fmt_interval(ci: Mapping | None, scale: float = 100.0, signed: bool = False) -> str | None:
    """``59.4 [55.1, 63.0]`` (x ``scale``; ``+`` signs for differences); None when undefined."""
    if not ci or ci.get("value") is None:
        return None
    f = "{:+.1f}" if signed else "{:.1f}"
    v = f.format(ci["value"] * scale)
    if ci.get("lo") is None or ci.get("hi") is None:
        return v
    return f"{v} [{f.format(ci['lo'] * scale)}, {f.format(ci['hi'] * scale)}]"


def interval_note(block: Mapping) -> str:
    """One line on how a block's intervals were computed."""
    return (f"{100 * block['level']:g} % {block['method']}: {block['n_boot']} resamples of the {block['images']} "
            f"images (seed {block['seed']}), mAP50 recomputed on each; [lo, hi] = percentiles")


def transfer_interval_table(result: Mapping) -> tuple[list[str], list[list]] | None:
    """(columns, rows): attack, each victim's box mAP50 x100 with its interval, the black-box mean's;
    None when the result has no intervals."""
    block = result.get("bootstrap")
    if not block:
        return None
    victims = result["victims"]
    cols = ["attack"] + victims + ["black-box mean"]
    rows = []
    for r, ci in zip(result["rows"], block["rows"]):
        cells = [fmt_interval(ci["cells"][v]) for v in victims]
        if r.get("white_box") is not None and r["white_box"]["victim"] in victims:
            j = victims.index(r["white_box"]["victim"])
            cells[j] = None if cells[j] is None else cells[j] + "*"
        rows.append([r["label"]] + cells + [fmt_interval(ci["black_box"])])
    return cols, rows


def transfer_paired_table(result: Mapping) -> tuple[list[str], list[list]] | None:
    """(columns, rows): per (reference row, baseline row) the difference of box mAP50 x100 with its
    paired interval, per victim and for the black-box mean; None without paired comparisons."""
    block = result.get("bootstrap")
    if not block or not block.get("paired"):
        return None
    victims = result["victims"]
    cols = [block["reference"], "baseline"] + victims + ["black-box mean"]
    rows = [[p["row"], p["baseline"]] + [fmt_interval(p["cells"][v], signed=True) for v in victims]
            + [fmt_interval(p["black_box"], signed=True)] for p in block["paired"]]
    return cols, rows


def robustness_interval_table(result: Mapping, labels: Mapping[str, str] | None = None
                              ) -> tuple[list[str], list[list]] | None:
    """(columns, rows) of a robustness table's mAP50 (%) with intervals; None without intervals."""
    block = result.get("intervals")
    if not block:
        return None
    labels = labels or {}
    attacks = result["attacks"]
    cols = ["Method"] + [labels.get(a, a) for a in attacks]
    rows = [[m] + [fmt_interval(block["map50"][m].get(a)) for a in attacks] for m in result["models"]]
    return cols, rows


def robustness_paired_table(result: Mapping, labels: Mapping[str, str] | None = None
                            ) -> tuple[list[str], list[list]] | None:
    """(columns, rows): every model minus the first, mAP50 points with paired intervals; None when there is
    a single model or no intervals."""
    block = result.get("intervals")
    if not block or not block.get("paired"):
        return None
    labels = labels or {}
    attacks = result["attacks"]
    cols = [f"Method - {block['baseline']}"] + [labels.get(a, a) for a in attacks]
    rows = [[m] + [fmt_interval(block["paired"][m].get(a), signed=True) for a in attacks]
            for m in result["models"][1:]]
    return cols, rows


def sweep_interval_table(result: Mapping, attack: str) -> tuple[list[str], list[list]] | None:
    """A steps sweep's mAP50 (%) with intervals for one attack (rows models, columns step counts)."""
    block = result.get("intervals")
    if not block:
        return None
    clean = result.get("clean") is not None
    cols = ["Method"] + (["Clean"] if clean else []) + [f"{s} steps" for s in result["steps"]]
    rows = []
    for m in result["models"]:
        cells = block["map50"][m]
        row = [m] + ([fmt_interval(cells.get("clean"))] if clean else [])
        row += [fmt_interval(cells.get(f"{attack}@{s}")) for s in result["steps"]]
        rows.append(row)
    return cols, rows
