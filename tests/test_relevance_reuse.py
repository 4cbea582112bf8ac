"""Exact mode's traced pass returns the plain pass's outputs of its convolutions and normalisations
instead of computing them again (relevance/rules/context.py ``LRPContext.true_output``; issue 20,
Performance): the relevance and its derivative are bitwise those of the recomputing trace, the plain
outputs are reused only where the plain pass left them unmodified (in-place activations), and train-mode
batch norm is still run twice (its running statistics)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advdet.relevance import lrp
from advdet.relevance.rules.context import LRPContext


class Net(nn.Module):
    """conv -> BN -> ReLU(inplace) -> conv -> BN -> LeakyReLU -> conv (+ bias), an in-place op on a BN
    output and a LeakyReLU (negative inputs: alpha1-beta0's second term)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        h = F.relu(self.b1(self.c1(x)), inplace=True)
        return self.c3(F.leaky_relu(self.b2(self.c2(h)), 0.1)).flatten(1)


def _net(dtype):
    torch.manual_seed(0)
    net = Net().to(dtype)
    for b in (net.b1, net.b2):
        b.running_mean.uniform_(-0.2, 0.2)
        b.running_var.uniform_(0.5, 1.5)
        b.weight.data.uniform_(0.5, 1.5)
        b.bias.data.uniform_(-0.3, 0.3)
    return net.eval()


def _map_and_grad(net, x):
    xr = x.clone().requires_grad_()
    rel = lrp(net, xr, lambda out: out.softmax(-1), create_graph=True)
    (g,) = torch.autograd.grad(rel.clamp(min=0).sum(), xr)
    return rel.detach(), g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reused_outputs_give_bitwise_the_same_map_and_gradient(dtype, monkeypatch):
    net = _net(dtype)
    x = torch.rand(2, 3, 10, 10, dtype=dtype, generator=torch.Generator().manual_seed(1))
    calls = []
    orig = LRPContext.true_output

    def spy(self, inp):
        out = orig(self, inp)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(LRPContext, "true_output", spy)
    rel, g = _map_and_grad(net, x)
    # c1, c2, c3 and b2 reused; b1's output is modified in place by the ReLU of the plain pass: recomputed
    assert calls == [True, False, True, True, True]
    monkeypatch.setattr(LRPContext, "true_output", lambda self, inp: None)
    rel0, g0 = _map_and_grad(net, x)
    assert torch.equal(rel, rel0) and torch.equal(g, g0)
    assert rel.abs().sum() > 0 and g.abs().sum() > 0


def test_train_mode_batch_norm_is_not_reused(monkeypatch):
    x = torch.rand(2, 3, 10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    nets = []
    for reuse in (True, False):
        if not reuse:
            monkeypatch.setattr(LRPContext, "true_output", lambda self, inp: None)
        net = _net(torch.float64).train()
        lrp(net, x.clone().requires_grad_(), create_graph=True)
        nets.append(net)
    for b, b0 in ((nets[0].b1, nets[1].b1), (nets[0].b2, nets[1].b2)):
        assert torch.equal(b.running_mean, b0.running_mean) and torch.equal(b.running_var, b0.running_var)
    assert not torch.equal(nets[0].b2.running_mean, _net(torch.float64).b2.running_mean)


def test_channels_last_weights_give_the_same_map_and_gradient_without_mixed_layouts(monkeypatch):
    """A model with channels-last weights (``get_model``'s default) gets the relevance map and its derivative of
    the contiguous model up to float rounding, and the rules' adjoints come back channels-last where the layer
    input is, so that the products with the layer inputs are not on mixed layouts
    (``vjp_factory(channels_last=...)``)."""
    import copy

    import advdet.relevance.rules.weighted as weighted
    from advdet.models.hub import to_channels_last

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.LeakyReLU(0.1), nn.Conv2d(8, 16, 3, padding=1),
                        nn.LeakyReLU(0.1), nn.Conv2d(16, 4, 3, stride=2, padding=1)).eval()
    net_cl = copy.deepcopy(net)
    to_channels_last(net_cl)
    x = torch.rand(2, 3, 16, 16)
    layouts, made = {}, weighted.vjp_factory

    def spy(*a, **k):
        layouts.setdefault(id(current), []).append(k.get("channels_last", False))
        return made(*a, **k)

    monkeypatch.setattr(weighted, "vjp_factory", spy)
    results = []
    for current in (net, net_cl):
        xr = x.clone().requires_grad_(True)
        rel = lrp(current, xr, create_graph=True)
        (g,) = torch.autograd.grad(rel.sum(dim=1).pow(2).sum(), xr)
        results.append((rel.detach(), g))
    (r0, g0), (r1, g1) = results
    assert r0.abs().sum() > 0 and g0.abs().sum() > 0
    assert torch.allclose(r0, r1, rtol=1e-4, atol=1e-6) and torch.allclose(g0, g1, rtol=1e-3, atol=1e-6)
    # contiguous model: no layer input is channels-last; channels-last model: all but the first (x itself)
    assert layouts[id(net)][:3] == [False, False, False] and layouts[id(net_cl)][:3] == [False, True, True]


def test_split_sign_has_clamps_values_and_their_gradient_away_from_zero():
    from advdet.relevance.rules.weighted import _split_sign

    t = torch.tensor([-2.0, -0.5, 0.0, 0.25, 3.0], dtype=torch.float64, requires_grad=True)
    pos, neg = _split_sign(t)
    assert torch.equal(pos, t.clamp(min=0)) and torch.equal(neg, t.clamp(max=0))
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    mine = torch.autograd.grad((pos * g).sum() + (neg * g * 10).sum(), t)[0]
    ref = torch.autograd.grad((t.clamp(min=0) * g).sum() + (t.clamp(max=0) * g * 10).sum(), t)[0]
    nonzero = t != 0
    assert torch.equal(mine[nonzero], ref[nonzero])
    assert mine.tolist() == [10.0, 20.0, 30.0, 4.0, 5.0]  # at 0 only the negative part's slope (relu' = 0)
