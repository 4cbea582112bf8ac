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
    ta, tb = (s["targets"] for s in atk.last_state["members"])
    assert torch.equal(ta[0]["boxes"], pseudo_targets(a, x)[0]["boxes"])
    assert torch.equal(tb[0]["boxes"], pseudo_targets(b, x)[0]["boxes"])
    assert len(ta[0]["boxes"]) >= 1 and len(tb[0]["boxes"]) >= 1


def test_ensemble_needs_members_of_one_input_size():
    with pytest.raises(ValueError, match="share one input size"):
        SurrogateEnsemble([_ssd(0), ssd_vgg_small(num_classes=K, input_size=96, width=0.125)])
    with pytest.raises(ValueError, match="at least one"):
        SurrogateEnsemble([])


# ------------------------------------------------------------------------------ ensembles of any attack (issue 24)
from advdet.attacks.batches import letterbox_mask  # noqa: E402
from advdet.attacks.ensemble import EnsembleAttack, EnsembleError, parse_ensemble  # noqa: E402
from advdet.data.errors import AdvdetError, UnknownNameError  # noqa: E402
from advdet.data.letterbox import letterbox_params  # noqa: E402

SINGLE = {  # fast settings of the attacks compared with their ensembles of identical members
    "pgd": dict(steps=2),
    "rad": dict(steps=1, transforms=[], micro_batch=None),
}


@pytest.mark.parametrize("name", list(SINGLE))
@pytest.mark.parametrize("ens_kw", [{"normalize": False}, {}, {"weights": "loss"},
                                    {"weights": "loss", "normalize": True}], ids=["raw", "l1", "loss", "loss-l1"])
def test_ensemble_of_identical_surrogates_equals_one_surrogate(name, ens_kw):
    m = _ssd(0)
    x = torch.rand(2, 3, S, S, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    p = letterbox_params(48, 64, S)  # padding rows above and below the image content
    x = x * letterbox_mask([p, p], S, S)
    mask = letterbox_mask([p, p], S, S)
    single = build_attack(name, m, **SINGLE[name])(x, None, mask=mask)
    atk = build_attack(name, SurrogateEnsemble([m, m], ["a", "b"]), **SINGLE[name], **ens_kw)
    assert isinstance(atk, EnsembleAttack) and atk.attack_name == name
    ens = atk(x, None, mask=mask)
    assert not torch.equal(single, x)
    assert torch.allclose(ens, single, atol=1e-10, rtol=0)
    w = atk.last_state["weights"]
    assert torch.allclose(w, torch.full_like(w, 0.5))


@pytest.mark.parametrize("normalize", [False, True, None], ids=["raw", "l1", "default-l1"])
def test_two_member_gradient_is_the_weighted_mean_of_the_members_gradients(normalize):
    a, b = _ssd(0), _ssd(1)
    x = torch.rand(2, 3, S, S, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    tg = _gt(2)
    kw = {} if normalize is None else {"normalize": normalize}
    atk = build_attack("pgd", SurrogateEnsemble([a, b]), weights=[1, 3], **kw)
    normalize = True if normalize is None else normalize  # the default: every member's gradient L1-normalised
    assert atk.hyperparameters()["normalize"] is normalize
    assert atk.weights == [0.25, 0.75]
    state = atk._prepare_state(x, tg, None)
    atk.on_step(0, x, state)
    got = atk.gradient(x, state)
    want = torch.zeros_like(x)
    for w, m in ((0.25, a), (0.75, b)):
        xr = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(sum_keys(total_losses(m, xr, tg), None), xr)
        want += w * (g / g.abs().flatten(1).mean(1).view(-1, 1, 1, 1) if normalize else g)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)
    # the per-image objective is the weighted mean of the members' objectives
    obj = atk.objective(x, state)
    pa = atk.members[0].objective(x, state["members"][0])
    pb = atk.members[1].objective(x, state["members"][1])
    assert torch.allclose(obj, 0.25 * pa + 0.75 * pb)


def test_loss_weights_balance_the_members_objectives():
    a, b = _ssd(0), _ssd(1)
    x = torch.rand(2, 3, S, S, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    atk = build_attack("pgd", SurrogateEnsemble([a, b]), weights="loss", steps=1)
    state = atk._prepare_state(x, _gt(2), None)
    atk.on_step(0, x, state)
    w = state["weights"]
    la = atk.members[0].objective(x, state["members"][0]).abs()
    lb = atk.members[1].objective(x, state["members"][1]).abs()
    assert torch.allclose(w.sum(1), torch.ones(2, dtype=w.dtype))
    assert torch.allclose(w[:, 0] * la, w[:, 1] * lb)  # every weighted term has the same magnitude


def test_ens_pgd_is_pgd_on_an_ensemble_with_l1_normalisation():
    a, b = _ssd(0), _ssd(1)
    ens = SurrogateEnsemble([a, b])
    x = torch.rand(1, 3, S, S, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    one = build_attack("ens-pgd", ens, steps=2)(x, _gt(1))
    two = build_attack("pgd", ens, eps=16, step=2, steps=2, normalize=True)(x, _gt(1))
    assert torch.equal(one, two)


def test_parse_ensemble_and_errors():
    assert parse_ensemble("yolov3+fasterrcnn+fcos") == ["yolov3", "fasterrcnn", "fcos"]
    assert parse_ensemble("yolov3") == ["yolov3"]
    with pytest.raises(EnsembleError, match="empty member"):
        parse_ensemble("yolov3++fcos")
    ens = SurrogateEnsemble([_ssd(0), _ssd(1)], ["a", "b"])
    with pytest.raises(AdvdetError, match="runs its own loop"):
        build_attack("mtd", ens)
    with pytest.raises(AdvdetError, match="image classifier"):
        build_attack("cls-pgd", ens)
    with pytest.raises(AdvdetError, match="2 weights for 3 members|3 members"):
        build_attack("pgd", SurrogateEnsemble([_ssd(0)] * 3), weights=[1, 2])
    with pytest.raises(AdvdetError, match="weights must be one of"):
        build_attack("pgd", ens, weights="biggest")
    with pytest.raises(AdvdetError, match="attack 'pgd'"):
        build_attack("pgd", ens, nodes=3)  # an option the member attack does not have


def test_unknown_ensemble_member_is_one_clear_error():
    from advdet.bench.loading import load_ensemble, load_model

    models = {"a": _ssd(0)}

    def load(name):
        return load_model(name, model=models.get(name)) if name in models else load_model(name)

    with pytest.raises(UnknownNameError, match="ensemble 'a\\+nope': unknown member 'nope'"):
        load_ensemble("a+nope", load)
    lm = load_ensemble("a+a", load)
    assert lm.input_size == S and lm.info()["members"].keys() == {"a"}


def test_plan_rows_leave_one_out():
    from advdet.bench.transfer_rows import ABLATION, NO_ATTACK, ensemble_members, plan_rows

    pool = ["yolov3", "ssd_vgg", "fcos"]
    rows = plan_rows(["yolov3+fcos"], ["pgd", "cls-pgd"], leave_one_out=pool)
    assert [r.label for r in rows] == [NO_ATTACK, ABLATION, "pgd", "ens-pgd without yolov3", "ens-pgd without ssd_vgg",
                                       "ens-pgd without fcos", "cls-pgd"]
    assert rows[2].surrogate == "yolov3+fcos" and rows[2].held_out is None
    assert [(r.surrogate, r.held_out) for r in rows[3:6]] == [
        ("ssd_vgg+fcos", "yolov3"), ("yolov3+fcos", "ssd_vgg"), ("yolov3+ssd_vgg", "fcos")]
    assert rows[6].surrogate == "classifier" and rows[6].held_out is None  # classifier attacks: no ensembles
    assert ensemble_members("ssd_vgg+fcos") == ["ssd_vgg", "fcos"] and ensemble_members(None) == []
    rows = plan_rows([], ["rad"], leave_one_out=pool, eps=[8, 16])
    assert [r.label for r in rows[2:4]] == ["ens-rad without yolov3 eps=8", "ens-rad without yolov3 eps=16"]
    rows = plan_rows([], ["ens-pgd"], leave_one_out=pool)  # an ensemble attack keeps its own name
    assert [r.label for r in rows[2:]] == ["ens-pgd without yolov3", "ens-pgd without ssd_vgg", "ens-pgd without fcos"]
    with pytest.raises(ValueError, match="'pgd' and 'ens-pgd' both make the row 'ens-pgd without yolov3'"):
        plan_rows([], ["pgd", "ens-pgd"], leave_one_out=pool)
    with pytest.raises(ValueError, match="at least two"):
        plan_rows([], ["rad"], leave_one_out=["yolov3"])


ENSEMBLE_FAST = {"pgd": dict(steps=2), "cls": dict(steps=2), "cwa": dict(steps=2), "dag-eps": dict(steps=2),
                 "dfool": dict(steps=2), "loc-shift": dict(steps=2), "size": dict(steps=2),
                 "rad": dict(steps=1, transforms=[], micro_batch=None),
                 "osfd": dict(steps=2, theta=0, s_max=1.0, sigma=0)}


@pytest.mark.parametrize("name", list(ENSEMBLE_FAST))
def test_attacks_on_a_two_family_ensemble_stay_in_budget_and_raise_the_mean_objective(name):
    from advdet.models.yolov3 import yolov3_small

    torch.manual_seed(2)
    yolo = yolov3_small(num_classes=K, input_size=S).double().eval()
    ens = SurrogateEnsemble([_ssd(0), yolo], ["ssd", "yolo"])
    x = torch.rand(2, 3, S, S, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    atk = build_attack(name, ens, **ENSEMBLE_FAST[name], normalize=True)
    xa = atk(x, _gt(2))
    assert xa.shape == x.shape and (xa - x).abs().max() * 255 <= atk.eps + 1e-9 and not torch.equal(xa, x)
    assert [type(m).__name__ for m in atk.members] == [type(atk.members[0]).__name__] * 2
    # DAG's objective counts only the candidates still predicted as before; RAD re-selects its nodes and, on
    # these random-weight models, one step on the ssd member alone already lowers one image's objective
    if name not in ("dag-eps", "rad"):
        before, after = atk.objective_values(x, xa, _gt(2))
        assert (after > before).all(), (before, after)
