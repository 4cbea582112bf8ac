"""Hostile inputs on the command line (issue 23, item 6): a user error is one line naming the file and the
item with exit status 2, a bug keeps its traceback, and nothing is dropped or converted silently.

Every case builds tiny files in tmp_path; the models are the shipped zoo ones (no network)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from advdet.cli import app
from advdet.data.errors import AdvdetError, DatasetError, OptionError, UnknownNameError
from advdet.models.weights import CheckpointError, read_state_dict

CATS8 = [{"id": i + 1, "name": f"c{i}"} for i in range(8)]  # the zoo's label space (8 shape classes)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], terminal_width=200)


def one_error_line(res) -> str:
    """The output of a user error: exactly one non-empty line, ``error: ...``, and exit status 2."""
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output
    return lines[0]


@pytest.fixture
def images(tmp_path):
    """Three 64x80 RGB PNGs 0.png..2.png; returns (folder, function(json dict, name) -> ann path)."""
    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(d / f"{i}.png")

    def ann(images=None, annotations=None, name="ann.json", categories=CATS8):
        if images is None:
            images = [{"id": i, "file_name": f"{i}.png", "height": 64, "width": 80} for i in range(3)]
        if annotations is None:
            annotations = [{"id": i + 1, "image_id": i, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400,
                            "iscrowd": 0} for i in range(3)]
        path = tmp_path / name
        path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
        return path

    return d, ann


# ----------------------------------------------------------------------------- the one handler


def test_error_classes_share_one_base():
    for cls in (DatasetError, CheckpointError, UnknownNameError, OptionError):
        assert issubclass(cls, AdvdetError) and issubclass(cls, ValueError)
    assert issubclass(UnknownNameError, KeyError) and str(UnknownNameError("unknown x 'y'")) == "unknown x 'y'"
    assert issubclass(OptionError, TypeError)


@pytest.mark.parametrize("command", ["eval", "attack", "dataset"])
@pytest.mark.parametrize("bug", [KeyError("map"), TypeError("unsupported operand type(s)"),
                                 AttributeError("'NoneType' object has no attribute 'boxes'"),
                                 ValueError("operands could not be broadcast together"),
                                 KeyError("unknown key raised outside advdet")])
def test_a_bug_keeps_its_traceback(monkeypatch, images, tmp_path, command, bug):
    """Builtin KeyError/TypeError inside a command are bugs: they propagate (traceback), not "error: 'map'"
    with exit 2 (what `attack` and `dataset` printed before)."""
    import advdet.bench.aoco as aoco
    import advdet.bench.craft as craft
    import advdet.models.hub as hub

    def broken(*a, **k):
        raise bug

    target = {"eval": (hub, "get_model"), "attack": (craft, "craft_dataset"), "dataset": (aoco, "build_aoco")}
    monkeypatch.setattr(*target[command], broken)
    d, ann = images
    args = {"eval": ["--model", "retinanet"], "attack": ["--attack", "pgd", "--model", "ssd_vgg"], "dataset": []}
    res = invoke(command, *args[command], "--data", d, "--ann", ann(), "--device", "cpu",
                 *(["--out", tmp_path / "o"] if command != "eval" else []))
    assert res.exception is bug and res.exit_code == 1, res.output
    assert "error:" not in res.output


def test_unknown_zoo_model_is_one_line_exit_2(images):
    d, ann = images  # models.zoo's lookup raises a builtin KeyError with a sentence
    res = invoke("eval", "--model", "nope", "--data", d, "--ann", ann(), "--device", "cpu")
    assert one_error_line(res).startswith("error: unknown zoo model 'nope'; known: ")


def test_a_value_error_of_advdet_is_one_line_and_advdet_traceback_shows_it(images, tmp_path, monkeypatch):
    d, ann = images
    args = ("dataset", "--data", d, "--ann", ann(), "--out", tmp_path / "o", "--attack", "gaussian",
            "--det-surrogate", "", "--seg-surrogate", "")
    assert "no split to build" in one_error_line(invoke(*args))  # a ValueError raised by bench.aoco
    monkeypatch.setenv("ADVDET_TRACEBACK", "1")
    res = invoke(*args)
    assert isinstance(res.exception, ValueError) and res.exit_code == 1


def test_eval_batch_size_zero_is_a_usage_error(images):
    d, ann = images  # torch's DataLoader would raise a ValueError (a traceback: not raised by advdet)
    res = invoke("eval", "--model", "retinanet", "--data", d, "--ann", ann(), "--batch-size", "0")
    assert res.exit_code == 2 and "--batch-size" in res.output and "Traceback" not in res.output


def test_unknown_attack_name_and_hyperparameter_are_user_errors(images, tmp_path):
    d, ann = images
    res = invoke("attack", "--attack", "nope", "--model", "ssd_vgg", "--data", d, "--ann", ann(),
                 "--out", tmp_path / "o")
    assert "unknown attack 'nope'" in one_error_line(res)
    res = invoke("attack", "--attack", "pgd", "--model", "ssd_vgg", "--data", d, "--ann", ann(),
                 "--out", tmp_path / "o", "--set", "no_such_knob=1", "--device", "cpu")
    line = one_error_line(res)
    assert "attack 'pgd'" in line and "no_such_knob" in line


# ----------------------------------------------------------------------------- advdet eval


def test_eval_bad_image_is_one_line(images):
    d, ann = images
    (d / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    imgs = [{"id": i, "file_name": f"{i}.png", "height": 64, "width": 80} for i in range(3)]
    path = ann(imgs + [{"id": 3, "file_name": "bad.png", "height": 64, "width": 80}])
    res = invoke("eval", "--model", "retinanet", "--data", d, "--ann", path, "--device", "cpu")
    line = one_error_line(res)
    assert f"{d / 'bad.png'}: unreadable or truncated image" in line


def test_eval_bad_annotations_is_one_line(images, tmp_path):
    d, _ = images
    path = tmp_path / "broken.json"
    path.write_text(json.dumps({"images": [], "annotations": "oops", "categories": CATS8}))
    res = invoke("eval", "--model", "retinanet", "--data", d, "--ann", path, "--device", "cpu")
    assert one_error_line(res) == f"error: {path}: 'annotations' is not a list"


def test_eval_bad_weights_is_one_line(images, tmp_path):
    d, ann = images
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"garbage")
    res = invoke("eval", "--model", "retinanet", "--weights", bad, "--data", d, "--ann", ann(), "--device", "cpu")
    assert one_error_line(res).startswith(f"error: {bad}: unreadable or truncated weights file")


def test_eval_label_space_mismatch_names_the_file(images):
    d, ann = images
    path = ann(categories=CATS8[:2])
    res = invoke("eval", "--model", "retinanet", "--data", d, "--ann", path, "--device", "cpu")
    assert one_error_line(res) == (f"error: {path}: 2 categories, but retinanet predicts 8 classes: evaluate it "
                                   "on data with its label space")


class _RunsCode:
    """Pickles as a call of a non-allowlisted global: torch.load(weights_only=True) must refuse it."""

    def __reduce__(self):
        return (_RunsCode, ())


def test_unsafe_pickle_checkpoint_one_line_with_conversion(images, tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "payload": _RunsCode()}, evil)
    with pytest.raises(CheckpointError) as err:
        read_state_dict(evil)
    msg = str(err.value)
    assert msg.startswith(f"{evil}: refused to load") and "\n" not in msg
    assert "safetensors" in msg and str(evil.with_suffix(".safetensors")) in msg
    d, ann = images
    res = invoke("eval", "--model", "retinanet", "--weights", evil, "--data", d, "--ann", ann(), "--device", "cpu")
    assert one_error_line(res) == f"error: {msg}"
    # the conversion it prints works on a checkpoint that also holds non-tensor entries (an epoch, an
    # argparse.Namespace of options: torch's safe loader refuses the latter)
    import argparse
    import subprocess
    import sys

    from safetensors.torch import load_file
    ckpt = tmp_path / "opts.pt"
    torch.save({"w": torch.arange(3.0), "epoch": 7, "opts": argparse.Namespace(lr=0.1)}, ckpt)
    with pytest.raises(CheckpointError) as err:
        read_state_dict(ckpt)
    command = str(err.value).split("python -c ", 1)[1]
    assert command[0] == command[-1] == '"'
    subprocess.run([sys.executable, "-c", command[1:-1]], check=True, timeout=120)
    assert torch.equal(load_file(str(ckpt.with_suffix(".safetensors")))["w"], torch.arange(3.0))


def test_eval_maskrcnn_without_mask_annotations_reports_box_map(images, tmp_path):
    d, ann = images
    out = tmp_path / "m.json"
    res = invoke("eval", "--model", "maskrcnn", "--data", d, "--ann", ann(), "--device", "cpu", "--json", out)
    assert res.exit_code == 0, res.output
    assert "mask mAP needs mask annotations" in res.output
    metrics = json.loads(out.read_text())
    assert "map" in metrics and not any(k.startswith("segm_map") for k in metrics)
    assert "mask mAP needs mask annotations" in metrics["segm_note"]
    assert "(a detection-only dataset)" in metrics["segm_note"]  # no annotation has a segmentation


def test_mask_note_says_detection_only_only_when_no_annotation_has_a_mask():
    from advdet.models.evaluate import score_results
    poly = [[10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]]
    gt = {"images": [{"id": 1, "height": 64, "width": 64, "file_name": "a.png"}],
          "categories": [{"id": 1, "name": "a"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400,
                           "iscrowd": 0, "segmentation": poly},
                          {"id": 2, "image_id": 1, "category_id": 1, "bbox": [40, 40, 10, 10], "area": 100,
                           "iscrowd": 0}]}
    results = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9}]
    note = score_results(gt, results, [1], masks=True)["segm_note"]
    assert "no 'segmentation' on 1 of its 2 non-crowd annotations; box mAP only" in note
    assert "detection-only" not in note


# ----------------------------------------------------------------------------- advdet attack


def attack(d, path, out, *extra):
    return invoke("attack", "--attack", "pgd", "--steps", "1", "--model", "ssd_vgg", "--data", d, "--ann", path,
                  "--out", out, "--device", "cpu", *extra)


def test_attack_negative_width_and_outside_boxes_error_or_skipped_and_listed(images, tmp_path):
    d, ann = images
    anns = [{"id": i + 1, "image_id": i, "category_id": 1, "bbox": [10, 10, 20, 20]} for i in range(3)]
    anns += [{"id": 10, "image_id": 1, "category_id": 1, "bbox": [30, 10, -20, 20]},  # negative width
             {"id": 11, "image_id": 2, "category_id": 1, "bbox": [200, 200, 10, 10]}]  # outside the 80x64 image
    path = ann(annotations=anns)
    line = one_error_line(attack(d, path, tmp_path / "o"))
    assert line == (f"error: {path}: annotation 10 (image 1): bbox [30, 10, -20, 20] has a negative width or "
                    "height (COCO boxes are [x, y, w, h])")
    res = attack(d, path, tmp_path / "o", "--skip-bad")
    assert res.exit_code == 0, res.output
    card = json.loads((tmp_path / "o" / "card.json").read_text())
    assert card["num_skipped"] == 2
    assert [s["item"] for s in card["skipped"]] == ["annotation 10 (image 1)", "annotation 11 (image 2)"]
    assert "skipped annotation 10 (image 1): bbox [30, 10, -20, 20] has a negative width" in res.output
    assert "skipped annotation 11 (image 2): bbox [200, 200, 10, 10] lies entirely outside the 80x64 image" \
        in res.output


def test_nan_bbox_message_keeps_its_brackets(images, tmp_path):
    d, ann = images
    anns = [{"id": 9, "image_id": 0, "category_id": 1, "bbox": [float("nan"), 1, 2, 3]}]
    path = ann(annotations=anns)
    line = one_error_line(attack(d, path, tmp_path / "o"))
    assert line == f"error: {path}: annotation 9 (image 0): bbox [nan, 1, 2, 3] is not 4 finite numbers [x, y, w, h]"


def test_duplicate_image_id_names_both_files(images, tmp_path):
    d, ann = images
    imgs = [{"id": i, "file_name": f"{i}.png", "height": 64, "width": 80} for i in range(3)]
    path = ann(imgs + [{"id": 0, "file_name": "2.png", "height": 64, "width": 80}])
    line = one_error_line(attack(d, path, tmp_path / "o"))
    assert f"error: {path}: image 0: duplicate image id 0: '0.png' and '2.png'" in line


def test_format_conversions_are_counted_listed_and_printed(images, tmp_path):
    d, ann = images
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (64, 80, 4), dtype=np.uint8), "RGBA").save(d / "rgba.png")
    Image.fromarray(rng.integers(0, 65536, (64, 80)).astype(np.uint16)).save(d / "deep.png")
    Image.new("P", (80, 64), 5).save(d / "pal.png")
    Image.new("CMYK", (80, 64), (0, 200, 200, 0)).save(d / "cmyk.jpg")
    files = ["0.png", "rgba.png", "deep.png", "pal.png", "cmyk.jpg"]
    path = ann([{"id": i, "file_name": f, "height": 64, "width": 80} for i, f in enumerate(files)], [])
    res = attack(d, path, tmp_path / "o")
    assert res.exit_code == 0, res.output
    card = json.loads((tmp_path / "o" / "card.json").read_text())
    converted = {c["item"].rsplit("/", 1)[-1]: c["problem"] for c in card["converted"]}
    assert converted == {"rgba.png": "RGBA (alpha dropped) converted to 8-bit RGB",
                         "deep.png": "16-bit converted to 8-bit RGB", "pal.png": "palette converted to 8-bit RGB",
                         "cmyk.jpg": "CMYK converted to 8-bit RGB"}
    for name, what in converted.items():
        assert f"converted {d / name}: {what}" in res.output


# ----------------------------------------------------------------------------- advdet bench robustness


def test_bench_robustness_prints_and_stores_the_data_report(images, tmp_path):
    d, ann = images
    Image.fromarray(np.zeros((64, 80, 4), np.uint8), "RGBA").save(d / "rgba.png")
    imgs = [{"id": i, "file_name": f"{i}.png", "height": 64, "width": 80} for i in range(3)]
    imgs.append({"id": 3, "file_name": "rgba.png", "height": 64, "width": 80})
    anns = [{"id": i + 1, "image_id": i, "category_id": 1, "bbox": [10, 10, 20, 20]} for i in range(3)]
    anns.append({"id": 11, "image_id": 2, "category_id": 1, "bbox": [200, 200, 10, 10]})  # outside the image
    path = ann(imgs, anns)
    out = tmp_path / "t.json"
    args = ["bench", "robustness", "--models", "ssd_vgg", "--attacks", "clean", "--data", d, "--ann", path,
            "--no-ci", "--device", "cpu", "--json", out]
    line = one_error_line(invoke(*args))
    assert "annotation 11 (image 2): bbox [200, 200, 10, 10] lies entirely outside the 80x64 image" in line
    res = invoke(*args, "--skip-bad")
    assert res.exit_code == 0, res.output
    assert "skipped annotation 11 (image 2): bbox [200, 200, 10, 10] lies entirely outside" in res.output
    assert f"converted {d / 'rgba.png'}: RGBA (alpha dropped) converted to 8-bit RGB" in res.output
    report = json.loads(out.read_text())["data_report"]
    assert [s["item"] for s in report["skipped"]] == ["annotation 11 (image 2)"]
    assert report["converted_images"] == 1
