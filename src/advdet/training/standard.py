"""Standard (clean) training of any Detector, with checkpoints and bit-exact resume on CPU."""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from advdet.models.detector import Detector
from advdet.training.augment import augment_detection
from advdet.training.tensor_cache import TensorCache

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Hyper-parameters of a training run (the zoo recipes are instances of this)."""

    epochs: float = 10.0
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 5e-4
    optimizer: str = "adamw"  # adamw | sgd (momentum 0.9)
    warmup_iters: int = 200
    grad_clip: float = 10.0
    augment: bool = True
    seed: int = 0
    checkpoint_every: int = 200
    log_every: int = 20
    max_minutes: float | None = None  # stop (and checkpoint) after this wall time

    def as_dict(self) -> dict:
        return asdict(self)


def build_optimizer(detector: Detector, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in detector.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (expected adamw or sgd)")


def lr_factor(it: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 5 % of the base rate."""
    if it < warmup:
        return (it + 1) / warmup
    t = (it - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def make_batch(cache: TensorCache, idx: torch.Tensor, gen: torch.Generator, augment: bool,
               with_masks: bool = False) -> tuple[torch.Tensor, list[dict]]:
    """Images (B, 3, S, S) float in [0, 1] and targets of the cache rows ``idx``, augmented if asked."""
    imgs, targets = [], []
    for i in idx.tolist():
        img = cache.images[i].float() / 255.0
        boxes, labels = cache.boxes[i], cache.labels[i]
        masks = cache.masks[i] if (with_masks and cache.masks is not None) else None
        if augment:
            img, boxes, labels, masks = augment_detection(img, boxes, labels, gen, masks)
        t = {"boxes": boxes, "labels": labels}
        if masks is not None:
            t["masks"] = masks.to(torch.uint8)
        imgs.append(img)
        targets.append(t)
    return torch.stack(imgs), targets


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_detector(detector: Detector, cache: TensorCache, cfg: TrainConfig, out_dir: str | os.PathLike,
                   resume: bool = False, with_masks: bool = False, step_fn=None) -> dict:
    """Train ``detector`` on ``cache`` with ``cfg``; checkpoints to out_dir/checkpoint.pt.

    ``step_fn(detector, images, targets) -> dict of losses`` replaces the plain ``detector.loss`` (the
    adversarial-training methods plug in here). With ``resume=True`` the run continues from the last
    checkpoint, restoring weights, optimizer, schedule position and random-generator state, so a
    resumed CPU run ends with the same weights as an uninterrupted one.
    Returns a summary: iterations, seconds, final losses.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "checkpoint.pt"
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = build_optimizer(detector, cfg)
    n = len(cache)
    iters_per_epoch = max(1, n // cfg.batch_size)
    total = max(1, round(cfg.epochs * iters_per_epoch))
    it, elapsed, perm = 0, 0.0, None
    history: list[dict] = []
    if resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=True)
        detector.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["generator"])
        torch.set_rng_state(ck["torch_rng"])
        it, elapsed, perm = int(ck["iteration"]), float(ck["elapsed"]), ck["perm"]
        history = list(ck.get("history", []))
        log.info("resumed from %s at iteration %d", ckpt_path, it)
    step_fn = step_fn or (lambda det, x, t: det.loss(x, t))

    def save() -> None:
        _atomic_save({"model": detector.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                      "torch_rng": torch.get_rng_state(), "iteration": it, "elapsed": elapsed, "perm": perm,
                      "history": history}, ckpt_path)

    detector.train()
    t_start = time.perf_counter() - elapsed
    running: dict[str, float] = {}
    stopped_early = False
    while it < total:
        pos = it % iters_per_epoch
        if pos == 0 or perm is None:
            perm = torch.randperm(n, generator=gen)
        idx = perm[pos * cfg.batch_size:(pos + 1) * cfg.batch_size]
        x, targets = make_batch(cache, idx, gen, cfg.augment, with_masks)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_factor(it, total, cfg.warmup_iters)
        losses = step_fn(detector, x, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss at iteration {it}: "
                                     f"{ {k: float(v) for k, v in losses.items()} }")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(detector.parameters(), cfg.grad_clip)
        opt.step()
        it += 1
        for k, v in losses.items():
            running[k] = running.get(k, 0.0) + float(v.detach())
        elapsed = time.perf_counter() - t_start
        if it % cfg.log_every == 0 or it == total:
            k = cfg.log_every if it % cfg.log_every == 0 else (it % cfg.log_every)
            rec = {"iteration": it, "epoch": round(it / iters_per_epoch, 3), "seconds": round(elapsed, 1),
                   "lr": opt.param_groups[0]["lr"], **{kk: round(v / k, 5) for kk, v in running.items()}}
            history.append(rec)
            log.info("%s", rec)
            running = {}
        if it % cfg.checkpoint_every == 0 or it == total:
            save()
        if cfg.max_minutes is not None and elapsed > cfg.max_minutes * 60 and it < total:
            save()
            stopped_early = True
            break
    detector.eval()
    return {"iterations": it, "total_iterations": total, "seconds": round(elapsed, 1),
            "images_per_second": round(it * cfg.batch_size / max(elapsed, 1e-9), 2),
            "finished": it >= total and not stopped_early, "history": history[-5:]}
