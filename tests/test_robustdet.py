"""RobustDet model side: dynamic convolution, AID, triplet mining/loss, CFR, RobustSSD and its objective."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advdet.models.aid import AID, aid_resnet18, aid_small
from advdet.models.cfr import CFR, CFRDecoder, _decoder_size, cfr_kld, cfr_recon_loss
from advdet.models.dynamic_conv import DynamicConv2d
from advdet.models.robustdet import (RobustSSD, robustdet_from_ssd, robustdet_loss, robustdet_small)
from advdet.models.ssd_vgg import CONV4_3_INDEX, ssd_vgg_small
from advdet.models.aid_triplet import (EMPTY_TRIPLET_LOSS, aid_triplet_loss, js_divergence, mine_triplets,
                                     pdist_js, triplet_loss)

S = 64


def _ssd(seed: int = 0):
    torch.manual_seed(seed)
    return ssd_vgg_small(num_classes=3, input_size=S, width=0.125).eval()


def _targets(n: int, clean: torch.Tensor | None = None) -> list[dict]:
    out = []
    for i in range(n):
        t = {"boxes": torch.tensor([[8.0 + i, 10.0, 40.0, 44.0 - i], [30.0, 30.0, 60.0, 58.0]]),
             "labels": torch.tensor([i % 3, (i + 1) % 3])}
        if clean is not None:
            t["clean_image"] = clean[i]
        out.append(t)
    return out


def _perturb_kernels(model: nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    """Make the K kernel slots differ (a fresh RobustSSD has identical slots, so pi would not matter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DynamicConv2d):
                m.weight.add_(torch.randn(m.weight.shape, generator=g) * scale * m.weight.std())


# ----------------------------------------------------------------------------------------- DynamicConv2d


@pytest.mark.parametrize("kw", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1),
                                dict(kernel_size=3, padding=2, dilation=2), dict(kernel_size=1),
                                dict(kernel_size=3, padding=1, groups=2, bias=False)])
def test_dynamic_conv_identical_kernels_equal_plain_conv(kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, **kw)
    d = DynamicConv2d.from_conv(conv, K=4)
    assert d.weight.shape == (4, 6, 4 // conv.groups, *conv.kernel_size)
    x = torch.randn(3, 4, 9, 9)
    pi = torch.randn(3, 4).softmax(-1)
    torch.testing.assert_close(d(x, pi), conv(x), rtol=1e-5, atol=1e-5)


def test_dynamic_conv_per_image_mixing():
    torch.manual_seed(0)
    d = DynamicConv2d(3, 5, 3, stride=1, padding=1, K=4)
    x = torch.randn(4, 3, 7, 7)
    pi = torch.randn(4, 4).softmax(-1)
    y = d(x, pi)
    for i in range(4):
        w_i = sum(pi[i, k] * d.weight[k] for k in range(4))
        b_i = sum(pi[i, k] * d.bias[k] for k in range(4))
        torch.testing.assert_close(d.mixed_weight(pi)[i], w_i)
        torch.testing.assert_close(y[i:i + 1], F.conv2d(x[i:i + 1], w_i, b_i, padding=1), rtol=1e-5, atol=1e-5)
    # a shared (K,) pi broadcasts over the batch
    torch.testing.assert_close(d(x, pi[0]), d(x, pi[:1].expand(4, -1)))
    with pytest.raises(ValueError, match="pi must have shape"):
        d(x, pi[:, :3])


def test_dynamic_conv_gradients_reach_every_kernel_and_pi():
    torch.manual_seed(0)
    d = DynamicConv2d(2, 3, 3, padding=1, K=3).double()
    x = torch.randn(2, 2, 5, 5, dtype=torch.double, requires_grad=True)
    logits = torch.randn(2, 3, dtype=torch.double, requires_grad=True)
    d(x, logits.softmax(-1)).square().sum().backward()
    for k in range(3):
        assert d.weight.grad[k].abs().sum() > 0 and d.bias.grad[k].abs().sum() > 0
    assert logits.grad.abs().sum() > 0 and x.grad.abs().sum() > 0
    pi = torch.rand(2, 3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda xx, pp: d(xx, pp), (x.detach().requires_grad_(), pi))


def test_dynamic_conv_from_conv_rejects_other_modules():
    with pytest.raises(TypeError):
        DynamicConv2d.from_conv(nn.Linear(3, 3))


# ------------------------------------------------------------------------------------------------ AID


def test_aid_outputs_probabilities():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64) * 60
    for aid in (aid_small(4), aid_resnet18(4)):
        aid.eval()
        p = aid(x)
        assert isinstance(aid, AID) and p.shape == (2, 4)
        torch.testing.assert_close(p.sum(-1), torch.ones(2))
    net = aid_resnet18(4).backbone
    assert isinstance(net.fc, nn.Linear) and (net.fc.in_features, net.fc.out_features) == (512, 4)


# ---------------------------------------------------------------------------------------- triplet loss


def _e(k: int) -> list[float]:
    v = [0.0] * 4
    v[k] = 1.0
    return v


# clean (0): e0, e0, e1; adversarial (1): e2, e0, e2. With one-hot vectors d(a, b) is 0 (same) or D (different),
# D = ln 2 (JS) or 2 (squared L2), and v_n = d(a,p) - d(a,n) + 0.6 <= 0 exactly when a == p and a != n.
HAND_PROBS = torch.tensor([_e(0), _e(0), _e(1), _e(2), _e(0), _e(2)])
HAND_LABELS = [0, 0, 0, 1, 1, 1]
HAND_VALID = {  # (anchor, positive) -> the valid (hard) negatives; (3, 5) has none and is skipped
    (0, 1): {4}, (0, 2): {3, 4, 5}, (1, 2): {3, 4, 5}, (3, 4): {0, 1, 2}, (4, 5): {0, 1, 2},
}


@pytest.mark.parametrize("distance", ["js", "sqeuclidean"])
def test_triplet_mining_hand_built_batch(distance):
    seen: dict[tuple[int, int], set[int]] = {k: set() for k in HAND_VALID}
    for seed in range(60):
        t = mine_triplets(HAND_PROBS, HAND_LABELS, distance=distance, generator=torch.Generator().manual_seed(seed))
        assert [tuple(r[:2]) for r in t.tolist()] == list(HAND_VALID)  # mining order, (3, 5) skipped
        for a, p, n in t.tolist():
            assert n in HAND_VALID[(a, p)]
            seen[(a, p)].add(n)
    assert seen == HAND_VALID  # the random choice covers every valid negative
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(mine_triplets(HAND_PROBS, HAND_LABELS, distance=distance, generator=g1),
                       mine_triplets(HAND_PROBS, HAND_LABELS, distance=distance, generator=g2))


def test_triplet_mining_reference_distance_makes_every_negative_hard():
    # pdist_js <= ln(2)/2 < 0.6 for K = 4: every (a, p) pair gets a (uniformly random) negative
    t = mine_triplets(HAND_PROBS, HAND_LABELS, distance="pdist_js", generator=torch.Generator().manual_seed(0))
    assert [tuple(r[:2]) for r in t.tolist()] == [(0, 1), (0, 2), (1, 2), (3, 4), (3, 5), (4, 5)]
    assert all(HAND_LABELS[n] != HAND_LABELS[a] for a, _, n in t.tolist())


def test_triplet_mining_fallback_and_empty():
    probs = torch.tensor([_e(0), _e(0), _e(1), _e(1)])
    # every pair is identical inside its label and far from the other: no hard negative at all ->
    # the reference's fallback: last (a, p) pair, first negative of the last label
    t = mine_triplets(probs, [0, 0, 1, 1], distance="js")
    assert t.tolist() == [[2, 3, 0]]
    assert mine_triplets(probs, [0, 0, 1, 1], distance="js", fallback=False).shape == (0, 3)
    # one label only: no negative, no triplet; code form -> constant 0.1, paper form -> 0
    p = probs.clone().requires_grad_()
    loss, t = aid_triplet_loss(p, [0, 0, 0, 0], form="code")
    assert t.shape == (0, 3) and loss.item() == pytest.approx(EMPTY_TRIPLET_LOSS) and not loss.requires_grad
    loss, _ = aid_triplet_loss(p, [0, 0, 0, 0], form="paper")
    assert loss.item() == 0.0 and loss.requires_grad


def _js_ref(p, q):
    m = [(a + b) / 2 for a, b in zip(p, q)]
    kl = lambda u: sum(a * math.log(a / c) for a, c in zip(u, m) if a > 0)  # noqa: E731
    return 0.5 * kl(p) + 0.5 * kl(q)


def test_triplet_loss_values_both_forms():
    a, p, n = [0.7, 0.1, 0.1, 0.1], [0.5, 0.2, 0.2, 0.1], [0.4, 0.1, 0.1, 0.4]
    probs = torch.tensor([a, p, n], dtype=torch.double, requires_grad=True)
    trip = torch.tensor([[0, 1, 2], [1, 0, 2]])
    # code form: squared L2 on the softmax vectors: 0.06 - 0.18 + 0.6 = 0.48 and 0.06 - 0.12 + 0.6 = 0.54
    assert triplet_loss(probs, trip, form="code").item() == pytest.approx(0.51)
    assert triplet_loss(probs, trip, form="code", reduction="sum").item() == pytest.approx(1.02)
    # paper form (eq. 2): JS divergence
    want = [max(0.0, _js_ref(a, p) - _js_ref(a, n) + 0.6), max(0.0, _js_ref(p, a) - _js_ref(p, n) + 0.6)]
    assert triplet_loss(probs, trip, form="paper", reduction="sum").item() == pytest.approx(sum(want))
    assert triplet_loss(probs, trip, form="paper").item() == pytest.approx(sum(want) / 2)
    triplet_loss(probs, trip, form="paper").backward()
    assert probs.grad.abs().sum() > 0
    # distances: JS of identical = 0, of disjoint = ln 2; pdist_js = (2 / K) JS
    e0, e1 = torch.tensor(_e(0)), torch.tensor(_e(1))
    assert js_divergence(e0, e0).item() == 0.0 and js_divergence(e0, e1).item() == pytest.approx(math.log(2))
    pa, pn = torch.tensor(a), torch.tensor(n)
    assert pdist_js(pa, pn).item() == pytest.approx(2 / 4 * _js_ref(a, n), rel=1e-5)
    with pytest.raises(ValueError):
        triplet_loss(probs, trip, form="kl")


# ------------------------------------------------------------------------------------------------- CFR


def test_cfr_losses_match_formulas():
    mu = torch.tensor([[1.0, 2.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)]])
    # eq. 4: sum_i 1/(2N) (-log s_i^2 + mu_i^2 + s_i^2 - 1) with N = 2
    assert cfr_kld(mu, logvar).item() == pytest.approx((6 - math.log(2)) / 4)
    assert cfr_kld(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)).item() == 0.0
    recon, clean = torch.full((2, 3, 4, 4), 2.0), torch.zeros(2, 3, 4, 4)
    clean[0, 0, 0, 0] = 6.0
    assert cfr_recon_loss(recon, clean).item() == pytest.approx((4 * 95 + 16) / 96)
    with pytest.raises(ValueError):
        cfr_recon_loss(recon, clean[:, :, :2])


def test_cfr_decoder_sizes():
    assert _decoder_size(38) == 300  # the reference 300 px layout, no resize needed
    dec = CFRDecoder(16, 300)
    y = dec.layers(torch.randn(1, 16, 38, 38))
    assert y.shape == (1, 3, 300, 300)
    small = CFRDecoder(64, 64).eval()  # 8x8 map of a 64 px input -> 60 px, resized to 64
    out = small(torch.randn(2, 64, 8, 8))
    assert out.shape == (2, 3, 64, 64) and out.abs().max() <= 160.0


def test_cfr_heads_init_clamp_and_sampling():
    torch.manual_seed(0)
    mu_head = DynamicConv2d.from_conv(nn.Conv2d(4, 8, 3, padding=1), K=4)
    cfr = CFR(mu_head, 16)
    lv = cfr.logvar_head
    assert lv is not mu_head and not torch.equal(lv.weight, mu_head.weight)
    assert torch.all(lv.bias == 0)
    bound = math.sqrt(6 / (4 * 9 + 8 * 9))  # Xavier-uniform bound of one (8, 4, 3, 3) kernel
    assert lv.weight.abs().max() <= bound and lv.weight.abs().max() > 0.5 * bound
    with torch.no_grad():
        lv.bias.fill_(100.0)
    h, pi = torch.randn(2, 4, 5, 5), torch.full((2, 4), 0.25)
    assert torch.all(cfr.logvar(h, pi) == 10.0)
    mu, logvar = torch.zeros(1000), torch.full((1000,), math.log(4.0))
    z = CFR.sample(mu, logvar)
    assert z.std().item() == pytest.approx(2.0, rel=0.15)


# ------------------------------------------------------------------------------------------- RobustSSD


def test_robustssd_structure_and_identity_to_ssd():
    ssd = _ssd()
    before = {k: v.clone() for k, v in ssd.state_dict().items()}
    for cfr in (False, True):
        r = robustdet_from_ssd(ssd, K=4, cfr=cfr).eval()
        assert isinstance(r, RobustSSD) and r.family == "robustdet" and r.num_classes == 3
        for lst in (r.model.vgg, r.model.extras, r.model.loc, r.model.conf):
            assert not any(type(m) is nn.Conv2d for m in lst)
        n_plain = sum(isinstance(m, nn.Conv2d) for lst in (ssd.model.vgg, ssd.model.extras, ssd.model.loc,
                                                           ssd.model.conf) for m in lst)
        n_dyn = sum(isinstance(m, DynamicConv2d) for lst in (r.model.vgg, r.model.extras, r.model.loc,
                                                             r.model.conf) for m in lst)
        assert n_dyn == n_plain and isinstance(r.model.vgg[CONV4_3_INDEX], DynamicConv2d)
        assert all(m.K == 4 for m in r.modules() if isinstance(m, DynamicConv2d) and m is not None)
        x = torch.rand(2, 3, S, S)
        d0, d1 = ssd.dense(x), r.dense(x)
        torch.testing.assert_close(d1.logits, d0.logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(d1.boxes, d0.boxes, rtol=1e-4, atol=1e-3)
        assert d1.extra["pi"].shape == (2, 4)
        for pi in (torch.tensor([[1.0, 0, 0, 0], [0, 0, 0.3, 0.7]]), torch.randn(2, 4).softmax(-1)):
            torch.testing.assert_close(r.dense(x, pi).logits, d0.logits, rtol=1e-4, atol=1e-4)
        tg = _targets(2)
        l0, l1 = ssd.loss(x, tg), r.loss(x, tg)
        assert set(l1) == {"cls", "loc"}
        for k in ("cls", "loc"):
            assert l1[k].item() == pytest.approx(l0[k].item(), rel=1e-4)
        p0, p1 = ssd.predict(x), r.predict(x)
        torch.testing.assert_close(p1[0]["scores"], p0[0]["scores"], rtol=1e-4, atol=1e-4)
    for k, v in ssd.state_dict().items():  # the SSD is untouched
        assert torch.equal(v, before[k])


def test_robustssd_state_dict_has_no_shared_tensors():
    r = robustdet_small(num_classes=3, input_size=S, cfr=True)
    sd = r.state_dict()
    ptrs = [v.data_ptr() for v in sd.values() if v.numel()]
    assert len(ptrs) == len(set(ptrs))
    r2 = robustdet_small(num_classes=3, input_size=S, cfr=True)
    r2.load_state_dict(sd)


def test_gradients_reach_the_aid_through_dense():
    r = robustdet_from_ssd(_ssd(), cfr=False).eval()
    _perturb_kernels(r)
    x = torch.rand(2, 3, S, S, requires_grad=True)
    r.dense(x).logits.logsumexp(-1).sum().backward()
    aid_grad = sum(p.grad.abs().sum() for p in r.model.aid.parameters() if p.grad is not None)
    assert aid_grad > 0
    g_adaptive = x.grad.clone()
    x.grad = None
    pi = r.aid_probs(x).detach()
    r.dense(x, pi).logits.logsumexp(-1).sum().backward()
    assert not torch.allclose(g_adaptive, x.grad)  # the AID path contributes to the input gradient
    # a loss-based attack step works on it (e.g. A_cls)
    x2 = torch.rand(1, 3, S, S, requires_grad=True)
    r.loss(x2, _targets(1))["cls"].backward()
    assert torch.isfinite(x2.grad).all() and x2.grad.abs().sum() > 0


def test_robustssd_cfr_sampling_and_losses():
    torch.manual_seed(0)
    r = robustdet_from_ssd(_ssd(), cfr=True)
    x = torch.rand(2, 3, S, S)
    clean = torch.rand(2, 3, S, S)
    r.eval()
    torch.testing.assert_close(r.dense(x).logits, r.dense(x).logits)  # eval: mu, deterministic
    tg = _targets(2, clean)
    losses = r.loss(x, tg)
    assert set(losses) == {"cls", "loc", "re", "kld"}
    out = r.model.run(r.normalize(x), decode=True)
    torch.testing.assert_close(out["z"], out["mu"])
    torch.testing.assert_close(losses["re"], F.mse_loss(out["recon"], clean * 255 - r.mean))
    mu, lv = out["mu"], out["logvar"]
    torch.testing.assert_close(losses["kld"], -0.5 * torch.mean(1 + lv - mu ** 2 - lv.exp()))
    assert lv.max() <= 10.0
    r.train()
    a, b = r.dense(x).logits, r.dense(x).logits
    assert not torch.allclose(a, b)  # train: z = mu + sigma * eps is sampled
    out = r.model.run(r.normalize(x))
    assert not torch.allclose(out["z"], out["mu"])


@pytest.mark.parametrize("cfg", [dict(cfr=False, triplet="code"), dict(cfr=True, triplet="paper", adc=True),
                                 dict(cfr=True, triplet="code", cfr_divisor=255.0)])
def test_robustdet_loss_runs_and_backprops(cfg):
    cfg = dict(cfg)
    cfr = cfg.pop("cfr")
    torch.manual_seed(0)
    r = robustdet_from_ssd(_ssd(), cfr=cfr).train()
    _perturb_kernels(r)
    x_clean, x_src = torch.rand(2, 3, S, S), torch.rand(2, 3, S, S)
    x_adv = (x_src + 0.03 * torch.randn_like(x_src)).clamp(0, 1)
    t_clean, t_adv = _targets(2), _targets(2, x_src if cfr else None)
    out = robustdet_loss(r, x_clean, t_clean, x_adv, t_adv, generator=torch.Generator().manual_seed(0), **cfg)
    want = 0.75 * (out["det"] + 3 * out["aid"])
    if cfr:
        want = want + (0.16 * out["re"] + 5 * out["kld"]) / cfg.get("cfr_divisor", 1.0)
    torch.testing.assert_close(out["loss"], want)
    torch.testing.assert_close(out["det"], out["cls"] + out["loc"])
    assert out["n_triplets"].item() >= 1 and out["pi"].shape == (4, 4)
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in r.parameters() if p.grad is not None)
    assert sum(p.grad.abs().sum() for p in r.model.aid.parameters() if p.grad is not None) > 0
    conv = r.model.vgg[0]
    assert all(conv.weight.grad[k].abs().sum() > 0 for k in range(conv.K))
    if cfr:
        assert r.model.cfr.logvar_head.weight.grad.abs().sum() > 0
        assert r.model.cfr.decoder.layers[0].weight.grad.abs().sum() > 0
        with pytest.raises(ValueError, match="clean images of the adversarial batch"):
            robustdet_loss(r, x_clean, t_clean, x_adv, _targets(2))
        # x_adv_clean given explicitly gives the same reconstruction target
        torch.manual_seed(1)
        o1 = robustdet_loss(r, x_clean, t_clean, x_adv, t_adv, generator=torch.Generator().manual_seed(0))
        torch.manual_seed(1)
        o2 = robustdet_loss(r, x_clean, t_clean, x_adv, _targets(2), x_adv_clean=x_src,
                            generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(o1["loss"], o2["loss"])


def test_robustdet_loss_decreases_with_a_few_steps():
    torch.manual_seed(0)
    r = robustdet_from_ssd(_ssd(), cfr=False).train()
    x_clean, x_adv = torch.rand(2, 3, S, S), torch.rand(2, 3, S, S)
    t_clean, t_adv = _targets(2), _targets(2)
    opt = torch.optim.Adam(r.parameters(), lr=1e-3)

    def step() -> float:
        out = robustdet_loss(r, x_clean, t_clean, x_adv, t_adv, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        return out["loss"].item(), out["aid"].item()

    losses, aid = zip(*[step() for _ in range(6)])
    assert losses[-1] < 0.8 * losses[0], losses
    assert aid[-1] < aid[0], aid  # the AID starts to separate clean from adversarial


def test_aid_cross_entropy_value_and_term_in_the_loss():
    from advdet.models.aid import aid_cross_entropy

    pi = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25], [0.0, 1.0, 0.0, 0.0]])
    want = -(math.log(0.7) + math.log(0.25) + math.log(1.0)) / 3
    assert aid_cross_entropy(pi, torch.tensor([0, 1, 1])).item() == pytest.approx(want, rel=1e-6)
    assert math.isfinite(aid_cross_entropy(pi, torch.tensor([0, 1, 0])).item())  # log 0 clamped
    torch.manual_seed(0)
    r = robustdet_from_ssd(_ssd(), cfr=False).train()
    x_clean, x_adv = torch.rand(2, 3, S, S), torch.rand(2, 3, S, S)
    kw = dict(generator=torch.Generator().manual_seed(0))
    base = robustdet_loss(r, x_clean, _targets(2), x_adv, _targets(2), **kw)
    kw = dict(generator=torch.Generator().manual_seed(0))
    out = robustdet_loss(r, x_clean, _targets(2), x_adv, _targets(2), aid_ce=2.0, **kw)
    assert "ce" not in base
    torch.testing.assert_close(out["ce"], aid_cross_entropy(out["pi"], torch.tensor([0, 0, 1, 1])))
    torch.testing.assert_close(out["loss"], base["loss"] + 2.0 * out["ce"])


def test_aid_cross_entropy_separates_what_the_triplet_loss_cannot_from_a_collapsed_start():
    """docs/robustdet.md: with every softmax vector equal, the squared-L2 triplet loss sits at its margin with
    zero gradient; the cross-entropy moves the AID towards kernel 0 for clean, kernel 1 for adversarial."""
    from advdet.models.aid import aid_cross_entropy

    torch.manual_seed(0)
    aid = aid_small(4)
    nn.init.zeros_(aid.backbone.fc.weight)
    nn.init.zeros_(aid.backbone.fc.bias)  # collapsed: pi = 1/4 for every image
    x = torch.rand(8, 3, 32, 32) * 255
    x[4:] += 20 * torch.randn(4, 3, 32, 32)  # "adversarial" half: noisier images
    labels = torch.tensor([0] * 4 + [1] * 4)
    pi = aid(x)
    loss, _ = aid_triplet_loss(pi, labels, generator=torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(0.6, abs=1e-6)
    loss.backward()
    assert all(p.grad is None or p.grad.abs().max() < 1e-8 for p in aid.parameters())
    aid.zero_grad()
    opt = torch.optim.SGD(aid.parameters(), lr=0.05, momentum=0.9)
    for _ in range(30):
        opt.zero_grad()
        aid_cross_entropy(aid(x), labels).backward()
        opt.step()
    aid.eval()
    with torch.no_grad():
        pi = aid(x)
    assert (pi[:4, 0] > pi[:4, 1]).all() and (pi[4:, 1] > pi[4:, 0]).all()
