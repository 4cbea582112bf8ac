"""Standard training (resume is bit-exact), weights with cards (clear errors), the zoo registry, eval CLI."""

import json

import pytest
import torch
from typer.testing import CliRunner

from advdet.cli import app
from advdet.models.ssd_vgg import ssd_vgg_small
from advdet.models.weights import (CheckpointError, load_weights, load_weights_under, read_card, round_to_dtype,
                                   save_weights)
from advdet.models.zoo import build_model, zoo_entries, zoo_entry
from advdet.training.augment import augment_detection
from advdet.training.standard import TrainConfig, train_detector
from advdet.training.tensor_cache import TensorCache


def _cache(n=6, s=64):
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(n, 3, s, s, generator=g) * 60).to(torch.uint8)
    boxes, labels = [], []
    for i in range(n):
        x0 = 4 + 3 * i
        images[i, :, 10:40, x0:x0 + 20] = 230
        boxes.append(torch.tensor([[x0, 10.0, x0 + 20, 40]]))
        labels.append(torch.tensor([i % 2]))
    return TensorCache(images, boxes, labels)


def _cfg(**kw):
    base = dict(epochs=2, batch_size=2, lr=1e-3, warmup_iters=2, checkpoint_every=2, log_every=1, seed=3)
    return TrainConfig(**{**base, **kw})


def test_resume_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    a = ssd_vgg_small(num_classes=2, input_size=64)
    b = ssd_vgg_small(num_classes=2, input_size=64)
    b.load_state_dict(a.state_dict())
    init = {k: v.clone() for k, v in a.state_dict().items()}
    full = train_detector(a, _cache(), _cfg(), tmp_path / "full")
    assert full["finished"] and full["iterations"] == 6
    # interrupted after 1 iteration (max_minutes=0 saves and stops), then resumed from that checkpoint
    part = train_detector(b, _cache(), _cfg(max_minutes=0.0), tmp_path / "part")
    assert not part["finished"] and part["iterations"] == 1
    c = ssd_vgg_small(num_classes=2, input_size=64)
    c.load_state_dict(init)
    done = train_detector(c, _cache(), _cfg(), tmp_path / "part", resume=True)
    assert done["finished"]
    for k, v in a.state_dict().items():
        assert torch.equal(v, c.state_dict()[k]), k


def test_lr_mults_scale_the_step_of_the_named_parameters_only(tmp_path):
    from advdet.training.standard import build_optimizer, lr_mult_of

    assert lr_mult_of("model.aid.fc.weight", {"model.aid.": 30, "model.": 2}) == 30.0
    assert lr_mult_of("model.vgg.0.weight", {"model.aid.": 30, "model.": 2}) == 2.0
    assert lr_mult_of("model.vgg.0.weight", None) == 1.0
    m = ssd_vgg_small(num_classes=2, input_size=64)
    plain = build_optimizer(m, _cfg(optimizer="sgd"))
    # no multipliers: the two groups (decay, no decay) of earlier versions, so old checkpoints still resume
    assert [(g["weight_decay"], g["lr_mult"]) for g in plain.param_groups] == [(5e-4, 1.0), (0.0, 1.0)]
    # one SGD step (lr 1e-3, no weight decay, no warm-up) from the same weights with the loc heads' lr x 10
    torch.manual_seed(0)
    a = ssd_vgg_small(num_classes=2, input_size=64)
    b = ssd_vgg_small(num_classes=2, input_size=64)
    b.load_state_dict(a.state_dict())
    init = {k: v.clone() for k, v in a.state_dict().items()}
    kw = dict(iters=1, batch_size=2, warmup_iters=0, weight_decay=0.0, optimizer="sgd",
              lr_schedule="constant", augment=False, grad_clip=0.0)
    train_detector(a, _cache(), _cfg(**kw), tmp_path / "a")
    train_detector(b, _cache(), _cfg(**kw, lr_mults={"model.loc.": 10.0}), tmp_path / "b")
    moved = 0.0
    for k in init:
        da, db = a.state_dict()[k] - init[k], b.state_dict()[k] - init[k]
        if k.startswith("model.loc."):
            assert torch.allclose(db, 10 * da, rtol=1e-3, atol=1e-6), k
            moved = max(moved, float(da.abs().max()))
        else:
            assert torch.equal(da, db), k
    assert moved > 1e-4  # well above the tolerance, so a missing multiplier fails


def test_augment_keeps_boxes_on_objects():
    g = torch.Generator().manual_seed(1)
    img = torch.zeros(3, 64, 64)
    img[:, 20:40, 10:30] = 1.0
    for _ in range(20):
        out, boxes, labels, _ = augment_detection(img, torch.tensor([[10.0, 20, 30, 40]]), torch.tensor([1]), g)
        assert out.shape == img.shape and 0 <= float(out.min()) and float(out.max()) <= 1
        for b in boxes:
            x0, y0, x1, y1 = (int(round(float(v))) for v in b)
            inside = out[:, y0:y1, x0:x1].mean()
            assert inside > 0.5  # the box still covers the bright object


def test_weights_round_trip_and_clear_errors(tmp_path):
    torch.manual_seed(0)
    m = ssd_vgg_small(num_classes=3, input_size=64)
    card = save_weights(m, tmp_path / "m.safetensors", {"name": "m"})
    assert card["sha256"] and card["file_size"] > 1000 and read_card(tmp_path / "m.safetensors")["name"] == "m"
    fresh = ssd_vgg_small(num_classes=3, input_size=64)
    load_weights(fresh, tmp_path / "m.safetensors")
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(m.eval().dense(x).logits, fresh.eval().dense(x).logits)
    with pytest.raises(CheckpointError, match="m.safetensors.*shape mismatches"):
        load_weights(ssd_vgg_small(num_classes=5, input_size=64), tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_weights(fresh, tmp_path / "cut.safetensors")
    from advdet.models.yolov3 import yolov3_small

    with pytest.raises(CheckpointError, match="another architecture"):
        load_weights(yolov3_small(num_classes=3, input_size=64), tmp_path / "m.safetensors")


def test_float16_storage_halves_the_file_and_loads_what_round_to_dtype_computes(tmp_path):
    torch.manual_seed(0)
    m = ssd_vgg_small(num_classes=3, input_size=64).eval()
    full = save_weights(m, tmp_path / "full.safetensors")
    half = save_weights(m, tmp_path / "half.safetensors", dtype=torch.float16)
    assert full["dtype"] == "float32" and half["dtype"] == "float16"
    assert 0.45 < half["file_size"] / full["file_size"] < 0.55
    x = torch.rand(2, 3, 64, 64)
    before = m.dense(x).logits.detach()
    fresh = load_weights(ssd_vgg_small(num_classes=3, input_size=64), tmp_path / "half.safetensors").eval()
    assert next(fresh.parameters()).dtype == torch.float32  # loaded back into the model's own dtype
    after = fresh.dense(x).logits.detach()
    assert 0 < float((after - before).abs().max()) < 1e-2  # rounded, not exact, and close
    round_to_dtype(m, torch.float16)
    assert torch.equal(m.dense(x).logits.detach(), after)  # what the card measures is what the file computes


def test_int8_storage_quarters_the_file_and_loads_what_round_to_dtype_computes(tmp_path):
    from advdet.models.robustdet import robustdet_small

    torch.manual_seed(0)
    m = robustdet_small(num_classes=3, input_size=64).eval()
    half = save_weights(m, tmp_path / "half.safetensors", dtype=torch.float16)
    q8 = save_weights(m, tmp_path / "q8.safetensors", dtype=torch.int8)
    assert q8["dtype"] == "int8" and 0.45 < q8["file_size"] / half["file_size"] < 0.6
    x = torch.rand(2, 3, 64, 64)
    before = m.dense(x).logits.detach()
    fresh = load_weights(robustdet_small(num_classes=3, input_size=64), tmp_path / "q8.safetensors").eval()
    after = fresh.dense(x).logits.detach()
    err = float((after - before).abs().max())
    assert 0 < err < 0.05 * float(before.abs().max())  # rounded, not exact, and close
    round_to_dtype(m, torch.int8)
    assert torch.equal(m.dense(x).logits.detach(), after)  # what the card measures is what the file computes
    # per output channel: a dynamic kernel (K, out, in, kh, kw) gets K x out scales, its bias stays float16
    from safetensors.torch import load_file

    raw = load_file(str(tmp_path / "q8.safetensors"))
    k, w = next((k, v) for k, v in raw.items() if v.ndim == 5)
    assert w.dtype == torch.int8 and raw[k + ".int8_scale"].shape == w.shape[:2]
    assert int(w.abs().amax(dim=(2, 3, 4)).min()) == 127  # each channel spans the full int8 range
    assert all(v.dtype == torch.float16 for k, v in raw.items() if k.endswith(".bias"))


def test_backbone_init_loads_only_the_backbone_and_checks_it(tmp_path):
    from advdet.models.torchvision_adapter import fcos_tiny, retinanet_tiny
    from advdet.training.zoo_train import BACKBONE_PREFIX

    torch.manual_seed(0)
    save_weights(fcos_tiny(num_classes=3, input_size=64), tmp_path / "fcos.safetensors")
    src = fcos_tiny(num_classes=3, input_size=64)
    load_weights(src, tmp_path / "fcos.safetensors")
    retina = retinanet_tiny(num_classes=3, input_size=64)
    head_before = {k: v.clone() for k, v in retina.state_dict().items() if not k.startswith(BACKBONE_PREFIX)}
    keys = load_weights_under(retina, tmp_path / "fcos.safetensors", BACKBONE_PREFIX)
    assert len(keys) > 50 and all(k.startswith("model.backbone.") for k in keys)
    for k in keys:
        assert torch.equal(retina.state_dict()[k], src.state_dict()[k])
    assert all(torch.equal(retina.state_dict()[k], v) for k, v in head_before.items())  # heads untouched
    x = torch.rand(1, 3, 64, 64)  # same features from the two models' backbones
    with torch.no_grad():
        a, b = retina.eval().model.backbone(x), src.eval().model.backbone(x)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointError, match=r"fcos.safetensors: its 'model.backbone.' part does not fit.*shape"):
        load_weights_under(retinanet_tiny(num_classes=3, input_size=64, fpn_channels=32),
                           tmp_path / "fcos.safetensors", BACKBONE_PREFIX)
    assert zoo_entry("retinanet").backbone_init == zoo_entry("fcos").backbone_init == "resnet_pre"


def test_zoo_registry_names_families_and_builds():
    names = {e.name for e in zoo_entries()}
    assert {"ssd_vgg", "yolov3", "retinanet", "fcos", "fasterrcnn", "maskrcnn"} <= names
    e = zoo_entry("ssd_vgg")
    assert e.family == "ssd_vgg" and e.recipe["epochs"] > 0
    m = build_model("ssd_vgg", pretrained=False)
    assert m.input_size == 256 and m.num_classes == 8
    with pytest.raises(KeyError, match="unknown zoo model"):
        zoo_entry("nope")


def test_zoo_list_json():
    res = CliRunner().invoke(app, ["zoo", "list", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert {r["name"] for r in rows} >= {"ssd_vgg", "yolov3"}
    assert all(r["input_size"] == 256 and r["parameters"] > 1e5 for r in rows if r["kind"] != "backbone")
    assert all(r["input_size"] == 96 for r in rows if r["kind"] == "backbone")
    # the table, piped (not a terminal): full names, and the total of the shipped files
    res = CliRunner().invoke(app, ["zoo", "list"])
    assert res.exit_code == 0, res.output
    assert all(f" {r['name']} " in res.output for r in rows)
    total = sum(r["file_size"] or 0 for r in rows) / 1e6
    assert f"shipped weights: {total:.1f} MB in all" in res.output


def test_eval_cli_on_a_tiny_dataset(tmp_path):
    from advdet.data.shapes import generate_shapes

    generate_shapes(tmp_path / "shp", train=0, val=4, seed=0, workers=1)
    torch.manual_seed(0)
    m = ssd_vgg_small(num_classes=8, input_size=256)
    save_weights(m, tmp_path / "w.safetensors", {})
    res = CliRunner().invoke(app, ["eval", "--model", "ssd_vgg", "--weights", str(tmp_path / "w.safetensors"),
                                   "--data", str(tmp_path / "shp" / "val"), "--json", str(tmp_path / "m.json"),
                                   "--predictions", str(tmp_path / "p.json")])
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "m.json").read_text())
    assert {"map", "map50", "map75"} <= set(out) and out["images"] == 4
    preds = json.loads((tmp_path / "p.json").read_text())
    assert preds and {"image_id", "category_id", "bbox", "score"} <= set(preds[0])
    assert {p["category_id"] for p in preds} <= set(range(1, 9))


def test_classifier_learns_presence_and_reports_accuracy(tmp_path):
    from advdet.data.registry import build_dataset
    from advdet.data.shapes import generate_shapes
    from advdet.models.classifier import classifier_accuracy, presence_vector, small_classifier

    assert presence_vector({"labels": torch.tensor([2, 2, 5])}, 8).tolist() == [0, 0, 1, 0, 0, 1, 0, 0]
    torch.manual_seed(0)
    m = small_classifier(num_classes=2, input_size=64)
    c = _cache()
    x = c.images.float() / 255
    t = [{"boxes": b, "labels": lab} for b, lab in zip(c.boxes, c.labels)]
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    first = float(m.loss(x, t)["cls"].detach())
    for _ in range(20):
        loss = m.loss(x, t)["cls"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first
    generate_shapes(tmp_path, train=0, val=6, seed=0, workers=1)
    acc = classifier_accuracy(small_classifier(num_classes=8, input_size=64),
                              build_dataset(tmp_path / "val", size=64))
    assert acc["images"] == 6 and 0.0 <= acc["top1_largest"] <= acc["top1"] <= 1.0


def test_zoo_card_command_reproduces_its_overrides():
    """The card's command, split as a shell would and parsed as `--set` parses it, gives back the overrides."""
    import shlex

    import torch

    from advdet.cli.app import parse_overrides
    from advdet.training.zoo_train import train_command

    overrides = {"lr_mults": {"model.stem.": 0.0, "model.stages.": 0.1}, "epochs": 2, "lr_schedule": "cosine"}
    cmd = train_command("yolov3", torch.device("cpu"), overrides)
    argv = shlex.split(cmd)
    assert argv[:4] == ["advdet", "zoo", "train", "yolov3"]
    assert parse_overrides(argv[5::2]) == overrides and argv[4::2] == ["--set"] * 3
    assert train_command("ssd_vgg", torch.device("cpu"), None) == "advdet zoo train ssd_vgg"


def test_start_fields_name_the_starting_files_sha256(tmp_path, monkeypatch):
    """A card records what its entry starts from with that file's sha256 at training time, so a robust entry
    fine-tuned from an older ssd_vgg can be told apart after ssd_vgg is retrained."""
    import advdet.models.zoo as zoo
    from advdet.training.zoo_train import start_fields

    monkeypatch.setattr(zoo, "ZOO_DIR", tmp_path)
    (tmp_path / "ssd_vgg.json").write_text(json.dumps({"name": "ssd_vgg", "sha256": "aa11"}))
    (tmp_path / "darknet_pre.json").write_text(json.dumps({"name": "darknet_pre", "sha256": "bb22"}))
    assert start_fields(zoo_entry("robustdet")) == {"init": "ssd_vgg", "init_sha256": "aa11"}
    assert start_fields(zoo_entry("ssd_vgg-at-cls")) == {"init": "ssd_vgg", "init_sha256": "aa11"}
    assert start_fields(zoo_entry("yolov3")) == {"backbone_init": "darknet_pre", "backbone_init_sha256": "bb22"}
    # ssd_vgg starts from vgg_pre, whose card is not there: the name is kept, the sha256 is unknown
    assert start_fields(zoo_entry("ssd_vgg")) == {"backbone_init": "vgg_pre", "backbone_init_sha256": None}
