"""Tests of the relevance layer: LRP rules (conservation, LRP-0 = gradient x input, zennit cross-check,
bounds, upsampling, normalisation), exact double differentiability (gradcheck in float64), SGLRP /
Multi-Node SGLRP, node selection, maps of the zoo families, and the relevance figure."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advdet.relevance import (LRPRules, NodeSelection, NodeSet, box_relevance_maps, distinct_candidates, lrp,
                              multi_node_sglrp_init, relevance_figure, relevance_map, sglrp_init, sglrp_map)
from advdet.relevance.figure import explain_image
from conftest import random_batchnorm

D64 = torch.float64


def _bias_free_net(bn: bool = False) -> nn.Module:
    layers = [nn.Conv2d(3, 6, 3, padding=1, bias=False)]
    if bn:
        layers.append(random_batchnorm(6))
    layers += [nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
               nn.Linear(8 * 4 * 4, 5, bias=False)]
    return nn.Sequential(*layers).to(D64).eval()


def _softmax_init(out: torch.Tensor) -> torch.Tensor:
    y = out.softmax(-1)
    return multi_node_sglrp_init(y, (torch.arange(out.shape[-1]) < 2).expand_as(y))


# ------------------------------------------------------------------------------------------------ the rules
@pytest.mark.parametrize("input_rule", ["zB", "alpha1beta0"])
def test_conservation_alpha1beta0_bias_free(input_rule):
    torch.manual_seed(0)
    net = _bias_free_net()
    x = torch.rand(2, 3, 8, 8, dtype=D64)
    init = torch.rand(2, 5, dtype=D64)
    rel = lrp(net, x, init, rules=LRPRules(input_rule=input_rule))
    assert rel.shape == x.shape
    torch.testing.assert_close(rel.sum((1, 2, 3)), init.sum(1), rtol=1e-5, atol=1e-5)


def test_batchnorm_passthrough_conserves():
    torch.manual_seed(1)
    net = _bias_free_net(bn=True)
    x = torch.rand(2, 3, 8, 8, dtype=D64)
    init = torch.rand(2, 5, dtype=D64)
    rel = lrp(net, x, init)  # norm="pass" (default)
    torch.testing.assert_close(rel.sum((1, 2, 3)), init.sum(1), rtol=1e-5, atol=1e-5)
    rel_g = lrp(net, x, init, rules=LRPRules(norm="gradient"))
    assert not torch.allclose(rel_g.sum((1, 2, 3)), init.sum(1), rtol=1e-3)


def test_lrp0_equals_gradient_times_input():
    torch.manual_seed(2)
    net = _bias_free_net()
    x = torch.randn(2, 3, 8, 8, dtype=D64)
    c = torch.randn(2, 5, dtype=D64)
    rel = lrp(net, x, lambda out: c * out, rules=LRPRules(input_rule="zero", layer_rule="zero", bias=False))
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad((c * net(xr)).sum(), xr)
    torch.testing.assert_close(rel, x * g, rtol=1e-8, atol=1e-10)


def test_matches_zennit_on_bias_free_net():
    """Independent cross-check of the first-order rules: zennit's ZBox (first layer) + AlphaBeta(1, 0)
    coincide with the reference rules when there is no bias."""
    from zennit.composites import SpecialFirstLayerMapComposite
    from zennit.rules import AlphaBeta, ZBox
    from zennit.types import Convolution
    from zennit.types import Linear as ZLinear

    torch.manual_seed(3)
    net = _bias_free_net()
    x = torch.randn(1, 3, 8, 8, dtype=D64)
    init = torch.rand(1, 5, dtype=D64)
    ours = lrp(net, x, init)  # zB with min / max of x, alpha1beta0
    comp = SpecialFirstLayerMapComposite(
        layer_map=[(Convolution, AlphaBeta(1.0, 0.0, stabilizer=1e-30)),
                   (ZLinear, AlphaBeta(1.0, 0.0, stabilizer=1e-30))],
        first_map=[(Convolution, ZBox(low=float(x.min()), high=float(x.max()), stabilizer=1e-30))])
    xz = x.clone().requires_grad_()
    with comp.context(net) as m:
        (ref,) = torch.autograd.grad(m(xz), xz, init)
    torch.testing.assert_close(ours, ref, rtol=1e-7, atol=1e-10)


class _Normalised(nn.Module):
    def __init__(self, mean, std, w, b):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.fc = nn.Linear(w.shape[1], w.shape[0]).to(D64)
        with torch.no_grad():
            self.fc.weight.copy_(w)
            self.fc.bias.copy_(b)

    def forward(self, x):
        return self.fc(((x - self.mean) / self.std).flatten(1))


@pytest.mark.parametrize("bounds", ["minmax", "pixel"])
def test_zb_rule_matches_formula_and_is_carried_to_pixels(bounds):
    """z^B with bias ignored, R_i = sum_j (a_i w_ij - l_i w+_ij - h_i w-_ij) / z_j R_j in the normalised
    space, returned unchanged (not rescaled by 1/std) on the pixel grid."""
    torch.manual_seed(4)
    mean = torch.tensor([0.4, 0.5, 0.6], dtype=D64).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3], dtype=D64).view(1, 3, 1, 1)
    w, b = torch.randn(4, 12, dtype=D64), torch.randn(4, dtype=D64)
    net = _Normalised(mean, std, w, b)
    x = torch.rand(1, 3, 2, 2, dtype=D64)
    init = torch.rand(1, 4, dtype=D64)
    rel = lrp(net, x, init, rules=LRPRules(bounds=bounds))
    a = ((x - mean) / std).flatten(1)
    if bounds == "minmax":
        lo, hi = a.min().expand_as(a), a.max().expand_as(a)
    else:
        lo = ((0 - mean) / std).expand_as(x).flatten(1)
        hi = ((1 - mean) / std).expand_as(x).flatten(1)
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    contrib = a[:, None, :] * w - lo[:, None, :] * wp - hi[:, None, :] * wn  # (1, J, I)
    z = contrib.sum(-1, keepdim=True)
    ref = (contrib / z * init[..., None]).sum(1).view_as(x)
    torch.testing.assert_close(rel, ref, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(rel.sum(), init.sum())  # z^B conserves


@pytest.mark.parametrize("mode,factor", [("gradient", 1.0), ("average", 0.25)])
def test_upsampling_rule(mode, factor):
    torch.manual_seed(5)
    c1, c2 = nn.Conv2d(3, 4, 3, padding=1, bias=False).to(D64), nn.Conv2d(4, 2, 1, bias=False).to(D64)
    with torch.no_grad():  # positive activations everywhere: no position without relevance-carrying input
        c1.weight.abs_()

    def net(x):
        return c2(F.relu(F.interpolate(F.relu(c1(x)), scale_factor=2.0, mode="nearest"))).flatten(1)

    x = torch.rand(1, 3, 4, 4, dtype=D64)
    init = torch.rand(1, 2 * 8 * 8, dtype=D64)
    rel = lrp(net, x, init, rules=LRPRules(upsample=mode), module=nn.ModuleList([c1, c2]))
    torch.testing.assert_close(rel.sum(), init.sum() * factor, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------ exact second derivative
class _KitchenSink(nn.Module):
    """conv-BN-LeakyReLU, strided conv + SiLU, nearest upsampling, concat, 1x1 conv, residual add,
    sigmoid, linear: every layer type of the zoo on a 6x6 input."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4 * 6 * 6, 5)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.2, 0.2)
            self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        h1 = F.leaky_relu(self.bn(self.c1(x)), 0.1)
        h2 = F.silu(self.c2(h1))
        u = F.interpolate(h2, scale_factor=2.0, mode="nearest")
        h3 = torch.sigmoid(self.c3(torch.cat([u, h1], 1))) + h1
        return self.fc(F.max_pool2d(h3, 1).flatten(1))


@pytest.mark.parametrize("rules", [LRPRules(), LRPRules(upsample="gradient", bounds="pixel"),
                                   LRPRules(input_rule="zero", layer_rule="epsilon", epsilon=1e-2)])
def test_double_backward_matches_finite_differences_tiny_net(rules):
    torch.manual_seed(6)
    net = _KitchenSink().to(D64).eval()
    x = torch.rand(1, 3, 6, 6, dtype=D64, requires_grad=True)
    proj = torch.randn(1, 3, 6, 6, dtype=D64)

    def f(inp):
        return (lrp(net, inp, _softmax_init, rules=rules, create_graph=True) * proj).sum()

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7, rtol=1e-4)


def test_double_backward_through_roi_align():
    """torchvision's roi_align has no double backward; the rules route through it with their own
    twice-differentiable adjoint."""
    from torchvision.ops import roi_align

    torch.manual_seed(7)
    conv, fc = nn.Conv2d(3, 4, 3, padding=1).to(D64), nn.Linear(4 * 2 * 2, 3).to(D64)
    boxes = torch.tensor([[0, 0.5, 0.5, 5.0, 4.0], [0, 2.0, 1.0, 6.0, 6.0]], dtype=D64)

    def net(x):
        return fc(roi_align(F.relu(conv(x)), boxes, 2, 1.0, 2, True).flatten(1)).sum(0, keepdim=True)

    x = torch.rand(1, 3, 6, 6, dtype=D64, requires_grad=True)
    proj = torch.randn(1, 3, 6, 6, dtype=D64)

    def f(inp):
        return (lrp(net, inp, _softmax_init, module=nn.ModuleList([conv, fc]), create_graph=True) * proj).sum()

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7, rtol=1e-4)


def _few_pixel_gradcheck(det, size: int, pick=None) -> None:
    """gradcheck of a scalar projection of the map w.r.t. a few input pixels of channel 1 (float64);
    ``pick(x) -> (3,)`` flat pixel indices, default three fixed ones."""
    torch.manual_seed(8)
    x = torch.rand(1, 3, size, size, dtype=D64)
    proj = torch.randn(1, size, size, dtype=D64)
    idx = torch.tensor([3 * size + 5, (size // 2) * size + size // 2, (size - 2) * size + 1])
    if pick is not None:
        idx = pick(x)

    def f(p):
        xx = x.reshape(1, 3, -1).index_put((torch.tensor([0]), torch.tensor([1]), idx), p).reshape_as(x)
        return (relevance_map(det, xx, create_graph=True).map * proj).sum()

    p = x.reshape(1, 3, -1)[0, 1, idx].clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (p,), eps=1e-6, atol=1e-8, rtol=1e-4)


def test_double_backward_tiny_ssd():
    from advdet.models.ssd_vgg import ssd_vgg_small

    torch.manual_seed(9)
    _few_pixel_gradcheck(ssd_vgg_small(num_classes=3, input_size=32).to(D64).eval(), 32)


def test_double_backward_tiny_yolo():
    from advdet.models import yolov3

    torch.manual_seed(10)
    _few_pixel_gradcheck(yolov3.yolov3_small(num_classes=3, input_size=32).to(D64).eval(), 32)


def test_double_backward_robustdet_dynamic_convs():
    """RobustDet: per-image kernels mixed by the AID's pi(x) (grouped functional convs); the derivative
    through the x-dependent kernels is part of the exact second derivative."""
    from advdet.models import robustdet
    from advdet.models.dynamic_conv import DynamicConv2d

    torch.manual_seed(17)
    det = robustdet.robustdet_small(num_classes=3, input_size=32).to(D64).eval()
    with torch.no_grad():  # distinct kernels per slot, so that pi(x) matters
        for m in det.modules():
            if isinstance(m, DynamicConv2d):
                m.weight.mul_(1 + 0.5 * torch.randn_like(m.weight))
    r = relevance_map(det, torch.rand(1, 3, 32, 32, dtype=D64))
    dyn = [m for m in det.modules() if isinstance(m, DynamicConv2d)]
    assert len(dyn) > 0 and r.stats.input_layers == 2  # detector conv1_1 and the AID's stem

    def pixels_that_move_pi(x):  # the AID's stem max-pool ignores many pixels: check some that count
        xr = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(det.aid_probs(xr)[0, 0], xr)
        return g[0, 1].abs().flatten().topk(3).indices

    _few_pixel_gradcheck(det, 32, pixels_that_move_pi)


# ------------------------------------------------------------------------------------------------ SGLRP
def test_multi_node_init_reduces_to_sglrp():
    torch.manual_seed(11)
    y = torch.rand(3, 7, dtype=D64).softmax(-1)
    t = torch.tensor([0, 3, 6])
    mask = F.one_hot(t, 7).bool()
    torch.testing.assert_close(multi_node_sglrp_init(y, mask), sglrp_init(y, t))
    r = sglrp_init(y, t)  # eq. 1 by hand for image 1
    assert torch.isclose(r[1, 3], y[1, 3] * (1 - y[1, 3])) and torch.isclose(r[1, 0], -y[1, 0] * y[1, 3])
    empty = multi_node_sglrp_init(y, torch.zeros_like(mask))
    assert torch.equal(empty, torch.zeros_like(empty))


@pytest.fixture(scope="module")
def ssd64():
    from advdet.models.ssd_vgg import ssd_vgg_small

    torch.manual_seed(12)
    return ssd_vgg_small(num_classes=3, input_size=64).eval()


def test_multi_node_map_for_one_node_equals_sglrp(ssd64):
    x = torch.rand(2, 3, 64, 64)
    multi = relevance_map(ssd64, x, NodeSelection(m=1))
    flat = torch.stack([multi.nodes.flat_indices(b)[0] for b in range(2)])
    single = sglrp_map(ssd64, x, flat)
    assert multi.nodes.counts == [1, 1]
    torch.testing.assert_close(multi.per_channel, single.per_channel, rtol=1e-5, atol=1e-9)
    assert multi.map.abs().sum() > 0


def test_relevance_map_api_and_node_sets(ssd64):
    x = torch.rand(2, 3, 64, 64)
    r = relevance_map(ssd64, x)
    assert r.map.shape == (2, 64, 64) and r.per_channel.shape == (2, 3, 64, 64)
    torch.testing.assert_close(r.map, r.per_channel.sum(1))
    assert r.nodes.counts == [20, 20]
    # cls nodes: the argmax foreground class logit column of each candidate (softmax_bg: bg column skipped)
    cols = r.nodes.columns[0]
    assert all(r.nodes.layout[int(c)].startswith("cls") for c in cols)
    # every conv of the network was reached by the rules; exactly one input layer
    convs = [m for m in ssd64.modules() if isinstance(m, nn.Conv2d)]
    assert {id(m.weight) for m in convs} <= r.stats.weight_ids and r.stats.input_layers == 1
    # reusing the node set gives the same map; batch images are independent
    again = relevance_map(ssd64, x, r.nodes)
    torch.testing.assert_close(again.map, r.map)
    alone = relevance_map(ssd64, x[1:])
    torch.testing.assert_close(alone.map[0], r.map[1], rtol=1e-4, atol=1e-9)
    # loc / size nodes: two box columns per box
    for nt, names in (("loc", {"box0", "box1"}), ("size", {"box2", "box3"})):
        rn = relevance_map(ssd64, x, NodeSelection(node_type=nt, m=5))
        assert rn.nodes.counts == [10, 10]
        assert {rn.nodes.layout[int(c)] for c in rn.nodes.columns[0]} == names
        assert torch.isfinite(rn.map).all()
    # dynamic: nothing above a huge threshold -> zero map; capped otherwise
    none = relevance_map(ssd64, x, NodeSelection(kind="dynamic", threshold=1e9))
    assert none.nodes.counts == [0, 0] and torch.equal(none.map, torch.zeros_like(none.map))
    dyn = relevance_map(ssd64, x, NodeSelection(kind="dynamic", threshold=-1e9, max_nodes=50))
    assert dyn.nodes.counts == [50, 50] and torch.isfinite(dyn.map).all()
    code = relevance_map(ssd64, x, variant="rad_code")
    assert torch.isfinite(code.map).all()
    with pytest.raises(ValueError):
        relevance_map(ssd64, x, variant="nope")
    with pytest.raises(ValueError):
        NodeSelection(node_type="shape")


def test_create_graph_map_equals_plain_map(ssd64):
    x = torch.rand(1, 3, 64, 64, requires_grad=True)
    r1 = relevance_map(ssd64, x.detach())
    r2 = relevance_map(ssd64, x, create_graph=True)
    torch.testing.assert_close(r2.map, r1.map, rtol=1e-5, atol=1e-10)
    (g,) = torch.autograd.grad(r2.map.clamp(min=0).mean(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ families
def _check_family(det, size: int = 64) -> list[str]:
    """Maps and their x-gradients are finite; returns the conv / linear modules the rules did not reach."""
    torch.manual_seed(13)
    x = torch.rand(1, 3, size, size, requires_grad=True)
    for nt in ("cls", "loc"):
        r = relevance_map(det, x, NodeSelection(node_type=nt), create_graph=True)
        assert r.map.shape == (1, size, size) and torch.isfinite(r.per_channel).all()
        assert r.nodes.counts[0] > 0 and r.map.abs().sum() > 0
        (g,) = torch.autograd.grad(r.map.sum(), x)
        assert torch.isfinite(g).all()
    weighted = [m for m in det.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    seen = r.stats.weight_ids
    missing = [type(m).__name__ for m in weighted if id(m.weight) not in seen]
    return missing


def test_maps_finite_ssd_vgg_small(ssd64):
    assert _check_family(ssd64) == []


def test_maps_finite_yolov3_small():
    from advdet.models import yolov3

    torch.manual_seed(14)
    det = yolov3.yolov3_small(num_classes=3, input_size=64).eval()
    assert _check_family(det) == []
    r = relevance_map(det, torch.rand(1, 3, 64, 64))
    assert all(r.nodes.layout[int(c)] == "obj" for c in r.nodes.columns[0])  # YOLO: objectness nodes
    assert r.stats.upsamples == 2


@pytest.mark.parametrize("builder", ["fasterrcnn_tiny", "retinanet_tiny"])
def test_maps_finite_torchvision_tiny(builder):
    from advdet.models.torchvision_adapter import TINY_BUILDERS

    torch.manual_seed(15)
    det = TINY_BUILDERS[builder](num_classes=3, input_size=64).eval()  # a renamed builder fails here
    assert _check_family(det) == []


# ------------------------------------------------------------------------------------------------ figures
def test_relevance_figure_writes_png(tmp_path):
    torch.manual_seed(16)
    img = torch.rand(3, 32, 32)
    boxes = torch.tensor([[2.0, 3.0, 20.0, 25.0], [10.0, 10.0, 30.0, 30.0]])
    out = relevance_figure(img, boxes, [torch.randn(32, 32), torch.randn(3, 32, 32)], torch.randn(32, 32),
                           tmp_path / "sub" / "fig.png", labels=["a 0.9", "b 0.5"])
    data = out.read_bytes()
    assert out.exists() and len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "sub").glob("*.tmp"))


def test_explain_image_and_single_box_maps(tmp_path, ssd64):
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        dense = ssd64.dense(x)
    cands = distinct_candidates(ssd64, dense, k=2)
    res, _ = box_relevance_maps(ssd64, x, cands[0][None])
    assert len(res) == len(cands[0]) and all(torch.isfinite(r.map).all() for r in res)
    if len(res):  # one cls node per box: the single-box map is eq. 1
        t = res[0].nodes.flat_indices(0)
        torch.testing.assert_close(res[0].map, sglrp_map(ssd64, x, t).map, rtol=1e-5, atol=1e-9)
    out = explain_image(ssd64, x, tmp_path / "explain.png", k=2)
    assert out.stat().st_size > 1000


def test_nodeset_from_other_layout_rejected(ssd64):
    x = torch.rand(1, 3, 64, 64)
    r = relevance_map(ssd64, x, NodeSelection(outputs="scores"))
    assert isinstance(r.nodes, NodeSet) and not any(c.startswith("box") for c in r.nodes.layout)
    bad = NodeSet(r.nodes.mask[:, :-1], r.nodes.candidates, r.nodes.columns, r.nodes.layout)
    with pytest.raises(ValueError):
        relevance_map(ssd64, x, bad)


PUBLIC_API = {  # what `from advdet.relevance import ...` promises (README, docs, attacks/rad.py)
    "box_regression", "box_relevance_maps", "distinct_candidates", "explain_image", "lrp", "lrp_backward",
    "LRPContext", "LRPRules", "multi_node_sglrp_init", "NodeSelection", "NodeSet", "output_softmax",
    "output_vector", "OutputVector", "rad_code_inits", "relevance_figure", "relevance_map", "RelevanceResult",
    "resolve_values", "score_values", "select_nodes", "selection_needs_boxes", "sglrp_init", "sglrp_map",
    "trace", "trace_forward", "Traced", "TrackedNodes",
}


def test_public_api_is_complete_and_resolves():
    """Fails when a public name is renamed or dropped, or listed in __all__ without being defined."""
    mod = importlib.import_module("advdet.relevance")
    assert set(mod.__all__) == PUBLIC_API and len(mod.__all__) == len(PUBLIC_API)
    missing = [n for n in mod.__all__ if not callable(getattr(mod, n, None))]
    assert missing == []
