"""Ensembles of surrogates: the L1 gradient normalisation and one step of ens-pgd, checked by hand."""

from __future__ import annotations

import pytest
import torch

from advdet.attacks import build_attack
from advdet.attacks.ensemble import EnsemblePGD, SurrogateEnsemble, l1_normalised
from advdet.attacks.losses import pseudo_targets, sum_keys, total_losses
from advdet.models.ssd_vgg import ssd_vgg_small

S, K = 64, 3


def _ssd(seed: int):
    torch.manual_seed(seed)
    return ssd_vgg_small(num_classes=K, input_size=S, width=0.125).double().eval()


def _gt(n: int) -> list[dict]:
    return [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0], [30.0, 20.0, 60.0, 50.0]]),
             "labels": torch.tensor([0, 2])} for _ in range(n)]


def test_l1_normalised_is_identity_forward_and_normalises_each_images_gradient():
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([1.0, 10.0, 1e-3], dtype=torch.float64).view(3, 1, 1, 1)
    y = l1_normalised(x)
    assert torch.equal(y, x)
    (g,) = torch.autograd.grad((y * scale * torch.linspace(-1, 2, 192, dtype=torch.float64).view(1, 3, 8, 8)).sum(), x)
    assert torch.allclose(g.abs().flatten(1).mean(1), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(g[0], g[1]) and torch.allclose(g[0], g[2])  # the scale of each image is gone


def test_one_step_follows_the_sign_of_the_summed_normalised_gradients():
    a, b = _ssd(0), _ssd(1)
    ens = SurrogateEnsemble([a, b], names=["a", "b"])
    x = torch.rand(2, 3, S, S, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    tg = _gt(2)
    atk = build_attack("ens-pgd", ens, steps=1)
    assert isinstance(atk, EnsemblePGD) and (atk.eps, atk.step, atk.update) == (16.0, 2.0, "sign")
    xa = atk(x, tg)
    expected = torch.zeros_like(x)
    for m in (a, b):
        xr = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(sum_keys(total_losses(m, xr, tg), None), xr)
        expected += g / g.abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    want = (x + 2 / 255 * expected.sign()).clamp(0, 1)
    assert torch.allclose(xa, want, atol=1e-12)
    # more steps stay within eps and raise every member's loss
    xa = build_attack("ens-pgd", ens, steps=4)(x, tg)
    assert (xa - x).abs().max() * 255 <= 16 + 1e-9
    for m in (a, b):
        assert sum_keys(total_losses(m, xa, tg), None) > sum_keys(total_losses(m, x, tg), None)


def test_without_targets_each_member_attacks_its_own_clean_predictions():
    a, b = _ssd(0), _ssd(1)
    atk = EnsemblePGD(SurrogateEnsemble([a, b]), steps=1)
    x = torch.rand(1, 3, S, S, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    atk(x)
    ta, tb = atk.last_state["member_targets"]
    assert torch.equal(ta[0]["boxes"], pseudo_targets(a, x)[0]["boxes"])
    assert torch.equal(tb[0]["boxes"], pseudo_targets(b, x)[0]["boxes"])
    assert len(ta[0]["boxes"]) >= 1 and len(tb[0]["boxes"]) >= 1


def test_ensemble_needs_members_of_one_input_size():
    with pytest.raises(ValueError, match="one input size"):
        SurrogateEnsemble([_ssd(0), ssd_vgg_small(num_classes=K, input_size=96, width=0.125)])
    with pytest.raises(ValueError, match="at least one"):
        SurrogateEnsemble([])
