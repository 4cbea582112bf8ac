"""CocoWriter: JSON content, atomic deterministic files, validation, and the round trip with CocoDetection."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from advdet.data.coco import CocoDetection
from advdet.data.coco_writer import CocoWriter, to_uint8_hwc

CATS = [{"id": 5, "name": "circle", "supercategory": "shape"}, {"id": 2, "name": "square"}]


def sample(rng, h, w, n):
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    boxes, masks = [], np.zeros((n, h, w), np.uint8)
    for j in range(n):
        x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
        x1, y1 = int(rng.integers(x0 + 4, w + 1)), int(rng.integers(y0 + 4, h + 1))
        masks[j, y0:y1, x0:x1] = 1
        boxes.append([x0, y0, x1, y1])
    return img, np.array(boxes, np.float32), masks


def test_json_content_and_files(tmp_path):
    rng = np.random.default_rng(0)
    img, boxes, masks = sample(rng, 24, 32, 2)
    w = CocoWriter(tmp_path / "out", CATS, info={"description": "unit"})
    assert w.add("sub/first.jpg", img, boxes, [5, 2], masks) == 1
    assert w.add("second", img, boxes[:1] + 0.25, [2], image_id=40, image_info={"source_id": 7}) == 40
    assert w.add("third.png", img) == 41  # no annotations
    assert "sub/first.png" in w and "first.png" not in w and len(w) == 3
    path = w.close()
    assert path == tmp_path / "out" / "instances.json"
    js = json.loads(path.read_text())
    assert js["info"] == {"description": "unit"}
    assert [c["id"] for c in js["categories"]] == [2, 5] and js["categories"][1]["supercategory"] == "shape"
    assert js["images"] == [
        {"id": 1, "file_name": "sub/first.png", "height": 24, "width": 32},
        {"id": 40, "file_name": "second.png", "height": 24, "width": 32, "source_id": 7},
        {"id": 41, "file_name": "third.png", "height": 24, "width": 32},
    ]
    a = js["annotations"]
    assert [x["id"] for x in a] == [1, 2, 3] and [x["image_id"] for x in a] == [1, 1, 40]
    assert [x["category_id"] for x in a] == [5, 2, 2] and all(x["iscrowd"] == 0 for x in a)
    b = boxes[0]
    assert a[0]["bbox"] == [b[0], b[1], b[2] - b[0], b[3] - b[1]]
    assert a[0]["area"] == float(masks[0].sum())
    assert isinstance(a[0]["segmentation"]["counts"], str) and a[0]["segmentation"]["size"] == [24, 32]
    assert "segmentation" not in a[2]
    assert a[2]["bbox"] == [b[0] + 0.25, b[1] + 0.25, b[2] - b[0], b[3] - b[1]]
    assert a[2]["area"] == (b[2] - b[0]) * (b[3] - b[1])
    # PNG, RGB, exact pixels; nothing temporary left behind
    saved = Image.open(tmp_path / "out" / "images" / "sub" / "first.png")
    assert saved.format == "PNG" and saved.mode == "RGB"
    assert np.array_equal(np.asarray(saved), img)
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name.endswith(".tmp")]


def test_round_trip_identical(tmp_path):
    """Write S x S images with the writer, read them back at S: pixels, boxes, labels, masks identical."""
    rng = np.random.default_rng(1)
    s = 48
    written = []
    with CocoWriter(tmp_path, CATS) as w:
        for i in range(3):
            img, boxes, masks = sample(rng, s, s, 3)
            boxes = np.minimum(boxes + rng.uniform(0, 0.9, boxes.shape).astype(np.float32), s)  # sub-pixel
            cids = rng.choice([5, 2], size=3)
            w.add(f"{i:03d}.png", img, boxes, cids, masks)
            written.append((img, boxes, cids, masks))
    ds = CocoDetection(tmp_path / "images", tmp_path / "instances.json", size=s)
    assert len(ds) == 3 and ds.with_masks and not ds.report.clipped_boxes
    for i, (img, boxes, cids, masks) in enumerate(written):
        it = ds[i]
        assert it["file_name"] == f"{i:03d}.png" and it["image_id"] == i + 1
        pix = (it["image"] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        assert np.array_equal(pix, img)
        np.testing.assert_allclose(it["boxes"], boxes, atol=1e-3, rtol=0)
        assert [ds.label_to_cat_id[int(k)] for k in it["labels"]] == list(cids)
        assert np.array_equal(it["masks"].numpy(), masks)


def test_round_trip_from_dataset_items(tmp_path):
    """The adversarial-dataset path: read items, save letterboxed float images + targets, read back."""
    rng = np.random.default_rng(2)
    src = CocoWriter(tmp_path / "src", CATS)
    for i, (h, wd) in enumerate([(30, 50), (60, 20)]):
        img, boxes, masks = sample(rng, h, wd, 2)
        src.add(f"{i}.png", img, boxes, [5, 2], masks)
    src.close()
    ds = CocoDetection(tmp_path / "src" / "images", tmp_path / "src" / "instances.json", size=40)

    out = CocoWriter(tmp_path / "adv", ds.categories)
    for it in (ds[0], ds[1]):
        cids = [ds.label_to_cat_id[int(k)] for k in it["labels"]]
        out.add(it["file_name"], it["image"], it["boxes"], cids, it["masks"], image_id=it["image_id"])
    out.close()

    back = CocoDetection(tmp_path / "adv" / "images", tmp_path / "adv" / "instances.json", size=40)
    assert back.image_ids == ds.image_ids and back.categories == ds.categories
    for i in range(2):
        a, b = ds[i], back[i]
        assert b["orig_size"] == (40, 40) and b["letterbox"].scale == 1.0
        assert (a["image"] - b["image"]).abs().max() <= 0.5 / 255 + 1e-6  # only uint8 rounding
        np.testing.assert_allclose(b["boxes"], a["boxes"], atol=1e-3, rtol=0)
        assert torch.equal(b["labels"], a["labels"]) and torch.equal(b["masks"], a["masks"])

    half = CocoDetection(tmp_path / "adv" / "images", tmp_path / "adv" / "instances.json", size=20)
    np.testing.assert_allclose(half[0]["boxes"], ds[0]["boxes"] / 2, atol=1e-3, rtol=0)


def test_float_images_round_and_bytes_are_deterministic(tmp_path):
    x = torch.linspace(0, 1, 3 * 8 * 8).view(3, 8, 8)
    arr = to_uint8_hwc(x)
    assert arr.shape == (8, 8, 3) and arr.dtype == np.uint8
    assert np.array_equal(arr, np.round(x.numpy() * 255).astype(np.uint8).transpose(1, 2, 0))
    assert np.array_equal(to_uint8_hwc(torch.full((4, 5), 2 / 255)), np.full((4, 5, 3), 2, np.uint8))
    q = torch.randint(0, 256, (3, 6, 6)).float() / 255  # quantised floats come back exactly
    assert np.array_equal(to_uint8_hwc(q), (q * 255).round().byte().permute(1, 2, 0).numpy())

    for d in ("a", "b"):
        with CocoWriter(tmp_path / d, CATS) as w:
            w.add("x", x, [[1, 1, 5, 6]], [2], np.ones((1, 8, 8)))
    for rel in ("images/x.png", "instances.json"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_boxes_are_clipped_to_the_image(tmp_path):
    w = CocoWriter(tmp_path, ["a"])
    w.add("x", np.zeros((10, 20, 3), np.uint8), [[-3, 2, 25, 12.5]], [1])
    assert w.annotations[0]["bbox"] == [0.0, 2.0, 20.0, 8.0] and w.categories == [{"id": 1, "name": "a"}]


def test_invalid_input_raises(tmp_path):
    w = CocoWriter(tmp_path, CATS)
    img = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(ValueError, match=r"unknown category ids \[3\]"):
        w.add("a", img, [[0, 0, 5, 5]], [3])
    with pytest.raises(ValueError, match="1 boxes but 2 category ids"):
        w.add("a", img, [[0, 0, 5, 5]], [2, 5])
    with pytest.raises(ValueError, match="positive width"):
        w.add("a", img, [[5, 0, 5, 5]], [2])
    with pytest.raises(ValueError, match="non-finite"):
        w.add("a", img, [[0, 0, float("nan"), 5]], [2])
    with pytest.raises(ValueError, match=r"masks must be \(1, 10, 10\)"):
        w.add("a", img, [[0, 0, 5, 5]], [2], np.ones((1, 10, 9)))
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        w.add("a", torch.full((3, 4, 4), 1.5))
    with pytest.raises(ValueError, match=r"uint8 image must be"):
        w.add("a", np.zeros((3, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="relative path"):
        w.add("../evil", img)
    assert len(w) == 0 and not (tmp_path / "images").exists()  # nothing written for rejected adds
    w.add("a", img, image_id=3)
    with pytest.raises(ValueError, match="duplicate file_name"):
        w.add("a.jpg", img)
    with pytest.raises(ValueError, match="duplicate image_id 3"):
        w.add("b", img, image_id=3)
    with pytest.raises(ValueError, match="duplicate category ids"):
        CocoWriter(tmp_path, [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}])


def test_with_block_and_resume(tmp_path):
    img = np.zeros((6, 6, 3), np.uint8)
    with pytest.raises(RuntimeError):
        with CocoWriter(tmp_path, CATS) as w:
            w.add("a", img, [[0, 0, 2, 2]], [2])
            raise RuntimeError("boom")
    assert not (tmp_path / "instances.json").exists()  # no JSON for a failed block
    with CocoWriter(tmp_path, CATS) as w:
        w.add("a", img, [[0, 0, 2, 2]], [2])
    with CocoWriter(tmp_path, CATS, resume=True) as w:
        assert "a.png" in w
        assert w.add("b", img, [[1, 1, 3, 3]], [5]) == 2
    js = json.loads((tmp_path / "instances.json").read_text())
    assert [i["file_name"] for i in js["images"]] == ["a.png", "b.png"]
    assert [a["id"] for a in js["annotations"]] == [1, 2]
