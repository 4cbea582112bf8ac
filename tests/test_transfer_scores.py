"""The aggregation of a transfer table as pure functions, on hand-computed numbers: black-box means, the
white-box cell, the perturbation means, the failure rates and the typed row result."""

from __future__ import annotations

import pytest
import torch

from advdet.bench.failure_rates import FailureCounter
from advdet.bench.pipeline import CraftedBatch
from advdet.bench.transfer_rows import RowSpec
from advdet.bench.transfer_scores import (RowResult, black_box_mean, black_box_victims, mean_of, perturbation_summary,
                                          row_record, white_box_cell)

VICTIMS = ["a", "b", "c"]
#: per victim its box mAP, mAP50, mAP75 (c has no ground truth for mAP75: pycocotools' -1)
METRICS = {"a": {"map": 0.10, "map50": 0.50, "map75": 0.05},
           "b": {"map": 0.20, "map50": 0.60, "map75": 0.15},
           "c": {"map": 0.40, "map50": 0.90, "map75": -1.0}}


def test_mean_of_leaves_out_missing_and_negative_values():
    assert mean_of([0.25, None, -1.0, 0.75]) == 0.5
    assert mean_of([None, -1.0]) is None and mean_of([]) is None


def test_black_box_victims_per_row_kind():
    det = RowSpec("pgd", "pgd", "detector", "a")
    ens = RowSpec("pgd (a+b)", "pgd", "detector", "a+b")
    loo = RowSpec("ens-pgd without c", "pgd", "detector", "a+b", held_out="c")
    ref = RowSpec("No Attack", None, "reference", None)
    assert black_box_victims(det, VICTIMS, {"a"}) == ["b", "c"]
    assert black_box_victims(ens, VICTIMS, {"a", "b"}) == ["c"]
    assert black_box_victims(loo, VICTIMS, {"a", "b"}) == ["c"]
    assert black_box_victims(ref, VICTIMS, {"a"}) == ["b", "c"]          # the attack rows' victims
    assert black_box_victims(ref, VICTIMS, {"a", "b", "c"}) == VICTIMS   # nothing left: all victims


def test_black_box_mean_and_white_box_cell():
    bb = black_box_mean(METRICS, ["b", "c"])
    assert bb["victims"] == ["b", "c"]
    assert bb["map"] == pytest.approx(0.30)    # (0.20 + 0.40) / 2
    assert bb["map50"] == pytest.approx(0.75)  # (0.60 + 0.90) / 2
    assert bb["map75"] == pytest.approx(0.15)  # c's -1 left out
    assert white_box_cell(RowSpec("pgd", "pgd", "detector", "a"), METRICS) == {"victim": "a", **METRICS["a"]}
    assert white_box_cell(RowSpec("pgd", "pgd", "detector", "z"), METRICS) is None        # not a victim
    assert white_box_cell(RowSpec("cls-pgd", "cls-pgd", "classifier", "a"), METRICS) is None


def test_perturbation_summary():
    assert perturbation_summary([1.0, 3.0, 5.0], [4.0, 8.0, 12.0]) == {"rmse": 3.0, "linf": 8.0, "linf_max": 12.0}
    assert perturbation_summary([], []) == {"rmse": 0.0, "linf": 0.0, "linf_max": 0.0}


def test_failure_rates_from_counts():
    c = FailureCounter(images=2, clean=4, adv=5, kept=2, misclassified=1, disappeared=1, hallucinated=3)
    r = c.rates()
    assert (r["disappearance"], r["misclassification"], r["kept"], r["hallucination"]) == (0.25, 0.25, 0.5, 1.5)
    empty = FailureCounter(images=3, adv=2, hallucinated=2).rates()
    assert empty["disappearance"] is None and empty["hallucination"] == pytest.approx(2 / 3)


def test_row_record_of_a_detector_row():
    spec = RowSpec("pgd", "pgd", "detector", "a", {"eps": 16.0, "transforms": [object()]})
    fail = {v: {"disappearance": 0.5} for v in VICTIMS}
    r = row_record(spec, METRICS, fail, VICTIMS, {"a"}, {"rmse": 2.0, "linf": 16.0, "linf_max": 16.0},
                   {"craft": 1.23456, "eval": 0.5}, None)
    assert r["black_box"]["victims"] == ["b", "c"] and r["black_box"]["map50"] == pytest.approx(0.75)
    assert r["white_box"]["map50"] == 0.50
    assert r["seconds"] == {"craft": 1.235, "eval": 0.5}
    assert r["settings"]["eps"] == 16.0 and isinstance(r["settings"]["transforms"], str)  # repr
    assert r["diagnostics"] is None and r["failure"] is fail


class _Diag:
    def __init__(self, n):
        self.n = n

    def merge(self, other):
        return _Diag(self.n + other.n)

    def as_dict(self):
        return {"n": self.n}


def _batch(rmse, linf, seconds, diag):
    z = torch.zeros(len(rmse), 3, 4, 4)
    return CraftedBatch(list(range(len(rmse))), z, [], [], z.bool(), z.to(torch.uint8), z.to(torch.uint8),
                        {"rmse": rmse, "linf": linf}, diag, seconds, seconds / 2)


def test_row_result_accumulates_batches_and_writes_its_row():
    row = RowResult(RowSpec("rad", "rad", "detector", "a"))
    row.add_crafted(_batch([1.0, 2.0], [8.0, 16.0], 1.0, _Diag(2)))
    row.add_crafted(_batch([6.0], [12.0], 0.5, _Diag(1)))
    row.add_eval(0.25, 0.125)
    row.add_eval(0.25, 0.125)
    assert row.perturbation == {"rmse": 3.0, "linf": 12.0, "linf_max": 16.0}
    assert row.seconds == {"craft": 1.5, "eval": 0.5, "craft_cpu": 0.75, "eval_cpu": 0.25}
    row.metrics, row.failure = METRICS, {v: {} for v in VICTIMS}
    out = row.to_json(VICTIMS, {"a"})
    assert out["diagnostics"] == {"n": 3} and out["perturbation"] == row.perturbation
    assert out["black_box"]["map"] == pytest.approx(0.30) and out["white_box"]["victim"] == "a"
    clean = RowResult(RowSpec("No Attack", None, "reference", None))
    assert clean.perturbation == {"rmse": 0.0, "linf": 0.0, "linf_max": 0.0} and clean.diagnostics is None
