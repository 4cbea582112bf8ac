"""The one crafting seed policy, used by every command that crafts adversarial images (``advdet attack`` /
``dataset``, ``bench transfer``, ``bench robustness``, the analyses).

A batch whose first image has dataset index ``i`` is crafted after :func:`seed_batch`: the attack's own
generator and torch's global generator are both reset to ``batch_seed(seed, i)``. The seed depends only on
the job seed and that index, never on the command, the process or a resumed run, so the same surrogate,
attack (with the same options), seed, images and batch size give the same bytes whichever command crafts
them (tests/test_seeding.py checks ``advdet attack`` against ``bench transfer``).

:func:`crafting_defaults` is the other half of that promise: the options every crafting command gives an
attack that does not set them itself (``valid_only=True``: the letterbox padding is never changed).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from advdet.attacks.spec_values import accepts

__all__ = ["batch_seed", "seed_batch", "crafting_defaults"]


def batch_seed(seed: int, first_index: int) -> int:
    """Seed of the batch whose first dataset index is ``first_index``: sha256 of (seed, index), 63 bits.

    Depends only on the job seed and the batch, never on the process or run that crafts it."""
    digest = hashlib.sha256(f"advdet-craft:{int(seed)}:{int(first_index)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def seed_batch(attack: Any, seed: int, first_index: int) -> int:
    """Reset ``attack``'s generator (``attack.manual_seed``, where it has one) and torch's global generator
    to ``batch_seed(seed, first_index)`` before crafting that batch; returns the seed."""
    s = batch_seed(seed, first_index)
    if hasattr(attack, "manual_seed"):
        attack.manual_seed(s)
    torch.manual_seed(s)
    return s


def crafting_defaults(cls: type, kwargs: dict, *, seed: int | None = None, device=None) -> dict:
    """``kwargs`` plus the crafting commands' defaults for the options ``cls`` accepts and ``kwargs`` leaves
    unset: ``valid_only=True``, ``seed`` and ``device`` (when given)."""
    kw = dict(kwargs)
    for key, val in (("valid_only", True), ("seed", seed), ("device", device)):
        if val is not None and key not in kw and accepts(cls, key):
            kw[key] = val
    return kw
