"""The Gaussian-noise ablation of RAD (sec. 4.1, Table 3 "Ablation")."""

from __future__ import annotations

from typing import Any

import torch

from advdet.attacks.base import Attack

__all__ = ["GaussianNoise"]


class GaussianNoise(Attack):
    """Add N(0, sigma^2) noise, sigma = 9 in 0-255 units, and clip to [0, 1] (RAD sec. 4.1: "we add
    large Gaussian noises (sigma = 9) to the resized images"); not eps-bounded unless ``eps`` is given.
    The noise is drawn from the attack's seeded generator (on the CPU, so the bytes do not depend on
    the device); ``valid_only`` leaves the padding untouched. No model call is made (``model`` may be
    None)."""

    name = "gaussian"
    surrogate_kind = "none"
    budget = "none"
    description = "Gaussian-noise ablation of RAD: x + N(0, 9^2) in 0-255 units, clipped to [0, 1]"

    def __init__(self, model: Any = None, *, sigma: float = 9.0, eps: float | None = None,
                 valid_only: bool = False, seed: int = 0, device=None):
        super().__init__(model if model is not None else torch.nn.Identity(), eps=eps, step=0.0, steps=0,
                         valid_only=valid_only, seed=seed, device=device)
        if sigma < 0:
            raise ValueError(f"GaussianNoise: sigma must be >= 0, got {sigma}")
        self.sigma = float(sigma)

    def _run(self, x: torch.Tensor, targets: Any, mask: torch.Tensor | None) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=self.generator, dtype=torch.float64).to(x.device, x.dtype)
        return self.project(x + noise * (self.sigma / 255.0), x, mask)

    def objective(self, x_in: torch.Tensor, state: dict) -> torch.Tensor:
        raise NotImplementedError("GaussianNoise has no objective")
