"""COCO mAP: agreement with pycocotools, hand-computed AP, edge cases, result conversion."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as pc_mask
from pycocotools.coco import COCO as PcCOCO
from pycocotools.cocoeval import COCOeval as PcCOCOeval

from advdet.metrics import COCO_METRIC_KEYS, coco_map, detections_to_coco_results

# pycocotools stats index of each of our keys
PC_INDEX = {"map": 0, "map50": 1, "map75": 2, "map_small": 3, "map_medium": 4, "map_large": 5, "ar100": 8}


def _ellipse_mask(h, w, box):
    x1, y1, x2, y2 = box
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    rx, ry = max((x2 - x1) / 2, 1), max((y2 - y1) / 2, 1)
    return (((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2 <= 1).astype(np.uint8)


def _rle(mask):
    rle = pc_mask.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def make_dataset(seed=0, n_images=24, with_masks=False, size=160):
    """Crowd-free GT over 5 categories, of which category 5 has no GT and category 4 no detections.

    Images 0 mod 6 get no detections at all. Boxes span small, medium and large areas.
    """
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    cats = [{"id": c, "name": f"c{c}"} for c in (1, 2, 3, 4, 5)]
    for img_id in range(1, n_images + 1):
        images.append({"id": img_id, "width": size, "height": size, "file_name": f"{img_id}.png"})
        for _ in range(rng.integers(1, 5)):
            cat = int(rng.choice([1, 2, 3, 4]))
            side = float(rng.choice([rng.uniform(8, 28), rng.uniform(40, 80), rng.uniform(110, 150)]))
            w, h = side * rng.uniform(0.8, 1.0), side * rng.uniform(0.8, 1.0)
            x1, y1 = rng.uniform(0, size - w), rng.uniform(0, size - h)
            box = [x1, y1, x1 + w, y1 + h]
            ann = {"id": len(anns) + 1, "image_id": img_id, "category_id": cat, "iscrowd": 0,
                   "bbox": [x1, y1, w, h], "area": w * h}
            if with_masks:
                m = _ellipse_mask(size, size, box)
                ann["segmentation"] = _rle(m)
                ann["area"] = float(m.sum())
            anns.append(ann)
            if img_id % 6 == 0 or cat == 4:
                continue
            # a true-ish detection (jittered), sometimes with a wrong class
            for _ in range(rng.integers(1, 3)):
                j = rng.normal(0, 0.12 * side, 4)
                dbox = [box[0] + j[0], box[1] + j[1], box[2] + j[2], box[3] + j[3]]
                dbox = [min(dbox[0], dbox[2] - 2), min(dbox[1], dbox[3] - 2), dbox[2], dbox[3]]
                dcat = cat if rng.random() < 0.85 else int(rng.choice([1, 2, 3]))
                dets.append(_det(img_id, dcat, dbox, float(rng.random()), with_masks, size))
        if img_id % 6 != 0:
            for _ in range(rng.integers(0, 4)):  # pure false positives
                x1, y1 = rng.uniform(0, size - 30, 2)
                dbox = [x1, y1, x1 + rng.uniform(5, 60), y1 + rng.uniform(5, 60)]
                dets.append(_det(img_id, int(rng.choice([1, 2, 3])), dbox, float(rng.random() * 0.6),
                                 with_masks, size))
    gt = {"images": images, "annotations": anns, "categories": cats}
    return gt, dets


def _det(img_id, cat, box, score, with_masks, size):
    d = {"image_id": img_id, "category_id": cat,
         "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": score}
    if with_masks:
        d["segmentation"] = _rle(_ellipse_mask(size, size, box))
    return d


def pycocotools_stats(gt, dets, iou_type, image_ids=None):
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = PcCOCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(dets))
        ev = PcCOCOeval(coco_gt, coco_dt, iou_type)
        if image_ids is not None:
            ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: float(ev.stats[i]) for k, i in PC_INDEX.items()}


@pytest.mark.parametrize("iou_type,drop_det_bbox", [("bbox", False), ("segm", False), ("segm", True)])
def test_agrees_with_pycocotools(iou_type, drop_det_bbox):
    gt, dets = make_dataset(seed=1, with_masks=iou_type == "segm")
    if drop_det_bbox:  # mask-only results: area and box come from the RLE, as in loadRes
        dets = [{k: v for k, v in d.items() if k != "bbox"} for d in dets]
    ours = coco_map(gt, dets, iou_type=iou_type)
    ref = pycocotools_stats(gt, dets, iou_type)
    assert set(ours) == set(COCO_METRIC_KEYS)
    # the data are non-trivial: every bucket is populated and the scores are far from 0 and 1
    for key in COCO_METRIC_KEYS:
        assert 0.05 < ref[key] < 0.95, (key, ref[key])
        assert ours[key] == pytest.approx(ref[key], abs=1e-4), key


def test_agrees_with_pycocotools_on_image_subset():
    gt, dets = make_dataset(seed=2)
    subset = [2, 3, 5, 6, 7, 12]
    ours = coco_map(gt, dets, image_ids=subset)
    ref = pycocotools_stats(gt, dets, "bbox", image_ids=subset)
    full = coco_map(gt, dets)
    assert ours["map"] != pytest.approx(full["map"], abs=1e-3)  # the subset really changes the number
    for key in COCO_METRIC_KEYS:
        assert ours[key] == pytest.approx(ref[key], abs=1e-4), key


def _two_gt_case():
    gt = {
        "images": [{"id": 1, "width": 200, "height": 200}, {"id": 2, "width": 200, "height": 200}],
        "categories": [{"id": 7, "name": "a"}, {"id": 9, "name": "b"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 50, 50], "area": 2500, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 7, "bbox": [100, 100, 50, 50], "area": 2500, "iscrowd": 0},
        ],
    }
    dets = [
        {"image_id": 1, "category_id": 7, "bbox": [10, 10, 50, 50], "score": 0.9},  # TP
        {"image_id": 1, "category_id": 7, "bbox": [120, 10, 40, 40], "score": 0.8},  # FP (no overlap)
        {"image_id": 2, "category_id": 7, "bbox": [100, 100, 50, 50], "score": 0.7},  # TP
    ]
    return gt, dets


def test_hand_computed_ap():
    gt, dets = _two_gt_case()
    # Ranked: TP, FP, TP -> (recall, precision) = (0.5, 1), (0.5, 1/2), (1.0, 2/3).
    # Interpolated precision max_{r' >= r} p(r'): 1 for r in {0, .01, ..., .50} (51 points),
    # 2/3 for r in {.51, ..., 1.00} (50 points). AP = (51 * 1 + 50 * 2/3) / 101 = 0.834983...
    # Boxes match exactly, so every IoU threshold gives the same AP; category 9 has no GT (-1) and
    # is left out of the mean. Both GT are medium (area 2500), so small and large are -1.
    expected = (51 + 50 * 2 / 3) / 101
    res = coco_map(gt, dets)
    assert res["map"] == pytest.approx(expected, abs=1e-9)
    assert res["map50"] == pytest.approx(expected, abs=1e-9)
    assert res["map75"] == pytest.approx(expected, abs=1e-9)
    assert res["map_medium"] == pytest.approx(expected, abs=1e-9)
    assert res["map_small"] == -1.0
    assert res["map_large"] == -1.0
    assert res["ar100"] == pytest.approx(1.0)


def test_per_class_and_no_gt_category_excluded():
    gt, dets = _two_gt_case()
    expected = (51 + 50 * 2 / 3) / 101
    res = coco_map(gt, dets, per_class=True)
    assert res["ap_per_class"][7] == pytest.approx(expected, abs=1e-9)
    assert res["ap_per_class"][9] == -1.0  # no GT for category 9
    # A detection of the GT-less category changes nothing: category 9 stays out of the mean.
    dets2 = dets + [{"image_id": 2, "category_id": 9, "bbox": [0, 0, 30, 30], "score": 0.95}]
    assert coco_map(gt, dets2)["map"] == pytest.approx(expected, abs=1e-9)
    # A category with GT but no detections counts as 0: adding GT of category 9 halves the mean.
    gt3 = copy.deepcopy(gt)
    gt3["annotations"].append(
        {"id": 3, "image_id": 1, "category_id": 9, "bbox": [100, 100, 40, 40], "area": 1600, "iscrowd": 0})
    assert coco_map(gt3, dets)["map"] == pytest.approx(expected / 2, abs=1e-9)


def test_empty_detections_give_zeros():
    gt, _ = make_dataset(seed=3)
    res = coco_map(gt, [])
    assert set(res) == set(COCO_METRIC_KEYS)
    assert all(v == 0.0 for v in res.values()), res
    # buckets without GT keep COCO's -1
    gt2, _ = _two_gt_case()
    res2 = coco_map(gt2, [], iou_type="segm")
    assert res2["map"] == 0.0 and res2["map_medium"] == 0.0 and res2["ar100"] == 0.0
    assert res2["map_small"] == -1.0 and res2["map_large"] == -1.0


def test_inputs_not_mutated_and_paths_accepted(tmp_path):
    gt, dets = make_dataset(seed=4)
    gt_before, dets_before = copy.deepcopy(gt), copy.deepcopy(dets)
    res = coco_map(gt, dets)
    assert gt == gt_before and dets == dets_before
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps(dets))
    res_path = coco_map(tmp_path / "gt.json", str(tmp_path / "res.json"))
    assert res_path == pytest.approx(res, abs=1e-12)


def test_bad_inputs_raise_clear_errors(tmp_path):
    gt, dets = _two_gt_case()
    with pytest.raises(ValueError, match="image ids not in the ground truth"):
        coco_map(gt, dets + [{"image_id": 99, "category_id": 7, "bbox": [0, 0, 1, 1], "score": 0.5}])
    with pytest.raises(ValueError, match="category ids not in the ground truth"):
        coco_map(gt, dets + [{"image_id": 1, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 0.5}])
    with pytest.raises(ValueError, match="not finite"):
        coco_map(gt, dets + [{"image_id": 1, "category_id": 7, "bbox": [0, 0, 1, 1], "score": float("nan")}])
    with pytest.raises(ValueError, match="segmentation"):
        coco_map(gt, dets, iou_type="segm")
    with pytest.raises(ValueError, match="iou_type"):
        coco_map(gt, dets, iou_type="keypoints")
    with pytest.raises(ValueError, match="image_ids not in the ground truth"):
        coco_map(gt, dets, image_ids=[1, 5])
    with pytest.raises(ValueError, match="missing.json"):
        coco_map(tmp_path / "missing.json", dets)


def test_verbose_flag(capsys):
    gt, dets = _two_gt_case()
    coco_map(gt, dets)
    assert capsys.readouterr().out == ""
    coco_map(gt, dets, verbose=True)
    out = capsys.readouterr().out
    assert "Average Precision" in out and "0.835" in out


def test_detections_to_coco_results_boxes():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 80.0], [0.5, 1.5, 2.5, 4.0]])
    res = detections_to_coco_results(42, boxes, torch.tensor([0.9, 0.3]), torch.tensor([0, 2]), [1, 5, 17])
    assert res == [
        {"image_id": 42, "category_id": 1, "bbox": [10.0, 20.0, 40.0, 60.0], "score": pytest.approx(0.9)},
        {"image_id": 42, "category_id": 17, "bbox": [0.5, 1.5, 2.0, 2.5], "score": pytest.approx(0.3)},
    ]
    json.dumps(res)  # JSON-serialisable (plain Python types)
    res_dict = detections_to_coco_results(1, np.zeros((1, 4)), [0.5], [3], {3: 90})
    assert res_dict[0]["category_id"] == 90
    assert detections_to_coco_results(1, np.zeros((0, 4)), [], [], {}) == []
    with pytest.raises(ValueError, match="label"):
        detections_to_coco_results(1, np.zeros((1, 4)), [0.5], [4], {3: 90})


def test_detections_to_coco_results_masks_roundtrip_and_evaluate():
    h, w = 40, 60
    m0 = np.zeros((h, w), bool)
    m0[5:15, 10:30] = True  # 10 x 20 = 200 pixels
    m1 = np.zeros((h, w), bool)
    m1[20:40, 0:5] = True  # 20 x 5 = 100 pixels
    probs = torch.from_numpy(np.stack([m0, m1]).astype(np.float32) * 0.8 + 0.1)[:, None]  # (N, 1, H, W)
    res = detections_to_coco_results(3, [[10, 5, 30, 15], [0, 20, 5, 40]], [0.9, 0.8], [0, 0], [1], masks=probs)
    json.dumps(res)
    decoded = pc_mask.decode([r["segmentation"] for r in res])  # (H, W, N)
    assert np.array_equal(decoded[..., 0], m0) and np.array_equal(decoded[..., 1], m1)
    assert [int(x) for x in pc_mask.area([r["segmentation"] for r in res])] == [200, 100]
    # the masks evaluate perfectly against GT made of the same masks
    gt = {"images": [{"id": 3, "width": w, "height": h}], "categories": [{"id": 1, "name": "a"}],
          "annotations": [{"id": i + 1, "image_id": 3, "category_id": 1, "iscrowd": 0,
                           "segmentation": _rle(m.astype(np.uint8)), "area": float(m.sum()),
                           "bbox": list(map(float, pc_mask.toBbox(_rle(m.astype(np.uint8)))))}
                          for i, m in enumerate([m0, m1])]}
    assert coco_map(gt, res, iou_type="segm")["map"] == pytest.approx(1.0)
