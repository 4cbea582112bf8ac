"""RAD (attacks/rad.py) on tiny random-init detectors: it lowers the relevance of its target nodes
(white-box), stays within eps / [0, 1] / the letterboxed area, batch == singles, static vs dynamic node
sets, loc / size nodes, the reference preset (SI step, second term on the clean ranking and raw logits,
gray padding, diagnostics), the paper preset, a gradcheck of the RAD loss itself, the registry, and every
detector family."""

from __future__ import annotations

import pytest
import torch

from advdet.attacks import DI, MI, SI, TI, build_attack
from advdet.attacks.base import Attack
from advdet.attacks.rad import GRAY, PRESETS, RAD, rad_loss, second_term, top_ranked
from advdet.attacks.registry import ATTACKS
from advdet.models.ssd_vgg import ssd_vgg_small
from advdet.relevance import NodeSelection, TrackedNodes, relevance_map
from advdet.relevance.nodes import candidate_scores

S = 64
SI2 = dict(transforms=[SI(scales=2, extra_unscaled=False)])  # a cheaper SI for the tests


@pytest.fixture(scope="module")
def ssd():
    torch.manual_seed(0)
    return ssd_vgg_small(num_classes=3, input_size=S, width=0.125).double().eval()


def images(n: int, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    return torch.rand(n, 3, S, S, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("preset", ["reference", "paper"])
def test_rad_lowers_relevance_of_its_target_nodes(ssd, preset):
    """White-box: 3 RAD steps cut the positive relevance of the (fixed, clean-image) top-20 nodes by more
    than half, and far more than random +-eps noise does."""
    x = images(2)
    atk = RAD(ssd, preset=preset, steps=3, **SI2)
    xa = atk(x)
    nodes = relevance_map(ssd, x, NodeSelection()).nodes
    variant = PRESETS[preset]["variant"]

    def positive(xx):
        return rad_loss(relevance_map(ssd, xx, nodes, variant=variant).per_channel, "positive")

    loss0, loss_rad = positive(x), positive(xa)
    assert (loss0 > 0).all()
    assert (loss_rad < 0.5 * loss0).all(), (loss0, loss_rad)
    noise = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype) * 2 - 1
    loss_noise = positive((x + noise * 16 / 255).clamp(0, 1))
    assert (loss0 - loss_rad > 3 * (loss0 - loss_noise).abs()).all()


def test_budget_range_and_letterbox_padding(ssd):
    x = images(2, seed=2)
    x[:, :, :10] = 0  # letterbox padding rows (RAD's valid mask: nonzero pixels)
    xa = RAD(ssd, steps=2, **SI2)(x)
    assert xa.shape == x.shape and xa.dtype == x.dtype
    assert xa.min() >= 0 and xa.max() <= 1
    assert (xa - x).abs().max().item() * 255 <= 16 + 1e-9
    assert torch.equal(xa[:, :, :10], x[:, :, :10])
    assert (xa[:, :, 10:] - x[:, :, 10:]).abs().max().item() * 255 > 3  # the image itself moved
    free = RAD(ssd, steps=1, valid_only=False, transforms=[])(x)
    assert not torch.equal(free[:, :, :10], x[:, :, :10])


def test_batch_of_two_equals_two_singles_and_micro_batches(ssd):
    x = images(3, seed=3)
    atk = RAD(ssd, steps=2, micro_batch=None, **SI2)  # SI only: deterministic; one relevance graph for all
    both = atk(x)
    d_both = atk.last_state["diagnostics"].as_dict()
    singles = torch.cat([atk(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(both, singles, rtol=0, atol=1e-9)
    micro = RAD(ssd, steps=2, micro_batch=2, **SI2)
    torch.testing.assert_close(micro(x), both, rtol=0, atol=1e-9)
    st = micro.last_state
    assert st["node_counts"] == [[20, 20, 20], [20, 20, 20]] and st["x"].shape[0] == 3
    d_micro = st["diagnostics"].as_dict()
    assert d_micro["gradient_evaluations"] == d_both["gradient_evaluations"] == 3 * 2 * 2
    for key in ("mean_abs_delta", "share_at_eps", "second_term_share"):
        assert d_micro[key] == pytest.approx(d_both[key], rel=1e-9)
    assert d_micro["relevance_per_iteration"] == pytest.approx(d_both["relevance_per_iteration"], rel=1e-9)
    assert RAD(ssd).chunk_size(x) == 1 and RAD(ssd, micro_batch=None).chunk_size(x) == 3


def test_dynamic_node_selection(ssd):
    x = images(2, seed=4)
    with torch.no_grad():
        _, pre, _ = candidate_scores(ssd, ssd.dense(x))
    thr = float(pre.flatten().sort(descending=True).values[60])  # about 30 nodes per image
    expected = [int((pre[b] > thr).sum()) for b in range(2)]
    assert expected != [20, 20] and min(expected) > 0
    dyn = RAD(ssd, steps=1, nodes="dynamic", threshold=thr, transforms=[])
    xd = dyn(x)
    assert dyn.last_state["node_counts"][0] == expected
    stat = RAD(ssd, steps=1, transforms=[])
    xs = stat(x)
    assert stat.last_state["node_counts"][0] == [20, 20]
    assert not torch.allclose(xd, xs)
    capped = RAD(ssd, steps=1, nodes="dynamic", threshold=thr, max_nodes=5, transforms=[])
    capped(x)
    assert capped.last_state["node_counts"][0] == [5, 5]


@pytest.mark.parametrize("node_type", ["loc", "size"])
def test_loc_and_size_nodes(ssd, node_type):
    x = images(1, seed=5)
    atk = RAD(ssd, steps=1, m=5, node_type=node_type, transforms=[])
    xa = atk(x)
    assert atk.last_state["node_counts"][0] == [10]  # two box-regression nodes per box
    assert torch.isfinite(xa).all() and not torch.equal(xa, x)
    assert (xa - x).abs().max().item() * 255 <= 16 + 1e-9


@pytest.mark.parametrize("kw", [dict(loss="sum", variant="paper"), dict(loss="positive"), dict(variant="paper"),
                                dict(outputs="scores"), dict(preset="paper")])
def test_options_run(ssd, kw):
    x = images(1, seed=6)
    xa = RAD(ssd, steps=1, **{"transforms": [], **kw})(x)
    assert torch.isfinite(xa).all() and not torch.equal(xa, x)


def test_transforms_di_ti_mi_and_seed(ssd):
    x = images(1, seed=7)

    def run(seed):
        return RAD(ssd, steps=1, transforms=[SI(scales=2, extra_unscaled=False), DI(copies=1), TI(size=3), MI()],
                   seed=seed)(x)

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a - x).abs().max().item() * 255 <= 16 + 1e-9


# ------------------------------------------------------------------------------------------ reference preset
class _Toy(Attack):
    """A toy objective with a known gradient: sum_j w_j sin(3 x_j) per image."""

    def prepare(self, x, targets):
        return {"w": torch.linspace(-1, 2, x[0].numel(), dtype=x.dtype).view_as(x[0])}

    def objective(self, x_in, state):
        return (state["w"] * torch.sin(3 * x_in)).flatten(1).sum(1)


def _toy_grad(x, w):
    return 3 * w * torch.cos(3 * x)


def test_reference_si_step_is_alpha_times_mean_of_normalised_terms():
    """RAD's code: d_i = g_i * N / ||g_i||_1 for the 5 SI inputs x, x/2, x/4, x/8, x (utils.build_direction),
    step x + alpha/255 * mean_i d_i, the average not normalised again (utils.calculate_direction)."""
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w = torch.linspace(-1, 2, x[0].numel(), dtype=x.dtype).view_as(x[0])
    terms = []
    for s in (1.0, 1.0, 0.5, 0.25, 0.125):
        g = s * _toy_grad(s * x, w)  # chain rule through x * s
        terms.append(g * g[0].numel() / g.flatten(1).abs().sum(1).view(-1, 1, 1, 1))
    expected = (x + 2.0 / 255 * sum(terms) / 5).clamp(0, 1)
    got = _Toy(torch.nn.Identity(), eps=None, step=2.0, steps=1, update="term_mean_abs", transforms=[SI()])(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    # the average is shorter than alpha where the terms disagree; eq. 5 (mean_abs) renormalises it
    mean_d = sum(terms) / 5
    assert (mean_d.flatten(1).abs().mean(1) < 0.999).all()
    renorm = _Toy(torch.nn.Identity(), eps=None, step=2.0, steps=1, update="mean_abs", transforms=[SI()])(x)
    torch.testing.assert_close(renorm, (x + 2.0 / 255 * mean_d / mean_d.flatten(1).abs().mean(1).view(-1, 1, 1, 1)
                                        ).clamp(0, 1), rtol=0, atol=1e-12)
    assert not torch.allclose(renorm, got)


def test_reference_ti_filters_each_term_before_its_normalisation():
    x = torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    w = torch.linspace(-1, 2, x[0].numel(), dtype=x.dtype).view_as(x[0])
    k1 = torch.exp(-0.5 * torch.linspace(-3, 3, 5, dtype=torch.float64) ** 2)
    kern = torch.outer(k1, k1) / torch.outer(k1, k1).sum()

    def smooth(g):  # an independent depthwise Gaussian filter, zero padding
        pad = torch.nn.functional.pad(g, (2, 2, 2, 2))
        return sum(kern[i, j] * pad[..., i:i + 12, j:j + 12] for i in range(5) for j in range(5))

    terms = []
    for s in (1.0, 0.5):
        g = smooth(s * _toy_grad(s * x, w))
        terms.append(g / g.abs().mean())
    expected = (x + 2.0 / 255 * sum(terms) / 2).clamp(0, 1)
    got = _Toy(torch.nn.Identity(), eps=None, step=2.0, steps=1, update="term_mean_abs", filter_terms=True,
               transforms=[SI(scales=2, extra_unscaled=False), TI(size=5)])(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    once = _Toy(torch.nn.Identity(), eps=None, step=2.0, steps=1, update="term_mean_abs",
                transforms=[SI(scales=2, extra_unscaled=False), TI(size=5)])(x)
    assert not torch.allclose(once, got)


def _yolo(objectness_bias: float | None = None, class_bias: float = 0.0, dtype=torch.float32):
    from advdet.models.yolov3 import yolov3_small

    torch.manual_seed(1)
    det = yolov3_small(num_classes=3, input_size=S)
    with torch.no_grad():
        for head in (det.model.head32, det.model.head16, det.model.head8):
            head.out.bias.view(3, 8)[:, 5:] = class_bias
            if objectness_bias is not None:
                head.out.bias.view(3, 8)[:, 4] = objectness_bias
    return det.to(dtype).eval()


def test_auto_micro_batch_is_the_surrogates_cpu_hint(ssd):
    x = images(3, seed=2)
    assert type(ssd).relevance_cpu_micro_batch == 1 and RAD(ssd).chunk_size(x) == 1
    yolo = _yolo()
    assert type(yolo).relevance_cpu_micro_batch == 2
    assert RAD(yolo).chunk_size(x) == 2 and RAD(yolo).chunk_size(x[:1]) == 1
    assert RAD(yolo, micro_batch=3).chunk_size(x) == 3 and RAD(yolo, micro_batch=None).chunk_size(x) == 3


def test_reference_second_term_uses_the_clean_ranking_and_raw_logits():
    """An untrained YOLO's objectness logits are all about -4.6: after the output ReLU its objectness nodes
    carry no relevance, the map is clamped at 1e-21 everywhere and the reference loss is
    1 + mean over the 3000 boxes ranked by objectness on the CLEAN image of their max raw class logit."""
    det = _yolo(class_bias=-1.5)
    x = images(1, seed=8, dtype=torch.float32)
    atk = RAD(det, steps=2, transforms=[])
    xa = atk(x)
    assert not torch.equal(xa, x)
    state = atk.last_state
    d = state["diagnostics"].as_dict()
    assert d["second_term_share"] == 1.0 and d["gradient_evaluations"] == 2
    with torch.no_grad():
        clean = det.dense(x)
        adv = det.dense(xa)
    k = min(3000, clean.objectness.shape[1])
    rank = clean.objectness.topk(k, dim=1).indices
    idx, weight = state["ranked"]
    assert torch.equal(idx, rank) and bool((weight == 1).all())
    with torch.no_grad():
        adv_rank = adv.objectness.topk(k, dim=1).indices
    assert not torch.equal(adv_rank, rank)  # re-ranking on x_adv would pick other boxes
    expected = adv.logits.gather(1, rank[..., None].expand(-1, -1, 3)).amax(-1).mean(1)  # raw logits
    assert (expected < -1).all()  # raw logits, not probabilities
    with torch.no_grad():
        atk.on_step(0, xa, state)
        loss = atk.relevance_loss(xa, state)
    torch.testing.assert_close(loss, 1.0 + expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second_term(det_ov(det, xa), "logits", idx, weight), expected)
    # without the second term there is nothing to descend on
    assert torch.equal(RAD(det, steps=1, loss="positive", transforms=[])(x), x)


def det_ov(det, x):
    from advdet.relevance import output_vector

    with torch.no_grad():
        return output_vector(det, det.dense(x))


def test_rad_loss_gradcheck_with_ungated_target_nodes():
    """gradcheck (float64) of the reference RAD loss itself, both terms, w.r.t. a few pixels, on a tiny
    YOLO whose target objectness logits are positive (not gated by the output ReLU), so the relevance
    path is checked end to end."""
    det = _yolo(objectness_bias=2.0, dtype=torch.float64)
    x = images(1, seed=10)
    atk = RAD(det, transforms=[])
    with torch.no_grad():
        state = atk._prepare_state(x, None, None)
        atk.on_step(0, x, state)
        res = relevance_map(det, x, state["tracked"], variant="rad_code")
    nodes = state["tracked"].nodes
    logits = det.dense(x).objectness.detach()[0, nodes.candidates[0]]
    assert (logits > 0).all()  # every target node carries relevance
    assert (res.per_channel > 1e-21).any() and (res.per_channel < 0).any()
    idx = torch.tensor([3 * S + 5, (S // 2) * S + S // 2, (S - 2) * S + 1, 17 * S + 40])

    def f(p):
        xx = x.reshape(1, 3, -1).index_put((torch.tensor([0]), torch.tensor([1]), idx), p).reshape_as(x)
        return atk.relevance_loss(xx, state) * 1e-21  # scale the 1e21 away: same derivative up to it

    p = x.reshape(1, 3, -1)[0, 1, idx].clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (p,), eps=1e-6, atol=1e-12, rtol=1e-4)
    g = torch.autograd.grad(f(p).sum(), p)[0]
    assert g.abs().max() > 0


def test_reference_gray_padding_and_diagnostics(ssd):
    """With the letterbox known, the surrogate sees gray padding (RAD's letterbox_image) while the result
    keeps the caller's zero padding; the diagnostics count what happened."""
    from advdet.data.letterbox import letterbox

    img = torch.rand(3, 40, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    canvas, lb = letterbox(img, S)
    x = canvas[None]
    atk = RAD(ssd, steps=2, **SI2)
    xa = atk(x, [{"letterbox": lb}])
    seen = atk.last_state["x"]
    pad = ~atk.last_state["mask"].expand_as(x)
    assert pad.any() and torch.equal(seen[pad], torch.full_like(seen[pad], GRAY))
    assert torch.equal(xa[pad], x[pad]) and bool((x[pad] == 0).all())
    zero = RAD(ssd, steps=2, pad_value=None, **SI2)
    xz = zero(x, [{"letterbox": lb}])
    assert torch.equal(zero.last_state["x"], x) and not torch.equal(xz, xa)
    d = atk.last_state["diagnostics"].as_dict()
    assert d["gradient_evaluations"] == 2 * 2  # 2 steps x 2 SI terms, one image
    assert len(d["relevance_per_iteration"]) == 2 and d["relevance_per_iteration"][0] > 0
    delta = (xa - x).abs()[~pad] * 255
    assert d["mean_abs_delta"] == pytest.approx(float(delta.mean()), rel=1e-9)
    assert d["share_at_eps"] == pytest.approx(float((delta >= 16 - 1e-3).double().mean()), rel=1e-9)
    merged = atk.last_state["diagnostics"].merge(zero.last_state["diagnostics"]).as_dict()
    assert merged["gradient_evaluations"] == 8


def test_paper_preset_normalises_the_averaged_raw_gradient(ssd):
    """Paper eq. 4-5: raw SI gradients of x / 2^i (i = 0..3) averaged, then divided by their mean |g|."""
    x = images(1, seed=11)
    atk = RAD(ssd, preset="paper", steps=1)
    xa = atk(x)
    assert (atk.variant, atk.loss, atk.update, atk.filter_terms, atk.pad_value) == ("paper", "sum", "mean_abs",
                                                                                    False, None)
    si = atk.transforms[0]
    assert (si.scales, si.extra_unscaled, si.normalize_terms) == (4, False, False)
    with torch.no_grad():
        state = atk._prepare_state(x, None, atk.valid_mask(x))
        atk.on_step(0, x, state)
    g = sum(s * atk.raw_gradient(x * s, state) for s in (1.0, 0.5, 0.25, 0.125)) / 4
    expected = x + (2.0 / 255 * g / g.abs().mean()).clamp(-16 / 255, 16 / 255)
    expected = torch.where(state["mask"], expected.clamp(0, 1), x)
    torch.testing.assert_close(xa, expected, rtol=0, atol=1e-12)


def test_registry_and_reference_defaults(ssd):
    assert ATTACKS["rad"] is RAD and RAD.description
    atk = build_attack("rad", ssd)
    assert isinstance(atk, RAD) and atk.preset == "reference"
    assert (atk.eps, atk.step, atk.steps, atk.update, atk.valid_only) == (16.0, 2.0, 10, "term_mean_abs", True)
    assert (atk.variant, atk.loss, atk.second_k, atk.filter_terms, atk.pad_value) == ("rad_code", "reference", 3000,
                                                                                      True, GRAY)
    assert len(atk.transforms) == 1 and isinstance(atk.transforms[0], SI)
    si = atk.transforms[0]
    assert (si.scales, si.extra_unscaled, si.normalize_terms) == (4, True, True)
    assert atk.selection == NodeSelection(kind="static", m=20, node_type="cls")
    assert RAD(ssd, preset="paper", loss="positive").loss == "positive"  # a knob overrides its preset
    for bad in (dict(variant="nope"), dict(loss="nope"), dict(node_type="shape"), dict(preset="nope"),
                dict(pad_value=2.0), dict(second_k=0), dict(loss="sum")):
        with pytest.raises(ValueError):
            RAD(ssd, **bad)


def _tiny(family: str):
    torch.manual_seed(2)
    if family == "ssd_vgg":
        return ssd_vgg_small(num_classes=3, input_size=S, width=0.125)
    if family == "yolov3":
        from advdet.models.yolov3 import yolov3_small

        return yolov3_small(num_classes=3, input_size=S)
    from advdet.models.torchvision_adapter import TINY_BUILDERS

    return TINY_BUILDERS[family](num_classes=3, input_size=S, fpn_channels=32)


@pytest.mark.parametrize("family", ["ssd_vgg", "yolov3", "retinanet_tiny", "fcos_tiny", "fasterrcnn_tiny",
                                    "maskrcnn_tiny", "ssd_tiny"])
def test_every_family(family):
    det = _tiny(family).eval()
    x = images(2, seed=9, dtype=torch.float32)
    # one relevance graph for the batch: tiny FCOS's 1 x 1 top level cannot be group-normalised alone
    atk = RAD(det, steps=1, transforms=[SI(scales=2, extra_unscaled=False)], micro_batch=None)
    xa = atk(x)
    assert xa.shape == x.shape and torch.isfinite(xa).all()
    assert (xa - x).abs().max().item() * 255 <= 16 + 1e-4
    assert atk.last_state["node_counts"][0] == [20, 20]
    tracked = atk.last_state["tracked"]
    if family in ("fasterrcnn_tiny", "maskrcnn_tiny"):
        assert tracked.reselected > 0  # proposals move with the input: nodes re-selected on the SI copy
    else:
        assert tracked.reselected == 0  # fixed anchors: the nodes of x_k are used on its copies


def test_frozen_heap_collects_only_the_blocks_garbage_and_restores_the_heap():
    import gc

    from advdet.attacks.rad import frozen_heap

    class Node:
        pass

    assert gc.get_freeze_count() == 0
    with frozen_heap():
        frozen = gc.get_freeze_count()
        assert frozen > 1000  # the interpreter's modules are frozen
        a, b = Node(), Node()
        a.other, b.other = b, a  # a reference cycle made inside the block
        del a, b
        assert gc.collect() >= 2  # collected by the block's own collection
        assert gc.get_freeze_count() == frozen
    assert gc.get_freeze_count() == 0
    gc.freeze()  # a caller that froze its heap keeps it frozen
    try:
        with frozen_heap():
            pass
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_rad_leaves_the_heap_unfrozen(ssd):
    import gc

    RAD(ssd, steps=1, transforms=[])(images(1))
    assert gc.get_freeze_count() == 0
