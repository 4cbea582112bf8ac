"""Attacks on the other detector families: the batched loss path, fixed two-stage proposals, DAG's
reference settings (RPN proposals, "strong" check), and small framework details (DI fill, classifier
labels from detection targets, scalar objectives)."""

from __future__ import annotations

import pytest
import torch

from advdet.attacks import DAG, DI, Attack, build_attack
from advdet.attacks.losses import per_image_losses, total_losses
from advdet.attacks.proposals import clean_proposals, dense_at, is_two_stage, rpn_settings
from advdet.models.torchvision_adapter import fasterrcnn_tiny, retinanet_tiny
from advdet.models.yolov3 import yolov3_small

S, K = 64, 3


def images(n: int, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    return torch.rand(n, 3, S, S, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def gt(n: int) -> list[dict]:
    base = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [28.0, 20.0, 60.0, 50.0]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.tensor([[10.0, 30.0, 34.0, 62.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},  # an image without objects
    ]
    return [{k: v.clone() for k, v in base[i % 3].items()} for i in range(n)]


@pytest.fixture(scope="module")
def frcnn():
    torch.manual_seed(0)
    return fasterrcnn_tiny(num_classes=K, input_size=S, fpn_channels=16, representation_size=32,
                           box_score_thresh=0.001).eval()


@pytest.mark.parametrize("family", ["retinanet", "yolov3"])
def test_batched_total_equals_per_image_sum(family):
    torch.manual_seed(0)
    model = (retinanet_tiny(num_classes=K, input_size=S, fpn_channels=16) if family == "retinanet"
             else yolov3_small(num_classes=K, input_size=S, width=0.125)).double().eval()
    assert model.loss_is_batch_mean
    x, tg = images(3).requires_grad_(True), gt(3)
    total = total_losses(model, x, tg)
    per = per_image_losses(model, x, tg)
    assert set(total) == set(per)
    for k in per:
        assert torch.allclose(total[k], per[k].sum(), rtol=1e-6), k
    g_total = torch.autograd.grad(sum(total.values()), x)[0]
    g_per = torch.autograd.grad(sum(v.sum() for v in per.values()), x)[0]
    assert g_total.abs().max() > 0
    assert torch.allclose(g_total, g_per, rtol=1e-6, atol=1e-6 * float(g_per.abs().max()))
    # PGD follows that gradient: its first step is the sign of it
    xa = build_attack("pgd", model, steps=1, eps=8, step=1)(x.detach(), tg)
    assert torch.equal((xa - x.detach()).sign(), g_per.sign() * (xa != x.detach()))


def test_total_objective_drives_the_loop_and_must_be_scalar():
    class Split(Attack):
        """per-image objective x . w, with a cheaper total whose gradient is 2x larger"""

        name, description = "split", "split"

        def objective(self, x_in, state):
            return x_in.flatten(1).sum(1)

        def total_objective(self, x_in, state):
            return 2 * x_in.sum()

    atk = Split(torch.nn.Identity(), update="mean_abs")
    x = images(2)
    assert torch.allclose(atk.gradient(x, {}), torch.full_like(x, 2.0))
    assert torch.allclose(atk.gradient(x, {}, objective=lambda xi, st: xi.flatten(1).sum(1)), torch.ones_like(x))
    assert torch.allclose(atk.gradient(x, {}, objective=lambda xi, st: 3 * xi.sum()), torch.full_like(x, 3.0))
    with pytest.raises(ValueError, match="one value per image"):
        atk.gradient(x, {}, objective=lambda xi, st: xi.sum(1))
    atk.total_objective = lambda xi, st: xi.flatten(1).sum(1)
    with pytest.raises(ValueError, match="scalar"):
        atk.gradient(x, {})


def test_two_stage_candidates_stay_the_clean_proposals(frcnn):
    assert is_two_stage(frcnn) and not is_two_stage(retinanet_tiny(num_classes=K, input_size=S, fpn_channels=16))
    x = images(2, dtype=torch.float32)
    d0 = frcnn.dense(x)
    props = clean_proposals(frcnn, d0)
    assert [p.shape[0] for p in props] == d0.valid.sum(1).tolist()
    x2 = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    moved = frcnn.dense(x2)
    fixed = dense_at(frcnn, x2, props)
    assert not torch.equal(moved.anchors, d0.anchors)  # the RPN re-proposes on another input
    assert torch.equal(fixed.anchors, d0.anchors) and torch.equal(fixed.valid, d0.valid)
    assert not torch.equal(fixed.logits, d0.logits)  # ... but the box head sees the new input
    # the attacks keep them: Dfool's candidates name the same proposals at every step
    tg = gt(2)
    atk = build_attack("dfool", frcnn, steps=3)
    xa = atk(x, tg)
    st = atk.last_state
    assert st["proposals"] is not None and st["matched"].any()
    before, after = atk.objective_values(x, xa, tg)
    assert (after > before).all()


def test_dag_on_two_stage_uses_the_reference_proposals(frcnn):
    rpn = frcnn.model.rpn
    saved = (rpn.nms_thresh, dict(rpn._pre_nms_top_n), dict(rpn._post_nms_top_n))
    x, tg = images(2, seed=4, dtype=torch.float32), gt(2)
    default_n = frcnn.dense(x).valid.sum(1)
    assert (default_n <= 300).all()  # the model's own test setting (post-NMS top 300)
    atk = DAG(frcnn, steps=6, gamma=8.0)
    with rpn_settings(frcnn, nms_thresh=0.9, post_nms_top_n=3000, pre_nms_top_n=3000):
        ref_n = frcnn.dense(x).valid.sum(1)
    assert (ref_n > default_n).all()  # NMS 0.9 and up to 3000 proposals keep many more
    assert (rpn.nms_thresh, rpn._pre_nms_top_n, rpn._post_nms_top_n) == saved  # restored
    xa = atk(x, tg)
    st = atk.last_state
    assert st["cand"].shape[1] == int(ref_n.max()) and [p.shape[0] for p in st["proposals"]] == ref_n.tolist()
    assert st["assigned"].any(1).all()
    assert (atk.fooled_fraction(xa) > 0).all()
    assert (rpn.nms_thresh, rpn._pre_nms_top_n, rpn._post_nms_top_n) == saved


def test_dag_strong_check_counts_weak_adversarial_boxes_as_unfooled():
    class Fixed(DAG):
        """DAG whose current predictions are given (the strong check alone)."""

        def predicted(self, x_in, state):
            return state["pred"], state["score"]

    atk = Fixed(torch.nn.Identity(), strong=True)
    boxes = torch.tensor([[[0.0, 0, 10, 10], [1, 1, 11, 11], [30, 30, 40, 40], [50, 50, 60, 60]]])
    state = {"assigned": torch.tensor([[True, True, True, True]]), "orig": torch.tensor([[0, 0, 1, 1]]),
             "adv": torch.tensor([[2, 2, 3, 3]]), "boxes0": boxes,
             # 0 and 1 overlap (IoU 0.68 > 0.35): NMS keeps 0 (0.9); 2 is adversarial but weak; 3 is original
             "pred": torch.tensor([[2, 2, 3, 1]]), "score": torch.tensor([[0.9, 0.5, 0.6, 0.9]])}
    x = torch.zeros(1, 3, 4, 4)
    assert atk.still_original(x, state).tolist() == [[False, False, True, True]]
    atk.strong = False  # the paper's rule: only box 3 is still predicted as its original label
    assert atk.still_original(x, state).tolist() == [[False, False, False, True]]


def test_classifier_attack_ignores_detection_targets():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 5)).double()
    x = images(2)
    atk = build_attack("cls-pgd", net, steps=1)
    atk(x, gt(2))  # detection dicts (as a dataset yields them) are not image labels
    assert torch.equal(atk.last_state["labels"], net(x).argmax(1))


def test_di_fill_value():
    x = torch.ones(1, 3, 20, 20, dtype=torch.float64) * 0.5
    white = DI.apply(x, (18, 18, 1, 1), fill=1.0)
    assert white[0, :, 0].eq(1.0).all() and white[0, :, :, 19].eq(1.0).all()
    assert torch.allclose(white[0, :, 1:19, 1:19], torch.tensor(0.5, dtype=torch.float64))
    assert DI.apply(x, (18, 18, 1, 1))[0, :, 0].eq(0.0).all()
    copies = DI(low=0.9, high=0.9, fill=1.0).copies(x, torch.Generator().manual_seed(0))
    assert all(c(x).max() == 1.0 for c in copies[1:])
    with pytest.raises(ValueError, match="fill"):
        DI(fill=2.0)


def test_pgd_subclass_with_its_own_objective_is_not_bypassed():
    """CWA (and any PGD subclass overriding ``objective``) follows its own objective's gradient."""
    torch.manual_seed(0)
    model = retinanet_tiny(num_classes=K, input_size=S, fpn_channels=16).double().eval()
    x, tg = images(2), gt(2)
    atk = build_attack("cwa", model, steps=1)
    state = {"targets": tg}
    xr = x.clone().requires_grad_(True)
    from advdet.attacks.losses import cwa_loss
    expected = torch.autograd.grad(cwa_loss(model, xr, tg).sum(), xr)[0]
    assert expected.abs().max() > 0
    assert torch.allclose(atk.gradient(x, state), expected, rtol=1e-6, atol=0)
    pgd_grad = build_attack("pgd", model).gradient(x, state)
    assert not torch.allclose(pgd_grad, expected, rtol=1e-2, atol=0)
