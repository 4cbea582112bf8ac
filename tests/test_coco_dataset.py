"""CocoDetection: targets, masks, letterbox, and every kind of bad input."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader

from advdet.data.coco import CocoDetection
from advdet.data.collate import collate_detection
from advdet.data.errors import DatasetError


def rect(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def uncompressed_rle(m):
    flat, counts, cur, run = m.flatten(order="F"), [], 0, 0
    for v in flat:
        if v == cur:
            run += 1
        else:
            counts.append(run)
            cur, run = v, 1
    counts.append(run)
    return {"size": list(m.shape), "counts": counts}


def compressed_rle(m):
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"size": list(m.shape), "counts": rle["counts"].decode()}


def base_json():
    """img 1: 40x60 (polygon, compressed RLE, uncompressed RLE, crowd); img 2: 30x30 (polygon)."""
    return {
        "info": {"description": "test"},
        "images": [
            {"id": 2, "file_name": "b.png", "height": 30, "width": 30},
            {"id": 1, "file_name": "a.png", "height": 40, "width": 60},
        ],
        "categories": [{"id": 3, "name": "cat"}, {"id": 1, "name": "dog"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 3, "bbox": [10, 5, 20, 10], "area": 200, "iscrowd": 0,
             "segmentation": [[10, 5, 30, 5, 30, 15, 10, 15]]},
            {"id": 11, "image_id": 1, "category_id": 1, "bbox": [0, 20, 60, 20], "area": 1200, "iscrowd": 0,
             "segmentation": compressed_rle(rect(40, 60, 20, 40, 0, 60))},
            {"id": 12, "image_id": 1, "category_id": 3, "bbox": [40, 0, 10, 10], "area": 100, "iscrowd": 0,
             "segmentation": uncompressed_rle(rect(40, 60, 0, 10, 40, 50))},
            {"id": 13, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 1,
             "segmentation": uncompressed_rle(rect(40, 60, 0, 5, 0, 5))},
            {"id": 20, "image_id": 2, "category_id": 1, "bbox": [5, 5, 10, 10], "area": 100, "iscrowd": 0,
             "segmentation": [[5, 5, 15, 5, 15, 15, 5, 15]]},
        ],
    }


def save(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture
def coco(tmp_path):
    """Build a dataset folder; returns a function (json dict) -> (images_dir, ann_file)."""
    rng = np.random.default_rng(0)
    pix = {"a.png": rng.integers(0, 256, (40, 60, 3), dtype=np.uint8),
           "b.png": rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)}
    for name, arr in pix.items():
        save(tmp_path / "images" / name, arr)

    def build(js=None, text=None):
        ann = tmp_path / "instances.json"
        ann.write_text(text if text is not None else json.dumps(js if js is not None else base_json()))
        return tmp_path / "images", ann

    build.pixels = pix
    build.root = tmp_path
    return build


def test_targets_labels_and_letterbox(coco):
    ds = CocoDetection(*coco(), size=64)
    assert len(ds) == 2 and ds.image_ids == [1, 2]
    assert [c["id"] for c in ds.categories] == [1, 3] and ds.num_classes == 2
    assert ds.cat_id_to_label == {1: 0, 3: 1} and ds.label_to_cat_id == {0: 1, 1: 3}
    assert ds.with_masks

    it = ds[0]
    assert set(it) == {"image", "boxes", "labels", "masks", "image_id", "orig_size", "letterbox", "file_name"}
    assert it["image"].dtype == torch.float32 and it["image"].shape == (3, 64, 64)
    assert it["image"].min() >= 0 and it["image"].max() <= 1
    assert (it["image_id"], it["orig_size"], it["file_name"]) == (1, (40, 60), "a.png")
    lb = it["letterbox"]
    assert lb.scale == pytest.approx(64 / 60) and (lb.pad_x, lb.pad_y) == (0, 10)
    # padding rows are zero, content rows are not
    assert it["image"][:, :10].abs().sum() == 0 and it["image"][:, 53:].abs().sum() == 0
    assert it["image"][:, 10:53].mean() > 0.3
    # crowd annotation 13 excluded; order as in the file
    s = 64 / 60
    expect = torch.tensor([[10 * s, 5 * s + 10, 30 * s, 15 * s + 10],
                           [0, 20 * s + 10, 64, 40 * s + 10],
                           [40 * s, 10, 50 * s, 10 * s + 10]])
    assert it["boxes"].dtype == torch.float32
    np.testing.assert_allclose(it["boxes"], expect, atol=1e-4, rtol=0)
    assert it["labels"].tolist() == [1, 0, 1] and it["labels"].dtype == torch.int64
    assert it["masks"].shape == (3, 64, 64) and it["masks"].dtype == torch.uint8

    it2 = ds[1]  # 30x30 -> scale 64/30, no padding
    np.testing.assert_allclose(it2["boxes"], np.array([[5, 5, 15, 15]]) * 64 / 30, atol=1e-4, rtol=0)
    assert it2["labels"].tolist() == [0]


def test_masks_polygon_and_both_rle_kinds_decode_exactly(coco):
    ds = CocoDetection(*coco(), size=60)  # 40x60 -> scale 1, pad_y 10: masks are just shifted
    m = ds[0]["masks"]
    expect = np.zeros((3, 60, 60), np.uint8)
    expect[0, 15:25, 10:30] = 1  # polygon [10,5]-[30,15]
    expect[1, 30:50, 0:60] = 1  # compressed RLE
    expect[2, 10:20, 40:50] = 1  # uncompressed RLE
    assert np.array_equal(m.numpy(), expect)
    # image pixels are exact when no resize happens
    img = (ds[0]["image"][:, 10:50] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(img, coco.pixels["a.png"])


def test_masks_off(coco):
    ds = CocoDetection(*coco(), size=64, with_masks=False)
    assert "masks" not in ds[0] and not ds.with_masks
    js = base_json()
    for a in js["annotations"]:
        a.pop("segmentation")
    ds = CocoDetection(*coco(js), size=64)  # auto: no segmentation -> no masks
    assert "masks" not in ds[0]
    with pytest.raises(DatasetError, match=r"instances\.json.*annotation 10.*no segmentation"):
        CocoDetection(*coco(js), size=64, with_masks=True)


def test_collate_with_dataloader(coco):
    ds = CocoDetection(*coco(), size=32)
    images, targets = next(iter(DataLoader(ds, batch_size=2, collate_fn=collate_detection)))
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    assert [t["image_id"] for t in targets] == [1, 2]
    assert "image" not in targets[0] and targets[0]["boxes"].shape == (3, 4)
    assert torch.equal(images[1], ds[1]["image"])
    with pytest.raises(ValueError):
        collate_detection([])


def test_coco_gt_is_raw_json_when_clean_and_evaluates_to_ap_1(coco):
    images_dir, ann = coco()
    ds = CocoDetection(images_dir, ann, size=64)
    assert ds.coco_gt == json.loads(ann.read_text())

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO()
    gt.dataset = copy.deepcopy(ds.coco_gt)
    gt.createIndex()
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in ds.coco_gt["annotations"] if not a["iscrowd"]]
    ev = COCOeval(gt, gt.loadRes(dets), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_coco_gt_fills_missing_fields_and_sizes_from_headers(coco):
    js = base_json()
    for img in js["images"]:
        del img["height"], img["width"]
    for a in js["annotations"]:
        del a["area"], a["id"]
    ds = CocoDetection(*coco(js), size=64)
    assert ds[0]["orig_size"] == (40, 60)
    gt = ds.coco_gt
    assert [i["height"] for i in gt["images"]] == [30, 40]
    assert [a["id"] for a in gt["annotations"]] == [1, 2, 3, 4, 5]
    assert [a["area"] for a in gt["annotations"]] == [200.0, 1200.0, 100.0, 25.0, 100.0]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("problem", ["missing", "truncated", "garbage"])
def test_bad_image_raises_in_getitem_or_is_skipped(coco, problem):
    images_dir, ann = coco()
    path = images_dir / "b.png"
    if problem == "missing":
        path.unlink()
    elif problem == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(b"not an image at all" * 10)
    ds = CocoDetection(images_dir, ann, size=32)
    assert len(ds) == 2
    ds[0]
    with pytest.raises(DatasetError, match=r"b\.png") as err:
        ds[1]
    assert err.value.path.endswith("b.png")
    assert ("not found" if problem == "missing" else "unreadable") in err.value.problem

    ds = CocoDetection(images_dir, ann, size=32, skip_bad=True)
    assert len(ds) == 1 and ds.image_ids == [1]
    assert len(ds.report.skipped) == 1 and ds.report.skipped[0][0].endswith("b.png")
    assert "1 annotations skipped" in ds.report.skipped[0][1]
    assert ds.coco_gt["images"][0]["id"] == 1 and {a["image_id"] for a in ds.coco_gt["annotations"]} == {1}

    with pytest.raises(DatasetError, match=r"b\.png") as err:  # validation up front without skipping
        CocoDetection(images_dir, ann, size=32, validate_images=True)
    assert err.value.path.endswith("b.png") and not err.value.problem.startswith(str(images_dir))
    assert "skipped" not in str(err.value)


def test_grayscale_rgba_and_16bit_are_converted(tmp_path):
    d = tmp_path / "conv"
    gray = np.full((20, 20), 77, np.uint8)
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., :3] = (10, 200, 30)
    rgba[..., 3] = 255
    rgba[:10, :, 3] = 0  # transparent top half -> black
    deep = np.full((20, 20), 32896, np.uint16)  # 32896 / 65535 * 255 = 128
    d.mkdir()
    Image.fromarray(gray).save(d / "g.png")
    Image.fromarray(rgba).save(d / "r.png")
    Image.fromarray(deep).save(d / "d.png")
    assert Image.open(d / "d.png").mode.startswith("I")
    js = {"images": [{"id": i + 1, "file_name": f, "height": 20, "width": 20}
                     for i, f in enumerate(["g.png", "r.png", "d.png"])],
          "annotations": [], "categories": [{"id": 1, "name": "x"}]}
    (d / "ann.json").write_text(json.dumps(js))
    ds = CocoDetection(d, d / "ann.json", size=20)
    px = [(ds[i]["image"] * 255).round().to(torch.uint8) for i in range(3)]
    assert ds.report.converted_images == 3
    ds[0]
    assert ds.report.converted_images == 3  # counted once per image
    assert px[0].shape == (3, 20, 20) and (px[0] == 77).all()
    assert px[1][:, :10].sum() == 0 and px[1][:, 10, 0].tolist() == [10, 200, 30]
    assert (px[2] == 128).all()
    assert "masks" not in ds[0] and ds[0]["boxes"].shape == (0, 4)
    ds = CocoDetection(d, d / "ann.json", size=20, skip_bad=True)
    assert ds.report.converted_images == 3 and not ds.report.skipped
    assert sorted((Path(f).name, what) for f, what in ds.report.converted) == [
        ("d.png", "16-bit converted to 8-bit RGB"), ("g.png", "grayscale converted to 8-bit RGB"),
        ("r.png", "RGBA (alpha dropped) converted to 8-bit RGB")]
    lines = ds.report.lines()
    assert "3 images converted to 8-bit RGB" in lines[0] and sum("converted" in ln for ln in lines[1:]) == 3


def test_palette_and_cmyk_are_converted_and_listed(tmp_path):
    Image.new("P", (8, 6), 3).save(tmp_path / "p.png")
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    js = {"images": [{"id": 1, "file_name": "p.png"}, {"id": 2, "file_name": "c.jpg"}],
          "annotations": [], "categories": [{"id": 1, "name": "x"}]}
    (tmp_path / "ann.json").write_text(json.dumps(js))
    ds = CocoDetection(tmp_path, tmp_path / "ann.json", size=8, skip_bad=True)
    assert ds.report.converted_images == 2
    assert sorted(what for _, what in ds.report.converted) == ["CMYK converted to 8-bit RGB",
                                                               "palette converted to 8-bit RGB"]


def test_image_size_mismatch_names_image(coco):
    js = base_json()
    js["images"][0]["width"] = 31
    ds = CocoDetection(*coco(js), size=32)
    with pytest.raises(DatasetError, match=r"b\.png: image is 30x30 \(WxH\) but instances\.json says 31x30"):
        ds[1]


def test_orphan_annotation(coco):
    js = base_json()
    js["annotations"].append({"id": 99, "image_id": 7, "category_id": 1, "bbox": [0, 0, 5, 5]})
    with pytest.raises(DatasetError, match=r"instances\.json: annotation 99 \(image 7\): image id 7 is not in 'images'"):
        CocoDetection(*coco(js))
    ds = CocoDetection(*coco(js), size=32, skip_bad=True)
    assert ds.report.skipped == [("annotation 99 (image 7)", "image id 7 is not in 'images'")]
    assert len(ds) == 2 and ds[0]["labels"].tolist() == [1, 0, 1]


def test_unknown_category(coco):
    js = base_json()
    js["annotations"][0]["category_id"] = 42
    with pytest.raises(DatasetError, match=r"instances\.json: annotation 10 \(image 1\): unknown category id 42") as err:
        CocoDetection(*coco(js))
    assert err.value.path.endswith("instances.json")
    ds = CocoDetection(*coco(js), size=32, skip_bad=True)
    assert ds.report.skipped == [("annotation 10 (image 1)", "unknown category id 42")]
    assert ds[0]["labels"].tolist() == [0, 1]
    assert 10 not in {a["id"] for a in ds.coco_gt["annotations"]}


def test_boxes_clipped_and_zero_area_dropped(coco):
    js = base_json()
    for a in js["annotations"]:
        a.pop("segmentation")
    js["annotations"] += [
        {"id": 30, "image_id": 2, "category_id": 3, "bbox": [-5, -5, 20, 20]},  # clipped to [0,0,15,15]
        {"id": 31, "image_id": 2, "category_id": 3, "bbox": [25, 10, 10, 50]},  # clipped to [25,10,30,30]
        {"id": 33, "image_id": 2, "category_id": 3, "bbox": [3, 3, 0, 7]},  # zero width: dropped and listed
    ]
    ds = CocoDetection(*coco(js), size=30)  # 30x30 at 30: identity letterbox
    assert ds.report.clipped_boxes == 2 and ds.report.dropped_zero_area == 1
    assert ds.report.dropped == [("annotation 33 (image 2)", "zero-area bbox [3, 3, 0, 7]: not a target")]
    it = ds[1]
    assert it["boxes"].tolist() == [[5, 5, 15, 15], [0, 0, 15, 15], [25, 10, 30, 30]]
    assert it["labels"].tolist() == [0, 1, 1]
    gt = {a["id"]: a["bbox"] for a in ds.coco_gt["annotations"]}
    assert gt[30] == [0, 0, 15, 15] and gt[31] == [25, 10, 5, 20] and 33 not in gt


@pytest.mark.parametrize("bbox, problem", [
    ([40, 10, 5, 5], r"bbox \[40, 10, 5, 5\] lies entirely outside the 30x30 image \(b\.png\)"),
    ([3, 3, -2, 7], r"bbox \[3, 3, -2, 7\] has a negative width or height"),
])
def test_negative_or_outside_box_is_an_error_or_skipped_and_listed(coco, bbox, problem):
    js = base_json()
    for a in js["annotations"]:
        a.pop("segmentation")
    js["annotations"].append({"id": 34, "image_id": 2, "category_id": 3, "bbox": bbox})
    with pytest.raises(DatasetError, match=r"instances\.json: annotation 34 \(image 2\): " + problem):
        CocoDetection(*coco(js), size=30)
    ds = CocoDetection(*coco(js), size=30, skip_bad=True)
    assert [item for item, _ in ds.report.skipped] == ["annotation 34 (image 2)"]
    assert ds.report.dropped_zero_area == 0 and 34 not in {a["id"] for a in ds.coco_gt["annotations"]}
    assert any("annotation 34 (image 2)" in line for line in ds.report.lines())


def test_duplicate_image_id_names_both_files(coco):
    js = base_json()
    js["images"].append({"id": 2, "file_name": "a.png", "height": 40, "width": 60})
    with pytest.raises(DatasetError, match=r"image 2: duplicate image id 2: 'b\.png' and 'a\.png'"):
        CocoDetection(*coco(js))
    ds = CocoDetection(*coco(js), skip_bad=True, size=32)
    (item, problem), = ds.report.skipped
    assert item == "image 2" and "'b.png' and 'a.png'" in problem and ds.image_ids == [1]


def test_malformed_and_missing_json(coco):
    with pytest.raises(DatasetError, match=r"instances\.json: malformed JSON"):
        CocoDetection(*coco(text="{'images': [}"))
    with pytest.raises(DatasetError, match=r"instances\.json: top level is list"):
        CocoDetection(*coco(text="[]"))
    with pytest.raises(DatasetError, match=r"nope\.json: file not found"):
        CocoDetection(coco.root, coco.root / "nope.json")


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_missing_top_level_key(coco, key):
    js = base_json()
    del js[key]
    with pytest.raises(DatasetError, match=rf"instances\.json: missing key '{key}'"):
        CocoDetection(*coco(js), skip_bad=True)  # not fixable: raises even when skipping


def test_missing_keys_in_entries(coco):
    js = base_json()
    del js["annotations"][1]["bbox"]
    del js["annotations"][4]["category_id"]
    with pytest.raises(DatasetError, match=r"annotation 11: missing key\(s\) 'bbox'"):
        CocoDetection(*coco(js))
    ds = CocoDetection(*coco(js), skip_bad=True, size=32)
    assert ds.report.skipped == [("annotation 11", "missing key(s) 'bbox'"),
                                 ("annotation 20", "missing key(s) 'category_id'")]
    assert ds[0]["labels"].tolist() == [1, 1] and ds[1]["labels"].tolist() == []

    js = base_json()
    del js["images"][0]["file_name"]
    with pytest.raises(DatasetError, match=r"image 2: missing 'file_name'"):
        CocoDetection(*coco(js))
    ds = CocoDetection(*coco(js), skip_bad=True)
    assert ds.image_ids == [1] and ds.report.skipped == [("image 2", "missing 'file_name'")]

    js = base_json()
    js["categories"][0].pop("name")
    with pytest.raises(DatasetError, match=r"category #0 needs an integer 'id' and a string 'name'"):
        CocoDetection(*coco(js))


def test_malformed_values(coco):
    cases = [
        (lambda js: js["annotations"][0].update(bbox=[1, 2, 3]), r"bbox \[1, 2, 3\] is not 4 finite numbers"),
        (lambda js: js["annotations"][0].update(bbox=[1, "a", 3, 4]), r"is not 4 finite numbers"),
        (lambda js: js["annotations"][0].update(segmentation=[[1, 1, 5, 5]]), r"polygon has 4 coordinates"),
        (lambda js: js["annotations"][1]["segmentation"].update(size=[10, 10]), r"RLE size \[10, 10\] differs"),
        (lambda js: js["annotations"][0].update(iscrowd=2), r"iscrowd 2 is not 0 or 1"),
        (lambda js: js["images"].append(dict(js["images"][0])), r"image 2: duplicate image id"),
        (lambda js: js["images"][1].update(height=-4), r"invalid height/width"),
        (lambda js: js["annotations"][1].update(id=10), r"annotation 10: duplicate or non-integer annotation id"),
    ]
    for mutate, pattern in cases:
        js = base_json()
        mutate(js)
        with pytest.raises(DatasetError, match=pattern):
            CocoDetection(*coco(js))
        ds = CocoDetection(*coco(js), skip_bad=True, size=32)
        assert len(ds.report.skipped) == 1, pattern
