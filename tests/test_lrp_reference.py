"""The reference LRP rules (iNNvestigate 1.0.8 BoundedDeepTaylor, ALGORITHMS.md 2.2) against an independent
implementation: zennit's hooks, with the full-bias alpha1-beta0 rule of iNNvestigate written as a zennit
``BasicHook`` (zennit's stock ``AlphaBeta`` puts only b+ in the denominator) and zennit's ``ZBox`` (which
cancels the bias, as the reference's z^B rule ignores it) on the first layer, on small VGG-like nets in
float64 with signed random biases in every layer, the first included."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advdet.relevance import LRPRules, lrp
from conftest import random_batchnorm

D64 = torch.float64


def _full_bias_alpha1beta0():
    """iNNvestigate's alpha1-beta0 with bias: z_j = sum_i (x+_i w+_ij + x-_i w-_ij) + b_j (the whole bias,
    either sign), R_i = x+_i sum_j w+_ij R_j / z_j + x-_i sum_j w-_ij R_j / z_j."""
    from zennit.rules import BasicHook, ParamMod, Stabilizer

    stab = Stabilizer.ensure(1e-300)
    return BasicHook(
        input_modifiers=[lambda a: a.clamp(min=0), lambda a: a.clamp(max=0)],
        param_modifiers=[ParamMod(lambda p, name: p if name == "bias" else p.clamp(min=0)),
                         ParamMod(lambda p, name: torch.zeros_like(p) if name == "bias" else p.clamp(max=0))],
        output_modifiers=[lambda o: o] * 2,
        gradient_mapper=lambda out_grad, outputs: [out_grad / stab(outputs[0] + outputs[1])] * 2,
        reducer=lambda inputs, grads: inputs[0] * grads[0] + inputs[1] * grads[1],
    )


def _vgg_like(bn_leaky: bool) -> nn.Sequential:
    """conv-act-conv-act-pool-conv-act-pool-flatten-linear-act-linear, every layer with a signed bias;
    ``bn_leaky``: BatchNorm after every conv and LeakyReLU(0.1) instead of ReLU."""

    def act():
        return nn.LeakyReLU(0.1) if bn_leaky else nn.ReLU()

    def block(cin, cout):
        out = [nn.Conv2d(cin, cout, 3, padding=1)]
        if bn_leaky:
            out.append(random_batchnorm(cout))
        return out + [act()]

    layers = (block(3, 6) + block(6, 8) + [nn.MaxPool2d(2)] + block(8, 8) + [nn.MaxPool2d(2)]
              + [nn.Flatten(), nn.Linear(8 * 2 * 2, 10), act(), nn.Linear(10, 5)])
    net = nn.Sequential(*layers)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.bias.uniform_(-0.5, 0.5)  # signed, in every layer
    return net.to(D64).eval()


@pytest.mark.parametrize("bn_leaky", [False, True], ids=["relu", "batchnorm_leakyrelu"])
@pytest.mark.parametrize("seed", [0, 1])
def test_reference_rules_match_zennit_full_bias(bn_leaky, seed):
    from zennit.composites import SpecialFirstLayerMapComposite
    from zennit.rules import Pass, ZBox
    from zennit.types import BatchNorm, Convolution, Linear

    torch.manual_seed(seed)
    net = _vgg_like(bn_leaky)
    x = torch.rand(1, 3, 8, 8, dtype=D64) * 2 - 0.5  # signed inputs reach the first layer
    init = torch.randn(1, 5, dtype=D64)

    ours = lrp(net, x, init, rules=LRPRules())  # z^B (min / max of x) first, alpha1-beta0 with bias, BN passed

    layer_map = [(Convolution, _full_bias_alpha1beta0()), (Linear, _full_bias_alpha1beta0()), (BatchNorm, Pass())]
    first = [(Convolution, ZBox(low=x.min().reshape(()), high=x.max().reshape(()), stabilizer=1e-300))]
    comp = SpecialFirstLayerMapComposite(layer_map=layer_map, first_map=first)
    xz = x.clone().requires_grad_()
    with comp.context(net) as hooked:
        (ref,) = torch.autograd.grad(hooked(xz), xz, init)

    assert ref.abs().sum() > 0
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10 * ref.abs().max().item())
    # the bias matters here: without it in the denominators the maps differ
    no_bias = lrp(net, x, init, rules=LRPRules(bias=False))
    assert not torch.allclose(no_bias, ref, rtol=1e-3)
