"""Consistent Features with Reconstruction (RobustDet's CFR, paper Sec. 4.4, ALGORITHMS.md 1.4).

CFR turns conv4_3 into a Gaussian layer: the mean head ``mu`` is the (dynamic) conv4_3 itself and the
log-variance head is a deep copy of it re-initialised Xavier-uniform with zero bias; ``logvar`` is clamped
to <= 10. Training forwards the reparameterised sample ``z = mu + exp(0.5 logvar) * eps`` (pre-ReLU) to
the rest of the detector and to a decoder that reconstructs the clean image; evaluation forwards ``mu``.

Losses (eq. 3 and 4, mean reductions as in the reference code):

- ``L_re = mean((G(z) - x_clean)^2)`` in the detector's normalised pixel units (``x * 255 - mean``);
- ``L_kld = -0.5 * mean(1 + logvar - mu^2 - exp(logvar))``.

The decoder follows the reference's layer list for conv4_3 (512x38x38 -> 3x300x300, BN + LeakyReLU(0.01)
after every layer but the last, ``tanh * 160`` output). Its channel counts scale with the conv4_3 width
(512, 256, 128, 64, 32 times ``channels / 512``, at least 8), and when the input size is not 300 its
output is resized to S x S with a bilinear ``interpolate`` (at 300 px with a 38 x 38 map the layer list
gives exactly 300 x 300 and nothing is resized).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from advdet.models.dynamic_conv import DynamicConv2d

LOGVAR_MAX = 10.0
DECODER_OUT_SCALE = 160.0


def _decoder_size(n: int) -> int:
    """Side of the decoder's output for an n x n input (the reference layer list)."""
    n = (n - 1) * 2 + 3 + 1      # ConvT3 s2 op1
    n = n - 2                    # Conv3
    n = (n - 1) * 2 + 3 + 1      # ConvT3 s2 op1
    n = n - 2 - 2                # Conv3, Conv3
    n = (n - 1) * 2 + 3 + 1      # (Conv3 p1) ConvT3 s2 op1
    return n - 2                 # Conv3


class CFRDecoder(nn.Module):
    """Decoder G: conv4_3 feature (B, C, h, h) -> image (B, 3, S, S) in normalised pixel units."""

    def __init__(self, in_channels: int, out_size: int, out_scale: float = DECODER_OUT_SCALE):
        super().__init__()
        c1, c2, c3, c4, c5 = (max(8, round(w * in_channels / 512)) for w in (512, 256, 128, 64, 32))

        def act(ch: int) -> list[nn.Module]:
            return [nn.BatchNorm2d(ch), nn.LeakyReLU(0.01)]

        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1), *act(c1),
            nn.ConvTranspose2d(c1, c2, 3, stride=2, output_padding=1), *act(c2),
            nn.Conv2d(c2, c2, 3), *act(c2),
            nn.ConvTranspose2d(c2, c3, 3, stride=2, output_padding=1), *act(c3),
            nn.Conv2d(c3, c3, 3), *act(c3),
            nn.Conv2d(c3, c4, 3), *act(c4),
            nn.Conv2d(c4, c4, 3, padding=1), *act(c4),
            nn.ConvTranspose2d(c4, c5, 3, stride=2, output_padding=1), *act(c5),
            nn.Conv2d(c5, 3, 3),
        )
        self.out_size = out_size
        self.out_scale = out_scale

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.layers(z)) * self.out_scale
        if y.shape[-2:] != (self.out_size, self.out_size):
            y = F.interpolate(y, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False)
        return y


class CFR(nn.Module):
    """The CFR parts that are not conv4_3 itself: the log-variance head and the decoder.

    Args:
        mu_head: the detector's (dynamic) conv4_3; it is deep-copied into the log-variance head and then
            re-initialised (Xavier-uniform per kernel slot with ``gain``, zero bias). The mean head itself
            stays in the detector (it is not registered here, so weights are not stored twice).
        out_size: S, the side of the reconstructed image.
        gain: Xavier gain of the log-variance head (the reference uses 1/256 for cfr_layer <= 14, else 1).
        logvar_max: clamp of the log-variance (10).
    """

    def __init__(self, mu_head: nn.Module, out_size: int, *, gain: float = 1.0, logvar_max: float = LOGVAR_MAX):
        super().__init__()
        self.logvar_head = copy.deepcopy(mu_head)
        w = self.logvar_head.weight
        with torch.no_grad():
            if isinstance(self.logvar_head, DynamicConv2d):
                for k in range(w.shape[0]):
                    nn.init.xavier_uniform_(w[k], gain=gain)
            else:
                nn.init.xavier_uniform_(w, gain=gain)
            if self.logvar_head.bias is not None:
                self.logvar_head.bias.zero_()
        self.decoder = CFRDecoder(mu_head.out_channels, out_size)
        self.logvar_max = logvar_max

    def logvar(self, h: torch.Tensor, pi: torch.Tensor | None = None) -> torch.Tensor:
        """Clamped log-variance of the conv4_3 feature, from the conv4_2 activation ``h``."""
        lv = self.logvar_head(h, pi) if isinstance(self.logvar_head, DynamicConv2d) else self.logvar_head(h)
        return lv.clamp(max=self.logvar_max)

    @staticmethod
    def sample(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """Reparameterised sample ``z = mu + exp(0.5 logvar) * eps``, eps ~ N(0, I) (global RNG)."""
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


def cfr_recon_loss(recon: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Eq. 3 as in the reference: mean squared error between reconstruction and clean image (same units)."""
    if recon.shape != clean.shape:
        raise ValueError(f"CFR reconstruction {tuple(recon.shape)} and clean image {tuple(clean.shape)} differ")
    return F.mse_loss(recon, clean)


def cfr_kld(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Eq. 4: ``-0.5 * mean(1 + logvar - mu^2 - exp(logvar))`` over all elements."""
    return -0.5 * torch.mean(1 + logvar - mu.pow(2) - logvar.exp())
