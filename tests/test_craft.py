"""Adversarial datasets (`advdet attack`, bench/craft.py): COCO layout, eps-bounded PNGs, card, sharding,
resume after a kill (in-process crash and a killed subprocess), skip-bad, --list and clear errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from advdet.attacks.quantize import load_png, to_uint8
from advdet.attacks.registry import ATTACKS
from advdet.bench.craft import CraftError, craft_dataset
from advdet.bench.craft_job import batch_seed
from advdet.cli import app
from advdet.data.coco import CocoDetection
from advdet.data.coco_writer import CocoWriter
from advdet.data.errors import DatasetError
from advdet.data.shapes import generate_shapes

N_IMAGES = 6


@pytest.fixture(scope="module")
def shapes6(tmp_path_factory) -> Path:
    """A 6-image shapes split (COCO format with masks, images 160-400 px, letterboxed to 256 by the zoo)."""
    root = tmp_path_factory.mktemp("shapes6")
    generate_shapes(root, train=0, val=N_IMAGES, seed=3, workers=1)
    return root / "val"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_same_output(a: Path, b: Path) -> None:
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        if name == "card.json":
            ca, cb = json.loads(fa[name]), json.loads(fb[name])
            ca.pop("run"), cb.pop("run")
            assert ca == cb
        else:
            assert fa[name] == fb[name], name


# pgd with a random start and 2 steps on an untrained yolov3 (256 px): fast, and the random start
# makes the bytes depend on the per-batch seeds
PGD = dict(eps=6, step=2, steps=2, attack_kwargs={"random_start": True}, pretrained=False, progress=False)


def test_layout_coco_eps_and_card(shapes6, tmp_path):
    out = tmp_path / "adv"
    card = craft_dataset("pgd", "yolov3", shapes6, out, limit=5, batch_size=2, seed=7, **PGD)
    # layout: the finished record replaces the per-batch parts
    assert sorted(p.name for p in out.iterdir()) == ["card.json", "images", "instances.json", "job.json",
                                                     "manifest.json"]
    src = CocoDetection(shapes6 / "images", shapes6 / "instances.json", size=256)
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == [Path(src[i]["file_name"]).stem + ".png" for i in range(5)]
    # COCO validity: reload with the project's reader; same letterboxed boxes, original category ids, masks
    adv = CocoDetection(out / "images", out / "instances.json", size=256)
    assert len(adv) == 5 and adv.with_masks and adv.categories == src.categories
    for i in range(5):
        a, s = adv[i], src[i]
        assert a["image_id"] == s["image_id"] and a["image"].shape == (3, 256, 256)
        assert torch.allclose(a["boxes"], s["boxes"], atol=1e-3)
        assert torch.equal(a["labels"], s["labels"])
        assert (a["masks"] != s["masks"]).float().mean() < 1e-3
        # the PNG is within eps of the clean uint8 image, and the attack did change it
        q, clean = load_png(out / "images" / names[i]).long(), to_uint8(s["image"]).long()
        d = (q - clean).abs()
        assert int(d.max()) == 6 and float(d.float().mean()) > 1.0
    # card: attack, settings, surrogate, data, seed, counts and statistics
    assert card == json.loads((out / "card.json").read_text())
    assert card["attack"]["name"] == "pgd" and card["attack"]["eps"] == 6
    hp = card["attack"]["hyperparameters"]
    assert (hp["eps"], hp["step"], hp["steps"], hp["random_start"]) == (6, 2, 2, True)
    assert card["surrogate"]["name"] == "yolov3" and card["surrogate"]["untrained"] is True
    assert card["seed"] == 7 and card["images"] == 5 and card["num_skipped"] == 0 and card["skipped"] == []
    assert card["targets"] == "ground truth" and card["data"]["size"] == 256
    assert card["annotations"] == len(json.loads((out / "instances.json").read_text())["annotations"])
    assert card["linf_max"] == 6 and 1.0 < card["rmse_mean"] <= card["rmse_max"] <= 6
    assert card["run"]["images_crafted"] == 5 and card["run"]["images_per_s"] > 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["complete"] and [m["file_name"] for m in man["images"]] == names
    assert np.isclose(np.mean([m["rmse"] for m in man["images"]]), card["rmse_mean"], atol=1e-5)
    # a finished job is not redone
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert craft_dataset("pgd", "yolov3", shapes6, out, limit=5, batch_size=2, seed=7, **PGD) == card
    assert mtimes == {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    # ... and a folder holding another job is refused
    with pytest.raises(CraftError, match="another crafting job.*seed"):
        craft_dataset("pgd", "yolov3", shapes6, out, limit=5, batch_size=2, seed=8, **PGD)


def test_seeds_shards_and_crash_resume(shapes6, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    craft_dataset("pgd", "yolov3", shapes6, ref, batch_size=2, seed=1, **PGD)
    assert batch_seed(1, 0) != batch_seed(1, 2) and batch_seed(1, 2) != batch_seed(2, 2)
    # another seed gives other bytes (the random start matters)
    other = tmp_path / "other"
    craft_dataset("pgd", "yolov3", shapes6, other, batch_size=2, seed=2, **PGD)
    assert (other / "images" / "000000.png").read_bytes() != (ref / "images" / "000000.png").read_bytes()
    # two shards run one after the other (no process group): the last one merges, same bytes
    sharded = tmp_path / "sharded"
    part = craft_dataset("pgd", "yolov3", shapes6, sharded, batch_size=2, seed=1, shard=(1, 2), **PGD)
    assert part["complete"] is False and part["batches_left"] == 2 and len(list((sharded / "images").iterdir())) == 2
    craft_dataset("pgd", "yolov3", shapes6, sharded, batch_size=2, seed=1, shard=(0, 2), **PGD)
    shutil.rmtree(sharded / "parts")  # kept by shard merges (another shard could still be reading them)
    _assert_same_output(ref, sharded)
    # a crash in the middle of batch 2 (its first PNG written, no batch record), then a resume
    crashed = tmp_path / "crashed"
    real_add, calls = CocoWriter.add, []

    def add(self, *a, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_add(self, *a, **kw)

    monkeypatch.setattr(CocoWriter, "add", add)
    with pytest.raises(KeyboardInterrupt):
        craft_dataset("pgd", "yolov3", shapes6, crashed, batch_size=2, seed=1, **PGD)
    monkeypatch.setattr(CocoWriter, "add", real_add)
    assert len(list((crashed / "parts").glob("b*.json"))) == 1 and len(list((crashed / "images").iterdir())) == 3
    card = craft_dataset("pgd", "yolov3", shapes6, crashed, batch_size=2, seed=1, **PGD)
    assert card["run"]["images_crafted"] == 4
    _assert_same_output(ref, crashed)


@pytest.mark.slow
def test_resume_after_killing_the_command(shapes6, tmp_path):
    """`python -m advdet attack` killed (SIGKILL) mid-run, then started again: the same files as an
    uninterrupted run."""
    args = dict(eps=8, step=2, steps=4, attack_kwargs={"random_start": True}, batch_size=1, seed=5,
                pretrained=False, progress=False)
    ref = tmp_path / "ref"
    craft_dataset("pgd", "yolov3", shapes6, ref, **args)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "advdet", "attack", "--attack", "pgd", "--model", "yolov3", "--untrained",
           "--data", str(shapes6), "--out", str(out), "--eps", "8", "--step", "2", "--steps", "4",
           "--set", "random_start=true", "--batch-size", "1", "--seed", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread, as this test process: same float arithmetic
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while True:
            done = len(list((out / "parts").glob("b*.json"))) if (out / "parts").is_dir() else 0
            if done >= 1:
                proc.send_signal(signal.SIGKILL)
                break
            if proc.poll() is not None:
                pytest.fail(f"the command ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
            assert time.monotonic() < deadline, "no batch finished in time"
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    done = len(list((out / "parts").glob("b*.json")))
    assert 1 <= done < N_IMAGES and not (out / "card.json").exists()
    # started again (in this process, to save a second interpreter start: the same command)
    res = CliRunner().invoke(app, cmd[3:], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert f"output: {out}" in res.output
    card = json.loads((out / "card.json").read_text())
    assert card["run"]["images_crafted"] == N_IMAGES - done
    _assert_same_output(ref, out)


def test_classifier_attack_and_model_checks(shapes6, tmp_path):
    card = craft_dataset("cls-pgd", "classifier", shapes6, tmp_path / "cls", limit=2, steps=2, eps=4,
                         pretrained=False, progress=False)
    assert card["surrogate"]["kind"] == "classifier" and card["targets"] == "classifier clean prediction"
    assert card["images"] == 2 and card["linf_max"] == 4
    with pytest.raises(CraftError, match="attacks an image classifier.*classifier"):
        craft_dataset("cls-pgd", "yolov3", shapes6, tmp_path / "x", pretrained=False, progress=False)
    with pytest.raises(CraftError, match="needs a detector surrogate"):
        craft_dataset("pgd", "classifier", shapes6, tmp_path / "y", pretrained=False, progress=False)
    with pytest.raises(CraftError, match="unknown attack 'nope'"):
        craft_dataset("nope", "yolov3", shapes6, tmp_path / "z", pretrained=False, progress=False)
    with pytest.raises(CraftError, match="attack 'gaussian'.*steps"):
        craft_dataset("gaussian", "yolov3", shapes6, tmp_path / "w", steps=3, pretrained=False, progress=False)


def test_skip_bad_counts_a_truncated_image(shapes6, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(shapes6, src)
    bad = src / "images" / "000002.png"
    bad.write_bytes(bad.read_bytes()[:300])
    kw = dict(steps=1, eps=4, batch_size=4, pretrained=False, progress=False)
    with pytest.raises(DatasetError, match="000002.png.*truncated"):
        craft_dataset("pgd", "yolov3", src, tmp_path / "strict", **kw)
    card = craft_dataset("pgd", "yolov3", src, tmp_path / "skip", skip_bad=True, **kw)
    assert card["images"] == N_IMAGES - 1 and card["num_skipped"] == 1
    assert card["skipped"][0]["index"] == 2 and "000002.png" in card["skipped"][0]["item"]
    assert "truncated" in card["skipped"][0]["problem"]
    names = sorted(p.name for p in (tmp_path / "skip" / "images").iterdir())
    assert "000002.png" not in names and len(names) == N_IMAGES - 1
    assert len(CocoDetection(tmp_path / "skip" / "images", tmp_path / "skip" / "instances.json")) == N_IMAGES - 1


def test_cli_list_run_and_errors(shapes6, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["attack", "--list"], terminal_width=200)
    assert res.exit_code == 0
    for name, cls in ATTACKS.items():
        assert name in res.output and cls.description[:30] in res.output
    out = tmp_path / "cli"
    res = runner.invoke(app, ["attack", "--attack", "gaussian", "--model", "yolov3", "--untrained", "--data",
                              str(shapes6), "--out", str(out), "--limit", "3", "--seed", "4", "--evaluate"],
                        terminal_width=200)
    assert res.exit_code == 0, res.output
    card = json.loads((out / "card.json").read_text())
    assert card["images"] == 3 and card["attack"]["hyperparameters"]["sigma"] == 9.0
    assert card["evaluation"]["yolov3"]["white_box"] and card["evaluation"]["yolov3"]["images"] == 3
    assert "clean vs adversarial" in res.output
    assert f"{card['rmse_mean']:.3f}" in res.output and str(out) in res.output
    for argv, message in (
            (["--attack", "nope", "--model", "yolov3"], "unknown attack 'nope'"),
            (["--attack", "pgd", "--model", "nope", "--data", str(shapes6)], "unknown zoo model 'nope'"),
            (["--attack", "pgd", "--model", "yolov3", "--data", str(tmp_path / "missing")], "no such dataset folder"),
            (["--attack", "pgd"], "--model is required"),
            (["--attack", "gaussian", "--model", "yolov3", "--untrained", "--data", str(shapes6), "--set", "sigma=3"],
             "holds another crafting job")):
        res = runner.invoke(app, ["attack", *argv, "--out", str(out)], terminal_width=200)
        assert res.exit_code == 2, res.output
        assert message in " ".join(res.output.split()), res.output


def test_rad_card_carries_its_diagnostics(shapes6, tmp_path):
    """A RAD dataset's card says how much of RAD was a relevance attack (issue 20): the gradient
    evaluations, the share driven by the second term alone, relevance per iteration, mean |delta|."""
    card = craft_dataset("rad", "ssd_vgg", shapes6, tmp_path / "rad", limit=3, batch_size=2, seed=0, steps=1,
                         progress=False)
    d = card["diagnostics"]
    assert d["gradient_evaluations"] == 3 * 1 * 4  # 3 images, 1 iteration, 4 distinct SI inputs (x counts twice)
    assert 0.0 <= d["second_term_share"] <= 1.0 and len(d["relevance_per_iteration"]) == 1
    assert 0 < d["mean_abs_delta"] <= 16 and 0 <= d["share_at_eps"] <= 1
    pgd = craft_dataset("pgd", "yolov3", shapes6, tmp_path / "pgd", limit=1, batch_size=1, **PGD)
    assert pgd["diagnostics"] is None


def test_ensemble_surrogate_dataset_and_unknown_member(shapes6, tmp_path):
    card = craft_dataset("pgd", "yolov3+ssd_vgg", shapes6, tmp_path / "ens", limit=1, steps=1, eps=4,
                         attack_kwargs={"weights": "loss", "normalize": True}, pretrained=False, progress=False)
    assert card["surrogate"]["family"] == "ensemble" and set(card["surrogate"]["members"]) == {"yolov3", "ssd_vgg"}
    hp = card["attack"]["hyperparameters"]
    assert hp["attack"] == "pgd" and hp["members"] == ["yolov3", "ssd_vgg"] and hp["weights"] == "loss"
    assert hp["normalize"] is True and card["linf_max"] == 4
    res = CliRunner().invoke(app, ["attack", "--attack", "pgd", "--surrogate", "yolov3+nope", "--untrained",
                                   "--data", str(shapes6), "--out", str(tmp_path / "x")], terminal_width=200)
    assert res.exit_code == 2, res.output
    assert "ensemble 'yolov3+nope': unknown member 'nope'" in " ".join(res.output.split()), res.output
