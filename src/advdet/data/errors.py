"""Errors and bad-item accounting for datasets."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


class DatasetError(ValueError):
    """A problem with one input file; the message always names the file."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass
class DataReport:
    """What a reader fixed or skipped: counts plus the list of skipped items with their reasons."""

    clipped_boxes: int = 0
    dropped_zero_area: int = 0
    converted_images: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def as_dict(self) -> dict:
        return {
            "clipped_boxes": self.clipped_boxes,
            "dropped_zero_area": self.dropped_zero_area,
            "converted_images": self.converted_images,
            "skipped": [{"item": item, "problem": problem} for item, problem in self.skipped],
        }
