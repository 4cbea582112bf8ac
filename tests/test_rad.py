"""RAD (attacks/rad.py) on tiny random-init detectors: it lowers the relevance of its target nodes
(white-box), stays within eps / [0, 1] / the letterboxed area, batch == singles, static vs dynamic node
sets, loc / size nodes, the reference's fallback term, the registry, and every detector family."""

from __future__ import annotations

import pytest
import torch

from advdet.attacks import DI, MI, SI, TI, build_attack
from advdet.attacks.rad import RAD, fallback_loss, rad_loss
from advdet.attacks.registry import ATTACKS
from advdet.models.ssd_vgg import ssd_vgg_small
from advdet.relevance import NodeSelection, relevance_map
from advdet.relevance.nodes import candidate_scores

S = 64
SI2 = dict(transforms=[SI(scales=2, extra_unscaled=False)])  # a cheaper SI for the tests


@pytest.fixture(scope="module")
def ssd():
    torch.manual_seed(0)
    return ssd_vgg_small(num_classes=3, input_size=S, width=0.125).double().eval()


def images(n: int, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    return torch.rand(n, 3, S, S, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_rad_lowers_relevance_of_its_target_nodes(ssd):
    """White-box: 3 RAD steps cut the positive relevance of the (fixed, clean-image) top-20 nodes by more
    than half, and far more than random +-eps noise does."""
    x = images(2)
    atk = RAD(ssd, steps=3, **SI2)
    xa = atk(x)
    before, after = atk.objective_values(x, xa)  # objective = -loss, nodes selected on the clean image
    loss0, loss_rad = -before, -after
    assert (loss0 > 0).all()
    assert (loss_rad < 0.5 * loss0).all(), (loss0, loss_rad)
    noise = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype) * 2 - 1
    xn = (x + noise * 16 / 255).clamp(0, 1)
    _, after_noise = atk.objective_values(x, xn)
    assert (loss0 - loss_rad > 3 * (loss0 - (-after_noise)).abs()).all()
    # the same number as the relevance layer gives for those nodes
    nodes = relevance_map(ssd, x, NodeSelection()).nodes
    torch.testing.assert_close(rad_loss(relevance_map(ssd, xa, nodes).per_channel), loss_rad)


def test_budget_range_and_letterbox_padding(ssd):
    x = images(2, seed=2)
    x[:, :, :10] = 0  # letterbox padding rows (RAD's valid mask: nonzero pixels)
    xa = RAD(ssd, steps=2, **SI2)(x)
    assert xa.shape == x.shape and xa.dtype == x.dtype
    assert xa.min() >= 0 and xa.max() <= 1
    assert (xa - x).abs().max().item() * 255 <= 16 + 1e-9
    assert torch.equal(xa[:, :, :10], x[:, :, :10])
    assert (xa[:, :, 10:] - x[:, :, 10:]).abs().max().item() * 255 > 3  # the image itself moved
    free = RAD(ssd, steps=1, valid_only=False, transforms=[])(x)
    assert not torch.equal(free[:, :, :10], x[:, :, :10])


def test_batch_of_two_equals_two_singles(ssd):
    x = images(2, seed=3)
    atk = RAD(ssd, steps=2, **SI2)  # SI only: deterministic
    both = atk(x)
    singles = torch.cat([atk(x[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(both, singles, rtol=0, atol=1e-9)


def test_dynamic_node_selection(ssd):
    x = images(2, seed=4)
    with torch.no_grad():
        _, pre, _ = candidate_scores(ssd, ssd.dense(x))
    thr = float(pre.flatten().sort(descending=True).values[60])  # about 30 nodes per image
    expected = [int((pre[b] > thr).sum()) for b in range(2)]
    assert expected != [20, 20] and min(expected) > 0
    dyn = RAD(ssd, steps=1, nodes="dynamic", threshold=thr, transforms=[])
    xd = dyn(x)
    assert dyn.last_state["node_counts"][0] == expected
    stat = RAD(ssd, steps=1, transforms=[])
    xs = stat(x)
    assert stat.last_state["node_counts"][0] == [20, 20]
    assert not torch.allclose(xd, xs)
    capped = RAD(ssd, steps=1, nodes="dynamic", threshold=thr, max_nodes=5, transforms=[])
    capped(x)
    assert capped.last_state["node_counts"][0] == [5, 5]


@pytest.mark.parametrize("node_type", ["loc", "size"])
def test_loc_and_size_nodes(ssd, node_type):
    x = images(1, seed=5)
    atk = RAD(ssd, steps=1, m=5, node_type=node_type, transforms=[])
    xa = atk(x)
    assert atk.last_state["node_counts"][0] == [10]  # two box-regression nodes per box
    assert torch.isfinite(xa).all() and not torch.equal(xa, x)
    assert (xa - x).abs().max().item() * 255 <= 16 + 1e-9


@pytest.mark.parametrize("kw", [dict(loss="sum"), dict(variant="rad_code"), dict(outputs="scores")])
def test_options_run(ssd, kw):
    x = images(1, seed=6)
    xa = RAD(ssd, steps=1, **{"transforms": [], **kw})(x)
    assert torch.isfinite(xa).all() and not torch.equal(xa, x)


def test_transforms_di_ti_mi_and_seed(ssd):
    x = images(1, seed=7)

    def run(seed):
        return RAD(ssd, steps=1, transforms=[SI(scales=2, extra_unscaled=False), DI(copies=1), TI(size=3), MI()],
                   seed=seed)(x)

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a - x).abs().max().item() * 255 <= 16 + 1e-9


def test_fallback_when_no_positive_relevance():
    """An untrained YOLO's objectness logits are all about -4.6, so after the output ReLU its objectness
    nodes carry no relevance: RAD then descends on the reference's second term."""
    from advdet.models.yolov3 import yolov3_small

    torch.manual_seed(1)
    det = yolov3_small(num_classes=3, input_size=S).eval()
    x = images(1, seed=8, dtype=torch.float32)
    atk = RAD(det, steps=1, transforms=[])
    xa = atk(x)
    assert atk.last_state["fallback_images"] > 0
    before, _ = atk.objective_values(x, xa)
    with torch.no_grad():
        fb = fallback_loss(det.dense(x), 3000)
    torch.testing.assert_close(-before, fb)
    nofb = RAD(det, steps=1, fallback=False, transforms=[])
    assert torch.equal(nofb(x), x)  # no positive relevance and no fallback: nothing to descend on


def test_registry_and_defaults(ssd):
    assert ATTACKS["rad"] is RAD and RAD.description
    atk = build_attack("rad", ssd)
    assert isinstance(atk, RAD)
    assert (atk.eps, atk.step, atk.steps, atk.update, atk.valid_only) == (16.0, 2.0, 10, "mean_abs", True)
    assert len(atk.transforms) == 1 and isinstance(atk.transforms[0], SI)
    assert atk.selection == NodeSelection(kind="static", m=20, node_type="cls")
    with pytest.raises(ValueError):
        RAD(ssd, variant="nope")
    with pytest.raises(ValueError):
        RAD(ssd, loss="nope")
    with pytest.raises(ValueError):
        RAD(ssd, node_type="shape")


def _tiny(family: str):
    torch.manual_seed(2)
    if family == "ssd_vgg":
        return ssd_vgg_small(num_classes=3, input_size=S, width=0.125)
    if family == "yolov3":
        from advdet.models.yolov3 import yolov3_small

        return yolov3_small(num_classes=3, input_size=S)
    from advdet.models.torchvision_adapter import TINY_BUILDERS

    return TINY_BUILDERS[family](num_classes=3, input_size=S, fpn_channels=32)


@pytest.mark.parametrize("family", ["ssd_vgg", "yolov3", "retinanet_tiny", "fcos_tiny", "fasterrcnn_tiny",
                                    "maskrcnn_tiny", "ssd_tiny"])
def test_every_family(family):
    det = _tiny(family).eval()
    x = images(2, seed=9, dtype=torch.float32)
    atk = RAD(det, steps=1, transforms=[SI(scales=2, extra_unscaled=False)])
    xa = atk(x)
    assert xa.shape == x.shape and torch.isfinite(xa).all()
    assert (xa - x).abs().max().item() * 255 <= 16 + 1e-4
    assert atk.last_state["node_counts"][0] == [20, 20]
    tracked = atk.last_state["tracked"]
    if family in ("fasterrcnn_tiny", "maskrcnn_tiny"):
        assert tracked.reselected > 0  # proposals move with the input: nodes re-selected on the SI copy
    else:
        assert tracked.reselected == 0  # fixed anchors: the nodes of x_k are used on its copies
