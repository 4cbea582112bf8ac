"""The shapes benchmark: determinism, content, COCO validity, CLI."""

import hashlib
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from advdet.cli import app
from advdet.data.io import read_json
from advdet.data.shapes import SHAPE_CLASSES, generate_shapes, render_shapes_image


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_byte_identical_and_worker_independent(tmp_path):
    generate_shapes(tmp_path / "a", train=24, val=6, seed=3, workers=1)
    generate_shapes(tmp_path / "b", train=24, val=6, seed=3, workers=2)
    for sub in ("train", "val"):
        assert _tree_hash(tmp_path / "a" / sub) == _tree_hash(tmp_path / "b" / sub)


def test_different_seed_gives_different_images(tmp_path):
    generate_shapes(tmp_path / "a", train=4, val=0, seed=0, workers=1)
    generate_shapes(tmp_path / "b", train=4, val=0, seed=1, workers=1)
    a = sorted((tmp_path / "a" / "train" / "images").iterdir())
    b = sorted((tmp_path / "b" / "train" / "images").iterdir())
    assert all(x.read_bytes() != y.read_bytes() for x, y in zip(a, b))


def test_content_variety_and_exact_masks(tmp_path):
    summary = generate_shapes(tmp_path, train=120, val=0, seed=0, workers=1)
    coco = read_json(tmp_path / "train" / "instances.json")
    s = summary["splits"]["train"]
    assert len(coco["categories"]) == len(SHAPE_CLASSES) >= 8
    assert all(v > 0 for v in s["per_class"].values())
    assert s["small"] > 0 and s["medium"] > 0 and s["large"] > 0
    sizes = [(i["height"], i["width"]) for i in coco["images"]]
    assert min(min(hw) for hw in sizes) >= 160 and max(max(hw) for hw in sizes) <= 400
    assert max(max(hw) for hw in sizes) - min(min(hw) for hw in sizes) > 150
    per_image = np.bincount([a["image_id"] for a in coco["annotations"]])[1:]
    assert per_image.min() >= 1 and per_image.max() <= 8 and per_image.max() >= 6
    # masks decode to the stated area and fit the stated box exactly
    for a in coco["annotations"][:60]:
        m = mask_utils.decode(a["segmentation"])
        assert int(m.sum()) == a["area"]
        ys, xs = np.nonzero(m)
        x, y, w, h = a["bbox"]
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)


def test_occlusion_keeps_objects_visible_and_masks_disjoint():
    # masks of one image never overlap (later objects cut earlier ones) and every object keeps pixels
    seen_occlusion = False
    for i in range(40):
        arr, objects = render_shapes_image(0, "train", i)
        assert arr.dtype == np.uint8 and arr.shape[2] == 3
        total = np.zeros(arr.shape[:2], np.int32)
        for o in objects:
            assert o["mask"].sum() > 0
            total += o["mask"]
        assert total.max() <= 1
        seen_occlusion |= len(objects) >= 2
    assert seen_occlusion


def test_background_is_not_flat():
    arr, _ = render_shapes_image(0, "val", 0)
    assert arr.reshape(-1, 3).std(0).max() > 10


def test_cli_writes_coco_and_summary(tmp_path):
    res = CliRunner().invoke(app, ["data", "shapes", "--out", str(tmp_path), "--train", "5", "--val", "3",
                                   "--seed", "7", "--json", str(tmp_path / "s.json")])
    assert res.exit_code == 0, res.output
    assert "train" in res.output and "val" in res.output
    assert len(list((tmp_path / "train" / "images").glob("*.png"))) == 5
    assert read_json(tmp_path / "s.json")["splits"]["val"]["images"] == 3


def test_cli_version():
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and "advdet 0.1.0" in res.output
