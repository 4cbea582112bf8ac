"""SSD-VGG (ssd.pytorch layout) behind the Detector contract."""

import numpy as np
import pytest
import torch

from advdet.models.box_ops import match_priors, ssd_decode, ssd_encode
from advdet.models.detector import postprocess_dense
from advdet.models.ssd_vgg import CONV4_3_INDEX, ssd_vgg16, ssd_vgg_small


def _images(n=4, s=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, s, s, generator=g) * 0.2
    targets = []
    for i in range(n):
        x0, y0 = 6 + 4 * i, 10 + 2 * i
        x[i, i % 3, y0:y0 + 24, x0:x0 + 20] = 0.9
        targets.append({"boxes": torch.tensor([[x0, y0, x0 + 20, y0 + 24]], dtype=torch.float32),
                        "labels": torch.tensor([i % 3])})
    return x, targets


def test_full_size_layout_matches_ssd300():
    m = ssd_vgg16(num_classes=20)
    assert m.priors.shape == (8732, 4)
    assert isinstance(m.model.vgg[CONV4_3_INDEX], torch.nn.Conv2d)
    assert m.model.vgg[CONV4_3_INDEX].out_channels == 512
    assert isinstance(m.model.vgg[CONV4_3_INDEX + 1], torch.nn.ReLU)
    assert abs(sum(p.numel() for p in m.parameters()) - 26_285_486) == 0


def test_encode_decode_inverse_and_matching():
    priors = torch.tensor([[20.0, 20, 10, 10], [40, 40, 20, 20], [50, 10, 8, 16]])
    gt = torch.tensor([[15.0, 16, 26, 25], [28, 30, 52, 51]])
    idx, pos = match_priors(gt, torch.tensor([[15.0, 15, 25, 25], [30, 30, 50, 50], [46, 2, 54, 18]]))
    assert idx.tolist()[:2] == [0, 1] and pos.tolist() == [True, True, False]
    enc = ssd_encode(gt[idx], priors)
    np.testing.assert_allclose(ssd_decode(enc, priors)[:2].numpy(), gt.numpy(), atol=1e-4)


def test_predict_equals_postprocessed_dense():
    torch.manual_seed(0)
    m = ssd_vgg_small(num_classes=3, input_size=64).eval()
    x, _ = _images()
    pred = m.predict(x)
    dense = m.dense(x)
    assert dense.boxes.shape[1] == m.priors.shape[0]  # one candidate per prior
    again = postprocess_dense(dense, m.nms, 64)
    assert sum(len(p["boxes"]) for p in pred) > 0
    for a, b in zip(pred, again):
        np.testing.assert_allclose(a["boxes"].numpy(), b["boxes"].numpy(), atol=1e-4)
        np.testing.assert_allclose(a["scores"].numpy(), b["scores"].numpy(), atol=1e-4)
        assert torch.equal(a["labels"], b["labels"])


def test_loss_decreases():
    torch.manual_seed(0)
    m = ssd_vgg_small(num_classes=3, input_size=64).train()
    x, t = _images()
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    first = None
    for _ in range(15):
        losses = m.loss(x, t)
        assert set(losses) == {"cls", "loc"}
        loss = sum(losses.values())
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.7 * first


def test_per_image_multibox_and_zero_gt_loss():
    # (batch == single images, gradients to pixels: tests/test_detector_contract.py)
    torch.manual_seed(0)
    m = ssd_vgg_small(num_classes=3, input_size=64).eval()
    x, t = _images()
    per_image = m.multibox_loss(*m.raw(x), t, reduction="none")
    assert per_image["cls"].shape == (4,)
    empty = [{"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.long)}] * 4
    z = m.loss(x, empty)
    assert torch.isfinite(z["cls"]) and float(z["loc"]) == 0.0


def test_wrong_input_shape_is_a_clear_error():
    m = ssd_vgg_small(num_classes=3, input_size=64)
    with pytest.raises(ValueError, match="expects"):
        m.dense(torch.rand(3, 64, 64))
