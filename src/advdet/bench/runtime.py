"""Small helpers that every bench job shares: which device a run uses, JSON-safe values, percentages.

Kept in one place so that the transfer, robustness, crafting and analysis jobs pick devices and write
settings the same way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import gc
import math
import sys
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["resolve_device", "jsonable", "nan_to_none", "percent", "release_memory"]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device``; ``None`` means CUDA when present, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def jsonable(value: Any, *, nonfinite: str | None = "text") -> Any:
    """``value`` made JSON-safe: the one sanitiser of cards, result files and reports.

    Keys become strings, tuples lists, numpy scalars / arrays and tensors Python numbers / lists,
    dataclasses a dict with their ``type``, any other object its ``repr``. Non-finite floats (NaN, inf)
    become their text (``nonfinite="text"``: ``"nan"``, ``"inf"``; attack settings in cards) or None
    (``nonfinite=None``: metrics in result files, where a missing number is ``null``)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, (np.generic, np.ndarray, torch.Tensor)):
        return jsonable(value.tolist(), nonfinite=nonfinite)
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return str(value) if nonfinite == "text" else None
    if isinstance(value, (list, tuple)):
        return [jsonable(x, nonfinite=nonfinite) for x in value]
    if isinstance(value, dict):
        return {str(k): jsonable(x, nonfinite=nonfinite) for k, x in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"type": type(value).__name__,
                **{f.name: jsonable(getattr(value, f.name), nonfinite=nonfinite) for f in dataclasses.fields(value)}}
    return repr(value)


def nan_to_none(obj: Any) -> Any:
    """:func:`jsonable` with every non-finite float as None (result files)."""
    return jsonable(obj, nonfinite=None)


def percent(value: float | None, ndigits: int | None = None) -> float | None:
    """A fraction (mAP, a drop) in percent, rounded to ``ndigits`` when given; None for None and for
    negative values (COCO's -1: no ground truth for that cell)."""
    if value is None or value < 0:
        return None
    v = 100.0 * float(value)
    return v if ndigits is None else round(v, ndigits)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where there is none (macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    return fn


def release_memory() -> bool:
    """Collect garbage and hand freed heap pages back to the system (glibc's ``malloc_trim(0)``).

    Attacks that differentiate through relevance maps allocate and free gigabytes per batch; glibc keeps
    the freed pages, so a long run's resident memory creeps up batch after batch (a 200-image RAD transfer
    run was OOM-killed at 13 GB on a 24 GB machine). Both halves matter: the double-backward graphs leave
    reference cycles that hold tensors until a collection (16 RAD images peak at 6.5 GB with the trim
    alone, 4.9 GB with both). Called once per batch by the long bench jobs (~60 ms, the collection).
    Returns whether memory was trimmed (False off glibc, where it only collects garbage)."""
    gc.collect()
    trim = _malloc_trim()
    return trim is not None and bool(trim(0))
