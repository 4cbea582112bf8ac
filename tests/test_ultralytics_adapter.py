"""The ultralytics adapter (issue 22): YOLOv8 behind the Detector contract.

Skipped as a whole where the extra is not installed (``uv sync --all-extras`` / ``pip install
'advdet[ultralytics]'``). The availability check does not import ultralytics, so the import happens inside
the ``ul`` fixture, after conftest has pointed ``$ADVDET_HOME`` at a temporary folder (ultralytics writes its
settings file at import: here under ``$ADVDET_HOME/ultralytics``, never ``~/.config``) and with every socket
call failing (a test fails if anything tries the network).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import pickle
import socket
from pathlib import Path

import pytest
import torch
from conftest import block_network

if importlib.util.find_spec("ultralytics") is None:  # pytest.importorskip would import it before $ADVDET_HOME
    pytest.skip("the ultralytics extra is not installed (advdet[ultralytics])", allow_module_level=True)

S = 128
K = 4


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    block_network(monkeypatch)


@pytest.fixture(scope="module")
def ul():
    """The adapter module, ultralytics imported under the network guard."""
    with pytest.MonkeyPatch.context() as mp:
        block_network(mp)
        from advdet.models import ultralytics_adapter as ula

        ula.import_ultralytics()
        return ula


def test_import_leaves_pillow_and_torch_save_alone(ul, tmp_path):
    """ultralytics replaces PIL.Image.open with a wrapper that pip-installs pi-heif on an unreadable file;
    after import_ultralytics advdet's readers see Pillow's own function and error."""
    import PIL
    from PIL import Image

    import ultralytics.utils.patches  # noqa: F401  (the module that patches, already imported)

    assert Image.open.__module__ == "PIL.Image" and torch.save.__module__ == "torch.serialization"
    bad = tmp_path / "garbage.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(PIL.UnidentifiedImageError):
        Image.open(bad)


@pytest.fixture(scope="module")
def det(ul):
    torch.manual_seed(0)
    d = ul.ultralytics_detector("yolov8n.yaml", num_classes=K, input_size=S)
    with torch.no_grad():  # class biases at 0 (probabilities near 0.5): NMS has many candidates to sort
        for seq in d.head.cv3:
            seq[-1].bias.zero_()
    return d.eval()


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, S, S, generator=torch.Generator().manual_seed(seed))


def targets(n: int) -> list[dict]:
    base = [
        {"boxes": torch.tensor([[8.0, 8.0, 60.0, 50.0], [70.0, 60.0, 120.0, 110.0]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.tensor([[20.0, 30.0, 90.0, 100.0]]), "labels": torch.tensor([3])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]
    return [{k: v.clone() for k, v in base[i % 3].items()} for i in range(n)]


def test_import_is_offline_and_keeps_settings_and_torch_save(ul):
    import ultralytics.utils as uu

    from advdet.data.shapes import advdet_home

    assert os.environ["YOLO_OFFLINE"] == "1" and uu.ONLINE is False
    assert Path(uu.SETTINGS.file).resolve().is_relative_to(advdet_home().resolve())
    assert torch.save is torch.serialization.save  # ultralytics' replacement is undone
    assert torch._tensor_str.PRINT_OPTS.precision == 4 and torch._tensor_str.PRINT_OPTS.linewidth == 80


def test_dense_contract_and_gradients_reach_pixels(det):
    x = images(2).requires_grad_(True)
    d = det.dense(x)
    n = sum((S // s) ** 2 for s in (8, 16, 32))
    assert d.logits.shape == (2, n, K) and d.boxes.shape == (2, n, 4) and d.anchors.shape == (2, n, 4)
    assert d.score_mode == "sigmoid" and d.objectness is None and d.num_classes == K
    assert d.extra["num_per_level"] == [256, 64, 16] and d.extra["strides"] == [8.0, 16.0, 32.0]
    (g,) = torch.autograd.grad(d.logits.sum() + d.boxes.sum(), x)
    assert g.abs().sum() > 0 and torch.isfinite(g).all()
    # the first anchor is the 8-px cell at the origin
    torch.testing.assert_close(d.anchors[0, 0], torch.tensor([0.0, 0.0, 8.0, 8.0]))


def test_dense_is_ultralytics_inference_output(det):
    from ultralytics.utils.ops import xywh2xyxy

    x = images(2)
    with torch.no_grad():
        y, _ = det.model(x)
        d = det.dense(x)
    torch.testing.assert_close(d.extra["pred"], y, rtol=0, atol=0)
    torch.testing.assert_close(d.boxes, xywh2xyxy(y[:, :4].transpose(1, 2)))
    torch.testing.assert_close(d.logits.sigmoid(), y[:, 4:].transpose(1, 2))


@pytest.mark.parametrize("nms", [None, dict(conf_thres=0.25, iou_thres=0.45, multi_label=False, max_det=50)])
def test_predict_equals_ultralytics_nms(ul, det, nms):
    from ultralytics.utils.nms import non_max_suppression

    d = copy.deepcopy(det)
    if nms is not None:
        d.nms = ul.YoloNMS(**nms)
    c = d.nms
    x = images(3, seed=4)
    with torch.no_grad():
        y, _ = d.model(x)  # ultralytics' own forward and NMS on the same input
        ref = non_max_suppression(y, c.conf_thres, c.iou_thres, multi_label=c.multi_label, max_det=c.max_det,
                                  nc=K, max_time_img=1e9)
    out = d.predict(x)
    assert len(out) == 3 and sum(len(o["boxes"]) for o in out) > 10
    for o, r in zip(out, ref):
        torch.testing.assert_close(o["boxes"], r[:, :4].clamp(0, S), rtol=0, atol=0)
        torch.testing.assert_close(o["scores"], r[:, 4], rtol=0, atol=0)
        assert torch.equal(o["labels"], r[:, 5].long()) and o["labels"].dtype == torch.int64
        assert len(o["boxes"]) <= c.max_det


def test_batch_equals_single_images_in_eval(det):
    x = images(2, seed=5)
    with torch.no_grad():
        both = det.dense(x)
        one = det.dense(x[1:])
    torch.testing.assert_close(both.logits[1:], one.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(both.boxes[1:], one.boxes, rtol=1e-4, atol=1e-3)


def test_loss_is_v8_detection_loss_split_by_name(det):
    from ultralytics.utils.loss import v8DetectionLoss

    x, t = images(3).requires_grad_(True), targets(3)
    losses = det.loss(x, t)
    assert set(losses) == {"cls", "loc", "dfl"}
    assert all(v.ndim == 0 and torch.isfinite(v) and v > 0 for v in losses.values())
    # ultralytics' own criterion on the same forward output and batch: (box, cls, dfl) * batch size
    batch = det._targets_batch(t, x)
    with torch.no_grad():
        total, _ = v8DetectionLoss(det.model)(det.model(x.detach()), batch)
    ours = torch.stack([losses["loc"], losses["cls"], losses["dfl"]]).detach() * 3
    torch.testing.assert_close(ours, total, rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(sum(losses.values()), x)
    assert g.abs().sum() > 0 and torch.isfinite(g).all()


def test_per_image_loss_equals_each_image_alone(det):
    from advdet.attacks.losses import LOC_KEYS, total_losses

    x, t = images(3, seed=2), targets(3)
    per = det.per_image_loss(x, t)
    for i in range(3):
        alone = det.loss(x[i:i + 1], t[i:i + 1])
        for k in ("cls", "loc", "dfl"):
            torch.testing.assert_close(per[k][i], alone[k], rtol=1e-5, atol=1e-6)
    assert per["loc"][2] == 0 and per["dfl"][2] == 0  # no boxes: no box terms
    tot = total_losses(det, x, t)
    torch.testing.assert_close(tot["cls"], per["cls"].sum())
    assert "dfl" in LOC_KEYS


def test_loss_rejects_bad_targets(det):
    x = images(1)
    with pytest.raises(ValueError, match="labels must be in 0..3"):
        det.loss(x, [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([K])}])
    with pytest.raises(ValueError, match="positive width"):
        det.loss(x, [{"boxes": torch.tensor([[10.0, 0, 10, 10]]), "labels": torch.tensor([0])}])
    with pytest.raises(ValueError, match="2 targets for a batch of 1"):
        det.loss(x, targets(2))


def test_training_steps_lower_the_loss(ul):
    torch.manual_seed(1)
    d = ul.ultralytics_detector("yolov8n.yaml", num_classes=K, input_size=S).train()
    x, t = images(2, seed=6), targets(2)
    opt = torch.optim.AdamW(d.parameters(), lr=2e-3)
    first = None
    for _ in range(8):
        loss = sum(d.loss(x, t).values())
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(sum(d.loss(x, t).values()).detach()) < first


def test_feature_layers_are_the_backbone_maps_the_neck_reads(det):
    names = list(det.feature_layers())
    assert names == ["model.model.4", "model.model.6", "model.model.9"]  # P3, P4, SPPF of yolov8.yaml
    feats = det.features(images(1))
    assert [f.shape[-1] for f in feats.values()] == [S // 8, S // 16, S // 32]


@pytest.mark.parametrize("name,kw", [("cls", dict(steps=2)), ("loc", dict(steps=2)), ("dag", dict(steps=3)),
                                     ("cwa", dict(steps=2)), ("osfd", dict(steps=2, theta=0, s_max=1.0, sigma=0))])
def test_attacks_run_with_yolov8_as_surrogate(det, name, kw):
    from advdet.attacks import build_attack

    x, t = images(2, seed=3), targets(2)
    xa = build_attack(name, det, **kw)(x, t)
    assert xa.shape == x.shape and 0 <= xa.min() and xa.max() <= 1
    assert (xa - x).abs().max() * 255 <= 16 + 1e-4 and not torch.equal(xa, x)


def test_pt_checkpoint_loads_through_the_restricted_loader(ul, det, tmp_path):
    """An ultralytics-style .pt (the model object pickled in half precision, as its trainer saves it) loads
    with weights_only=True and ultralytics' allow-list, into a fresh model that computes the same."""
    pt = tmp_path / "best.pt"
    torch.save({"model": copy.deepcopy(det.model).half(), "ema": None, "train_args": {"imgsz": S},
                "epoch": 3}, pt)
    loaded = ul.load_ultralytics(pt, input_size=S)
    ref = copy.deepcopy(det)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.half().float())
    x = images(1)
    with torch.no_grad():
        torch.testing.assert_close(loaded.dense(x).logits, ref.dense(x).logits, rtol=1e-4, atol=1e-4)
    assert loaded.num_classes == K and not loaded.training
    # the same through the model hub name
    from advdet.models.zoo import build_model, is_external

    assert is_external(f"ultralytics:{pt}")
    hub = build_model(f"ultralytics:{pt}", input_size=S)
    assert hub.family == "ultralytics" and hub.input_size == S


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_untrusted_pickle_is_refused_and_runs_nothing(ul, tmp_path):
    marker = tmp_path / "pwned"
    pt = tmp_path / "evil.pt"
    with open(pt, "wb") as fh:
        torch.save({"model": _Payload(marker)}, fh, pickle_module=pickle)
    from advdet.models.weights import CheckpointError

    with pytest.raises(CheckpointError, match="trust_pickle"):
        ul.load_ultralytics(pt)
    assert not marker.exists()


def test_missing_file_is_never_downloaded(ul):
    from advdet.models.weights import CheckpointError

    with pytest.raises(CheckpointError, match="not found"):
        ul.load_ultralytics("yolov8n.pt")  # a bare official name: ultralytics would fetch it


def test_safetensors_round_trip_without_pickle(ul, det, tmp_path):
    path = tmp_path / "y8.safetensors"
    card = ul.save_ultralytics(det, path)
    assert card["ultralytics_yaml"]["nc"] == K and card["family"] == "ultralytics"
    back = ul.load_ultralytics(path, input_size=S)
    x = images(1)
    with torch.no_grad():
        torch.testing.assert_close(back.dense(x).boxes, det.dense(x).boxes)
    from advdet.models.zoo import build_model

    same = build_model("ultralytics:yolov8n.yaml", weights=path, input_size=S)
    assert same.num_classes == K


def test_refuses_other_heads(ul):
    from advdet.data.errors import AdvdetError

    with pytest.raises(AdvdetError, match="Segment head"):
        ul.ultralytics_detector("yolov8n-seg.yaml", num_classes=K, input_size=S)


def test_zoo_entry_untrained_and_not_on_the_zoo_page(ul):
    from advdet.models.weights import CheckpointError
    from advdet.models.zoo import ZOO_INPUT_SIZE, build_model, zoo_entry

    e = zoo_entry("yolov8")
    assert (e.family, e.extra, e.kind, e.backbone_init) == ("ultralytics", "ultralytics", "detector", "yolov8_pre")
    assert e.recipe["batch_size"] == 8
    from advdet.data.shapes import SHAPE_CLASSES

    m = e.builder()
    assert m.input_size == ZOO_INPUT_SIZE and m.num_classes == len(SHAPE_CLASSES)
    if not e.trained:
        with pytest.raises(CheckpointError, match="no shipped weights yet"):
            build_model("yolov8")
        from advdet.models.zoo_docs import zoo_markdown

        assert "`yolov8`" not in zoo_markdown()


@pytest.mark.parametrize("activation", ["gradient", "pass"])
def test_rad_and_relevance_maps_with_a_yolov8_surrogate(det, activation):
    """RAD runs on YOLOv8 (SiLU, C2f split/concat, SPPF, nearest upsampling, the DFL softmax and conv) with the
    reference rules and with smooth activations passed through (relevance/rules/activation.py)."""
    from advdet.attacks import build_attack
    from advdet.relevance import LRPRules, NodeSelection, relevance_map

    rules = LRPRules(activation=activation)
    x, t = images(2, seed=3), targets(2)
    r = relevance_map(det, x[:1], NodeSelection(), rules=rules)
    assert r.per_channel.shape == (1, 3, S, S) and torch.isfinite(r.per_channel).all()
    assert r.per_channel.abs().sum() > 0
    xa = build_attack("rad", det, steps=1, transforms=[], rules=rules)(x, t)
    assert (xa - x).abs().max() * 255 <= 16 + 1e-4 and not torch.equal(xa, x)


def test_a_fresh_process_writes_nothing_outside_advdet_home(tmp_path):
    """Import and build in a new process with an empty $HOME and every socket call failing: ultralytics' settings
    file lands under $ADVDET_HOME, nothing under $HOME/.config, and nothing goes online."""
    import subprocess
    import sys

    home, adv = tmp_path / "home", tmp_path / "adv"
    home.mkdir()
    code = ("import socket\n"
            "def no(*a, **k): raise AssertionError('network')\n"
            "socket.socket.connect = no; socket.getaddrinfo = no; socket.create_connection = no\n"
            "from advdet.models.ultralytics_adapter import ultralytics_detector\n"
            "ultralytics_detector('yolov8n.yaml', num_classes=3, input_size=64)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("YOLO_", "XDG_"))}
    env.update(HOME=str(home), ADVDET_HOME=str(adv))
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, timeout=300)
    assert [p.relative_to(adv).parts[0] for p in adv.rglob("settings.json")] == ["ultralytics"]
    assert [p.name for p in home.rglob("*")] == []


def test_yolov8_starts_from_its_pretrained_backbone(ul, tmp_path, monkeypatch):
    """yolov8_pre (kind backbone: yolov8n.yaml's layers 0-9 with a linear head, on the procedural set) fills
    the detector's backbone, as darknet_pre does for yolov3; the neck and head are not touched."""
    from advdet.models import zoo
    from advdet.models.weights import save_weights
    from advdet.models.zoo import zoo_entry
    from advdet.training.zoo_train import load_backbone_init

    pre, det_entry = zoo_entry("yolov8_pre"), zoo_entry("yolov8")
    assert (pre.kind, pre.extra, det_entry.backbone_init) == ("backbone", "ultralytics", "yolov8_pre")
    torch.manual_seed(0)
    backbone = pre.builder()
    assert backbone.input_size == 96 and backbone(torch.rand(2, 3, 96, 96)).shape == (2, 256)
    monkeypatch.setattr(zoo, "ZOO_DIR", tmp_path)
    save_weights(backbone, tmp_path / "yolov8_pre.safetensors", {})
    model = det_entry.builder()
    keys = load_backbone_init(model, det_entry)
    own, src = model.state_dict(), backbone.state_dict()
    assert {k.split(".")[2] for k in keys} == {str(i) for i in range(10)}
    assert all(torch.equal(own[k], src["body." + k[len("model.model."):]]) for k in keys)
    assert not any(k.startswith(("model.model.10.", "model.model.22.")) for k in keys)
