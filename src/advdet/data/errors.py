"""The user-error classes of advdet, and bad-item accounting for datasets.

``AdvdetError`` is the one base class of errors a user can fix (a bad file, name or option). The CLI
prints such an error as one line (``error: FILE: ITEM: PROBLEM``) and exits with status 2; every other
exception is a bug and keeps its traceback. It lives in ``data``, the lowest layer, so that every
layer can raise it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


class AdvdetError(ValueError):
    """A user error: bad input file, name or option. The message names the file and the item.

    Subclasses ``ValueError`` so that ``except ValueError`` callers keep working.
    """


class UnknownNameError(AdvdetError, KeyError):
    """An unknown name (attack, model, method, column); also a ``KeyError`` for lookup callers."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class OptionError(AdvdetError, TypeError):
    """An option or hyper-parameter of the wrong name or type; also a ``TypeError``."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class DatasetError(AdvdetError):
    """A problem with one input file; the message always names the file."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass
class DataReport:
    """What a reader fixed, converted, dropped or skipped: counts plus the items with their reasons.

    ``skipped``: bad items left out because the user asked to skip (``--skip-bad``); ``dropped``:
    zero-area boxes (after clipping to the image) that are no target; ``converted``: images that were
    not 8-bit RGB (16-bit, RGBA, palette, CMYK, grayscale, ...) and were converted.
    """

    clipped_boxes: int = 0
    dropped_zero_area: int = 0
    converted_images: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    converted: list[tuple[str, str]] = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    @property
    def empty(self) -> bool:
        """Nothing clipped, dropped, converted or skipped."""
        return not (self.clipped_boxes or self.dropped_zero_area or self.converted_images or self.skipped)

    def as_dict(self) -> dict:
        return {
            "clipped_boxes": self.clipped_boxes,
            "dropped_zero_area": self.dropped_zero_area,
            "converted_images": self.converted_images,
            "skipped": [{"item": item, "problem": problem} for item, problem in self.skipped],
            "dropped": [{"item": item, "problem": problem} for item, problem in self.dropped],
            "converted": [{"item": item, "problem": problem} for item, problem in self.converted],
        }

    @classmethod
    def from_dict(cls, d: dict | None) -> "DataReport":
        """The inverse of ``as_dict`` (a report stored in a card or a result JSON); None -> empty."""
        d = d or {}
        return cls(clipped_boxes=int(d.get("clipped_boxes", 0)),
                   dropped_zero_area=int(d.get("dropped_zero_area", 0)),
                   converted_images=int(d.get("converted_images", 0)),
                   **{k: [(e["item"], e["problem"]) for e in d.get(k, [])] for k in ("skipped", "dropped", "converted")})

    def lines(self, limit: int = 10) -> list[str]:
        """Human-readable lines: the counts, then each skipped, dropped and converted item (first
        ``limit`` of each kind)."""
        if self.empty:
            return []
        out = [f"data report: {self.num_skipped} skipped, {self.dropped_zero_area} zero-area boxes dropped, "
               f"{self.clipped_boxes} boxes clipped to the image, {self.converted_images} images converted "
               "to 8-bit RGB"]
        for verb, items in (("skipped", self.skipped), ("dropped", self.dropped), ("converted", self.converted)):
            out += [f"  {verb} {item}: {problem}" for item, problem in items[:limit]]
            if len(items) > limit:
                out.append(f"  ... and {len(items) - limit} more {verb}")
        return out
