"""Detector attacks on a tiny random-init SSD-VGG (float64): objective up, budget, [0, 1], valid_only,
batch 8 == batch 1, DAG's labels and stopping rule, eval mode, registry."""

from __future__ import annotations

import pytest
import torch

from advdet.attacks import (ATTACKS, DAG, MTD, Attack, adversarial_label_map, build_attack,
                            letterbox_mask, list_attacks)
from advdet.attacks.losses import cwa_loss, per_image_losses
from advdet.data.letterbox import letterbox_params
from advdet.models.detector import DenseOutput, Detector, NMSConfig, postprocess_dense
from advdet.models.ssd_vgg import ssd_vgg_small

S, K = 64, 3


@pytest.fixture(scope="module")
def ssd():
    torch.manual_seed(0)
    return ssd_vgg_small(num_classes=K, input_size=S, width=0.125).double().eval()


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, S, S, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def gt(n: int) -> list[dict]:
    base = [
        {"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0], [30.0, 20.0, 60.0, 50.0]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.tensor([[4.0, 30.0, 30.0, 62.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[20.0, 10.0, 50.0, 34.0]]), "labels": torch.tensor([2])},
    ]
    return [{k: v.clone() for k, v in base[i % 3].items()} for i in range(n)]


FAST = {  # fewer steps than the defaults, to keep the suite fast
    "pgd": dict(steps=3), "cls": dict(steps=3), "loc": dict(steps=3), "cwa": dict(steps=3),
    "mtd": dict(steps=3), "dag": dict(steps=20, gamma=8.0), "dag-eps": dict(steps=4),
    "dfool": dict(steps=4), "loc-shift": dict(steps=4), "size": dict(steps=4),
    # RAD re-selects its nodes on x_k at every step; with the reference head (its map is rescaled to sum to
    # zero) a second step on new nodes can raise the relevance of the clean image's nodes again
    "rad": dict(steps=1, transforms=[]), "dag-robustdet": dict(steps=3), "ens-pgd": dict(steps=3),
    # OSFD's augmentation is redrawn at every objective call; off here so that objective_values compares
    # one objective (tests/test_osfd.py runs it with augmentation)
    "osfd": dict(steps=3, theta=0, s_max=1.0, sigma=0),
}
DETECTOR_ATTACKS = [n for n, c in ATTACKS.items() if c.surrogate_kind == "detector"]


@pytest.mark.parametrize("name", DETECTOR_ATTACKS)
def test_attack_increases_objective_within_budget(ssd, name):
    x, tg = images(3), gt(3)
    atk = build_attack(name, ssd, **FAST[name])
    xa = atk(x, tg)
    assert xa.shape == x.shape and xa.dtype == x.dtype
    assert xa.min() >= 0 and xa.max() <= 1
    if atk.eps is not None:
        assert (xa - x).abs().max().item() * 255 <= atk.eps + 1e-9
    if name == "dag":
        # DAG's goal: candidates no longer predicted as their original label
        assert atk.last_state["assigned"].sum(1).min() > 0
        assert (atk.fooled_fraction(xa) >= 0.6).all()  # random-init logits have near-ties; see the toy test
        return
    before, after = atk.objective_values(x, xa, tg)
    assert (after > before).all(), (before, after)


@pytest.mark.parametrize("name", ["pgd", "cls", "dfool"])
def test_pseudo_targets_from_clean_predictions(ssd, name):
    x = images(2, seed=3)
    atk = build_attack(name, ssd, steps=2)
    xa = atk(x)
    tg = atk.last_state["targets"] if name != "dfool" else atk.last_state["attacked"]
    assert all(len(t["boxes"]) >= 1 for t in tg)
    assert all((t["scores"] >= 0.5).all() or len(t["scores"]) == 1 for t in tg)
    assert not torch.equal(xa, x)
    preds = [p["labels"] for p in ssd.predict(xa)]
    clean = [p["labels"] for p in ssd.predict(x)]
    assert any(len(a) != len(b) or not torch.equal(a, b) for a, b in zip(preds, clean))


@pytest.mark.parametrize("name,kw", [("pgd", {}), ("cls", {}), ("loc", {}), ("cwa", {}), ("mtd", {}),
                                     ("mtd", {"mode": "per_step"}), ("dfool", {}), ("loc-shift", {}),
                                     ("size", {})])
def test_batch_of_8_equals_batch_of_1(ssd, name, kw):
    x, tg = images(8, seed=5), gt(8)
    steps = 2
    batch = build_attack(name, ssd, steps=steps, **kw)(x, tg)
    for i in range(8):
        single = build_attack(name, ssd, steps=steps, **kw)(x[i:i + 1], tg[i:i + 1])
        assert torch.allclose(single, batch[i:i + 1], atol=1e-5, rtol=0), (name, i)


def test_per_image_losses_match_single_images_and_generic_path(ssd):
    x, tg = images(3, seed=7), gt(3)
    fast = per_image_losses(ssd, x, tg)
    for i in range(3):
        one = ssd.loss(x[i:i + 1], tg[i:i + 1])
        assert torch.allclose(fast["cls"][i], one["cls"]) and torch.allclose(fast["loc"][i], one["loc"])

    class LossOnly:  # a detector of another family: only the contract's loss()
        def loss(self, xx, targets):
            return ssd.loss(xx, targets)

    generic = per_image_losses(LossOnly(), x, tg)
    assert all(torch.allclose(generic[k], fast[k]) for k in fast)


def test_cwa_loss_is_classwise_mean(ssd):
    x, tg = images(1, seed=2), gt(1)  # two classes in the image
    loc, conf = ssd.raw(x)
    loc_t, cls_t = ssd.encode_targets(tg)
    ce = torch.nn.functional.cross_entropy(conf[0], cls_t[0], reduction="none")
    per = ce + torch.nn.functional.smooth_l1_loss(loc[0], loc_t[0], reduction="none").sum(-1)
    means = [per[cls_t[0] == c].mean() for c in cls_t[0].unique() if c > 0]
    assert len(means) == 2
    assert torch.allclose(cwa_loss(ssd, x, tg)[0], sum(means) / 2)

    class LossOnly:
        def loss(self, xx, targets):
            return ssd.loss(xx, targets)

    approx = cwa_loss(LossOnly(), x, tg)  # the per-class-subset approximation of other families
    assert approx.shape == (1,) and torch.isfinite(approx).all() and approx.item() > 0


def test_mtd_picks_the_stronger_example(ssd):
    x, tg = images(2, seed=11), gt(2)
    atk = MTD(ssd, steps=2)
    xa = atk(x, tg)
    cls_x = build_attack("cls", ssd, steps=2)(x, tg)
    loc_x = build_attack("loc", ssd, steps=2)(x, tg)
    total = lambda z: sum(per_image_losses(ssd, z, tg)[k] for k in ("cls", "loc"))  # noqa: E731
    with torch.no_grad():
        for i in range(2):
            best = cls_x[i] if total(cls_x)[i] >= total(loc_x)[i] else loc_x[i]
            assert torch.equal(xa[i], best)


def test_valid_only_leaves_padding_untouched(ssd):
    x = images(2, seed=4)
    p0, p1 = letterbox_params(40, 64, S), letterbox_params(64, 30, S)
    mask = letterbox_mask([p0, p1], S, S)
    x = x * mask
    tg = gt(2)
    for t, p in zip(tg, (p0, p1)):
        t["letterbox"] = p
    for name in ("cls", "dfool"):
        xa = build_attack(name, ssd, steps=2, valid_only=True)(x, tg)
        pad = ~mask.expand_as(x)
        assert torch.equal(xa[pad], x[pad]) and not torch.equal(xa[~pad], x[~pad])
    # without letterbox params: RAD's rule (nonzero pixels); explicit masks win
    x2 = x.clone()
    x2[0, :, 30:34, 30:34] = 0  # black content pixels count as padding under RAD's rule
    xa = build_attack("pgd", ssd, steps=1, valid_only=True)(x2, gt(2))
    assert torch.equal(xa[0, :, 30:34, 30:34], x2[0, :, 30:34, 30:34])
    explicit = torch.zeros(2, 1, S, S, dtype=torch.bool)
    explicit[:, :, 10:20, 10:20] = True
    xa = build_attack("pgd", ssd, steps=1, valid_only=True)(x, tg, mask=explicit)
    assert torch.equal(xa[~explicit.expand_as(x)], x[~explicit.expand_as(x)])


def test_dag_label_map_is_injective_to_absent_classes():
    g = torch.Generator().manual_seed(0)
    maps = set()
    for _ in range(20):
        lut = adversarial_label_map([1, 4, 7], 10, g)
        targets = lut[[1, 4, 7]].tolist()
        assert len(set(targets)) == 3 and not set(targets) & {1, 4, 7} and all(0 <= t < 10 for t in targets)
        assert (lut[[0, 2, 3, 5, 6, 8, 9]] == -1).all()
        maps.add(tuple(targets))
    assert len(maps) > 1  # random
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(adversarial_label_map([0, 2], 5, g1), adversarial_label_map([0, 2], 5, g2))


class CellDetector(Detector):
    """A toy one-stage detector (K = 5): 16 candidates on a 4 x 4 grid of 16 px cells, logits linear in
    the mean colour of their cell (softmax with background, or sigmoid without it; grey cells score low),
    so DAG can fool every candidate."""

    family = "toy"

    def __init__(self, score_mode: str = "softmax_bg"):
        super().__init__(torch.nn.Linear(3, 6).double(), 5, S)
        self.score_mode = score_mode
        with torch.no_grad():  # background, then 5 classes (red, green, blue, yellow, cyan)
            self.model.weight.copy_(torch.tensor([[0.0, 0, 0], [6, -3, -3], [-3, 6, -3], [-3, -3, 6],
                                                  [3, 3, -6], [-6, 3, 3]]))
            self.model.bias.copy_(torch.tensor([0.5, 0, 0, 0, 0, 0]))
        ij = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(-1, 2)
        self.register_buffer("cells", torch.cat([ij[:, [1, 0]] * 16, ij[:, [1, 0]] * 16 + 16], 1).double())

    def dense(self, x):
        feats = torch.nn.functional.avg_pool2d(x, 16).flatten(2).transpose(1, 2)  # (B, 16, 3)
        b = x.shape[0]
        cells = self.cells[None].expand(b, -1, -1)
        logits = self.model(feats) * 4
        if self.score_mode == "sigmoid":  # no background column: grey cells have low sigmoid scores
            logits = logits[..., 1:] - 3.0
        return DenseOutput(logits=logits, boxes=cells, anchors=cells, score_mode=self.score_mode)

    @torch.no_grad()
    def predict(self, x):
        return postprocess_dense(self.dense(x), NMSConfig(score_thresh=0.3), S)


@pytest.mark.parametrize("score_mode", ["softmax_bg", "sigmoid"])
def test_dag_state_and_stopping(score_mode):
    det = CellDetector(score_mode).eval()
    x = torch.full((2, 3, S, S), 0.2, dtype=torch.float64)
    x[0, 0, :32] = 0.7   # image 0: red top half (class 0)
    x[1, 2, 32:] = 0.7   # image 1: blue bottom half (class 2), and green top-left cell (class 1)
    x[1, 1, :16, :16] = 0.7
    tg = [{"boxes": torch.tensor([[0.0, 0, 64, 32]]), "labels": torch.tensor([0])},
          {"boxes": torch.tensor([[0.0, 32, 64, 64], [0, 0, 16, 16]]), "labels": torch.tensor([2, 1])}]
    atk = DAG(det, steps=150)
    xa = atk(x, tg)
    st = atk.last_state
    assigned = st["assigned"]
    assert assigned.sum(1).tolist() == [8, 9]
    # adversarial labels follow each image's class map, go to absent classes, never the original label
    for i in range(2):
        o, a = st["orig"][i][assigned[i]], st["adv"][i][assigned[i]]
        assert torch.equal(a, st["label_maps"][i][o]) and (a != o).all()
        assert not set(a.tolist()) & set(tg[i]["labels"].tolist())
    assert (atk.fooled_fraction(xa) == 1).all()
    assert not bool(st["active"].any())  # stopped before the 150 iterations
    assert (xa - x).abs().max() * 255 < 150 * 0.5  # each step moves at most gamma = 0.5 levels
    # the stopping rule: more iterations change nothing once every candidate is fooled
    assert torch.equal(DAG(det, steps=200)(x, tg), xa)
    # per image: a batch gives what single images give (label maps drawn image by image)
    assert torch.equal(DAG(det, steps=150)(x[:1], tg[:1]), xa[:1])


def test_attack_restores_mode_and_device_dtype(ssd):
    ssd.train()
    try:
        x = images(1).float()
        m32 = ssd_vgg_small(num_classes=K, input_size=S, width=0.125).train()
        seen = []
        hook = m32.model.register_forward_pre_hook(lambda mod, inp: seen.append(mod.training))
        xa = build_attack("cls", m32, steps=1)(x, gt(1))
        hook.remove()
        assert seen and not any(seen)  # eval mode during the attack
        assert m32.training and all(m.training for m in m32.modules())  # restored
        assert xa.dtype == torch.float32 and xa.device == x.device
    finally:
        ssd.eval()


def test_random_start_and_input_checks(ssd):
    x = images(1)
    a = build_attack("pgd", ssd, steps=0, random_start=True, seed=3)(x, gt(1))
    b = build_attack("pgd", ssd, steps=0, random_start=True, seed=3)(x, gt(1))
    c = build_attack("pgd", ssd, steps=0, random_start=True, seed=4)(x, gt(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0 < (a - x).abs().max() * 255 <= 8 + 1e-9
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        build_attack("pgd", ssd)(x * 2)
    with pytest.raises(ValueError, match="update"):
        build_attack("pgd", ssd, update="adam")


def test_gaussian_noise_ablation():
    x = torch.full((2, 3, 64, 64), 0.5, dtype=torch.float64)
    x[:, :, :8] = 0  # padding rows
    a = build_attack("gaussian", None, seed=1)(x)
    b = build_attack("gaussian", None, seed=1)(x)
    c = build_attack("gaussian", None, seed=2)(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    noise = (a - x)[:, :, 8:] * 255
    assert noise.std().item() == pytest.approx(9.0, rel=0.05) and abs(noise.mean().item()) < 0.3
    assert a.min() >= 0 and a.max() <= 1
    v = build_attack("gaussian", None, valid_only=True)(x)
    assert torch.equal(v[:, :, :8], x[:, :, :8])


def test_registry():
    names = dict(list_attacks())
    for n in ("pgd", "cls", "loc", "cwa", "mtd", "dag", "dag-eps", "dfool", "loc-shift", "size", "gaussian",
              "cls-pgd", "cls-si-pgd", "cls-mi-di-pgd", "cls-mi-ti-pgd"):
        assert n in names and names[n]
        assert issubclass(ATTACKS[n], Attack) and ATTACKS[n].__doc__
    with pytest.raises(KeyError, match="unknown attack"):
        build_attack("nope", None)
    with pytest.raises(TypeError, match="'pgd'"):
        build_attack("pgd", None, not_a_param=1)
    atk = build_attack("cls", None, eps=4, step=1, steps=7)
    assert (atk.eps, atk.step, atk.steps, atk.update) == (4.0, 1.0, 7, "sign")
    d = build_attack("dag", None)
    assert (d.eps, d.step, d.steps, d.update) == (None, 0.5, 150, "linf")
    assert (d.num_candidates, d.iou_thresh, d.prob_thresh, d.early_stop, d.strong, d.rpn_nms) == (
        3000, 0.1, 0.1, True, False, 0.9)
    for name in ("pgd", "cls", "loc", "cwa", "mtd"):  # RobustDet's evaluation setting (ALGORITHMS.md 1.6)
        a = build_attack(name, None)
        assert (a.eps, a.step, a.steps, a.update, a.random_start) == (8.0, 8.0, 20, "sign", False), name
    for name in ("dfool", "loc-shift", "size"):  # RAD sec. 4.1
        a = build_attack(name, None)
        assert (a.eps, a.step, a.steps, a.update) == (16.0, 2.0, 10, "mean_abs"), name
    assert build_attack("mtd", None).mode == "per_image" and build_attack("gaussian", None).sigma == 9.0
    r = build_attack("dag-eps", None)
    assert (r.eps, r.step, r.steps, r.update) == (16.0, 2.0, 10, "mean_abs")
