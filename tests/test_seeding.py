"""The one crafting seed policy (advdet.attacks.seeding): batch seeds, and ``advdet attack`` crafting the
same bytes as ``bench transfer`` for the same surrogate, attack, seed, images and batch size."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from advdet.attacks.registry import ATTACKS, build_attack
from advdet.attacks.seeding import batch_seed, crafting_defaults, seed_batch
from advdet.data.shapes import generate_shapes


def test_batch_seed_is_sha256_of_seed_and_first_index():
    digest = hashlib.sha256(b"advdet-craft:7:12").digest()
    assert batch_seed(7, 12) == int.from_bytes(digest[:8], "big") >> 1
    assert batch_seed(7, 12) != batch_seed(7, 13) and batch_seed(7, 12) != batch_seed(8, 12)
    assert 0 <= batch_seed(123456, 10**6) < 2**63


def test_seed_batch_resets_the_attack_and_torch_generators():
    atk = build_attack("gaussian", None, sigma=9.0)
    s = seed_batch(atk, 3, 40)
    assert s == batch_seed(3, 40) == atk.seed
    expected = torch.rand(5, generator=torch.Generator().manual_seed(s))
    assert torch.equal(torch.rand(5, generator=atk.generator), expected)
    assert torch.equal(torch.rand(5), expected)  # torch's global generator too


def test_crafting_defaults_fill_only_what_the_attack_takes_and_leaves_unset():
    kw = crafting_defaults(ATTACKS["pgd"], {"steps": 2}, seed=5)
    assert kw == {"steps": 2, "valid_only": True, "seed": 5}
    assert crafting_defaults(ATTACKS["pgd"], {"valid_only": False})["valid_only"] is False

    class NoMaskAttack:  # an attack class without valid_only / seed options gets neither
        def __init__(self, model=None, *, steps: int = 1):
            self.steps = steps

    assert crafting_defaults(NoMaskAttack, {"steps": 3}, seed=5) == {"steps": 3}


PGD_OPTIONS = {"pgd": {"step": 2.0, "steps": 2, "random_start": True}}


@pytest.fixture(scope="module")
def shapes4(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes4")
    generate_shapes(root, train=0, val=4, seed=3, workers=1)
    return root / "val"


def test_advdet_attack_and_bench_transfer_craft_the_same_bytes(shapes4, tmp_path):
    """pgd with a random start (its bytes depend on the batch seeds) on the zoo yolov3, 4 images in
    batches of 2, seed 7: the PNGs of ``craft_dataset`` equal the adversarial images ``transfer_matrix``
    evaluated."""
    from advdet.bench.craft import craft_dataset
    from advdet.bench.transfer import transfer_matrix
    from advdet.attacks.quantize import load_png

    out = tmp_path / "adv"
    craft_dataset("pgd", "yolov3", shapes4, out, eps=6, attack_kwargs=PGD_OPTIONS["pgd"],
                  batch_size=2, seed=7, labels=False, progress=False)
    res = transfer_matrix(["yolov3"], ["pgd"], ["yolov3"], str(shapes4 / "images"),
                          ann=shapes4 / "instances.json", eps=6, attack_kwargs=PGD_OPTIONS, batch_size=2, seed=7, examples=4,
                          relevance=False, n_boot=0, progress=False)
    pngs = sorted((out / "images").glob("*.png"))
    assert len(pngs) == 4 and len(res["_examples"]) == 4
    ri = [r["attack"] for r in res["rows"]].index("pgd")  # after No Attack and the Gaussian ablation
    for png, ex in zip(pngs, res["_examples"]):
        crafted = load_png(png).permute(1, 2, 0).numpy()
        assert np.array_equal(crafted, ex["rows"][ri]["adv"]), png.name
        assert not np.array_equal(crafted, ex["rows"][0]["clean"])
    # a different seed gives different bytes (the comparison above can fail)
    res8 = transfer_matrix(["yolov3"], ["pgd"], ["yolov3"], str(shapes4 / "images"),
                           ann=shapes4 / "instances.json", eps=6, attack_kwargs=PGD_OPTIONS, batch_size=2, seed=8, examples=1,
                           relevance=False, n_boot=0, progress=False)
    assert not np.array_equal(load_png(pngs[0]).permute(1, 2, 0).numpy(), res8["_examples"][0]["rows"][ri]["adv"])
