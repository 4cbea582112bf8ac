"""Batching of detection samples."""

from __future__ import annotations

from typing import Any

import torch


def collate_detection(batch: list[dict[str, Any]]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Collate dataset items into (images (B, 3, S, S), list of per-image target dicts).

    Every item must have the same canvas size (true for letterboxed datasets); the target dicts
    hold every key except ``image``. Use as ``DataLoader(..., collate_fn=collate_detection)``.
    """
    if not batch:
        raise ValueError("collate_detection: empty batch")
    images = torch.stack([item["image"] for item in batch])
    targets = [{k: v for k, v in item.items() if k != "image"} for item in batch]
    return images, targets
