"""The shared crafting pipeline (advdet.bench.pipeline): the per-size dataset cache."""

from __future__ import annotations

import pytest
import torch

from advdet.bench.pipeline import DatasetsBySize
from advdet.data.shapes import write_shapes_split


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline_shapes")
    write_shapes_split(root, "val", 3, seed=0, workers=1)
    return str(root)


def test_datasets_by_size_reads_each_size_once_in_the_same_order(tiny_data):
    ds = DatasetsBySize(tiny_data)
    assert len(ds) == 0 and ds.first is None
    a = ds[64]
    assert ds[64] is a and ds.first is a and 64 in ds and 96 not in ds
    b = ds[96]
    assert list(ds) == [64, 96] and ds.first is a
    assert list(a.image_ids) == list(b.image_ids)
    assert a[0]["image"].shape == (3, 64, 64) and b[0]["image"].shape == (3, 96, 96)
    x, targets = ds.batch(96, [2, 0])
    assert x.shape == (2, 3, 96, 96)
    assert [t["image_id"] for t in targets] == [b.image_ids[2], b.image_ids[0]]
    assert torch.equal(x[1], b[0]["image"])


def test_datasets_by_size_masks_only_for_the_transfer_reader(tiny_data):
    assert DatasetsBySize(tiny_data, masks=True)[64].with_masks  # shapes has a segmentation per object
    assert not DatasetsBySize(tiny_data)[64].with_masks           # evaluation reader: boxes only
