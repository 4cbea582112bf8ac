"""``LRPRules(activation="pass")`` (relevance/rules/activation.py): smooth activations and the softmax pass
relevance through unchanged, as the ReLU gate does, so LRP-0 without bias conserves relevance through SiLU,
GELU and a DFL-style softmax, where their gradient does not; exact mode stays exact (gradcheck)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advdet.relevance import LRPRules, lrp

D64 = torch.float64
LRP0 = dict(input_rule="zero", layer_rule="zero", bias=False)


class SiluNet(nn.Module):
    """conv -> SiLU -> conv -> GELU -> conv, no biases."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.c3 = nn.Conv2d(6, 2, 1, bias=False)

    def forward(self, x):
        return self.c3(F.gelu(self.c2(nn.SiLU()(self.c1(x)))))


class DflNet(nn.Module):
    """conv -> per-edge softmax over 8 bins -> the DFL's fixed conv (weights 0..7): expected distances."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4 * 8, 3, padding=1, bias=False)
        self.dfl = nn.Conv2d(8, 1, 1, bias=False).requires_grad_(False)
        self.dfl.weight.data[:] = torch.arange(8, dtype=self.dfl.weight.dtype).view(1, 8, 1, 1)

    def forward(self, x):
        b, _, h, w = x.shape
        z = self.c1(x).view(b, 4, 8, h * w).transpose(1, 2)  # (B, bins, 4 edges, HW) as ultralytics' DFL
        return self.dfl(z.softmax(1)).view(b, 4, h, w)


def _inputs(seed: int = 0, s: int = 6) -> torch.Tensor:
    return torch.rand(2, 3, s, s, dtype=D64, generator=torch.Generator().manual_seed(seed)) + 0.1


@pytest.mark.parametrize("net_cls", [SiluNet, DflNet])
def test_pass_conserves_where_the_gradient_does_not(net_cls):
    torch.manual_seed(0)
    net = net_cls().to(D64)
    x = _inputs()
    with torch.no_grad():
        out = net(x)
    rel = lrp(net, x, rules=LRPRules(**LRP0, activation="pass"))
    torch.testing.assert_close(rel.sum(), out.sum(), rtol=1e-9, atol=1e-12)
    grad_rule = lrp(net, x, rules=LRPRules(**LRP0))
    assert not torch.allclose(grad_rule.sum(), out.sum(), rtol=1e-3)


def test_pass_is_the_gradient_for_relu():
    """For ReLU networks nothing changes (ReLU is not a smooth op: it keeps its gradient, the gate)."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).to(D64)
    x = _inputs(1)
    torch.testing.assert_close(lrp(net, x, rules=LRPRules(activation="pass")), lrp(net, x))


def test_exact_second_derivative_with_pass():
    torch.manual_seed(2)
    net = SiluNet().to(D64)
    x = _inputs(2, s=4).requires_grad_(True)
    rules = LRPRules(**LRP0, activation="pass")
    assert torch.autograd.gradcheck(lambda t: lrp(net, t, rules=rules, create_graph=True), (x,), atol=1e-6)


def test_unknown_activation_rule():
    with pytest.raises(ValueError, match="activation must be"):
        LRPRules(activation="gate")
