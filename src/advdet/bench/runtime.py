"""Small helpers that every bench job shares: which device a run uses, and attack settings as JSON.

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

import torch

__all__ = ["resolve_device", "jsonable", "nan_to_none", "release_memory"]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device``; ``None`` means CUDA when present, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def jsonable(value: Any) -> Any:
    """``value`` made JSON-safe for cards and result files (attack hyper-parameters and the like).

    Keys become strings, tuples lists, non-finite floats their text (``"nan"``, ``"inf"``), dataclasses a
    dict with their ``type``, and any other object its ``repr``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return [jsonable(x) for x in value]
    if isinstance(value, dict):
        return {str(k): jsonable(x) for k, x in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"type": type(value).__name__,
                **{f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    return repr(value)


def nan_to_none(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf) in it, nested in dicts / lists / tuples, as None."""
    if isinstance(obj, float):
        return None if not math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nan_to_none(v) for v in obj]
    return obj


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
