"""The Hugging Face RT-DETR adapter (issue 22): RT-DETR behind the Detector contract.

Skipped as a whole where the extra is not installed (``uv sync --all-extras`` / ``pip install 'advdet[hf]'``).
Every socket call fails during these tests, model construction included: nothing is downloaded.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import block_network

if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("scipy") is None:
    pytest.skip("the hf extra is not installed (advdet[hf])", allow_module_level=True)

S = 128
K = 4


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    block_network(monkeypatch)


@pytest.fixture(scope="module")
def hf():
    with pytest.MonkeyPatch.context() as mp:
        block_network(mp)
        from advdet.models import hf_rtdetr

        hf_rtdetr.import_transformers()
        return hf_rtdetr


@pytest.fixture(scope="module")
def det(hf):
    with pytest.MonkeyPatch.context() as mp:
        block_network(mp)
        torch.manual_seed(0)
        return hf.rtdetr_detector("rtdetr_tiny", num_classes=K, input_size=S)


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, S, S, generator=torch.Generator().manual_seed(seed))


def targets(n: int) -> list[dict]:
    base = [
        {"boxes": torch.tensor([[8.0, 8.0, 60.0, 50.0], [70.0, 60.0, 120.0, 110.0]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.tensor([[20.0, 30.0, 90.0, 100.0]]), "labels": torch.tensor([3])},
    ]
    return [{k: v.clone() for k, v in base[i % 2].items()} for i in range(n)]


def test_dense_contract_and_gradients_reach_pixels(det):
    q = det.model.config.num_queries
    x = images(2).requires_grad_(True)
    d = det.dense(x)
    assert d.logits.shape == (2, q, K) and d.boxes.shape == (2, q, 4) and d.anchors.shape == (2, q, 4)
    assert d.score_mode == "sigmoid" and d.objectness is None and d.num_classes == K
    (g,) = torch.autograd.grad(d.logits.sum() + d.boxes.sum(), x)
    assert g.abs().sum() > 0 and torch.isfinite(g).all()
    # boxes are the model's relative cxcywh in pixels, xyxy
    pb = d.extra["pred_boxes"].detach()
    torch.testing.assert_close(d.boxes.detach()[..., 2] - d.boxes.detach()[..., 0], pb[..., 2] * S)
    torch.testing.assert_close((d.boxes.detach()[..., 0] + d.boxes.detach()[..., 2]) / 2, pb[..., 0] * S)


def test_predict_equals_hf_post_processing(det):
    from transformers import RTDetrImageProcessor

    x = images(2, seed=3)
    with torch.no_grad():
        out = det.model(pixel_values=x)  # HF's own forward and post-processing on the same input
    ref = RTDetrImageProcessor().post_process_object_detection(out, threshold=det.score_thresh,
                                                              target_sizes=[(S, S), (S, S)])
    ours = det.predict(x)
    assert sum(len(o["boxes"]) for o in ours) > 0
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o["boxes"], r["boxes"], rtol=0, atol=0)
        torch.testing.assert_close(o["scores"], r["scores"], rtol=0, atol=0)
        assert torch.equal(o["labels"], r["labels"]) and o["labels"].dtype == torch.int64


def test_loss_parts_are_named_and_sum_to_hf_loss(det):
    x, t = images(2).requires_grad_(True), targets(2)
    losses = det.loss(x, t)
    assert set(losses) == {"cls", "loc", "giou"}
    assert all(v.ndim == 0 and torch.isfinite(v) and v > 0 for v in losses.values())
    with torch.no_grad():
        hf_out = det.model(pixel_values=x.detach(), labels=det._labels(t, x))
    torch.testing.assert_close(sum(losses.values()).detach(), hf_out.loss, rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad(losses["cls"] + losses["loc"], x)
    assert g.abs().sum() > 0 and torch.isfinite(g).all()


def test_per_image_loss_equals_each_image_alone(det):
    x, t = images(2, seed=5), targets(2)
    per = det.per_image_loss(x, t)
    for i in range(2):
        alone = det.loss(x[i:i + 1], t[i:i + 1])
        for k in ("cls", "loc", "giou"):
            torch.testing.assert_close(per[k][i], alone[k], rtol=1e-4, atol=1e-5)


def test_loss_rejects_bad_targets(det):
    x = images(1)
    with pytest.raises(ValueError, match="labels must be in 0..3"):
        det.loss(x, [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([K])}])
    with pytest.raises(ValueError, match="2 targets for a batch of 1"):
        det.loss(x, targets(2))


def test_training_mode_loss_with_denoising_steps(hf):
    torch.manual_seed(2)
    d = hf.rtdetr_detector("rtdetr_tiny", num_classes=K, input_size=S).train()
    x, t = images(2, seed=6), targets(2)
    losses = d.loss(x, t)
    assert set(losses) == {"cls", "loc", "giou"}
    sum(losses.values()).backward()
    assert all(p.grad is not None for n, p in d.named_parameters() if "class_embed" in n)


@pytest.mark.parametrize("name,kw", [("cls", dict(steps=2)), ("loc", dict(steps=2)), ("dag", dict(steps=2)),
                                     ("cwa", dict(steps=2)), ("dfool", dict(steps=2))])
def test_attacks_run_with_rtdetr_as_surrogate(det, name, kw):
    from advdet.attacks import build_attack

    x, t = images(2, seed=3), targets(2)
    xa = build_attack(name, det, **kw)(x, t)
    assert xa.shape == x.shape and 0 <= xa.min() and xa.max() <= 1
    assert (xa - x).abs().max() * 255 <= 16 + 1e-4
    # DAG attacks the candidates that overlap a ground truth *and* predict its class: an untrained model
    # may have none (then DAG leaves the image as it is)
    assert name == "dag" or not torch.equal(xa, x)


def test_rtdetr_as_victim_of_a_transfer(det):
    """Victim: evaluated on images crafted elsewhere, with its own predict (no gradient needed)."""
    x = images(2, seed=7)
    xa = (x + 8 / 255 * torch.sign(torch.randn_like(x))).clamp(0, 1)
    clean, adv = det.predict(x), det.predict(xa)
    assert len(clean) == len(adv) == 2 and all(o["boxes"].shape[-1] == 4 for o in adv)


def test_save_pretrained_folder_loads_from_disk(hf, det, tmp_path):
    folder = tmp_path / "rtdetr"
    det.model.save_pretrained(folder)  # config.json + model.safetensors, what a user's checkpoint holds
    assert (folder / "model.safetensors").is_file()
    back = hf.rtdetr_detector(str(folder), input_size=S)
    x = images(1)
    with torch.no_grad():
        torch.testing.assert_close(back.dense(x).logits, det.dense(x).logits)
    from advdet.models.zoo import build_model, is_external

    assert is_external(f"hf:{folder}")
    assert build_model(f"hf:{folder}", input_size=S).num_classes == K
    from advdet.models.weights import CheckpointError

    with pytest.raises(CheckpointError, match="has 4 classes, not 3"):
        hf.rtdetr_detector(str(folder), num_classes=3)
    with pytest.raises(KeyError, match="unknown RT-DETR"):
        hf.rtdetr_detector(str(tmp_path / "nowhere"))


def test_advdet_safetensors_round_trip(hf, det, tmp_path):
    from advdet.models.weights import save_weights

    path = tmp_path / "rt.safetensors"
    save_weights(det, path)
    back = hf.rtdetr_detector("rtdetr_tiny", num_classes=K, input_size=S, weights=path)
    x = images(1)
    with torch.no_grad():
        torch.testing.assert_close(back.dense(x).boxes, det.dense(x).boxes)


def test_tiny_resnet_body_variant(hf):
    """rtdetr_resnet_pre: HF's RT-DETR on advdet's TinyResNet (the body resnet_pre pretrains)."""
    from advdet.models.tiny_backbone import TinyResNet

    torch.manual_seed(3)
    d = hf.rtdetr_detector("rtdetr_resnet_pre", num_classes=K, input_size=S)
    assert isinstance(d.model.model.backbone.model.body, TinyResNet)
    assert list(d.feature_layers()) == [f"model.model.backbone.model.body.layer{i}" for i in (2, 3, 4)]
    x = images(1).requires_grad_(True)
    feats = d.features(x)
    assert [f.shape[1] for f in feats.values()] == [32, 64, 128]
    losses = d.loss(x, targets(1))
    (g,) = torch.autograd.grad(sum(losses.values()), x)
    assert g.abs().sum() > 0 and len(d.predict(x.detach())) == 1


def test_zoo_entry_untrained_and_not_on_the_zoo_page(hf):
    from advdet.data.shapes import SHAPE_CLASSES
    from advdet.models.weights import CheckpointError
    from advdet.models.zoo import ZOO_INPUT_SIZE, build_model, zoo_entry

    e = zoo_entry("rtdetr")
    assert (e.family, e.extra, e.kind, e.backbone_init) == ("rtdetr", "hf", "detector", "resnet_pre")
    m = e.builder()
    assert m.input_size == ZOO_INPUT_SIZE and m.num_classes == len(SHAPE_CLASSES)
    pre = zoo_entry("resnet_pre")
    if pre.trained:  # the body starts from resnet_pre's, as the torchvision families' bodies do
        from advdet.training.zoo_train import load_backbone_init

        keys = load_backbone_init(m, e)
        assert len(keys) > 30 and all(k.startswith("model.model.backbone.model.body.") for k in keys)
    if not e.trained:
        with pytest.raises(CheckpointError, match="no shipped weights yet"):
            build_model("rtdetr")
        from advdet.models.zoo_docs import zoo_markdown

        assert "`rtdetr`" not in zoo_markdown()
