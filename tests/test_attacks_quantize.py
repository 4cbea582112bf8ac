"""Quantisation-safe saving: |uint8(x_adv) - clean| <= eps after rounding, and the PNG round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from advdet.attacks import load_png, quantize_adv, save_adversarial_png, save_png, to_uint8


@st.composite
def cases(draw):
    h = draw(st.integers(1, 9))
    w = draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, 256, size=(3, h, w), dtype=np.uint8)
    # include the extremes, where the eps ball is cut by [0, 255]
    clean.flat[: draw(st.integers(0, 3))] = draw(st.sampled_from([0, 255]))
    eps = draw(st.one_of(st.integers(0, 32).map(float), st.floats(0, 40, allow_nan=False)))
    scale = draw(st.sampled_from([0.5, 1.0, 3.0, 100.0]))  # perturbations inside, at and far outside eps
    delta = rng.uniform(-scale * eps - 1, scale * eps + 1, size=clean.shape)
    x_adv = (clean.astype(np.float64) + delta) / 255.0   # may leave [0, 1]: quantize_adv clips
    if draw(st.booleans()):
        x_adv = np.clip(x_adv, 0, 1).astype(np.float32)   # float32 as the attacks produce
    return clean, x_adv, eps


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cases())
def test_quantized_adv_within_eps_and_png_round_trip(tmp_path, case):
    clean, x_adv, eps = case
    q = quantize_adv(torch.from_numpy(x_adv), torch.from_numpy(clean), eps)
    assert q.dtype == torch.uint8 and q.shape == clean.shape
    diff = (q.to(torch.int16) - torch.from_numpy(clean).to(torch.int16)).abs()
    assert diff.max().item() <= eps
    # where x_adv was already a representable in-budget value, it is kept exactly
    exact = np.round(np.clip(x_adv.astype(np.float64), 0, 1) * 255)
    inside = np.abs(exact - clean) <= np.floor(eps)
    assert np.array_equal(q.numpy()[inside], exact[inside].astype(np.uint8))
    path = save_png(tmp_path / "adv.png", q)
    assert torch.equal(load_png(path), q)


def test_quantize_batch_mask_and_float_clean(tmp_path):
    g = torch.Generator().manual_seed(0)
    clean_f = torch.rand(2, 3, 5, 6, generator=g)
    x_adv = (clean_f + (torch.rand(2, 3, 5, 6, generator=g) - 0.5) * 0.2).clamp(0, 1)
    mask = torch.zeros(2, 1, 5, 6, dtype=torch.bool)
    mask[..., 1:4, 2:5] = True
    q = quantize_adv(x_adv, clean_f, 4, mask=mask)
    c8 = to_uint8(clean_f)
    assert torch.equal(q[~mask.expand_as(q)], c8[~mask.expand_as(q)])
    assert (q.int() - c8.int()).abs().max() <= 4
    saved = save_adversarial_png(tmp_path / "a" / "img.png", x_adv[0], clean_f[0], 4)
    assert torch.equal(load_png(tmp_path / "a" / "img.png"), saved)
    assert not list((tmp_path / "a").glob("*.tmp"))  # written atomically


def test_quantize_errors():
    with pytest.raises(ValueError, match="shape"):
        quantize_adv(torch.zeros(3, 2, 2), torch.zeros(3, 2, 3, dtype=torch.uint8), 8)
    with pytest.raises(ValueError, match="non-finite"):
        quantize_adv(torch.full((3, 2, 2), float("nan")), torch.zeros(3, 2, 2, dtype=torch.uint8), 8)
    with pytest.raises(TypeError):
        save_png("/tmp/never.png", torch.zeros(3, 2, 2))


def test_fractional_eps_just_below_an_integer():
    """A budget like 1.999999999999993 (float arithmetic) allows 1 level, never 2."""
    clean = torch.full((3, 2, 2), 100, dtype=torch.uint8)
    q = quantize_adv((clean.double() + 2) / 255, clean, 1.999999999999993)
    assert (q.int() - 100).abs().max() == 1
    assert (quantize_adv((clean.double() + 2) / 255, clean, 2.0).int() - 100).abs().max() == 2
