"""The AOCO protocol (`advdet dataset`, bench/aoco.py): det and seg splits with cards, victims' clean vs
adversarial mAP, and the torchrun (gloo, 2 processes) run equal to the single-process run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from advdet.attacks.quantize import load_png, to_uint8
from advdet.bench.aoco import build_aoco, parse_victims
from advdet.bench.craft_job import load_attack_registry
from advdet.cli import app
from advdet.data.coco import CocoDetection
from advdet.data.shapes import generate_shapes
from advdet.models.evaluate import evaluate_detector
from advdet.models.zoo import build_model, zoo_entry


@pytest.fixture(scope="module")
def shapes6(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes6")
    generate_shapes(root, train=0, val=6, seed=11, workers=1)
    return root / "val"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_parse_victims():
    assert parse_victims("yolov3, torchvision:fasterrcnn_resnet50_fpn=/w/f.pth,") == [
        ("yolov3", None), ("torchvision:fasterrcnn_resnet50_fpn", "/w/f.pth")]
    assert parse_victims(None) == []


def test_aoco_splits_cards_and_evaluation(shapes6, tmp_path):
    retina = zoo_entry("retinanet")
    assert retina.trained, "the shipped retinanet zoo weights (src/advdet/zoo_weights/retinanet.safetensors) are missing"
    out = tmp_path / "aoco"
    victims = [("retinanet", str(retina.weights_path)), ("maskrcnn", None)]
    cards = build_aoco(shapes6, out, attack="pgd", eps=8, step=8, steps=1, limit=3, batch_size=2, seed=2,
                       victims=victims, pretrained=False, progress=False)
    assert sorted(cards) == ["det", "seg"] and (out / "aoco.json").is_file()
    summary = json.loads((out / "aoco.json").read_text())
    assert summary["attack"] == "pgd" and sorted(summary["splits"]) == ["det", "seg"]
    for split, surrogate in (("det", "yolov3"), ("seg", "maskrcnn")):
        card = json.loads((out / split / "card.json").read_text())
        assert card == cards[split]
        assert card["surrogate"]["name"] == surrogate and card["images"] == 3 and card["linf_max"] == 8
        assert card["attack"]["eps"] == 8 and summary["splits"][split]["surrogate"] == surrogate
        adv = CocoDetection(out / split / "images", out / split / "instances.json", size=256)
        assert len(adv) == 3 and adv.with_masks  # shapes has masks: both splits keep them
        ev = card["evaluation"]
        assert summary["splits"][split]["evaluation"] == ev
        key = f"retinanet={retina.weights_path}"
        assert sorted(ev) == sorted([key, "maskrcnn"]) and ev[key]["images"] == 3
        assert "segm_map" in ev["maskrcnn"]["clean"] and "segm_map" not in ev[key]["clean"]
        # the numbers are the victim's COCO mAP on the source images and on the split
        det = build_model("retinanet", weights=retina.weights_path)
        clean = evaluate_detector(det, CocoDetection(shapes6 / "images", shapes6 / "instances.json", size=256),
                                  limit=3)
        attacked = evaluate_detector(det, adv)
        for k in ("map", "map50", "map75"):
            assert ev[key]["clean"][k] == pytest.approx(clean[k], abs=1e-6)
            assert ev[key]["adversarial"][k] == pytest.approx(attacked[k], abs=1e-6)
    # the trained victim finds objects on the clean images
    assert cards["det"]["evaluation"][key]["clean"]["map50"] > 0


def test_dataset_cli_errors(shapes6, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["dataset", "--data", str(shapes6), "--out", str(tmp_path / "o"), "--attack", "nope",
                              "--untrained"], terminal_width=200)
    assert res.exit_code == 2 and "unknown attack 'nope'" in res.output
    res = runner.invoke(app, ["dataset", "--data", str(shapes6), "--out", str(tmp_path / "o"), "--attack", "gaussian",
                              "--det-surrogate", "", "--seg-surrogate", ""], terminal_width=200)
    assert res.exit_code == 2 and "no split to build" in res.output


def test_default_attack_rad(shapes6, tmp_path):
    assert "rad" in load_attack_registry()  # the dataset command's default attack
    res = CliRunner().invoke(app, ["dataset", "--data", str(shapes6), "--out", str(tmp_path / "rad"), "--limit", "1",
                                   "--steps", "1", "--seg-surrogate", "", "--untrained"], terminal_width=200)
    assert res.exit_code == 0, res.output
    card = json.loads((tmp_path / "rad" / "det" / "card.json").read_text())
    assert card["attack"]["name"] == "rad" and card["images"] == 1 and 0 < card["linf_max"] <= 16
    assert card["attack"]["hyperparameters"]["valid_only"] is True  # RAD leaves the padding clean
    png = load_png(tmp_path / "rad" / "det" / "images" / "000000.png")
    lb = json.loads((tmp_path / "rad" / "det" / "instances.json").read_text())["images"][0]["letterbox"]
    clean = to_uint8(CocoDetection(shapes6 / "images", shapes6 / "instances.json", size=256)[0]["image"])
    changed = (png != clean).any(0)
    inside = torch.zeros_like(changed)
    nh, nw = round(lb["orig_h"] * lb["scale"]), round(lb["orig_w"] * lb["scale"])
    inside[lb["pad_y"]:lb["pad_y"] + nh, lb["pad_x"]:lb["pad_x"] + nw] = True
    assert changed.any() and not (changed & ~inside).any()


@pytest.mark.slow
def test_torchrun_two_processes_equal_single_process(shapes6, tmp_path):
    """`torchrun --nproc_per_node 2 -m advdet dataset` (gloo on CPU): rank 0 crafts batches 0 and 2, rank 1
    batch 1, rank 0 merges; every file equals the single-process run's (card.json up to its `run` timings)."""
    args = dict(attack="pgd", eps=16, step=None, steps=1, attack_kwargs={"random_start": True}, batch_size=2, seed=0,
                pretrained=False, progress=False)
    single = tmp_path / "single"
    build_aoco(shapes6, single, **args)
    multi = tmp_path / "multi"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "advdet",
           "dataset", "--data", str(shapes6), "--out", str(multi), "--attack", "pgd", "--steps", "1",
           "--set", "random_start=true", "--batch-size", "2", "--untrained", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread, as this test process: same float arithmetic
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "(2 processes)" in " ".join(res.stdout.split())  # rich may wrap the title at the table's width
    fs, fm = _files(single), _files(multi)
    assert sorted(fs) == sorted(fm)
    assert sum(name.endswith(".png") for name in fs) == 12
    for name in fs:
        if name.endswith("card.json"):
            cs, cm = json.loads(fs[name]), json.loads(fm[name])
            assert cm["run"]["world_size"] == 2 and cs["run"]["world_size"] == 1
            assert cm["run"]["images_crafted"] == 6
            cs.pop("run"), cm.pop("run")
            assert cs == cm, name
        else:
            assert fs[name] == fm[name], name


def test_victims_are_checked_before_crafting(shapes6, tmp_path):
    out = tmp_path / "o"
    coco_model = "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn"
    with pytest.raises(ValueError, match=f"victim '{coco_model}' has 80 classes"):
        build_aoco(shapes6, out, attack="gaussian", victims=[(coco_model, None)], pretrained=False, progress=False,
                   input_size=128)
    with pytest.raises(KeyError, match="unknown zoo model 'nope'"):
        build_aoco(shapes6, out, attack="gaussian", victims=[("nope", None)], pretrained=False, progress=False)
    assert not out.exists()
