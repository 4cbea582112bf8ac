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


def test_crafter_batches_follow_the_seed_policy_and_quantise(tiny_data):
    from advdet.attacks.batches import letterbox_mask
    from advdet.attacks.quantize import quantize_adv, to_uint8
    from advdet.attacks.registry import build_attack
    from advdet.attacks.seeding import seed_batch
    from advdet.bench.pipeline import Crafter

    ds = DatasetsBySize(tiny_data, masks=True)
    atk = build_attack("gaussian", None, valid_only=True, seed=7)
    crafted = list(Crafter(atk, 7, torch.device("cpu")).batches(ds, 64, [[0, 1], [2]]))
    assert [b.indices for b in crafted] == [[0, 1], [2]] and all(b.size == 64 for b in crafted)
    for b in crafted:
        x, targets = ds.batch(64, b.indices)
        mask = letterbox_mask([t["letterbox"] for t in targets], 64, 64)
        seed_batch(atk, 7, b.indices[0])
        expect = quantize_adv(atk(x, None, mask=mask), x, None, mask=mask)
        assert b.adv.dtype == torch.uint8 and torch.equal(b.adv, expect)
        assert torch.equal(b.x, x) and torch.equal(b.mask, mask) and torch.equal(b.clean_u8, to_uint8(x))
        assert len(b.stats["rmse"]) == len(b.indices) and b.diagnostics is None
    floats = list(Crafter(atk, 7, torch.device("cpu"), quantize=False).batches(ds, 64, [[2]]))
    seed_batch(atk, 7, 2)
    x, targets = ds.batch(64, [2])
    mask = letterbox_mask([t["letterbox"] for t in targets], 64, 64)
    assert torch.equal(floats[0].adv, atk(x, None, mask=mask)) and floats[0].stats is None
    # craft(): the same seed policy on a batch the caller holds (robustness, analyses)
    assert torch.equal(Crafter(atk, 7, torch.device("cpu")).craft(2, x, None, mask), floats[0].adv)


def test_model_set_loads_once_and_skips_what_it_may():
    from advdet.bench.loading import UntrainedModelError
    from advdet.bench.pipeline import ModelSet
    from advdet.models.yolov3 import yolov3_small

    yolo = yolov3_small(num_classes=3, input_size=64).eval()
    ms = ModelSet(device=torch.device("cpu"), models={"yolo": yolo}, skip_unavailable=True)
    assert ms.get("yolo") is ms.get("yolo") and ms["yolo"].model is yolo and ms["yolo"].input_size == 64
    assert ms.get("torchvision:fcos_tiny") is None and ms.skipped[0].startswith("model torchvision:fcos_tiny:")
    with pytest.raises(UntrainedModelError):
        ModelSet(device=torch.device("cpu")).get("torchvision:fcos_tiny")
