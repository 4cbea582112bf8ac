"""Transfer-enhancing gradient transforms (RAD sec. 3.5 and appendix E.2; ALGORITHMS.md 2.4), stackable
on any attack: ``transforms=[SI(), DI(), TI(), MI()]``.

Three kinds, applied by ``Attack.gradient`` in this order whatever their order in the list:

- input transforms (``stage = 0``: SI, DI) average the gradient over transformed copies of the input;
  they nest in list order (``[SI(), DI()]``: SI outermost, 5 x 5 = 25 gradient terms per step; RAD's
  code adds the copies instead, 9 terms);
- gradient filters (``stage = 1``: TI) act on the averaged gradient before normalisation;
- momentum (``stage = 2``: MI) accumulates the filtered gradient.

Every random choice draws from the attack's ``torch.Generator`` (passed to ``wrap``).

Gradients of input transforms are taken w.r.t. the *original* input through the (differentiable)
transform, i.e. the vector-Jacobian product of the transform with the inner gradient. With
``normalize_terms=True`` (RAD's code) each term is divided by its per-image mean |g| before the
average, which makes positive scale factors (SI's chain-rule factor 0.5^i) irrelevant.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

GradFn = Callable[[torch.Tensor], torch.Tensor]

__all__ = ["GradientTransform", "InputTransform", "SI", "DI", "TI", "MI", "gaussian_kernel",
           "per_image_mean_abs"]


def per_image_mean_abs(g: torch.Tensor) -> torch.Tensor:
    """mean |g| per image, shaped (B, 1, ..., 1) for broadcasting."""
    return g.flatten(1).abs().mean(1).view(-1, *([1] * (g.ndim - 1)))


def _normalize(g: torch.Tensor) -> torch.Tensor:
    return g / per_image_mean_abs(g).clamp_min(torch.finfo(g.dtype).tiny)


class GradientTransform:
    """Base of the gradient transforms. ``stage``: 0 input transform, 1 gradient filter, 2 momentum."""

    stage: int = 1

    def reset(self, x: torch.Tensor) -> None:
        """Called at the start of every attack run (clears momentum)."""

    def wrap(self, grad_fn: GradFn, generator: torch.Generator, deterministic: bool = False) -> GradFn:
        """Input transforms: a gradient function averaging ``grad_fn`` over transformed inputs.
        ``deterministic``: ``grad_fn`` gives the same result for the same input (no random transform
        inside it), so a copy that repeats another (SI's second unscaled term) reuses its gradient."""
        return grad_fn

    def process(self, g: torch.Tensor) -> torch.Tensor:
        """Gradient filters and momentum: the new gradient."""
        return g

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class InputTransform(GradientTransform):
    """Average the gradient over ``copies(x, generator)`` (a list of differentiable maps of x; ``None``
    is the identity), each mapped back to x by its vector-Jacobian product."""

    stage = 0
    normalize_terms: bool = True
    map_back: bool = True

    def copies(self, x: torch.Tensor, generator: torch.Generator) -> list[Callable[[torch.Tensor], torch.Tensor] | None]:
        raise NotImplementedError  # pragma: no cover

    def wrap(self, grad_fn: GradFn, generator: torch.Generator, deterministic: bool = False) -> GradFn:
        def averaged(x: torch.Tensor) -> torch.Tensor:
            total = identity = None
            maps = self.copies(x, generator)
            for fn in maps:
                if fn is None and deterministic and identity is not None:
                    g = identity  # the same input again (RAD's SI counts x twice): the same gradient
                elif fn is None:
                    g = identity = grad_fn(x)
                else:
                    xr = x.detach().requires_grad_(True)
                    with torch.enable_grad():
                        y = fn(xr)
                    g_in = grad_fn(y.detach())
                    if self.map_back:
                        (g,) = torch.autograd.grad(y, xr, grad_outputs=g_in)
                    else:
                        g = g_in
                if self.normalize_terms:
                    g = _normalize(g)
                total = g if total is None else total + g
            return total / len(maps)

        return averaged


class SI(InputTransform):
    """Scale invariance (Lin et al., ICLR 2020; RAD eq. 4): average the gradient over ``x * 0.5**i``,
    i = 0..scales-1, plus one more unscaled ``x`` when ``extra_unscaled`` (RAD's code: 5 terms, x counted
    twice). ``normalize_terms`` (default, RAD's code): each term divided by its mean |g|. Lin et al.'s
    SIM is ``SI(scales=5, extra_unscaled=False, normalize_terms=False)``."""

    def __init__(self, *, scales: int = 4, extra_unscaled: bool = True, normalize_terms: bool = True):
        if scales < 1:
            raise ValueError(f"SI: scales must be >= 1, got {scales}")
        self.scales = int(scales)
        self.extra_unscaled = bool(extra_unscaled)
        self.normalize_terms = bool(normalize_terms)

    def copies(self, x, generator):
        maps: list = [None]
        for i in range(1, self.scales):
            maps.append(lambda t, s=0.5 ** i: t * s)
        if self.extra_unscaled:
            maps.append(None)
        return maps


class DI(InputTransform):
    """Diverse inputs (Xie et al., CVPR 2019; RAD appendix E.2): the original plus ``copies`` copies,
    each resized (bilinear) by a factor U(low, high) and pasted at a random position on a canvas of the
    input size filled with ``fill``, applied with probability ``p`` (1 in RAD). One random size and
    position per copy, shared by the batch. Defaults follow RAD's code (ALGORITHMS.md 2.4: U(0.9, 1),
    zero canvas); RAD's appendix E.2 text ("resize to 0.9x, pad with white pixels") is
    ``DI(low=0.9, high=0.9, fill=1.0)``.

    ``map_back=True`` (default, the standard DI): the copies are differentiable, so the gradient flows
    back to x through the resize and paste. RAD's reference code (ALGORITHMS.md 2.4) instead uses the
    gradient w.r.t. the transformed input as it is (spatially misaligned): ``map_back=False``.
    """

    def __init__(self, *, copies: int = 4, low: float = 0.9, high: float = 1.0, p: float = 1.0,
                 include_original: bool = True, normalize_terms: bool = True, map_back: bool = True,
                 fill: float = 0.0):
        if not 0 < low <= high <= 1:
            raise ValueError(f"DI: need 0 < low <= high <= 1, got {low}, {high}")
        if not 0 <= fill <= 1:
            raise ValueError(f"DI: fill must be in [0, 1], got {fill}")
        self.fill = float(fill)
        self.n_copies = int(copies)
        self.low, self.high, self.p = float(low), float(high), float(p)
        self.include_original = bool(include_original)
        self.normalize_terms = bool(normalize_terms)
        self.map_back = bool(map_back)

    def sample(self, h: int, w: int, generator: torch.Generator) -> tuple[int, int, int, int] | None:
        """(new_h, new_w, top, left) of one copy, or None (identity, with probability 1 - p)."""
        r = torch.rand(4, generator=generator, dtype=torch.float64)
        if r[0].item() >= self.p:
            return None
        f = self.low + (self.high - self.low) * r[1].item()
        nh, nw = max(1, round(h * f)), max(1, round(w * f))
        top = min(int(r[2].item() * (h - nh + 1)), h - nh)
        left = min(int(r[3].item() * (w - nw + 1)), w - nw)
        return nh, nw, top, left

    @staticmethod
    def apply(x: torch.Tensor, params: tuple[int, int, int, int] | None, fill: float = 0.0) -> torch.Tensor:
        """The copy of ``x`` (B, C, H, W) for ``params`` on a canvas of value ``fill``; differentiable."""
        if params is None:
            return x
        nh, nw, top, left = params
        h, w = x.shape[-2:]
        y = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)
        return F.pad(y, (left, w - nw - left, top, h - nh - top), value=fill)

    def copies(self, x, generator):
        h, w = x.shape[-2:]
        maps: list = [None] if self.include_original else []
        for _ in range(self.n_copies):
            params = self.sample(h, w, generator)
            maps.append(None if params is None else (lambda t, q=params: self.apply(t, q, self.fill)))
        if not maps:
            raise ValueError("DI: no copies (copies=0 and include_original=False)")
        return maps

    def __repr__(self) -> str:
        return (f"DI(copies={self.n_copies}, low={self.low}, high={self.high}, p={self.p}, "
                f"include_original={self.include_original}, normalize_terms={self.normalize_terms}, "
                f"map_back={self.map_back}, fill={self.fill})")


def gaussian_kernel(size: int = 15, nsig: float = 3.0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(size, size) Gaussian over [-nsig, nsig] on both axes, normalised to sum 1 (TI's kernel)."""
    t = torch.linspace(-nsig, nsig, size, dtype=torch.float64)
    k1 = torch.exp(-0.5 * t * t)
    k = torch.outer(k1, k1)
    return (k / k.sum()).to(dtype)


class TI(GradientTransform):
    """Translation invariance (Dong et al., CVPR 2019): depthwise convolution of the gradient with a
    ``size`` x ``size`` Gaussian over [-nsig, nsig] normalised to sum 1 (zero padding, same size), before
    the normalisation of the update (RAD appendix E.2: size 15)."""

    stage = 1

    def __init__(self, *, size: int = 15, nsig: float = 3.0):
        if size < 1 or size % 2 == 0:
            raise ValueError(f"TI: size must be odd and positive, got {size}")
        self.size, self.nsig = int(size), float(nsig)

    def process(self, g: torch.Tensor) -> torch.Tensor:
        c = g.shape[1]
        k = gaussian_kernel(self.size, self.nsig, g.dtype).to(g.device)
        w = k.expand(c, 1, self.size, self.size).contiguous()
        return F.conv2d(g, w, padding=self.size // 2, groups=c)


class MI(GradientTransform):
    """Momentum (Dong et al., CVPR 2018): ``v <- mu * v + g / ||g||_1`` (L1 norm per image), and the
    update uses ``v`` (mu = 1 as RAD appendix E.2). Reset at the start of every attack run."""

    stage = 2

    def __init__(self, *, mu: float = 1.0):
        self.mu = float(mu)
        self._v: torch.Tensor | None = None

    def reset(self, x: torch.Tensor) -> None:
        self._v = None

    def process(self, g: torch.Tensor) -> torch.Tensor:
        l1 = g.flatten(1).abs().sum(1).view(-1, *([1] * (g.ndim - 1)))
        gn = g / l1.clamp_min(torch.finfo(g.dtype).tiny)
        self._v = gn if self._v is None else self.mu * self._v + gn
        return self._v

