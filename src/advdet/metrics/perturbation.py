"""Size of adversarial perturbations, in 0-255 pixel units.

For one image with difference ``d = x_adv - x`` (0-255 units) over the ``N`` valid values (pixels
times channels):

- ``rmse = sqrt(sum(d**2) / N)``: the RMSE of RAD Table 5 (Chen et al., "Relevance Attack on
  Detectors", 2021; after Xie et al., "Adversarial Examples for Semantic Segmentation and Object
  Detection", ICCV 2017), taken over all pixels and channels;
- ``l2 = sqrt(sum(d**2))``;
- ``linf = max(|d|)``, the budget unit of the attacks (eps=16 means ``linf <= 16``).

Dataset numbers are the mean of the per-image values (a 5k-image RMSE is the mean of 5k RMSEs).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["perturbation_stats"]


def _to_255(x: Any, name: str) -> torch.Tensor:
    """float64 tensor in 0-255: float inputs are read as [0, 1], integer inputs as 0-255."""
    t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if t.dtype == torch.bool:
        raise TypeError(f"{name}: boolean images are not supported")
    if t.is_floating_point():
        t = t.to(torch.float64)
        if t.numel() and not torch.isfinite(t).all():
            raise ValueError(f"{name}: non-finite values")
        if t.numel() and (t.min() < -1e-6 or t.max() > 1 + 1e-6):
            raise ValueError(
                f"{name}: float images must be in [0, 1] (got [{t.min().item():.4g}, {t.max().item():.4g}]); "
                "pass integer (uint8) arrays for 0-255 data"
            )
        return t * 255.0
    return t.to(torch.float64)


def _channels_first(t: torch.Tensor, is_numpy: bool) -> torch.Tensor:
    """(B, C, H, W) from (B, 3, H, W) / (B, H, W, 3) / unbatched; numpy arrays default to HWC."""
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4:
        raise ValueError(f"images must be (B, 3, H, W), (B, H, W, 3) or unbatched, got shape {tuple(t.shape)}")
    cf, cl = t.shape[1] in (1, 3), t.shape[-1] in (1, 3)
    if cl and (is_numpy or not cf):
        return t.permute(0, 3, 1, 2)
    if cf:
        return t
    raise ValueError(f"cannot find a channel axis of size 1 or 3 in shape {tuple(t.shape)}")


def perturbation_stats(clean: Any, adv: Any, mask: Any | None = None) -> dict[str, Any]:
    """Per-image and mean RMSE, L2 and Linf of ``adv - clean`` in 0-255 units.

    Args:
        clean, adv: images of the same shape, torch tensors (B, 3, H, W) float in [0, 1] or numpy /
            torch uint8 in 0-255 (numpy arrays may be channels-last (B, H, W, 3), as read from PNG);
            a single unbatched image is accepted. The two may differ in dtype (float vs uint8).
        mask: optional (B, H, W) or (B, 1, H, W) boolean, True on valid (non-padding) pixels; the
            statistics use only those pixels (all their channels). Every image needs one.

    Returns:
        ``{"rmse": [...], "l2": [...], "linf": [...], "rmse_mean", "l2_mean", "linf_mean",
        "num_images"}``: per-image lists of floats and their means over images.
    """
    is_np = (not isinstance(clean, torch.Tensor), not isinstance(adv, torch.Tensor))
    c = _channels_first(_to_255(clean, "clean"), is_np[0])
    a = _channels_first(_to_255(adv, "adv"), is_np[1])
    if c.shape != a.shape:
        raise ValueError(f"clean and adv shapes differ: {tuple(c.shape)} vs {tuple(a.shape)}")
    b, ch, h, w = c.shape
    d = a - c
    if mask is None:
        valid = torch.ones(b, 1, h, w, dtype=torch.bool)
    else:
        m = mask.detach().cpu() if isinstance(mask, torch.Tensor) else torch.from_numpy(np.asarray(mask))
        m = m.to(torch.bool)
        if m.ndim == 2:
            m = m.unsqueeze(0)
        if m.ndim == 3:
            m = m.unsqueeze(1)
        if m.shape != (b, 1, h, w):
            raise ValueError(f"mask must be (B, H, W) or (B, 1, H, W) = ({b}, {h}, {w}); got {tuple(mask.shape)}")
        valid = m
    n_valid = valid.flatten(1).sum(1) * ch
    empty = torch.nonzero(n_valid == 0).flatten().tolist()
    if empty:
        raise ValueError(f"mask has no valid pixel in image(s) {empty}")
    d = d * valid  # zero outside the mask
    sq = (d * d).flatten(1).sum(1)
    rmse = torch.sqrt(sq / n_valid)
    l2 = torch.sqrt(sq)
    linf = d.abs().flatten(1).amax(1)
    out: dict[str, Any] = {"rmse": rmse.tolist(), "l2": l2.tolist(), "linf": linf.tolist()}
    out.update(rmse_mean=float(rmse.mean()), l2_mean=float(l2.mean()), linf_mean=float(linf.mean()))
    out["num_images"] = b
    return out
