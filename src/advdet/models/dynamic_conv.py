"""Adversarially-aware convolution (RobustDet's ``dconv``, paper Sec. 4.2, ALGORITHMS.md 1.2).

A :class:`DynamicConv2d` holds ``K`` kernels ``W_k`` (K, out, in/groups, kh, kw) and ``K`` biases ``b_k``
(K, out). Image ``i`` of a batch is convolved with its own convex combination of them,
``W(i) = sum_k pi_ik W_k`` and ``b(i) = sum_k pi_ik b_k``, where ``pi`` (B, K) comes from the adversarial
image discriminator (rows on the probability simplex). As in the reference code the per-image kernels
are applied in one grouped convolution with ``groups = B * groups``: the batch is folded into the
channel dimension, (1, B*in, H, W).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair


class DynamicConv2d(nn.Module):
    """K-kernel convolution mixed per image by ``pi`` (B, K).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as in
            :class:`torch.nn.Conv2d` (zero padding only).
        K: number of kernels (RobustDet uses 4).

    ``forward(x, pi)``: ``x`` (B, in, H, W), ``pi`` (B, K) (or (K,), shared by the batch) -> (B, out, H', W').
    The mixing weights are used as given (the AID already applies a softmax); gradients reach every
    kernel, every bias and ``pi``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, *, K: int = 4):
        super().__init__()
        if K < 1:
            raise ValueError(f"DynamicConv2d needs K >= 1 kernels, got {K}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be "
                             f"divisible by groups ({groups})")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.groups, self.K = groups, K
        self.weight = nn.Parameter(torch.empty(K, out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(K, out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each of the K kernels initialised like a fresh ``nn.Conv2d`` (Kaiming-uniform, a=sqrt(5))."""
        for k in range(self.K):
            conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, groups=self.groups,
                             bias=self.bias is not None)
            with torch.no_grad():
                self.weight[k].copy_(conv.weight)
                if self.bias is not None:
                    self.bias[k].copy_(conv.bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, K: int = 4) -> "DynamicConv2d":
        """A dynamic conv whose K kernels (and biases) are all copies of ``conv``'s (RobustDet's init)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_conv expects an nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("DynamicConv2d.from_conv supports numeric zero padding only "
                             f"(got padding={conv.padding!r}, padding_mode={conv.padding_mode!r})")
        d = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, K=K)
        d = d.to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            d.weight.copy_(conv.weight.detach()[None].expand_as(d.weight))
            if conv.bias is not None:
                d.bias.copy_(conv.bias.detach()[None].expand_as(d.bias))
        return d

    def _check_pi(self, pi: torch.Tensor, batch: int) -> torch.Tensor:
        if pi.ndim == 1:
            pi = pi[None].expand(batch, -1)
        if pi.ndim != 2 or pi.shape != (batch, self.K):
            raise ValueError(f"DynamicConv2d: pi must have shape ({batch}, {self.K}) or ({self.K},), "
                             f"got {tuple(pi.shape)}")
        return pi.to(self.weight.dtype)

    def mixed_weight(self, pi: torch.Tensor) -> torch.Tensor:
        """Per-image kernels (B, out, in/groups, kh, kw) = sum_k pi[:, k] W_k."""
        pi = self._check_pi(pi, pi.shape[0] if pi.ndim == 2 else 1)
        return (pi @ self.weight.flatten(1)).view(pi.shape[0], *self.weight.shape[1:])

    def mixed_bias(self, pi: torch.Tensor) -> torch.Tensor | None:
        """Per-image biases (B, out) = sum_k pi[:, k] b_k, or None without bias."""
        if self.bias is None:
            return None
        pi = self._check_pi(pi, pi.shape[0] if pi.ndim == 2 else 1)
        return pi @ self.bias

    def forward(self, x: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        pi = self._check_pi(pi, b)
        w = (pi @ self.weight.flatten(1)).view(b * self.out_channels, *self.weight.shape[2:])
        bias = (pi @ self.bias).flatten() if self.bias is not None else None
        out = F.conv2d(x.reshape(1, b * x.shape[1], *x.shape[2:]), w, bias, self.stride, self.padding,
                       self.dilation, groups=b * self.groups)
        return out.view(b, self.out_channels, *out.shape[2:])

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}, K={self.K}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s
