"""OSFD (issue 24, item 2): the feature-level transfer baseline on every zoo surrogate family, and the
backbone feature layers each family declares behind the Detector contract."""

from __future__ import annotations

import pytest
import torch

from advdet.attacks import OSFD, build_attack
from advdet.attacks.osfd import osfd_distance
from advdet.data.errors import AdvdetError
from advdet.models.detector import Detector, FeatureLayerError
from advdet.models.robustdet import robustdet_small
from advdet.models.ssd_vgg import ssd_vgg_small
from advdet.models.torchvision_adapter import TINY_BUILDERS
from advdet.models.yolov3 import yolov3_small

S, K = 64, 3

#: family -> (builder, the layers it declares)
FAMILIES = {
    "ssd_vgg": (lambda: ssd_vgg_small(num_classes=K, input_size=S, width=0.125),
                ["model.vgg.22", "model.vgg.34"]),
    "yolov3": (lambda: yolov3_small(num_classes=K, input_size=S, width=0.125),
               ["model.stages.2", "model.stages.3", "model.stages.4"]),
    "retinanet": (lambda: TINY_BUILDERS["retinanet_tiny"](num_classes=K, input_size=S, fpn_channels=16),
                  [f"model.backbone.body.layer{i}" for i in (2, 3, 4)]),
    "fcos": (lambda: TINY_BUILDERS["fcos_tiny"](num_classes=K, input_size=S, fpn_channels=32, num_convs=1),
             [f"model.backbone.body.layer{i}" for i in (2, 3, 4)]),
    "faster_rcnn": (lambda: TINY_BUILDERS["fasterrcnn_tiny"](num_classes=K, input_size=S, fpn_channels=16,
                                                             representation_size=32),
                    [f"model.backbone.body.layer{i}" for i in (1, 2, 3, 4)]),
    "robustdet": (lambda: robustdet_small(num_classes=K, input_size=S),
                  ["model.vgg.22", "model.vgg.34"]),
    "mask_rcnn": (lambda: TINY_BUILDERS["maskrcnn_tiny"](num_classes=K, input_size=S, fpn_channels=16,
                                                         representation_size=32, mask_layers=(8,)),
                  [f"model.backbone.body.layer{i}" for i in (1, 2, 3, 4)]),
}

_MODELS: dict[str, Detector] = {}


def model(family: str) -> Detector:
    if family not in _MODELS:
        torch.manual_seed(0)
        _MODELS[family] = FAMILIES[family][0]().eval()
    return _MODELS[family]


def images(n: int, seed: int = 1) -> torch.Tensor:
    x = torch.rand(n, 3, S, S, generator=torch.Generator().manual_seed(seed))
    x[:, :, :, 56:] = 0  # letterbox padding on the right
    return x


def gt(n: int) -> list[dict]:
    base = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [28.0, 20.0, 50.0, 50.0]]), "labels": torch.tensor([0, 2])},
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]  # an image without objects
    return [{k: v.clone() for k, v in base[i % 2].items()} for i in range(n)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_feature_layers_are_named_modules_of_every_family(family):
    det = model(family)
    layers = det.feature_layers()
    assert list(layers) == FAMILIES[family][1]
    modules = dict(det.named_modules())
    for name, mod in layers.items():
        assert modules[name] is mod
    feats = det.features(images(2))
    assert list(feats) == FAMILIES[family][1]
    for f in feats.values():
        assert f.ndim == 4 and f.shape[0] == 2 and torch.isfinite(f).all()
    # a subset, in the order asked; differentiable w.r.t. the input
    last, first = FAMILIES[family][1][-1], FAMILIES[family][1][0]
    x = images(1).requires_grad_(True)
    sub = det.features(x, [last, first])
    assert list(sub) == [last, first]
    (g,) = torch.autograd.grad(sub[last].square().sum(), x)
    assert g.abs().sum() > 0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_osfd_runs_on_every_family_within_budget_and_mask(family):
    det = model(family)
    x, tg = images(2), gt(2)
    atk = build_attack("osfd", det, steps=2, valid_only=True, seed=3)
    assert atk.layers == FAMILIES[family][1]
    xa = atk(x, tg)
    assert xa.shape == x.shape and xa.dtype == x.dtype
    assert (xa - x).abs().max() <= 16 / 255 + 1e-6
    assert xa.min() >= 0 and xa.max() <= 1
    assert torch.equal(xa[:, :, :, 56:], x[:, :, :, 56:])  # the padding is untouched
    assert (xa != x).any()


def test_features_stop_after_the_last_layer():
    det = model("yolov3")
    calls = []
    handle = det.model.head32.register_forward_hook(lambda *a: calls.append(1))
    try:
        det.features(images(1))
        assert calls == []  # the head never ran
        det.dense(images(1))
        assert calls == [1]
    finally:
        handle.remove()
    assert not det.model.stages[4]._forward_hooks  # the feature hooks are removed


def test_defaults_and_registry():
    det = model("yolov3")
    atk = build_attack("osfd", det)
    assert isinstance(atk, OSFD)
    assert (atk.eps, atk.step, atk.steps, atk.update, atk.k) == (16.0, 2.0, 10, "sign", 3.0)
    assert [type(t).__name__ for t in atk.transforms] == ["MI"]
    assert (atk.theta, atk.jitter, atk.rho, atk.s_max, atk.sigma, atk.start_noise) == (10.0, 10, 1.0, 1.1, 6.0, 2)
    assert build_attack("osfd", det, layers="model.stages.3, model.stages.4").layers == [
        "model.stages.3", "model.stages.4"]
    for bad in (dict(s_max=0.9), dict(theta=-1), dict(jitter=1.5), dict(sigma=-1)):
        with pytest.raises(AdvdetError, match="osfd: bad"):
            build_attack("osfd", det, **bad)


def test_same_seed_same_result_and_other_seed_differs():
    det = model("retinanet")
    x, tg = images(2), gt(2)
    a = build_attack("osfd", det, steps=2, seed=5)(x, tg)
    b = build_attack("osfd", det, steps=2, seed=5)(x, tg)
    c = build_attack("osfd", det, steps=2, seed=6)(x, tg)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    atk = build_attack("osfd", det, steps=2, seed=5)
    atk(x, tg)
    assert torch.equal(atk.manual_seed(5)(x, tg), a)  # reset by manual_seed
    # without targets the boxes are the clean detections: also reproducible
    assert torch.equal(build_attack("osfd", det, steps=1, seed=2)(x), build_attack("osfd", det, steps=1, seed=2)(x))


@pytest.mark.parametrize("family", ["ssd_vgg", "yolov3", "faster_rcnn"])
def test_feature_distance_to_k_times_clean_grows(family):
    det = model(family)
    x, tg = images(2), gt(2)
    xa = build_attack("osfd", det, seed=0)(x, tg)
    before = osfd_distance(det, x, x)
    after = osfd_distance(det, xa, x)
    assert (after > before).all(), (before, after)
    # the plain (un-augmented) objective climbs too: no rotation, no zoom-out, no noise
    plain = build_attack("osfd", det, theta=0, s_max=1.0, sigma=0, start_noise=0, seed=0)
    xp = plain(x, tg)
    assert (osfd_distance(det, xp, x) > 1.05 * before).all()


def test_augmentation_draws_from_the_generator_and_keeps_shape():
    det = model("yolov3")
    atk = build_attack("osfd", det)
    x, boxes = images(3), [t["boxes"].double() for t in gt(3)]
    atk.manual_seed(1)
    r1 = atk.rotate(x, boxes)
    z1 = atk.zoom_out(r1, boxes)
    atk.manual_seed(1)
    assert torch.equal(atk.rotate(x, boxes), r1) and torch.equal(atk.zoom_out(r1, boxes), z1)
    assert r1.shape == z1.shape == x.shape
    assert not torch.equal(r1, x) and not torch.equal(z1, r1)
    # theta = 0 and s_max = 1: both are the identity
    ident = build_attack("osfd", det, theta=0, s_max=1.0)
    assert torch.equal(ident.rotate(x, boxes), x) and torch.equal(ident.zoom_out(x, boxes), x)


def test_clear_error_for_a_model_without_feature_layers():
    class NoFeatures(Detector):
        family = "nofeat"

        def __init__(self):
            super().__init__(torch.nn.Conv2d(3, 4, 3), num_classes=K, input_size=S)

    det = NoFeatures()
    with pytest.raises(FeatureLayerError, match="NoFeatures.*declares no backbone feature layers"):
        det.feature_layers()
    with pytest.raises(FeatureLayerError, match="declares no backbone feature layers") as err:
        build_attack("osfd", det)
    assert isinstance(err.value, AdvdetError)  # a user error: the CLI prints one line
    with pytest.raises(FeatureLayerError, match="osfd attacks a Detector"):
        build_attack("osfd", torch.nn.Identity())
    with pytest.raises(FeatureLayerError, match="no feature layer 'model.stages.9'.*its layers: model.stages.2"):
        build_attack("osfd", model("yolov3"), layers=["model.stages.9"])
    with pytest.raises(FeatureLayerError, match="no feature layer 'nope'"):
        model("ssd_vgg").features(images(1), ["nope"])
