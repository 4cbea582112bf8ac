"""The relevance contract of issue 5, filling what tests/test_relevance.py leaves out:

- conservation on a real detector where the rules conserve (LRP-0 without bias, z^B input layer, BN /
  L2Norm pass-through, max-pool routing), and the documented non-conserving routing (residual adds copy);
- LRP-0 == gradient x input on a bias-free ReLU network with the routing ops detectors use (concat,
  overlapping max-pool, strided conv, nearest upsampling, transposed conv, linear);
- exact double backward (gradcheck, float64) on torchvision families (RetinaNet, FCOS);
- the map for T = {t} equals SGLRP for t on YOLO (objectness node), RetinaNet (sigmoid) and Faster R-CNN;
- finite maps for one untrained zoo builder per detector family, at the zoo's input size.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advdet.relevance import (LRPRules, NodeSelection, lrp, multi_node_sglrp_init, output_softmax, output_vector,
                              relevance_map, sglrp_map)

D64 = torch.float64


# ------------------------------------------------------------------------------------------- conservation
def test_conservation_on_ssd_detector_lrp0_without_bias():
    """sum over pixels of the map == sum of the initial relevance (eq. 2) that enters the network, i.e.
    over the outputs that survive the output ReLU, for LRP-0 without bias and the z^B input layer."""
    from advdet.models.ssd_vgg import ssd_vgg_small

    torch.manual_seed(0)
    det = ssd_vgg_small(num_classes=3, input_size=64, width=0.125).to(D64).eval()
    with torch.no_grad():  # nonzero biases: LRP-0 without bias still conserves, the reference rule not
        for m in det.modules():
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.uniform_(-0.05, 0.05)
    x = torch.rand(2, 3, 64, 64, dtype=D64, generator=torch.Generator().manual_seed(1))
    rules = LRPRules(input_rule="zB", layer_rule="zero", bias=False)
    r = relevance_map(det, x, NodeSelection(m=20), rules=rules)
    with torch.no_grad():
        ov = output_vector(det, det.dense(x))
    _, y = output_softmax(ov)
    init = multi_node_sglrp_init(y, r.nodes.mask)
    entering = (init * (ov.flat() > 0)).sum(1)
    assert entering.abs().min() > 1e-8
    torch.testing.assert_close(r.per_channel.sum((1, 2, 3)), entering, rtol=1e-6, atol=1e-12)
    # the reference rules (alpha1-beta0, bias in the denominator) do not conserve: the check can fail
    ref = relevance_map(det, x, r.nodes)
    assert not torch.allclose(ref.per_channel.sum((1, 2, 3)), entering, rtol=1e-3)


def test_residual_add_copies_relevance():
    """The reference routes relevance through a residual add by the gradient: each branch gets all of
    it (not half), so h + g(h) with a conserving g doubles the total."""
    torch.manual_seed(2)
    c1, c2, c3 = (nn.Conv2d(3, 4, 3, padding=1, bias=False).to(D64), nn.Conv2d(4, 4, 1, bias=False).to(D64),
                  nn.Conv2d(4, 2, 1, bias=False).to(D64))
    with torch.no_grad():  # positive weights: every unit active, nothing lost at the ReLUs
        for c in (c1, c2, c3):
            c.weight.abs_()

    def net(x):
        h = F.relu(c1(x))
        return c3(h + F.relu(c2(h))).flatten(1)

    x = torch.rand(1, 3, 5, 5, dtype=D64)
    init = torch.rand(1, 2 * 25, dtype=D64)
    rel = lrp(net, x, init, rules=LRPRules(input_rule="zero", layer_rule="zero", bias=False),
              module=nn.ModuleList([c1, c2, c3]))
    torch.testing.assert_close(rel.sum(), 2 * init.sum())


# ------------------------------------------------------------------------------------ LRP-0 = gradient x input
class _RoutingNet(nn.Module):
    """Bias-free ReLU network with the routing ops of the zoo: strided conv, overlapping max-pool,
    nearest upsampling, concatenation, functional transposed conv, linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
        self.c3 = nn.Conv2d(10, 4, 1, bias=False)
        self.wt = nn.Parameter(torch.randn(4, 3, 2, 2))
        self.fc = nn.Linear(3 * 8 * 8, 5, bias=False)

    def forward(self, x):
        h1 = F.relu(self.c1(x))                                     # 8 x 8
        h2 = F.relu(self.c2(F.max_pool2d(h1, 3, 1, 1)))             # 4 x 4, overlapping pool
        u = F.interpolate(h2, scale_factor=2.0, mode="nearest")     # 8 x 8
        h3 = F.relu(self.c3(torch.cat([u, h1], 1)))                  # 8 x 8
        h4 = F.relu(F.conv_transpose2d(F.max_pool2d(h3, 2), self.wt, stride=2))  # 4 -> 8
        return self.fc(h4.flatten(1))


def test_lrp0_equals_gradient_times_input_with_routing_ops():
    torch.manual_seed(3)
    net = _RoutingNet().to(D64).eval()
    x = torch.randn(2, 3, 8, 8, dtype=D64)
    c = torch.randn(2, 5, dtype=D64)
    rules = LRPRules(input_rule="zero", layer_rule="zero", bias=False, upsample="gradient")
    rel = lrp(net, x, lambda out: c * out, rules=rules)
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad((c * net(xr)).sum(), xr)
    torch.testing.assert_close(rel, x * g, rtol=1e-8, atol=1e-10)
    # the reference's upsampling rule (average) breaks the identity: the test can fail
    avg = lrp(net, x, lambda out: c * out, rules=LRPRules(input_rule="zero", layer_rule="zero", bias=False))
    assert not torch.allclose(avg, x * g, rtol=1e-3)


# ------------------------------------------------------------------------------ exact second derivative
def _gradcheck_map(det, size: int, seed: int) -> None:
    """gradcheck (float64) of a scalar projection of the map w.r.t. three pixels of channel 1."""
    torch.manual_seed(seed)
    x = torch.rand(1, 3, size, size, dtype=D64)
    proj = torch.randn(1, size, size, dtype=D64)
    idx = torch.tensor([2 * size + 3, (size // 2) * size + size // 2 + 1, (size - 3) * size + size - 4])
    nodes = relevance_map(det, x, NodeSelection(m=5)).nodes  # fixed T: the map is smooth in x

    def f(p):
        xx = x.reshape(1, 3, -1).index_put((torch.tensor([0]), torch.tensor([1]), idx), p).reshape_as(x)
        return (relevance_map(det, xx, nodes, create_graph=True).map * proj).sum()

    p = x.reshape(1, 3, -1)[0, 1, idx].clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (p,), eps=1e-6, atol=1e-9, rtol=1e-4)


@pytest.mark.parametrize("builder", ["retinanet_tiny", "fcos_tiny"])
def test_double_backward_torchvision_one_stage(builder):
    """BN pass-through (plain BatchNorm in the tiny ResNet), GroupNorm (FCOS head), FPN adds and
    upsampling, sigmoid heads: the derivative of the map is exact."""
    from advdet.models.torchvision_adapter import TINY_BUILDERS

    torch.manual_seed(4)
    # FCOS: GroupNorm(32) needs 2+ values per group on its 1 x 1 top level, so 64 channels there
    channels = 64 if builder == "fcos_tiny" else 32
    det = TINY_BUILDERS[builder](num_classes=3, input_size=32, fpn_channels=channels).to(D64).eval()
    _gradcheck_map(det, 32, 5)


# ----------------------------------------------------------------------------------- T = {t} is SGLRP
def _tiny(name: str, size: int = 64):
    torch.manual_seed(6)
    if name == "yolov3":
        from advdet.models.yolov3 import yolov3_small

        return yolov3_small(num_classes=3, input_size=size).eval()
    from advdet.models.torchvision_adapter import TINY_BUILDERS

    return TINY_BUILDERS[name](num_classes=3, input_size=size, fpn_channels=32).eval()


@pytest.mark.parametrize("name,column", [("yolov3", "obj"), ("retinanet_tiny", "cls"), ("fasterrcnn_tiny", "cls")])
def test_single_node_map_is_sglrp(name, column):
    det = _tiny(name)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    multi = relevance_map(det, x, NodeSelection(m=1))
    assert multi.nodes.counts == [1, 1]
    assert all(multi.nodes.layout[int(multi.nodes.columns[b][0])].startswith(column) for b in range(2))
    flat = torch.stack([multi.nodes.flat_indices(b)[0] for b in range(2)])
    single = sglrp_map(det, x, flat)
    assert single.map.abs().sum() > 0
    torch.testing.assert_close(multi.per_channel, single.per_channel, rtol=1e-5, atol=1e-12)


def test_output_values_probs_for_sigmoid_class_nodes():
    """values="auto": probabilities for RetinaNet / FCOS class nodes (RAD's RetinaNet code), logits for
    YOLO objectness nodes and softmax families; box columns stay raw."""
    from advdet.models.ssd_vgg import ssd_vgg_small
    from advdet.relevance import resolve_values, score_values

    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(11))
    torch.manual_seed(12)
    ssd = ssd_vgg_small(num_classes=3, input_size=64, width=0.125).eval()
    for det, expected in ((_tiny("retinanet_tiny"), "probs"), (_tiny("yolov3"), "logits"), (ssd, "logits")):
        with torch.no_grad():
            dense = det.dense(x)
        assert resolve_values(det, dense, "auto") == expected
        assert relevance_map(det, x, NodeSelection(m=3)).nodes.values == expected
        ov = output_vector(det, dense)
        p = score_values(ov, ov.raw, "probs")
        torch.testing.assert_close(p[..., :4], ov.raw[..., :4])  # box regression
        cls = p[..., ov.cls:]
        if dense.score_mode == "softmax_bg":
            torch.testing.assert_close(cls.sum(-1), torch.ones_like(cls[..., 0]))
        else:
            torch.testing.assert_close(cls, dense.logits.sigmoid())
        if ov.obj is not None:
            torch.testing.assert_close(p[..., ov.obj], dense.objectness.sigmoid())
    with pytest.raises(ValueError):
        NodeSelection(values="softmax")


# --------------------------------------------------------------------------------- every zoo family
def _zoo_detectors_one_per_family() -> list[str]:
    from advdet.models.zoo import zoo_entries

    seen, names = set(), []
    for e in zoo_entries():
        if e.kind == "detector" and e.family not in seen:
            seen.add(e.family)
            names.append(e.name)
    return names


@pytest.mark.parametrize("name", _zoo_detectors_one_per_family())
def test_maps_finite_for_every_zoo_family(name):
    """One untrained zoo builder per family, at the zoo's input size: the map is finite, not all zero,
    and of the input's size (loc / size nodes: tests/test_relevance.py and tests/test_rad.py)."""
    from advdet.models.zoo import zoo_entry

    torch.manual_seed(8)
    det = zoo_entry(name).builder().eval()
    s = det.input_size
    x = torch.rand(1, 3, s, s, generator=torch.Generator().manual_seed(9))
    r = relevance_map(det, x, NodeSelection())
    assert r.map.shape == (1, s, s) and r.per_channel.shape == (1, 3, s, s)
    assert torch.isfinite(r.per_channel).all() and r.map.abs().sum() > 0
    assert r.nodes.counts == [20] and r.stats.input_layers >= 1


# ------------------------------------------------------------------------------------- advdet explain
def _small_png(path) -> None:
    from PIL import Image

    rng = torch.Generator().manual_seed(10)
    a = (torch.rand(48, 72, 3, generator=rng) * 255).to(torch.uint8).numpy()
    a[10:30, 20:40] = (255, 0, 0)
    Image.fromarray(a).save(path)


def test_explain_cli_writes_the_figure(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from advdet.cli import app

    img, out = tmp_path / "small.png", tmp_path / "figs" / "explain.png"
    _small_png(img)
    res = CliRunner().invoke(app, ["explain", "--model", "torchvision:ssd_tiny", "--num-classes", "3", "--size", "64",
                                   "--image", str(img), "--out", str(out), "--nodes", "5", "--boxes", "2"])
    assert res.exit_code == 0, res.output
    assert out.is_file() and 20_000 < out.stat().st_size < 2_000_000
    with Image.open(out) as fig:
        w, h = fig.size
    # 1 x 4 panels (prediction, 2 single-box maps, multi-node map) at 2.6 x 2.9 in, 100 dpi
    assert (w, h) == (1040, 290)
    assert not list(out.parent.glob("*.tmp"))


def test_explain_cli_errors_name_the_file(tmp_path):
    from typer.testing import CliRunner

    from advdet.cli import app

    missing = tmp_path / "nope.png"
    res = CliRunner().invoke(app, ["explain", "--model", "ssd_vgg", "--image", str(missing),
                                   "--out", str(tmp_path / "f.png"), "--untrained"])
    assert res.exit_code == 2 and str(missing) in res.output and "not found" in res.output
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    res = CliRunner().invoke(app, ["explain", "--model", "ssd_vgg", "--image", str(bad),
                                   "--out", str(tmp_path / "f.png"), "--untrained"])
    assert res.exit_code == 2 and str(bad) in res.output
    assert not (tmp_path / "f.png").exists()
