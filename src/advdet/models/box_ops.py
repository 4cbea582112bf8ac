"""Box encodings and target matching shared by the anchor-based families (SSD, YOLO)."""

from __future__ import annotations

import torch
from torchvision.ops import box_iou


def xyxy_to_cxcywh(b: torch.Tensor) -> torch.Tensor:
    return torch.stack([(b[..., 0] + b[..., 2]) / 2, (b[..., 1] + b[..., 3]) / 2,
                        b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]], -1)


def cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    return torch.stack([b[..., 0] - b[..., 2] / 2, b[..., 1] - b[..., 3] / 2,
                        b[..., 0] + b[..., 2] / 2, b[..., 1] + b[..., 3] / 2], -1)


def ssd_encode(matched_xyxy: torch.Tensor, priors_cxcywh: torch.Tensor,
               variances: tuple[float, float] = (0.1, 0.2)) -> torch.Tensor:
    """SSD offsets: ((c_gt - c_p) / (v0 w_p), log(w_gt / w_p) / v1) (ssd.pytorch ``encode``)."""
    g = xyxy_to_cxcywh(matched_xyxy)
    cxy = (g[..., :2] - priors_cxcywh[..., :2]) / (variances[0] * priors_cxcywh[..., 2:])
    wh = torch.log((g[..., 2:] / priors_cxcywh[..., 2:]).clamp(min=1e-6)) / variances[1]
    return torch.cat([cxy, wh], -1)


def ssd_decode(loc: torch.Tensor, priors_cxcywh: torch.Tensor,
               variances: tuple[float, float] = (0.1, 0.2)) -> torch.Tensor:
    """Inverse of ``ssd_encode``: offsets (..., 4) to xyxy boxes."""
    cxy = priors_cxcywh[..., :2] + loc[..., :2] * variances[0] * priors_cxcywh[..., 2:]
    wh = priors_cxcywh[..., 2:] * torch.exp((loc[..., 2:] * variances[1]).clamp(max=10.0))
    return cxcywh_to_xyxy(torch.cat([cxy, wh], -1))


def match_priors(gt_boxes: torch.Tensor, priors_xyxy: torch.Tensor, iou_threshold: float = 0.5
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """SSD matching: each prior takes its best GT if IoU >= threshold; each GT forces its best prior.

    Returns (matched GT index per prior (P,), positive mask (P,)). With no GT every prior is negative.
    """
    p = priors_xyxy.shape[0]
    if gt_boxes.numel() == 0:
        return torch.zeros(p, dtype=torch.long, device=priors_xyxy.device), torch.zeros(
            p, dtype=torch.bool, device=priors_xyxy.device)
    iou = box_iou(gt_boxes, priors_xyxy)  # (G, P)
    best_gt_iou, best_gt = iou.max(0)
    best_prior = iou.argmax(1)  # (G,)
    best_gt_iou[best_prior] = 2.0
    best_gt[best_prior] = torch.arange(gt_boxes.shape[0], device=gt_boxes.device)
    return best_gt, best_gt_iou >= iou_threshold
