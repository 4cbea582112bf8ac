"""The model hub (issue 23, item 3): one registry, one state-dict reader, one fit check, one provenance record."""

from __future__ import annotations

import hashlib
import re

import pytest
import torch

from advdet.data.shapes import SHAPE_CLASSES
from advdet.models import hf_rtdetr, ultralytics_adapter as ula
from advdet.models.hub import (ModelInfo, Provenance, get_model, is_external, list_models, model_family, provenance,
                               register_model)
from advdet.models.weights import CheckpointError
from advdet.models.zoo import build_model, zoo_entries, zoo_entry
from conftest import block_network

K = len(SHAPE_CLASSES)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    block_network(monkeypatch)


def _zoo_model(**kw):
    """The zoo's ssd_vgg architecture, randomly initialised (the cheapest zoo entry)."""
    torch.manual_seed(0)
    return get_model("ssd_vgg", pretrained=False, **kw)


FAMILIES = [
    ("ssd_vgg", dict(pretrained=False), "SSDVGG"),
    ("torchvision:fcos_tiny", dict(num_classes=3, input_size=64), "FCOSDetector"),
    ("torchvision:ssd300_vgg16", dict(num_classes=2, input_size=300), "SSDDetector"),
    ("darknet:yolov3", dict(num_classes=2, input_size=64), "YOLOv3Detector"),
    pytest.param("ultralytics:yolov8n.yaml", dict(num_classes=2, input_size=64), "UltralyticsDetector",
                 marks=pytest.mark.skipif(not ula.available(), reason="needs advdet[ultralytics]")),
    pytest.param("hf:rtdetr_tiny", dict(num_classes=2, input_size=64), "RTDetrDetector",
                 marks=pytest.mark.skipif(not hf_rtdetr.available(), reason="needs advdet[hf]")),
]


@pytest.mark.parametrize("name, kw, cls", FAMILIES)
def test_every_family_builds_through_get_model(name, kw, cls):
    torch.manual_seed(0)
    model = get_model(name, **kw)
    assert type(model).__name__ == cls and not model.training
    assert model.input_size == kw.get("input_size", 256)
    assert model.num_classes == kw.get("num_classes", K)
    assert is_external(name) == (":" in name)
    assert model_family(name)[0].family == ("zoo" if ":" not in name else name.split(":")[0])


def test_list_models_lists_the_zoo_and_every_prefix():
    infos = list_models()
    names = [m.name for m in infos]
    assert len(names) == len(set(names))
    assert names[:len(zoo_entries())] == [e.name for e in zoo_entries()]  # the zoo first, in its order
    by_name = {m.name: m for m in infos}
    assert by_name["ssd_vgg"] == ModelInfo("ssd_vgg", "ssd_vgg", "detector", zoo_entry("ssd_vgg").trained, False,
                                           zoo_entry("ssd_vgg").description)
    assert by_name["classifier"].kind == "classifier" and by_name["resnet_pre"].kind == "backbone"
    assert by_name["torchvision:fasterrcnn_resnet50_fpn"].family == "torchvision"
    assert by_name["torchvision:retinanet_tiny"].family == "tiny"
    assert by_name["darknet:yolov3"].external and not by_name["darknet:yolov3"].trained
    assert ("ultralytics:yolov8n.yaml" in names) == ula.available()
    assert ("hf:rtdetr_tiny" in names) == hf_rtdetr.available()
    assert [m.name for m in list_models("zoo")] == [e.name for e in zoo_entries()]
    assert {m.name for m in list_models("tiny")} == {f"torchvision:{n}_tiny" for n in
                                                    ("retinanet", "fcos", "fasterrcnn", "maskrcnn", "ssd")}


def test_build_model_is_get_model():
    a, b = _zoo_model(), (torch.manual_seed(0), build_model("ssd_vgg", pretrained=False))[1]
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    with pytest.raises(KeyError, match="unknown zoo model 'nope'"):
        get_model("nope")
    with pytest.raises(ValueError, match="zoo model 'ssd_vgg' has input_size=256, not 64"):
        get_model("ssd_vgg", pretrained=False, input_size=64)


def test_a_prefix_registers_once():
    with pytest.raises(ValueError, match="'torchvision:' registered twice"):
        register_model("torchvision:", family="other")(lambda arch, **kw: None)
    with pytest.raises(ValueError, match="ends with ':'"):
        register_model("mine", family="mine")


def test_ddp_module_prefix_loads_for_a_zoo_and_a_torchvision_model(tmp_path):
    src = _zoo_model()
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "ddp_zoo.pt")
    got = get_model("ssd_vgg", weights=tmp_path / "ddp_zoo.pt")
    assert all(torch.equal(v, got.state_dict()[k]) for k, v in src.state_dict().items())

    torch.manual_seed(1)
    tv = get_model("torchvision:fcos_tiny", num_classes=3, input_size=64)
    torch.save({f"module.{k}": v for k, v in tv.model.state_dict().items()}, tmp_path / "ddp_tv.pt")
    torch.manual_seed(2)
    got = get_model("torchvision:fcos_tiny", num_classes=3, input_size=64, weights=tmp_path / "ddp_tv.pt")
    assert all(torch.equal(v, got.model.state_dict()[k]) for k, v in tv.model.state_dict().items())


def _first_mismatch(own: dict, other: dict) -> str:
    return next(k for k, v in own.items() if k in other and other[k].shape != v.shape)


#: the one message of a file that does not fit: PATH: does not fit MODEL: N shape mismatches (e.g. ['KEY: ...
FIT_MESSAGE = r"^(?P<path>\S+): does not fit (?P<model>\w+): (?P<n>\d+) shape mismatches \(e\.g\. \['(?P<key>[\w.]+): " \
              r"file \((?P<file>[\d, ]+)\) vs model \((?P<own>[\d, ]+)\)'.*\((?P<hint>[^()]*)\)$"


def test_one_fit_message_for_a_zoo_and_a_torchvision_file(tmp_path):
    from advdet.models.ssd_vgg import ssd_vgg_small
    from advdet.models.weights import save_weights

    torch.manual_seed(0)
    other = ssd_vgg_small(num_classes=K + 2, input_size=256)  # another class count
    save_weights(other, tmp_path / "zoo_k10.safetensors")
    with pytest.raises(CheckpointError) as zoo_err:
        get_model("ssd_vgg", weights=tmp_path / "zoo_k10.safetensors")
    torch.manual_seed(0)
    tv5 = get_model("torchvision:fcos_tiny", num_classes=5, input_size=64)
    torch.save(tv5.model.state_dict(), tmp_path / "fcos_k5.pt")
    with pytest.raises(CheckpointError) as tv_err:
        get_model("torchvision:fcos_tiny", num_classes=3, input_size=64, weights=tmp_path / "fcos_k5.pt")

    zoo_m = re.match(FIT_MESSAGE, str(zoo_err.value))
    tv_m = re.match(FIT_MESSAGE, str(tv_err.value))
    assert zoo_m and tv_m, (str(zoo_err.value), str(tv_err.value))
    assert zoo_m["path"] == str(tmp_path / "zoo_k10.safetensors") and zoo_m["model"] == "SSDVGG"
    assert tv_m["path"] == str(tmp_path / "fcos_k5.pt") and tv_m["model"] == "FCOS"
    own = _zoo_model().state_dict()
    assert zoo_m["key"] == _first_mismatch(own, other.state_dict())
    assert tuple(int(v) for v in zoo_m["file"].split(",")) == tuple(other.state_dict()[zoo_m["key"]].shape)
    torch.manual_seed(0)
    tv3 = get_model("torchvision:fcos_tiny", num_classes=3, input_size=64).model.state_dict()
    assert tv_m["key"] == _first_mismatch(tv3, tv5.model.state_dict()) == "head.classification_head.cls_logits.weight"
    assert tv_m["file"].startswith("5, ") and tv_m["own"].startswith("3, ")
    assert "another architecture or class count" in zoo_m["hint"]
    assert "91 for torchvision's COCO models" in tv_m["hint"]  # the torchvision class-layout hint stays
    assert "\n" not in str(zoo_err.value) + str(tv_err.value)


class _RunsCode:
    """Pickles as a call of a non-allowlisted global: torch.load(weights_only=True) must refuse it."""

    def __reduce__(self):
        return (_RunsCode, ())


@pytest.mark.parametrize("name, kw", [("ssd_vgg", {}), ("torchvision:fcos_tiny", dict(num_classes=3, input_size=64)),
                                      ("darknet:yolov3", dict(num_classes=2, input_size=64))])
def test_an_unsafe_pickle_is_refused_in_one_line_naming_the_file(tmp_path, name, kw):
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "payload": _RunsCode()}, evil)
    with pytest.raises(CheckpointError) as err:
        get_model(name, weights=evil, **kw)
    msg = str(err.value)
    assert msg.startswith(f"{evil}: refused to load") and "\n" not in msg and "weights_only=True" not in msg


def test_every_reader_error_names_the_file(tmp_path):
    from advdet.models.weights import read_state_dict

    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'none.pt'}: weights file not found")):
        get_model("torchvision:fcos_tiny", num_classes=3, input_size=64, weights=tmp_path / "none.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'list.pt'}: not a state dict")):
        read_state_dict(tmp_path / "list.pt")
    torch.save({"model_state_dict": {"a": torch.zeros(2)}, "epoch": 3}, tmp_path / "ckpt.pt")
    assert list(read_state_dict(tmp_path / "ckpt.pt")) == ["a"]


def test_zoo_provenance_is_the_sha256_of_the_shipped_file():
    from advdet.bench.craft_job import surrogate_info
    from advdet.bench.loading import load_model

    entry = zoo_entry("ssd_vgg")
    assert entry.trained, "the zoo's ssd_vgg weights are missing"
    digest = hashlib.sha256(entry.weights_path.read_bytes()).hexdigest()
    assert provenance("ssd_vgg") == Provenance("zoo", str(entry.weights_path), digest)
    assert provenance("ssd_vgg").as_dict() == {"file": str(entry.weights_path), "sha256": digest, "origin": "zoo"}
    loaded = load_model("ssd_vgg")
    assert loaded.provenance == provenance("ssd_vgg") and loaded.info()["weights_sha256"] == digest
    info = surrogate_info("ssd_vgg", loaded.model, None, True)
    assert (info["weights"], info["weights_sha256"], info["untrained"]) == (str(entry.weights_path), digest, False)
    assert provenance("ssd_vgg", pretrained=False) == Provenance("untrained")
    assert provenance("ssd_vgg", given=True) == Provenance("given")
    assert provenance("torchvision:fcos_tiny") == Provenance("untrained")


def test_provenance_of_a_given_file_and_the_untrained_rule(tmp_path, monkeypatch):
    import advdet.models.zoo as zoo
    from advdet.bench.loading import UntrainedModelError, load_model

    torch.save(_zoo_model().state_dict(), tmp_path / "mine.pt")
    p = provenance("ssd_vgg", weights=tmp_path / "mine.pt")
    assert p == Provenance("file", str(tmp_path / "mine.pt"), hashlib.sha256((tmp_path / "mine.pt").read_bytes())
                           .hexdigest())
    assert load_model("ssd_vgg", weights=tmp_path / "mine.pt").origin == str(tmp_path / "mine.pt")
    monkeypatch.setattr(zoo, "ZOO_DIR", tmp_path / "empty_zoo")  # no shipped weights
    with pytest.raises(CheckpointError, match="zoo model 'ssd_vgg' has no shipped weights yet"):
        get_model("ssd_vgg")  # pretrained=True never falls back to random weights
    with pytest.raises(UntrainedModelError, match="zoo model 'ssd_vgg' has no trained weights"):
        load_model("ssd_vgg")  # the benchmarks' one place that may allow them
    loaded = load_model("ssd_vgg", allow_untrained=True)
    assert loaded.provenance == Provenance("untrained") and not loaded.trained and loaded.origin == "untrained"


def test_a_loaded_model_made_by_hand_gets_its_provenance_from_its_fields():
    from torch import nn

    from advdet.bench.loading import LoadedModel

    entry = zoo_entry("ssd_vgg")
    assert LoadedModel("mine", nn.Module(), "detector", 32, False, True, None).origin == "given"
    assert LoadedModel("ssd_vgg", nn.Module(), "detector", 256, False, False, None).origin == "untrained"
    zoo = LoadedModel("ssd_vgg", nn.Module(), "detector", 256, False, True, None)
    assert zoo.origin == str(entry.weights_path) and zoo.weights_sha256 == provenance("ssd_vgg").sha256


@pytest.mark.parametrize("name", ["yolov3", "fasterrcnn"])
def test_get_model_stores_conv_weights_channels_last_with_the_same_outputs(name):
    """get_model's default NHWC weights (a CPU speed-up) change neither the weights' values nor, beyond float
    rounding, the dense outputs and the detections; channels_last=False keeps PyTorch's contiguous layout."""
    nhwc, nchw = get_model(name), get_model(name, channels_last=False)
    convs = [(a, b) for a, b in zip(nhwc.modules(), nchw.modules())  # (1x1 kernels are both layouts at once)
             if isinstance(a, torch.nn.Conv2d) and a.weight.shape[-2:] != (1, 1)]
    assert len(convs) > 10
    for a, b in convs:
        assert a.weight.is_contiguous(memory_format=torch.channels_last) and not a.weight.is_contiguous()
        assert b.weight.is_contiguous() and torch.equal(a.weight, b.weight)
    x = torch.rand(2, 3, nhwc.input_size, nhwc.input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        da, db = nhwc.dense(x), nchw.dense(x)
        pa, pb = nhwc.predict(x), nchw.predict(x)
    for k in ("logits", "boxes"):
        ta, tb = getattr(da, k), getattr(db, k)
        assert ta.shape == tb.shape and torch.allclose(ta, tb, rtol=1e-4, atol=1e-3), k
    for a, b in zip(pa, pb):
        assert a["boxes"].shape == b["boxes"].shape and torch.allclose(a["boxes"], b["boxes"], atol=1e-3)
        assert torch.equal(a["labels"], b["labels"]) and torch.allclose(a["scores"], b["scores"], atol=1e-4)
