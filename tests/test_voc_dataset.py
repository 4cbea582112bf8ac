"""VOCDetection on a tiny VOC tree built in tmp_path."""

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from advdet.data.collate import collate_detection
from advdet.data.errors import DatasetError
from advdet.data.voc import VOC_CLASSES, VOCDetection


def obj(name, box, difficult=0):
    x1, y1, x2, y2 = box
    return (f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>{difficult}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
            f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")


def xml(name, w, h, objects, size=True):
    sz = f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>" if size else ""
    return f"<annotation><folder>VOC2007</folder><filename>{name}.jpg</filename>{sz}{''.join(objects)}</annotation>"


@pytest.fixture
def voc(tmp_path):
    """VOCdevkit/VOC2007 with 3 test images; returns the devkit root."""
    root = tmp_path / "VOCdevkit" / "VOC2007"
    for d in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (root / d).mkdir(parents=True)
    specs = {
        "000001": (60, 40, [obj("dog", (11, 6, 30, 25)), obj("person", (1, 1, 60, 40), difficult=1)]),
        "000002": (50, 50, [obj("car", (41, 21, 70, 45)), obj("cat", (51, 5, 55, 9)), obj("tvmonitor", (1, 1, 10, 10))]),
        "000005": (40, 30, []),
    }
    colours = {"000001": (200, 30, 40), "000002": (20, 180, 90), "000005": (128, 128, 128)}
    for name, (w, h, objects) in specs.items():
        (root / "Annotations" / f"{name}.xml").write_text(xml(name, w, h, objects))
        Image.new("RGB", (w, h), colours[name]).save(root / "JPEGImages" / f"{name}.jpg", quality=95)
    (root / "ImageSets" / "Main" / "test.txt").write_text("000001\n000002\n000005\n")
    (root / "ImageSets" / "Main" / "train.txt").write_text("000002\n")
    return tmp_path / "VOCdevkit"


def test_items_and_voc_box_convention(voc):
    ds = VOCDetection(voc, split="test", year=2007, size=60)
    assert len(ds) == 3 and ds.image_ids == [1, 2, 5] and ds.num_classes == 20
    assert ds.classes[0] == "aeroplane" and ds.classes[19] == "tvmonitor" and len(VOC_CLASSES) == 20
    assert ds.categories[11] == {"id": 12, "name": "dog"} and ds.label_to_cat_id[14] == 15

    it = ds[0]  # 60x40 at 60: scale 1, pad_y 10
    assert set(it) == {"image", "boxes", "labels", "difficult", "image_id", "orig_size", "letterbox", "file_name"}
    assert (it["image_id"], it["orig_size"], it["file_name"]) == (1, (40, 60), "000001.jpg")
    # 1-based inclusive (11, 6, 30, 25) -> 0-based (10, 5, 30, 25), then + pad_y
    assert it["boxes"].tolist() == [[10, 15, 30, 35], [0, 10, 60, 50]]
    assert it["labels"].tolist() == [VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")] == [11, 14]
    assert it["difficult"].tolist() == [False, True] and it["difficult"].dtype == torch.bool
    assert it["image"].shape == (3, 60, 60) and it["image"][:, :10].abs().sum() == 0
    pix = it["image"][:, 10:50] * 255
    assert (pix[0] - 200).abs().max() < 4 and (pix[1] - 30).abs().max() < 4  # JPEG, near exact

    assert ds[2]["boxes"].shape == (0, 4) and ds[2]["labels"].dtype == torch.int64


def test_keep_difficult_and_splits(voc):
    ds = VOCDetection(voc / "VOC2007", split="test", size=60, keep_difficult=False)
    assert ds[0]["labels"].tolist() == [11] and ds[0]["difficult"].tolist() == [False]
    assert VOCDetection(voc, split="train", year="2007").image_ids == [2]
    with pytest.raises(DatasetError, match=r"ImageSets/Main/val\.txt: split file not found"):
        VOCDetection(voc, split="val", year=2007)


def test_clipping_and_zero_area(voc):
    ds = VOCDetection(voc, year=2007, size=50)
    # car (40,20,70,45) clipped to x<=50; cat (50,4,55,9) lies outside -> clipped then dropped
    assert ds.report.clipped_boxes == 2 and ds.report.dropped_zero_area == 1
    (item, problem), = ds.report.dropped  # listed, not only counted
    assert "000002.xml object #" in item and "(cat)" in item and "no area inside the 50x" in problem
    it = ds[1]
    assert it["boxes"].tolist() == [[40, 20, 50, 45], [0, 0, 10, 10]]
    assert it["labels"].tolist() == [6, 19]


def test_unknown_class_names_the_xml(voc):
    ann = voc / "VOC2007" / "Annotations" / "000002.xml"
    ann.write_text(xml("000002", 50, 50, [obj("unicorn", (1, 1, 5, 5)), obj("car", (1, 1, 20, 20))]))
    with pytest.raises(DatasetError, match=r"000002\.xml: object #0: unknown class name 'unicorn'") as err:
        VOCDetection(voc, year=2007)
    assert err.value.path == str(ann)
    ds = VOCDetection(voc, year=2007, skip_bad=True, size=50)
    assert ds.report.skipped == [(f"{ann} object #0 (unicorn)", "unknown class name 'unicorn'")]
    assert len(ds) == 3 and ds[1]["labels"].tolist() == [6]


def test_malformed_and_missing_xml(voc):
    anns = voc / "VOC2007" / "Annotations"
    (anns / "000001.xml").write_text("<annotation><object>")
    (anns / "000005.xml").unlink()
    with pytest.raises(DatasetError, match=r"000001\.xml: malformed XML"):
        VOCDetection(voc, year=2007)
    ds = VOCDetection(voc, year=2007, skip_bad=True)
    assert ds.image_ids == [2]
    assert [(p.split("/")[-1], why.split(":")[0]) for p, why in ds.report.skipped] == [
        ("000001.xml", "malformed XML"), ("000005.xml", "annotation file not found")]


def test_malformed_box(voc):
    ann = voc / "VOC2007" / "Annotations" / "000005.xml"
    ann.write_text(xml("000005", 40, 30, [obj("dog", (1, 1, "abc", 5))]))
    with pytest.raises(DatasetError, match=r"000005\.xml: object #0: malformed"):
        VOCDetection(voc, year=2007)
    assert VOCDetection(voc, year=2007, skip_bad=True).report.num_skipped == 1


@pytest.mark.parametrize("problem", ["missing", "truncated"])
def test_bad_image(voc, problem):
    jpg = voc / "VOC2007" / "JPEGImages" / "000002.jpg"
    if problem == "missing":
        jpg.unlink()
    else:
        jpg.write_bytes(jpg.read_bytes()[:300])
    ds = VOCDetection(voc, year=2007, size=32)
    with pytest.raises(DatasetError, match=r"000002\.jpg"):
        ds[1]
    ds = VOCDetection(voc, year=2007, size=32, skip_bad=True)
    assert ds.image_ids == [1, 5] and ds.report.skipped[0][0].endswith("000002.jpg")
    assert ds.report.clipped_boxes == 0  # counts only cover images kept


def test_grayscale_converted_and_size_from_header(voc):
    root = voc / "VOC2007"
    Image.new("L", (40, 30), 90).save(root / "JPEGImages" / "000005.jpg")
    (root / "Annotations" / "000005.xml").write_text(xml("000005", 0, 0, [obj("bird", (1, 1, 40, 30))], size=False))
    ds = VOCDetection(root, size=40)
    it = ds[2]
    assert it["orig_size"] == (30, 40) and it["boxes"].tolist() == [[0, 5, 40, 35]]
    assert ((it["image"][:, 5:35] * 255 - 90).abs() < 2).all()
    assert ds.report.converted_images == 1
    assert [(Path(f).name, what) for f, what in ds.report.converted] == [
        ("000005.jpg", "grayscale converted to 8-bit RGB")]


def test_non_numeric_ids_and_collate(voc):
    root = voc / "VOC2007"
    for old, new in (("000001", "2008_000001"), ("000002", "2008_000002")):
        (root / "Annotations" / f"{old}.xml").rename(root / "Annotations" / f"{new}.xml")
        (root / "JPEGImages" / f"{old}.jpg").rename(root / "JPEGImages" / f"{new}.jpg")
    (root / "ImageSets" / "Main" / "test.txt").write_text("2008_000001\n2008_000002\n")
    ds = VOCDetection(root, size=32)
    assert ds.image_ids == [0, 1] and ds[1]["file_name"] == "2008_000002.jpg"
    images, targets = next(iter(DataLoader(ds, batch_size=2, collate_fn=collate_detection)))
    assert images.shape == (2, 3, 32, 32)
    assert [t["difficult"].tolist() for t in targets] == [[False, True], [False, False]]
