"""`advdet demo` and ``run_demo`` on tiny untrained models and a 3-image dataset (fast settings)."""

from __future__ import annotations

import functools

import pytest
import torch

from advdet.bench import demo as demo_mod
from advdet.bench.transfer_rows import ABLATION, NO_ATTACK
from advdet.data.shapes import SHAPE_CLASSES, write_shapes_split

K = len(SHAPE_CLASSES)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from advdet.models.classifier import small_classifier
    from advdet.models.ssd_vgg import ssd_vgg_small
    from advdet.models.yolov3 import yolov3_small

    root = tmp_path_factory.mktemp("demo_shapes")
    write_shapes_split(root, "val", 3, seed=0, workers=1)
    torch.manual_seed(0)
    models = {"yolov3": yolov3_small(num_classes=K, input_size=64).eval(),
              "ssd_vgg": ssd_vgg_small(num_classes=K, input_size=64, width=0.125).eval(),
              "classifier": small_classifier(num_classes=K, input_size=64).eval()}
    return str(root), models


def fast_kwargs(data, models):
    return dict(data=data, models=models, victims=["yolov3", "ssd_vgg"], robust=[], examples=1,
                attacks=("rad", "cls-pgd", "dag-eps", "dfool", "loc-shift", "not-registered"),
                attack_kwargs={a: {"steps": 1} for a in ("rad", "cls-pgd", "dag-eps", "dfool", "loc-shift")})


def test_run_demo_tables_notes_and_report(tiny, tmp_path):
    data, models = tiny
    notes = []
    res = demo_mod.run_demo(tmp_path / "rep", limit=2, batch_size=2, progress=False, note=notes.append,
                            device="cpu", **fast_kwargs(data, models))
    t = res["transfer"]
    # an explicit list: a missing row (RAD's above all) fails; "not-registered" is a note, not a row
    assert [r["label"] for r in t["rows"]] == [NO_ATTACK, ABLATION, "rad", "cls-pgd", "dag-eps", "dfool", "loc-shift"]
    assert t["surrogates"] == ["yolov3"] and t["victims"] == ["yolov3", "ssd_vgg"] and t["images"] == 2
    # RAD's Loc row is loc-shift (loc is A_loc), at RAD's setting (step 2, 10 steps by default; here 1 step)
    loc = next(r for r in t["rows"] if r["label"] == "loc-shift")
    assert loc["settings"] == {"steps": 1, "eps": 16.0}  # step: loc-shift's default, RAD's 2
    assert 0 < loc["perturbation"]["linf_max"] <= 16  # mean_abs update: one step may reach eps
    # what is not there is a note, not a crash
    assert any("not-registered" in n for n in notes)
    assert any(n.startswith("robustness table skipped") for n in notes)
    assert res["robustness"] is None and notes == res["notes"]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert md.startswith("# advdet demo") and "Notes:" in md and "not-registered" in md
    assert (tmp_path / "rep" / "index.html").is_file()


def test_demo_without_trained_detectors_is_a_note(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_mod, "trained_detectors", lambda: [])
    res = demo_mod.run_demo(tmp_path / "r", data="unused", robust=[], progress=False)
    assert res["transfer"] is None and res["robustness"] is None
    assert res["notes"][0].startswith("transfer table skipped: no trained zoo detector")
    assert (tmp_path / "r" / "index.html").is_file()


def test_robust_models_lists_only_trained(monkeypatch):
    from advdet.models import zoo

    names = demo_mod.robust_models()
    for n in names:
        assert zoo.zoo_entry(n).trained
        assert n == "ssd_vgg" or n.startswith("ssd_vgg-") or n.startswith("robustdet")
    if names:
        assert names[0] == "ssd_vgg" or not zoo.zoo_entry("ssd_vgg").trained


def test_cli_demo_end_to_end(tiny, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import advdet.data.shapes as shapes
    from advdet.cli import app

    data, models = tiny
    monkeypatch.setattr(shapes, "ensure_default_shapes", lambda *a, **k: tmp_path)  # no 4500-image generation
    monkeypatch.setattr(demo_mod, "run_demo", functools.partial(demo_mod.run_demo, **fast_kwargs(data, models)))
    r = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "rep"), "--limit", "2", "--batch-size", "2",
                                 "--device", "cpu", "--json", str(tmp_path / "d.json")], terminal_width=200)
    assert r.exit_code == 0, r.output
    for word in ("No Attack", "Ablation", "dfool", "black-box mean", "robustness table skipped", "demo finished",
                 "index.html"):
        assert word in r.output
    assert (tmp_path / "rep" / "index.html").is_file() and (tmp_path / "d.json").is_file()
