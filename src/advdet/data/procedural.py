"""`procedural`: a formula-driven classification set, the "ImageNet" under the zoo's backbones.

Real detectors start from ImageNet-pretrained backbones, and families that share an architecture share
those weights; that shared start is what lets adversarial examples transfer between them. The embedded
benchmark has no ImageNet, so it pretrains on images drawn from formulas, in the spirit of FractalDB
(Kataoka et al., ACCV 2020: a class is an iterated function system, IFS) and of Baradad et al. (NeurIPS
2021: dead-leaves images and procedural noise with natural-image statistics):

- **classes**: class ``c`` is an IFS of 2 to 4 contractive affine maps drawn from a generator seeded by
  ``(seed, c)`` and kept only when its attractor fills between 6 % and 60 % of its bounding box (FractalDB's
  filling-rate filter, which rejects degenerate lines and blobs).
- **class appearance**: natural categories have typical colours and textures as well as shapes, so each
  class also draws a hue and a texture (flat, gradient, stripes of a period and angle, or noise)
  (:func:`class_style`). Shape alone proved too hard for the tiny backbones: with shape-only classes the
  pretraining loss of the ResNet body stayed at chance (ln 256) for 1,000 updates of 128 images.
- **an image** of class ``c``: the attractor of the class's IFS with every map parameter jittered by up to
  5 % (FractalDB's intra-class variation), rendered by the chaos game (384 chains x 40 steps) and
  thickened by a 3 x 3 max filter, randomly rotated, scaled (55 % to 95 % of the side), stretched,
  flipped and placed, filled with the class's texture (hue +- 0.04, random saturation and value, stripe
  period +- 15 %, angle +- 0.3 rad), over a background that carries no class information: a dead-leaves
  image (discs and squares with power-law radii), 1/f^a spectral noise, or one of the shapes renderer's
  backgrounds (smooth noise, gradients, stripes, clutter); with probability 0.35 one to three objects of
  the shapes renderer (random textures) are drawn as distractors before the fractal; mild sensor noise
  with probability 0.5.
- **labels are balanced**: item ``i`` of a split has label ``i % num_classes``.
- **deterministic**: item ``i`` is drawn from its own generator seeded by ``(seed, split, i, version)``,
  so the same (seed, split, index) gives the same bytes in any process and order.

:func:`render_procedural_image` draws one image; :class:`ProceduralClassification` is the dataset
(uint8 tensors, or float in [0, 1]); :func:`procedural_tensors` renders a whole split into a cached
uint8 tensor under ``$ADVDET_HOME/cache``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageDraw

from advdet.data.shapes import (SHAPE_CLASSES, _background, _gradient, _hsv_to_rgb, _shape_mask, _smooth_noise,
                                _texture, advdet_home)

log = logging.getLogger(__name__)

PROCEDURAL_VERSION = 2
_SPLIT_IDS = {"train": 1, "val": 2}
_CHAINS, _STEPS, _BURN = 384, 40, 8
MIN_FILL, MAX_FILL = 0.06, 0.60  # filling rate of a class's attractor in its bounding box (32 x 32 grid)


# ------------------------------------------------------------------------------------------- classes
def _chaos_game(maps: np.ndarray, probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Points (2, P) (x row, y row) on the attractor of the IFS ``maps`` (M, 2, 3) picked with ``probs``."""
    cum = np.cumsum(probs)
    cum[-1] = 1.0
    x, y = rng.uniform(-0.5, 0.5, (2, _CHAINS))
    out = np.empty((2, _STEPS - _BURN, _CHAINS))
    for t in range(_STEPS):
        a = maps[np.searchsorted(cum, rng.random(_CHAINS))]
        x, y = a[:, 0, 0] * x + a[:, 0, 1] * y + a[:, 0, 2], a[:, 1, 0] * x + a[:, 1, 1] * y + a[:, 1, 2]
        if t >= _BURN:
            out[0, t - _BURN], out[1, t - _BURN] = x, y
    return out.reshape(2, -1)


def _fill_rate(pts: np.ndarray, grid: int = 32) -> float:
    pts = pts.T
    lo, hi = pts.min(0), pts.max(0)
    span = np.maximum(hi - lo, 1e-9)
    ij = np.clip(((pts - lo) / span * (grid - 1)).round().astype(int), 0, grid - 1)
    # occupancy inside the square box of the longer side (thin lines fill little of it)
    sq = np.clip((ij * (span / span.max())).round().astype(int), 0, grid - 1)
    return len(np.unique(sq[:, 0] * grid + sq[:, 1])) / grid ** 2


@lru_cache(maxsize=4096)
def ifs_class(seed: int, cls: int) -> tuple[np.ndarray, np.ndarray]:
    """The IFS of class ``cls``: maps (M, 2, 3) (``[A | b]``, each A with spectral norm <= 0.85) and their
    picking probabilities (M,), proportional to ``|det A|`` (FractalDB). Deterministic in (seed, cls)."""
    rng = np.random.default_rng([seed, cls, PROCEDURAL_VERSION, 7])
    while True:
        m = int(rng.integers(2, 5))
        maps = rng.uniform(-1.0, 1.0, (m, 2, 3))
        for a in maps:
            s = np.linalg.norm(a[:, :2], 2)
            a[:, :2] *= min(1.0, float(rng.uniform(0.45, 0.85)) / max(s, 1e-9))
        det = np.abs(np.linalg.det(maps[:, :, :2]))
        if det.min() < 1e-3:
            continue
        probs = det / det.sum()
        pts = _chaos_game(maps, probs, np.random.default_rng([seed, cls, 11]))
        if not np.isfinite(pts).all() or np.ptp(pts, 1).min() < 1e-3:
            continue
        if MIN_FILL <= _fill_rate(pts) <= MAX_FILL:
            maps.setflags(write=False)
            probs.setflags(write=False)
            return maps, probs


@lru_cache(maxsize=4096)
def class_style(seed: int, cls: int) -> tuple[float, int, float, float]:
    """The appearance of class ``cls``: (hue in [0, 1), texture kind 0..3 (flat, gradient, stripes, noise),
    stripe period in px, stripe angle in radians). Natural categories have typical colours and textures as
    well as shapes; here they are the class's, jittered per image (:func:`_class_texture`)."""
    rng = np.random.default_rng([seed, cls, PROCEDURAL_VERSION, 13])
    return float(rng.random()), int(rng.integers(0, 4)), float(rng.uniform(3, 12)), float(rng.uniform(0, math.pi))


def _class_texture(rng: np.random.Generator, style: tuple[float, int, float, float], s: int) -> np.ndarray:
    """(s, s, 3) fill of one object of a class with ``style``: its hue (+- 0.04), a random saturation and
    value, and its texture (stripes keep the class's period +- 15 % and angle +- 0.3 rad)."""
    hue, kind, period, angle = style
    h = (hue + rng.uniform(-0.04, 0.04)) % 1.0
    sat, val = float(rng.uniform(0.45, 1.0)), float(rng.uniform(0.45, 1.0))
    rgb = np.array(_hsv_to_rgb(h, sat, val), dtype=np.float32)
    if kind == 0:
        return np.broadcast_to(rgb, (s, s, 3))
    other = np.array(_hsv_to_rgb((h + 0.5 * rng.uniform(-0.1, 0.1)) % 1.0, sat, val * 0.35), np.float32)
    if kind == 1:
        t = _gradient(rng, s, s)[..., :1]
    elif kind == 2:
        ang = angle + rng.uniform(-0.3, 0.3)
        per = period * rng.uniform(0.85, 1.15)
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
        t = (0.5 + 0.5 * np.sin((xx * math.cos(ang) + yy * math.sin(ang)) * 2 * math.pi / per))[..., None]
    else:
        t = _smooth_noise(rng, s, s, 12)[..., :1]
    return rgb + (other - rgb) * t


# ------------------------------------------------------------------------------------------- backgrounds
def _dead_leaves(rng: np.random.Generator, s: int) -> np.ndarray:
    """Occluding discs and squares of random colours with power-law radii (density ~ r^-3)."""
    img = Image.new("RGB", (s, s), tuple(int(v) for v in rng.integers(0, 256, 3)))
    d = ImageDraw.Draw(img)
    rmin, rmax = 2.0, s / 2.5
    # inverse-CDF sampling of p(r) ~ r^-3 on [rmin, rmax]
    u = rng.random(int(rng.integers(25, 80)))
    radii = (rmin ** -2 - u * (rmin ** -2 - rmax ** -2)) ** -0.5
    base = rng.random(3)
    for r in radii:
        col = np.clip(base + rng.normal(0, 0.35, 3), 0, 1) if rng.random() < 0.7 else rng.random(3)
        col = tuple(int(v * 255) for v in col)
        cx, cy = rng.uniform(-r, s + r, 2)
        if rng.random() < 0.7:
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
        else:
            d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=col)
    return np.asarray(img, dtype=np.float32) / 255.0


def _spectral_noise(rng: np.random.Generator, s: int) -> np.ndarray:
    """Coloured noise with a 1/f^a amplitude spectrum, a in [1, 2] (natural images: a ~ 1)."""
    a = float(rng.uniform(1.0, 2.0))
    fy = np.fft.fftfreq(s)[:, None]
    fx = np.fft.rfftfreq(s)[None, :]
    f = np.sqrt(fx ** 2 + fy ** 2)
    f[0, 0] = 1.0
    amp = f ** -a
    amp[0, 0] = 0.0
    chans = []
    for _ in range(2):  # two independent fields, mixed into RGB by a random colour matrix
        phase = rng.uniform(0, 2 * math.pi, amp.shape)
        field = np.fft.irfft2(amp * np.exp(1j * phase), s=(s, s))
        chans.append((field - field.mean()) / (field.std() + 1e-9))
    mix = rng.normal(0, 1, (2, 3))
    out = np.einsum("kij,kc->ijc", np.stack(chans), mix)
    out = out / (np.abs(out).max() + 1e-9) * float(rng.uniform(0.25, 0.5)) + rng.uniform(0.25, 0.75, 3)
    return np.clip(out, 0, 1).astype(np.float32)


def _procedural_background(rng: np.random.Generator, s: int) -> np.ndarray:
    kind = int(rng.integers(0, 3))
    if kind == 0:
        return _dead_leaves(rng, s)
    if kind == 1:
        return _spectral_noise(rng, s)
    return _background(rng, s, s)  # the shapes renderer's backgrounds


# ------------------------------------------------------------------------------------------- images
def _fractal_alpha(rng: np.random.Generator, maps: np.ndarray, probs: np.ndarray, s: int) -> np.ndarray:
    """(s, s) float coverage in [0, 1] of one jittered, posed instance of the IFS."""
    jitter = maps * rng.uniform(0.95, 1.05, maps.shape)
    x, y = _chaos_game(jitter, probs, rng)
    x, y = x - (x.min() + x.max()) / 2, y - (y.min() + y.max()) / 2
    ang = rng.uniform(0, 2 * math.pi)
    c, sn = math.cos(ang), math.sin(ang)
    y = y * math.exp(rng.uniform(-0.3, 0.3))  # stretch
    if rng.random() < 0.5:
        x = -x  # mirror
    x, y = x * c - y * sn, x * sn + y * c
    ext = max(np.abs(x).max(), np.abs(y).max()) + 1e-9
    size = s * float(rng.uniform(0.55, 0.95))
    cx, cy = rng.uniform(size / 2, s - size / 2, 2) if size < s else (s / 2, s / 2)
    ix = np.floor(x * (size / 2 / ext) + cx).astype(np.int64)
    iy = np.floor(y * (size / 2 / ext) + cy).astype(np.int64)
    ok = (ix >= 0) & (ix < s) & (iy >= 0) & (iy < s)
    dens = np.bincount(iy[ok] * s + ix[ok], minlength=s * s).reshape(s, s).astype(np.float32)
    alpha = np.minimum(1.0, dens / 2.0)
    # thicken by a 3 x 3 max filter: the attractor becomes a connected shape, not scattered dots
    pad = np.pad(alpha, 1)
    return np.maximum.reduce([pad[1 + dy:1 + dy + s, 1 + dx:1 + dx + s] for dy in (-1, 0, 1) for dx in (-1, 0, 1)])


def _distractors(rng: np.random.Generator, img: np.ndarray) -> None:
    s = img.shape[0]
    for _ in range(int(rng.integers(1, 4))):
        r = float(rng.uniform(0.06, 0.2)) * s
        cx, cy = rng.uniform(r, s - r, 2)
        kind = SHAPE_CLASSES[int(rng.integers(0, len(SHAPE_CLASSES)))]
        mask = _shape_mask(kind, s, s, float(cx), float(cy), r, float(rng.uniform(0, 2 * math.pi)), rng)
        img[mask] = _texture(rng, s, s)[mask]


def render_procedural_image(seed: int, split: str, index: int, num_classes: int, size: int = 64
                            ) -> tuple[np.ndarray, int]:
    """Item ``index`` of ``split`` ("train" or "val"): ((size, size, 3) uint8 image, label in
    ``[0, num_classes)``); the label is ``index % num_classes``."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be one of {sorted(_SPLIT_IDS)}, got {split!r}")
    label = index % num_classes
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index, PROCEDURAL_VERSION])
    img = _procedural_background(rng, size).copy()
    if rng.random() < 0.35:
        _distractors(rng, img)
    maps, probs = ifs_class(seed, label)
    alpha = _fractal_alpha(rng, maps, probs, size)[..., None]
    img = img * (1 - alpha) + _class_texture(rng, class_style(seed, label), size) * alpha
    if rng.random() < 0.5:
        img = img + rng.normal(0, float(rng.uniform(0.005, 0.03)), img.shape)
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8), label


class ProceduralClassification(torch.utils.data.Dataset):
    """``length`` items of a split: ``(image, label)`` with image (3, S, S) uint8 (``as_float``: float
    in [0, 1]) and an int label; see the module docstring. Items are rendered on access."""

    def __init__(self, num_classes: int = 256, length: int | None = None, size: int = 64, seed: int = 0,
                 split: str = "train", as_float: bool = False):
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes, self.size, self.seed, self.split = num_classes, size, seed, split
        self.length = num_classes if length is None else int(length)
        self.as_float = as_float

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not 0 <= i < self.length:
            raise IndexError(i)
        arr, label = render_procedural_image(self.seed, self.split, i, self.num_classes, self.size)
        x = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
        return (x.float() / 255.0 if self.as_float else x), label


def _render_range(args: tuple[int, int, int, int, str, int]) -> tuple[int, np.ndarray]:
    start, stop, num_classes, size, split, seed = args
    out = np.empty((stop - start, size, size, 3), dtype=np.uint8)
    for j, i in enumerate(range(start, stop)):
        out[j] = render_procedural_image(seed, split, i, num_classes, size)[0]
    return start, out


def procedural_tensors(num_classes: int, length: int, size: int = 64, seed: int = 0, split: str = "train",
                       cache: bool = True, workers: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split as ``(images (N, 3, S, S) uint8, labels (N,) int64)``, rendered once and kept under
    ``$ADVDET_HOME/cache`` (keyed by every argument but ``workers`` and the generator version).
    ``workers`` > 1 renders in that many processes (the same bytes: every item has its own generator)."""
    sig = f"procedural|v{PROCEDURAL_VERSION}|{num_classes}|{length}|{size}|{seed}|{split}"
    key = advdet_home() / "cache" / f"procedural-{hashlib.sha1(sig.encode()).hexdigest()[:16]}.pt"
    if cache and key.exists():
        d = torch.load(key, weights_only=True)
        return d["images"], d["labels"]
    log.info("rendering %d procedural %s images (%d classes, %d px, %d workers)", length, split, num_classes, size,
             workers)
    images = torch.empty((length, 3, size, size), dtype=torch.uint8)
    labels = torch.arange(length, dtype=torch.long) % num_classes
    chunk = 2000
    jobs = [(a, min(a + chunk, length), num_classes, size, split, seed) for a in range(0, length, chunk)]
    done = 0

    def put(start: int, arr: np.ndarray) -> None:
        nonlocal done
        images[start:start + len(arr)] = torch.from_numpy(arr).permute(0, 3, 1, 2)
        done += len(arr)
        if done % 10000 < chunk:
            log.info("rendered %d / %d", done, length)

    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            for start, arr in pool.map(_render_range, jobs):
                put(start, arr)
    else:
        for job in jobs:
            put(*_render_range(job))
    if cache:
        key.parent.mkdir(parents=True, exist_ok=True)
        tmp = key.with_suffix(f".{os.getpid()}.tmp")
        torch.save({"images": images, "labels": labels}, tmp)
        os.replace(tmp, key)
    return images, labels
