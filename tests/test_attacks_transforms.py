"""Gradient transforms SI, DI, TI, MI and their composition in the Attack loop (toy objectives)."""

from __future__ import annotations

import math

import pytest
import torch

from advdet.attacks import DI, MI, SI, TI, Attack, gaussian_kernel


class Toy(Attack):
    """An attack whose objective is a given per-image function of the input."""

    name = "toy"
    description = "toy"

    def __init__(self, fn, **kw):
        super().__init__(torch.nn.Identity(), **kw)
        self.fn = fn

    def objective(self, x_in, state):
        return self.fn(x_in)


def scale_invariant(x):
    """f(s x) = f(x) for s > 0: a linear form over the L2 norm, per image."""
    w = torch.linspace(-1, 1, x[0].numel(), dtype=x.dtype).view_as(x[0])
    return (x * w).flatten(1).sum(1) / x.flatten(1).norm(dim=1)


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_ti_kernel_sums_to_one_and_is_symmetric():
    k = gaussian_kernel(15, 3.0)
    assert k.shape == (15, 15)
    assert k.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert torch.allclose(k, k.T) and torch.allclose(k, k.flip(0)) and torch.allclose(k, k.flip(1))
    assert k[7, 7] == k.max() and (k > 0).all()
    # the 1-D profile is a Gaussian over [-3, 3]: edge/centre = exp(-3^2 / 2)
    assert (k[0, 7] / k[7, 7]).item() == pytest.approx(math.exp(-4.5), rel=1e-9)


def test_ti_is_depthwise_convolution_with_the_kernel():
    g = torch.zeros(1, 3, 21, 21, dtype=torch.float64)
    g[0, 1, 10, 10] = 1.0
    out = TI(size=15).process(g)
    assert torch.allclose(out[0, 1, 3:18, 3:18], gaussian_kernel(15, 3.0))
    assert out[0, 0].abs().sum() == 0 and out[0, 2].abs().sum() == 0  # channels stay separate
    assert out.shape == g.shape


@pytest.mark.parametrize("normalize", [False, True])
def test_si_on_scale_invariant_function_equals_plain_gradient(normalize):
    x = rand(2, 3, 8, 8) + 0.1
    plain = Toy(scale_invariant)
    si = Toy(scale_invariant, transforms=[SI(normalize_terms=normalize)])
    g = plain.gradient(x, {})
    g_si = si.gradient(x, {})
    expected = g / g.flatten(1).abs().mean(1).view(-1, 1, 1, 1) if normalize else g
    assert torch.allclose(g_si, expected, atol=1e-12)
    # and on a non-invariant function SI does differ from the plain gradient
    sq = lambda t: (t ** 3).flatten(1).sum(1)  # noqa: E731
    assert not torch.allclose(Toy(sq, transforms=[SI(normalize_terms=False)]).gradient(x, {}), Toy(sq).gradient(x, {}))


def test_si_terms_match_rad_code():
    """RAD's SI: x * 0.5^i for i = 0..3 plus x again, each term normalised by its mean |g|."""
    x = rand(1, 3, 4, 4)
    f = lambda t: (t ** 2 * torch.arange(48, dtype=t.dtype).view(1, 3, 4, 4)).flatten(1).sum(1)  # noqa: E731
    got = Toy(f, transforms=[SI()]).gradient(x, {})
    terms = []
    for s in (1.0, 0.5, 0.25, 0.125, 1.0):
        g = 2 * x * s * s * torch.arange(48, dtype=x.dtype).view(1, 3, 4, 4)  # d f(s x) / dx
        terms.append(g / g.abs().mean())
    assert torch.allclose(got, sum(terms) / 5, atol=1e-12)


def test_mi_accumulates_l1_normalised_gradients():
    mi = MI(mu=1.0)
    mi.reset(torch.zeros(1))
    g1 = torch.tensor([[1.0, -3.0]])       # ||g1||_1 = 4
    g2 = torch.tensor([[2.0, 2.0]])        # ||g2||_1 = 4
    g3 = torch.tensor([[0.0, -10.0]])      # ||g3||_1 = 10
    v1 = mi.process(g1)
    assert torch.allclose(v1, torch.tensor([[0.25, -0.75]]))
    v2 = mi.process(g2)
    assert torch.allclose(v2, torch.tensor([[0.75, -0.25]]))
    v3 = mi.process(g3)
    assert torch.allclose(v3, torch.tensor([[0.75, -1.25]]))
    half = MI(mu=0.5)
    half.reset(torch.zeros(1))
    half.process(g1)
    assert torch.allclose(half.process(g2), torch.tensor([[0.125 + 0.5, -0.375 + 0.5]]))
    # per image: a second image with a 10x gradient gets the same normalised contribution
    mi.reset(torch.zeros(1))
    assert torch.allclose(mi.process(torch.cat([g1, 10 * g1])), torch.tensor([[0.25, -0.75]] * 2))
    mi.reset(torch.zeros(1))  # reset clears the momentum
    assert torch.allclose(mi.process(g2), torch.tensor([[0.5, 0.5]]))


def test_di_output_shape_and_seeded_copies():
    x = rand(2, 3, 32, 32) + 0.5
    di = DI()
    p1 = [di.sample(32, 32, torch.Generator().manual_seed(1)) for _ in range(1)][0]
    outs = {}
    for seed in (1, 1, 2):
        gen = torch.Generator().manual_seed(seed)
        maps = di.copies(x, gen)
        assert len(maps) == 5 and maps[0] is None  # original + 4 copies (p = 1)
        outs.setdefault(seed, []).append(torch.stack([m(x) for m in maps[1:]]))
    for stack in outs[1] + outs[2]:
        assert stack.shape == (4, 2, 3, 32, 32)
    assert torch.equal(outs[1][0], outs[1][1])          # same seed, same copies
    assert not torch.equal(outs[1][0], outs[2][0])      # another seed, other copies
    nh, nw, top, left = p1
    assert 29 <= nh <= 32 and nh == nw and 0 <= top <= 32 - nh and 0 <= left <= 32 - nw
    y = DI.apply(x, (29, 29, 1, 2))
    assert y.shape == x.shape
    assert y[:, :, 0].abs().sum() == 0 and y[:, :, :, :2].abs().sum() == 0  # zero canvas around the paste
    assert y[:, :, 1:30, 2:31].min() > 0


def test_di_gradient_flows_back_through_the_transform():
    x = rand(1, 3, 16, 16)
    w = rand(1, 3, 16, 16, seed=3) - 0.5
    f = lambda t: (t * w).flatten(1).sum(1)  # noqa: E731
    mapped = Toy(f, transforms=[DI(include_original=False, copies=1, low=0.9, high=0.9,
                                   normalize_terms=False)], seed=5).gradient(x, {})
    raw = Toy(f, transforms=[DI(include_original=False, copies=1, low=0.9, high=0.9,
                                normalize_terms=False, map_back=False)], seed=5).gradient(x, {})
    assert torch.equal(raw, w.expand_as(raw))           # the reference code's misaligned gradient
    assert not torch.allclose(mapped, raw)               # the VJP of resize + paste
    # VJP check: <grad, v> equals the directional derivative of f(DI(x))
    params = DI(low=0.9, high=0.9).sample(16, 16, torch.Generator().manual_seed(5))
    v = rand(1, 3, 16, 16, seed=4)
    lhs = (mapped * v).sum()
    rhs = (w * DI.apply(v, params)).sum()  # DI is linear in x
    assert lhs.item() == pytest.approx(rhs.item(), rel=1e-9)


def test_transform_order_is_canonical():
    x = rand(2, 3, 20, 20)
    f = lambda t: (t ** 2).flatten(1).sum(1)  # noqa: E731
    a = Toy(f, transforms=[TI(size=5), MI()])
    b = Toy(f, transforms=[MI(), TI(size=5)])
    a.reset_transforms(x)
    b.reset_transforms(x)
    for _ in range(2):
        assert torch.allclose(a.gradient(x, {}), b.gradient(x, {}))


def test_stacked_transforms_run_in_an_attack_loop():
    x = rand(2, 3, 16, 16)
    f = lambda t: (t * (rand(1, 3, 16, 16, seed=9) - 0.5)).flatten(1).sum(1)  # noqa: E731
    atk = Toy(f, eps=4, step=1, steps=3, update="mean_abs", transforms=[SI(), DI(), TI(size=3), MI()], seed=1)
    xa = atk(x)
    assert (xa - x).abs().max() <= 4 / 255 + 1e-12
    assert (f(xa) > f(x)).all()
    assert torch.equal(xa, Toy(f, eps=4, step=1, steps=3, update="mean_abs",
                               transforms=[SI(), DI(), TI(size=3), MI()], seed=1)(x))  # seeded


def test_defaults_follow_rad_appendix_e2_and_the_reference_code():
    si, di, ti, mi = SI(), DI(), TI(), MI()
    x = rand(1, 3, 8, 8)
    assert (si.scales, si.extra_unscaled, si.normalize_terms) == (4, True, True)
    assert len(si.copies(x, torch.Generator())) == 5  # x * 0.5^i, i = 0..3, plus x again (RAD's code)
    assert (di.n_copies, di.low, di.high, di.p, di.fill, di.include_original) == (4, 0.9, 1.0, 1.0, 0.0, True)
    assert len(di.copies(x, torch.Generator())) == 5  # the original + 4 resized, pasted copies (p = 1)
    assert (ti.size, ti.nsig) == (15, 3.0) and mi.mu == 1.0
    assert (si.stage, di.stage, ti.stage, mi.stage) == (0, 0, 1, 2)


def test_si_reuses_the_gradient_of_its_repeated_unscaled_term():
    """RAD's SI counts x twice; with a deterministic inner gradient the second term reuses the first
    (4 gradient evaluations, not 5) and the average is unchanged."""
    from advdet.attacks.transforms import SI

    calls = []

    def grad(x):
        calls.append(float(x.abs().sum()))
        return torch.cos(3 * x)

    x = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gen = torch.Generator()
    reused = SI().wrap(grad, gen, deterministic=True)(x)
    assert len(calls) == 4
    again = SI().wrap(grad, gen)(x)
    assert len(calls) == 4 + 5
    torch.testing.assert_close(reused, again, rtol=0, atol=0)
