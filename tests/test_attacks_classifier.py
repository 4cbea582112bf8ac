"""Classifier transfer baselines of RAD Table 3 (PGD, SI-PGD, MI-DI-PGD, MI-TI-PGD) on a tiny CNN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advdet.attacks import DI, MI, SI, TI, attacks_of_kind, build_attack


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Dropout(0.5), nn.AdaptiveAvgPool2d(4),
                        nn.Flatten(), nn.Linear(128, 5))
    return net.double()


@pytest.mark.parametrize("name", sorted(attacks_of_kind("classifier")))
def test_classifier_attacks(classifier, name):
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    classifier.train()  # the attack must run it in eval mode (dropout off) and restore the mode
    atk = build_attack(name, classifier)
    assert (atk.eps, atk.step, atk.steps, atk.update) == (16.0, 2.0, 10, "sign")
    xa = atk(x)
    assert classifier.training
    assert (xa - x).abs().max().item() * 255 <= 16 + 1e-9 and xa.min() >= 0 and xa.max() <= 1
    classifier.eval()
    with torch.no_grad():
        label = classifier(x).argmax(1)
        assert torch.equal(atk.last_state["labels"], label)  # the clean prediction is the label
        ce = lambda z: nn.functional.cross_entropy(classifier(z), label, reduction="none")  # noqa: E731
        assert (ce(xa) > ce(x)).all()
    kinds = {type(t) for t in atk.transforms}
    assert kinds == {"cls-pgd": set(), "cls-si-pgd": {SI}, "cls-mi-di-pgd": {DI, MI},
                     "cls-mi-ti-pgd": {TI, MI}}[name]


def test_classifier_attack_with_given_labels(classifier):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    atk = build_attack("cls-pgd", classifier, steps=2)
    atk(x, torch.tensor([1, 3]))
    assert atk.last_state["labels"].tolist() == [1, 3]
    with pytest.raises(ValueError, match="labels"):
        atk(x, torch.tensor([1, 2, 3]))
