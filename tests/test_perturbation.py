"""Perturbation statistics (RMSE, L2, Linf in 0-255 units) with hand-computed numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from advdet.metrics import perturbation_stats


def test_uint8_hand_computed():
    clean = np.zeros((1, 3, 2, 2), np.uint8)
    adv = clean.copy()
    adv[0, 0, 0, 0] = 4
    adv[0, 2, 1, 1] = 2
    # d^2 sum = 16 + 4 = 20 over N = 3 * 2 * 2 = 12 values
    s = perturbation_stats(clean, adv)
    assert s["rmse"] == pytest.approx([math.sqrt(20 / 12)])  # 1.2910
    assert s["l2"] == pytest.approx([math.sqrt(20)])  # 4.4721
    assert s["linf"] == pytest.approx([4.0])
    assert s["num_images"] == 1
    # signs do not matter and uint8 does not wrap around: clean 4, adv 0 -> |d| = 4
    assert perturbation_stats(adv, clean)["linf"] == pytest.approx([4.0])


def test_float_batch_per_image_and_means():
    clean = torch.full((2, 3, 4, 5), 0.5)
    adv = clean.clone()
    adv[0] += 8 / 255  # image 0: d = 8 everywhere (60 values)
    adv[1, 1, 2, 3] -= 12 / 255  # image 1: one value d = -12
    s = perturbation_stats(clean, adv)
    assert s["rmse"] == pytest.approx([8.0, math.sqrt(144 / 60)], rel=1e-6)  # 8, 1.5492
    assert s["l2"] == pytest.approx([8 * math.sqrt(60), 12.0], rel=1e-6)  # 61.968, 12
    assert s["linf"] == pytest.approx([8.0, 12.0], rel=1e-6)
    assert s["rmse_mean"] == pytest.approx((8 + math.sqrt(2.4)) / 2, rel=1e-6)
    assert s["l2_mean"] == pytest.approx((8 * math.sqrt(60) + 12) / 2, rel=1e-6)
    assert s["linf_mean"] == pytest.approx(10.0, rel=1e-6)


def test_mixed_dtypes_and_layouts():
    clean_u8 = np.full((1, 6, 7, 3), 100, np.uint8)  # channels-last, as read from PNG
    adv_f = torch.full((1, 3, 6, 7), 110 / 255)  # channels-first float in [0, 1]
    s = perturbation_stats(clean_u8, adv_f)
    assert s["rmse"] == pytest.approx([10.0]) and s["linf"] == pytest.approx([10.0])
    assert s["l2"] == pytest.approx([10.0 * math.sqrt(6 * 7 * 3)])
    # unbatched (3, H, W) tensors
    s1 = perturbation_stats(torch.zeros(3, 2, 2), torch.full((3, 2, 2), 1.0))
    assert s1["rmse"] == pytest.approx([255.0]) and s1["num_images"] == 1


def test_mask_restricts_to_valid_pixels():
    clean = np.zeros((1, 3, 4, 4), np.uint8)
    adv = np.full((1, 3, 4, 4), 200, np.uint8)  # padding changed a lot
    adv[0, :, :2, :2] = 3  # valid region: d = 3
    mask = np.zeros((1, 4, 4), bool)
    mask[0, :2, :2] = True
    s = perturbation_stats(clean, adv, mask=mask)
    # N = 4 pixels * 3 channels = 12; sum d^2 = 12 * 9 = 108
    assert s["rmse"] == pytest.approx([3.0])
    assert s["l2"] == pytest.approx([math.sqrt(108)])  # 10.392
    assert s["linf"] == pytest.approx([3.0])
    # without the mask, the padding dominates
    assert perturbation_stats(clean, adv)["linf"] == pytest.approx([200.0])
    # (B, 1, H, W) torch mask gives the same
    s2 = perturbation_stats(clean, adv, mask=torch.from_numpy(mask)[:, None])
    assert s2["rmse"] == pytest.approx([3.0])


def test_bad_inputs():
    with pytest.raises(ValueError, match="shapes differ"):
        perturbation_stats(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        perturbation_stats(torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 3.0))
    no_valid = torch.zeros(2, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="no valid pixel in image"):
        perturbation_stats(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), mask=no_valid)
    with pytest.raises(ValueError, match="mask must be"):
        perturbation_stats(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), mask=torch.ones(1, 5, 4, dtype=torch.bool))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), eps=st.integers(1, 16))
def test_linf_budget_and_norm_relations(seed, eps):
    # an eps-bounded uint8 perturbation: linf <= eps, rmse <= linf, l2 = rmse * sqrt(N)
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, 256, (2, 3, 5, 6)).astype(np.int16)
    adv = np.clip(clean + rng.integers(-eps, eps + 1, clean.shape), 0, 255)
    s = perturbation_stats(clean.astype(np.uint8), adv.astype(np.uint8))
    d = (adv - clean).reshape(2, -1).astype(float)
    assert s["linf"] == pytest.approx(np.abs(d).max(1).tolist())
    assert max(s["linf"]) <= eps
    for r, l2, li in zip(s["rmse"], s["l2"], s["linf"]):
        assert r <= li + 1e-9
        assert l2 == pytest.approx(r * math.sqrt(90))
