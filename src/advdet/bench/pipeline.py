"""The crafting pipeline the benchmarks share: the evaluation data letterboxed once per input size.

:class:`DatasetsBySize` is the one per-size dataset cache of ``bench transfer``, ``bench robustness`` and
the relevance similarity: every model reads the same images, in the same order, letterboxed to its own
input size, and each size is read once.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

from advdet.data.collate import collate_detection

__all__ = ["DatasetsBySize"]


class DatasetsBySize:
    """One letterboxed copy of ``data`` per input size, built on first use (``ds[size]``), the same images
    in the same order at every size.

    Two readers, as the benchmarks need them:

    - ``masks=False`` (robustness, analyses, relevance similarity): boxes only, through
      :func:`advdet.bench.robustness_scoring.load_eval_dataset` (a Pascal VOC folder as
      ``VOCDetection(split=voc_split)``, anything else as COCO format);
    - ``masks=True`` (transfer): COCO format only (``advdet.data.registry.build_dataset``), with the
      instance masks where every annotation has a segmentation, so mask victims get a segm mAP.
    """

    def __init__(self, data: str | os.PathLike, ann: str | os.PathLike | None = None, *, skip_bad: bool = False,
                 masks: bool = False, voc_split: str = "test") -> None:
        self.data, self.ann, self.skip_bad, self.masks, self.voc_split = data, ann, skip_bad, masks, voc_split
        self._by_size: dict[int, Any] = {}

    def _load(self, size: int) -> Any:
        if self.masks:
            from advdet.data.registry import build_dataset

            return build_dataset(self.data, self.ann, size=size, skip_bad=self.skip_bad)
        from advdet.bench.robustness_scoring import load_eval_dataset

        return load_eval_dataset(self.data, self.ann, size=size, voc_split=self.voc_split, skip_bad=self.skip_bad)

    def __getitem__(self, size: int) -> Any:
        size = int(size)
        if size not in self._by_size:
            self._by_size[size] = self._load(size)
        return self._by_size[size]

    def __contains__(self, size: object) -> bool:
        return size in self._by_size

    def __iter__(self) -> Iterator[int]:
        return iter(self._by_size)

    def __len__(self) -> int:
        return len(self._by_size)

    @property
    def first(self) -> Any:
        """The dataset built first (None before any): the reference for image ids, categories and the
        reader's report (the same source images at every size)."""
        return next(iter(self._by_size.values()), None)

    def batch(self, size: int, indices: Sequence[int]) -> tuple[Any, list[dict]]:
        """Images ``indices`` at ``size``, collated: (images (B, 3, size, size), targets)."""
        ds = self[size]
        return collate_detection([ds[i] for i in indices])
