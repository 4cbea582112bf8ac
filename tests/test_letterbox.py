"""Letterbox: parameters, image placement, and the box/mask round trips."""

import numpy as np
import pytest
import torch

from advdet.data.letterbox import (
    letterbox,
    letterbox_boxes,
    letterbox_masks,
    letterbox_params,
    unletterbox_boxes,
    unletterbox_masks,
)


@pytest.mark.parametrize(
    "h, w, size, scale, pad_x, pad_y, content",
    [
        (300, 100, 150, 0.5, 50, 0, (150, 50)),  # portrait: padded left/right
        (100, 300, 150, 0.5, 0, 50, (50, 150)),  # landscape: padded top/bottom
        (200, 200, 100, 0.5, 0, 0, (100, 100)),  # square: no padding
        (40, 60, 64, 64 / 60, 0, 10, (43, 64)),  # upscale, odd padding total (21) floors to 10
        (480, 640, 256, 0.4, 0, 32, (192, 256)),
    ],
)
def test_params_portrait_landscape(h, w, size, scale, pad_x, pad_y, content):
    p = letterbox_params(h, w, size)
    assert p.scale == pytest.approx(scale)
    assert (p.pad_x, p.pad_y, p.size, p.orig_h, p.orig_w) == (pad_x, pad_y, size, h, w)
    assert p.content_hw == content
    assert max(content) == size


def test_known_image_is_centred_with_zero_padding():
    # 20x40 image of ones on a 40 canvas: scale 1, rows 10..29 hold the image, the rest is zero.
    img = torch.ones(3, 20, 40)
    canvas, p = letterbox(img, 40)
    assert canvas.shape == (3, 40, 40)
    assert (p.pad_x, p.pad_y, p.scale) == (0, 10, 1.0)
    assert torch.equal(canvas[:, 10:30], img)
    assert canvas[:, :10].abs().sum() == 0 and canvas[:, 30:].abs().sum() == 0

    # downscale of a portrait gradient: content columns 12..36, padding exactly zero
    ramp = torch.linspace(0.2, 0.8, 100).view(1, 100, 1).expand(3, 100, 50).contiguous()
    canvas, p = letterbox(ramp, 50)
    assert (p.pad_x, p.pad_y, p.content_hw) == (12, 0, (50, 25))
    assert canvas[:, :, :12].abs().sum() == 0 and canvas[:, :, 37:].abs().sum() == 0
    content = canvas[:, :, 12:37]
    assert content.min() > 0.19 and content.max() < 0.81
    # rows keep the vertical ramp (monotone, top ~0.2, bottom ~0.8)
    col = content[0, :, 10]
    assert torch.all(col[1:] > col[:-1])
    assert col[0].item() == pytest.approx(0.206, abs=0.01)
    assert col[-1].item() == pytest.approx(0.794, abs=0.01)


def test_full_image_box_matches_content_region():
    rng = np.random.default_rng(1)
    for _ in range(100):
        h, w = (int(v) for v in rng.integers(1, 1500, size=2))
        size = int(rng.choice([32, 64, 256, 320, 608]))
        p = letterbox_params(h, w, size)
        box = letterbox_boxes(torch.tensor([[0.0, 0.0, w, h]], dtype=torch.float64), p)[0]
        nh, nw = p.content_hw
        expect = torch.tensor([p.pad_x, p.pad_y, p.pad_x + nw, p.pad_y + nh], dtype=torch.float64)
        assert torch.all((box - expect).abs() <= 0.5 + 1e-9), (h, w, size)


def test_box_round_trip_under_half_pixel():
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 2000, size=2))
        size = int(rng.choice([64, 128, 256, 300, 512, 608]))
        n = int(rng.integers(1, 20))
        xs = np.sort(rng.uniform(0, w, size=(n, 2)), axis=1)
        ys = np.sort(rng.uniform(0, h, size=(n, 2)), axis=1)
        boxes = torch.tensor(np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], 1), dtype=torch.float32)
        p = letterbox_params(h, w, size)
        lb = letterbox_boxes(boxes, p)
        assert torch.all(lb >= -1e-3) and torch.all(lb <= size + 1e-3)
        back = unletterbox_boxes(lb, p)
        worst = max(worst, (back - boxes).abs().max().item())
    assert worst < 0.5


def test_unletterbox_clips_boxes_on_padding():
    p = letterbox_params(100, 300, 150)  # pad_y = 50, scale 0.5
    back = unletterbox_boxes(torch.tensor([[-10.0, 20.0, 160.0, 130.0]]), p)
    assert back.tolist() == [[0.0, 0.0, 300.0, 100.0]]
    raw = unletterbox_boxes(torch.tensor([[-10.0, 20.0, 160.0, 130.0]]), p, clip=False)
    assert raw.tolist() == [[-20.0, -60.0, 320.0, 160.0]]


def _ellipse(h, w, cy, cx, ry, rx):
    yy, xx = np.mgrid[:h, :w]
    return (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8)


def test_mask_round_trip_iou():
    rng = np.random.default_rng(2)
    ious = []
    for _ in range(15):
        h, w = (int(v) for v in rng.integers(60, 240, size=2))
        size = int(rng.choice([96, 128, 160]))
        masks = []
        for _ in range(3):
            ry, rx = rng.uniform(15, h / 3), rng.uniform(15, w / 3)
            masks.append(_ellipse(h, w, rng.uniform(ry, h - ry), rng.uniform(rx, w - rx), ry, rx))
        m = torch.from_numpy(np.stack(masks))
        p = letterbox_params(h, w, size)
        lb = letterbox_masks(m, p)
        assert lb.shape == (3, size, size) and lb.dtype == torch.uint8
        # nothing lands on the padding
        nh, nw = p.content_hw
        assert lb.sum() == lb[:, p.pad_y:p.pad_y + nh, p.pad_x:p.pad_x + nw].sum()
        back = unletterbox_masks(lb, p)
        assert back.shape == m.shape
        inter = (back.bool() & m.bool()).sum((1, 2)).float()
        union = (back.bool() | m.bool()).sum((1, 2)).float()
        ious.extend((inter / union).tolist())
    assert min(ious) > 0.85
    assert float(np.mean(ious)) > 0.95


def test_mask_identity_when_canvas_fits():
    m = torch.zeros(1, 20, 40, dtype=torch.uint8)
    m[0, 5:15, 10:30] = 1
    p = letterbox_params(20, 40, 40)
    lb = letterbox_masks(m, p)
    assert torch.equal(lb[0, 10:30], m[0]) and lb.sum() == 200
    assert torch.equal(unletterbox_masks(lb, p), m)
    assert unletterbox_masks(torch.zeros(0, 40, 40), p).shape == (0, 20, 40)


def test_mask_stays_aligned_with_its_box():
    # the letterboxed mask of a rectangle must sit on the letterboxed rectangle box (no drift)
    rng = np.random.default_rng(3)
    offsets = []
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(30, 400, size=2))
        size = int(rng.choice([64, 100, 128, 256]))
        y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        y1, x1 = y0 + max(h // 3, 8), x0 + max(w // 3, 8)
        m = torch.zeros(1, h, w, dtype=torch.uint8)
        m[0, y0:y1, x0:x1] = 1
        p = letterbox_params(h, w, size)
        lb = letterbox_masks(m, p)[0].numpy()
        box = letterbox_boxes(torch.tensor([[x0, y0, x1, y1]], dtype=torch.float64), p)[0].numpy()
        ys, xs = np.nonzero(lb)
        centre = np.array([xs.mean() + 0.5, ys.mean() + 0.5])  # pixel j covers [j, j + 1)
        offsets.append(centre - np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]))
        # mask extent matches the box within a pixel
        assert abs(xs.min() - box[0]) <= 1 and abs(xs.max() + 1 - box[2]) <= 1
        assert abs(ys.min() - box[1]) <= 1 and abs(ys.max() + 1 - box[3]) <= 1
    offsets = np.array(offsets)
    assert np.abs(offsets.mean(0)).max() < 0.15
    assert np.abs(offsets).max() < 0.75
