"""`shapes`: the deterministic synthetic detection and instance-segmentation benchmark.

Each image has a procedural background (smooth noise, gradient, stripes, clutter, or a blend) and 1 to 8
objects of ``SHAPE_CLASSES`` with random colour, texture, scale (small to large), rotation and partial
occlusion; image sides vary between 160 and 400 px. Masks are exact (the rendered pixels of each
object that stay visible after later objects are drawn over it); boxes are the tight boxes of those
visible masks. Every image is drawn from its own generator seeded by (seed, split, index), so output
is byte-identical for a seed whatever the number of worker processes.
"""

from __future__ import annotations

import fcntl
import io
import logging
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from advdet.data.io import atomic_write_bytes, atomic_write_json, read_json

log = logging.getLogger(__name__)

SHAPE_CLASSES = ("circle", "square", "triangle", "star", "cross", "ring", "ellipse", "crescent")
GENERATOR_VERSION = 1
MIN_SIDE, MAX_SIDE = 160, 400
MIN_VISIBLE = 0.55  # an object must keep at least this fraction of its pixels visible
_SPLIT_IDS = {"train": 1, "val": 2, "test": 3}


def shape_categories() -> list[dict]:
    """COCO categories of the benchmark (ids 1..8)."""
    return [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SHAPE_CLASSES)]


# --------------------------------------------------------------------------------------- background
def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Value noise: a coarse random grid bilinearly upsampled to (h, w, 3), in [0, 1]."""
    gh, gw = max(2, cells * h // max(h, w)), max(2, cells * w // max(h, w))
    grid = rng.random((gh, gw, 3), dtype=np.float32)
    img = Image.fromarray((grid * 255).astype(np.uint8), "RGB").resize((w, h), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


def _gradient(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    c0, c1 = rng.random(3, dtype=np.float32), rng.random(3, dtype=np.float32)
    ang = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = xx * math.cos(ang) + yy * math.sin(ang)
    t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
    return c0 + (c1 - c0) * t[..., None]


def _stripes(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    c0, c1 = rng.random(3, dtype=np.float32), rng.random(3, dtype=np.float32)
    ang = rng.uniform(0, math.pi)
    period = rng.uniform(6, 40)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = 0.5 + 0.5 * np.sin((xx * math.cos(ang) + yy * math.sin(ang)) * 2 * math.pi / period)
    return c0 + (c1 - c0) * t[..., None]


def _clutter(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Lines, dots and short arcs in random colours: distractors that are not shape-class objects."""
    base = tuple(int(v) for v in rng.integers(0, 256, 3))
    img = Image.new("RGB", (w, h), base)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(15, 50))):
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        x0, y0 = float(rng.uniform(0, w)), float(rng.uniform(0, h))
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.line([x0, y0, x0 + rng.uniform(-60, 60), y0 + rng.uniform(-60, 60)], fill=col,
                      width=int(rng.integers(1, 4)))
        elif kind == 1:
            r = float(rng.uniform(1, 3))
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=col)
        else:
            r = float(rng.uniform(8, 30))
            a0 = float(rng.uniform(0, 360))
            draw.arc([x0 - r, y0 - r, x0 + r, y0 + r], a0, a0 + float(rng.uniform(30, 120)), fill=col,
                     width=int(rng.integers(1, 3)))
    return np.asarray(img, dtype=np.float32) / 255.0


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    kinds = [lambda: _smooth_noise(rng, h, w, int(rng.integers(3, 12))), lambda: _gradient(rng, h, w),
             lambda: _stripes(rng, h, w), lambda: _clutter(rng, h, w)]
    a = kinds[int(rng.integers(0, 4))]()
    if rng.random() < 0.5:  # blend two kinds
        b = kinds[int(rng.integers(0, 4))]()
        t = float(rng.uniform(0.3, 0.7))
        a = a * t + b * (1 - t)
    return a


# ------------------------------------------------------------------------------------------- shapes
def _rotate(pts: np.ndarray, ang: float) -> np.ndarray:
    c, s = math.cos(ang), math.sin(ang)
    return pts @ np.array([[c, s], [-s, c]], dtype=np.float64)


def _regular(n: int, r: float, phase: float = 0.0) -> np.ndarray:
    t = phase + np.arange(n) * 2 * math.pi / n
    return np.stack([np.cos(t), np.sin(t)], 1) * r


def _shape_mask(kind: str, h: int, w: int, cx: float, cy: float, r: float, ang: float,
                rng: np.random.Generator) -> np.ndarray:
    """Binary (h, w) mask of one shape of class ``kind``, radius ``r``, rotation ``ang``."""
    m = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(m)

    def poly(pts: np.ndarray, fill: int = 255) -> None:
        pts = _rotate(pts, ang) + np.array([cx, cy])
        d.polygon([tuple(p) for p in pts.tolist()], fill=fill)

    if kind == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif kind == "square":
        poly(_regular(4, r, math.pi / 4))
    elif kind == "triangle":
        poly(_regular(3, r, -math.pi / 2))
    elif kind == "star":
        outer, inner = _regular(5, r, -math.pi / 2), _regular(5, r * 0.45, -math.pi / 2 + math.pi / 5)
        poly(np.stack([outer, inner], 1).reshape(-1, 2))
    elif kind == "cross":
        a, b = r, r * 0.33
        poly(np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b],
                       [-a, b], [-a, -b], [-b, -b]]))
    elif kind == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ri = r * float(rng.uniform(0.45, 0.6))
        d.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    elif kind == "ellipse":
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        poly(np.stack([np.cos(t) * r, np.sin(t) * r * float(rng.uniform(0.4, 0.55))], 1))
    elif kind == "crescent":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        off = _rotate(np.array([[r * 0.5, 0.0]]), ang)[0]
        ri = r * 0.85
        d.ellipse([cx + off[0] - ri, cy + off[1] - ri, cx + off[0] + ri, cy + off[1] + ri], fill=0)
    else:  # pragma: no cover - guarded by SHAPE_CLASSES
        raise ValueError(kind)
    return np.asarray(m) > 0


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Object fill: flat colour, two-colour gradient, stripes, or noise-modulated colour."""
    # saturated colours so objects stand out from most backgrounds, but not always
    hue = rng.random()
    sat, val = float(rng.uniform(0.5, 1.0)), float(rng.uniform(0.4, 1.0))
    rgb = np.array(_hsv_to_rgb(hue, sat, val), dtype=np.float32)
    kind = int(rng.integers(0, 4))
    if kind == 0:
        return np.broadcast_to(rgb, (h, w, 3))
    other = np.array(_hsv_to_rgb((hue + rng.uniform(-0.15, 0.15)) % 1.0, sat, val * 0.5), np.float32)
    if kind == 1:
        return rgb + (other - rgb) * _gradient(rng, h, w)[..., :1]
    if kind == 2:
        return rgb + (other - rgb) * _stripes(rng, h, w)[..., :1]
    return rgb + (other - rgb) * _smooth_noise(rng, h, w, 6)[..., :1]


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


def render_shapes_image(seed: int, split: str, index: int) -> tuple[np.ndarray, list[dict]]:
    """Render one image: returns (H, W, 3) uint8 and its objects [{label, mask (H, W) bool}]."""
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index, GENERATOR_VERSION])
    h, w = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, 2))
    img = _background(rng, h, w)
    n_obj = int(rng.integers(1, 9))
    objects: list[dict] = []  # each: label, mask (visible), area0
    side = min(h, w)
    for _ in range(n_obj):
        label = int(rng.integers(0, len(SHAPE_CLASSES)))
        for _attempt in range(6):
            # log-uniform radius: small (~9 px) to large (~35% of the short side)
            r = float(math.exp(rng.uniform(math.log(9), math.log(0.35 * side))))
            cx, cy = float(rng.uniform(r * 0.6, w - r * 0.6)), float(rng.uniform(r * 0.6, h - r * 0.6))
            mask = _shape_mask(SHAPE_CLASSES[label], h, w, cx, cy, r, float(rng.uniform(0, 2 * math.pi)), rng)
            area = int(mask.sum())
            if area < 30:
                continue
            ok = all((o["mask"] & ~mask).sum() >= MIN_VISIBLE * o["area0"] for o in objects)
            if ok:
                break
        else:
            continue
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        tex = _texture(rng, y1 - y0, x1 - x0)
        sub = mask[y0:y1, x0:x1]
        img[y0:y1, x0:x1][sub] = tex[sub]
        for o in objects:
            o["mask"] &= ~mask
        objects.append({"label": label, "mask": mask, "area0": area})
    if rng.random() < 0.5:  # mild sensor noise over the whole image
        img = img + rng.normal(0, float(rng.uniform(0.005, 0.03)), img.shape).astype(np.float32)
    out = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    return out, [{"label": o["label"], "mask": o["mask"]} for o in objects]


def _encode_png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _render_and_save(args: tuple[int, str, int, str]) -> tuple[dict, list[dict]]:
    seed, split, index, img_dir = args
    arr, objects = render_shapes_image(seed, split, index)
    h, w = arr.shape[:2]
    file_name = f"{index:06d}.png"
    atomic_write_bytes(Path(img_dir) / file_name, _encode_png(arr))
    image_id = index + 1
    anns = []
    for o in objects:
        m = o["mask"]
        ys, xs = np.nonzero(m)
        if len(xs) == 0:
            continue
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        x0, y0 = int(xs.min()), int(ys.min())
        anns.append({"image_id": image_id, "category_id": o["label"] + 1, "iscrowd": 0,
                     "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0],
                     "area": int(m.sum()), "segmentation": rle})
    return {"id": image_id, "file_name": file_name, "height": h, "width": w}, anns


def write_shapes_split(out_dir: str | os.PathLike, split: str, n: int, seed: int = 0,
                       workers: int | None = None) -> dict:
    """Write ``n`` images of ``split`` to out_dir/images/*.png and out_dir/instances.json (COCO)."""
    out_dir = Path(out_dir)
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(seed, split, i, str(img_dir)) for i in range(n)]
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    if workers > 1 and n > 16:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_render_and_save, jobs, chunksize=16))
    else:
        results = [_render_and_save(j) for j in jobs]
    images, annotations = [], []
    for img, anns in results:
        images.append(img)
        for a in anns:
            a["id"] = len(annotations) + 1
            annotations.append(a)
    coco = {"info": {"description": f"advdet shapes benchmark, split {split}, seed {seed}",
                     "version": str(GENERATOR_VERSION)},
            "images": images, "annotations": annotations, "categories": shape_categories()}
    atomic_write_json(out_dir / "instances.json", coco)
    return coco


def generate_shapes(out: str | os.PathLike, train: int = 4000, val: int = 500, seed: int = 0,
                    workers: int | None = None) -> dict:
    """Write the benchmark to out/train and out/val (COCO format); returns a summary dict."""
    out = Path(out)
    t0 = time.perf_counter()
    summary: dict = {"root": str(out), "seed": seed, "version": GENERATOR_VERSION,
                     "classes": list(SHAPE_CLASSES), "splits": {}}
    for split, n in (("train", train), ("val", val)):
        if n <= 0:
            continue
        coco = write_shapes_split(out / split, split, n, seed, workers)
        summary["splits"][split] = split_summary(coco)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    atomic_write_json(out / "shapes.json", summary, indent=2)
    return summary


def split_summary(coco: dict) -> dict:
    """Counts of a COCO dict: images, objects, objects per class, size range, object-size buckets."""
    per_class = {c["name"]: 0 for c in coco["categories"]}
    names = {c["id"]: c["name"] for c in coco["categories"]}
    small = medium = large = 0
    for a in coco["annotations"]:
        per_class[names[a["category_id"]]] += 1
        area = a["area"]
        small += area < 32 ** 2
        medium += 32 ** 2 <= area < 96 ** 2
        large += area >= 96 ** 2
    hs = [i["height"] for i in coco["images"]] or [0]
    ws = [i["width"] for i in coco["images"]] or [0]
    return {"images": len(coco["images"]), "objects": len(coco["annotations"]), "per_class": per_class,
            "height_range": [min(hs), max(hs)], "width_range": [min(ws), max(ws)],
            "small": small, "medium": medium, "large": large}


# ------------------------------------------------------------------------------------- default copy
DEFAULT_TRAIN, DEFAULT_VAL, DEFAULT_SEED = 4000, 500, 0


def advdet_home() -> Path:
    """$ADVDET_HOME, default ~/.cache/advdet."""
    return Path(os.environ.get("ADVDET_HOME", Path.home() / ".cache" / "advdet")).expanduser()


def default_shapes_root() -> Path:
    return advdet_home() / f"shapes-v{GENERATOR_VERSION}"


def ensure_default_shapes(train: int = DEFAULT_TRAIN, val: int = DEFAULT_VAL) -> Path:
    """Generate the default copy on first use (under a file lock) and return its root.

    The copy is complete when shapes.json exists with the expected counts; a half-written copy
    (killed generator) is regenerated, giving the same bytes.
    """
    root = default_shapes_root()
    root.mkdir(parents=True, exist_ok=True)
    marker = root / "shapes.json"

    def complete() -> bool:
        if not marker.exists():
            return False
        s = read_json(marker)
        return (s.get("seed") == DEFAULT_SEED and s["splits"].get("train", {}).get("images") == train
                and s["splits"].get("val", {}).get("images") == val)

    if complete():
        return root
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not complete():
            log.info("generating the shapes benchmark into %s (first use)", root)
            marker.unlink(missing_ok=True)
            generate_shapes(root, train, val, DEFAULT_SEED)
    return root
