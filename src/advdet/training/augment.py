"""Training augmentation on letterboxed tensors: random zoom/shift, horizontal flip, colour jitter."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def augment_detection(image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
                      gen: torch.Generator, masks: torch.Tensor | None = None,
                      scale_range: tuple[float, float] = (0.6, 1.4), min_keep: float = 0.45):
    """Augment one (3, S, S) float image with its boxes (N, 4), labels and optional masks (N, S, S).

    Zoom by s ~ U(scale_range) about a random placement on the zero canvas (boxes clipped; a box keeps
    its object only if >= ``min_keep`` of its area stays inside), flip left-right with p = 0.5, and
    jitter brightness/contrast/saturation by up to 20 %. All randomness comes from ``gen``.
    """
    s_img = image.shape[-1]

    def u(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=gen))

    s = u(*scale_range)
    n = max(8, round(s_img * s))
    ox = round(u(min(0, s_img - n), max(0, s_img - n)))
    oy = round(u(min(0, s_img - n), max(0, s_img - n)))
    resized = F.interpolate(image[None], size=(n, n), mode="bilinear", align_corners=False)[0]
    canvas = torch.zeros_like(image)
    x0, y0 = max(0, ox), max(0, oy)
    x1, y1 = min(s_img, ox + n), min(s_img, oy + n)
    canvas[:, y0:y1, x0:x1] = resized[:, y0 - oy:y1 - oy, x0 - ox:x1 - ox]
    b = boxes * (n / s_img) + torch.tensor([ox, oy, ox, oy], dtype=boxes.dtype)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    bc = b.clamp(0, s_img)
    area_c = (bc[:, 2] - bc[:, 0]).clamp(min=0) * (bc[:, 3] - bc[:, 1]).clamp(min=0)
    keep = (area_c >= min_keep * area) & (bc[:, 2] - bc[:, 0] >= 2) & (bc[:, 3] - bc[:, 1] >= 2)
    bc, labels = bc[keep], labels[keep]
    new_masks = None
    if masks is not None:
        m = masks[keep].float()
        mr = F.interpolate(m[:, None], size=(n, n), mode="nearest")[:, 0] if len(m) else m.new_zeros((0, n, n))
        new_masks = torch.zeros((len(m), s_img, s_img), dtype=torch.bool)
        new_masks[:, y0:y1, x0:x1] = mr[:, y0 - oy:y1 - oy, x0 - ox:x1 - ox] > 0.5
    if float(torch.rand((), generator=gen)) < 0.5:
        canvas = canvas.flip(-1)
        bc = torch.stack([s_img - bc[:, 2], bc[:, 1], s_img - bc[:, 0], bc[:, 3]], 1)
        if new_masks is not None:
            new_masks = new_masks.flip(-1)
    valid = canvas.sum(0, keepdim=True) > 0
    bright, contrast, sat = u(0.8, 1.2), u(0.8, 1.2), u(0.8, 1.2)
    gray = canvas.mean(0, keepdim=True)
    canvas = gray + (canvas - gray) * sat
    canvas = (canvas - 0.5) * contrast + 0.5
    canvas = (canvas * bright).clamp(0, 1) * valid  # padding stays zero
    return canvas, bc, labels, new_masks
