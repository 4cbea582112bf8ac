"""The bench's one JSON sanitiser and one percentage helper (advdet.bench.runtime)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import torch

from advdet.bench.runtime import jsonable, nan_to_none, percent
from advdet.bench.transfer_report import json_ready


@dataclasses.dataclass
class _Setting:
    eps: float
    scales: tuple


def test_jsonable_makes_every_bench_value_json_safe():
    value = {1: (np.float32(0.5), np.int64(3)), "t": torch.tensor([1.5, float("nan")]), "a": np.arange(3),
             "inf": float("inf"), "d": _Setting(8.0, (1, 2)), "o": object}
    text = jsonable(value)  # cards: non-finite as text
    assert text == {"1": [0.5, 3], "t": [1.5, "nan"], "a": [0, 1, 2], "inf": "inf",
                    "d": {"type": "_Setting", "eps": 8.0, "scales": [1, 2]}, "o": repr(object)}
    json.dumps(text, allow_nan=False)
    none = nan_to_none(value)  # result files: non-finite as null
    assert none["t"] == [1.5, None] and none["inf"] is None and none["1"] == [0.5, 3]
    json.dumps(none, allow_nan=False)


def test_json_ready_drops_private_keys_and_nulls_missing_numbers():
    out = json_ready({"rows": [{"map50": math.nan, "rmse": np.float64(2.0)}], "_examples": [object()]})
    assert out == {"rows": [{"map50": None, "rmse": 2.0}]}


def test_percent_of_fractions_and_cocos_missing_value():
    assert percent(0.4567) == 45.67 and percent(0.4567, 1) == 45.7 and percent(0.0) == 0.0
    assert percent(None) is None and percent(-1.0) is None  # COCO's -1: no ground truth
