"""Standard (clean) training of any Detector, with checkpoints and bit-exact resume on CPU.

The same loop runs every training method: ``step_fn`` plugs in the adversarial-training steps of
:mod:`advdet.training.adversarial` (their state, e.g. the adversarial batch carried across updates, is
checkpointed through ``step_fn.state_dict()`` / ``load_state_dict()``), and ``dist`` (a
:class:`~advdet.training.distributed.DistContext`) runs it under torchrun with DistributedDataParallel.
"""

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
from advdet.training.distributed import DistContext, shard_positions
from advdet.training.tensor_cache import TensorCache

log = logging.getLogger(__name__)

AUGMENT_SEED_OFFSET = 7919  # seed offset of the per-image augmentation seeds of distributed runs


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
    iters: int | None = None  # total iterations; overrides ``epochs`` when set
    lr_schedule: str = "cosine"  # cosine (warm-up, cosine to 5 %) | constant (warm-up, then lr)
    #: learning-rate multipliers by parameter-name prefix, e.g. ``{"model.aid.": 30}`` (first match wins)
    lr_mults: dict[str, float] | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def lr_mult_of(name: str, lr_mults: dict[str, float] | None) -> float:
    """The learning-rate multiplier of parameter ``name``: the first prefix of ``lr_mults`` it starts with, else 1."""
    for prefix, mult in (lr_mults or {}).items():
        if name.startswith(prefix):
            return float(mult)
    return 1.0


def build_optimizer(detector: Detector, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum 0.9) or AdamW; no weight decay on 1-d parameters (biases, norms); each group carries its
    ``lr_mult`` (:attr:`TrainConfig.lr_mults`), which the training loop applies to the scheduled rate."""
    groups_by_key: dict[tuple[float, bool], list] = {}
    for name, p in detector.named_parameters():
        if p.requires_grad:
            groups_by_key.setdefault((lr_mult_of(name, cfg.lr_mults), p.ndim > 1), []).append(p)
    # without multipliers: exactly the two groups (decay, no decay) of earlier versions, so old checkpoints resume
    keys = sorted(groups_by_key, key=lambda k: (k[0] != 1.0, k[0], not k[1]))
    groups = [{"params": groups_by_key[k], "weight_decay": cfg.weight_decay if k[1] else 0.0, "lr_mult": k[0]}
              for k in keys]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (expected adamw or sgd)")


def lr_factor(it: int, total: int, warmup: int, schedule: str = "cosine") -> float:
    """Linear warm-up, then cosine decay to 5 % of the base rate (``"cosine"``) or the base rate
    (``"constant"``, the RobustDet/MTD reference: its lr milestones are never reached)."""
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"unknown lr_schedule {schedule!r} (expected cosine or constant)")
    if it < warmup:
        return (it + 1) / warmup
    if schedule == "constant":
        return 1.0
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


def make_batch_seeded(cache: TensorCache, idx: torch.Tensor, seeds: torch.Tensor, augment: bool,
                      with_masks: bool = False) -> tuple[torch.Tensor, list[dict]]:
    """Like :func:`make_batch`, but image ``idx[j]`` is augmented with its own generator seeded ``seeds[j]``,
    so an image gets the same augmentation whichever rank of a distributed run loads it."""
    imgs, targets = [], []
    for i, s in zip(idx.tolist(), seeds.tolist()):
        x, t = make_batch(cache, torch.tensor([i]), torch.Generator().manual_seed(int(s)), augment, with_masks)
        imgs.append(x[0])
        targets += t
    return torch.stack(imgs), targets


def _to_device(x: torch.Tensor, targets: list[dict], device: torch.device) -> tuple[torch.Tensor, list[dict]]:
    if x.device == device:
        return x, targets
    return x.to(device), [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
                          for t in targets]


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_detector(detector: Detector, cache: TensorCache, cfg: TrainConfig, out_dir: str | os.PathLike,
                   resume: bool = False, with_masks: bool = False, step_fn=None, *,
                   dist: DistContext | None = None, stop_after: int | None = None) -> dict:
    """Train ``detector`` on ``cache`` with ``cfg``; checkpoints to out_dir/checkpoint.pt.

    ``step_fn(detector, images, targets) -> dict of losses`` replaces the plain ``detector.loss`` (the
    adversarial-training methods plug in here). The update minimises ``losses["loss"]`` when the dict has
    that key (the other entries are only logged), else the sum of all entries. A ``step_fn`` with
    ``state_dict()`` / ``load_state_dict()`` has its state checkpointed. With ``resume=True`` the run
    continues from the last checkpoint, restoring weights, optimizer, schedule position, random-generator
    and step-function state, so a resumed CPU run ends with the same weights as an uninterrupted one.
    ``stop_after``: stop (and checkpoint) once this many iterations are done, like ``max_minutes``.

    ``dist`` (world size W > 1, see :mod:`advdet.training.distributed`): ``cfg.batch_size`` is the batch
    of each rank; every rank draws the same global batch of W * batch_size indices (one shared generator),
    takes its shard (:func:`~advdet.training.distributed.shard_positions`), augments each image with its
    own seed (from a second generator, so without augmentation the data order equals a one-process run
    with batch W * batch_size), and runs the step through DistributedDataParallel; only rank 0 writes
    checkpoints.
    Returns a summary: iterations, seconds, images/s (all ranks), final losses.
    """
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    out_dir = Path(out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "checkpoint.pt"
    torch.manual_seed(cfg.seed + rank)
    gen = torch.Generator().manual_seed(cfg.seed)
    # distributed runs: per-image augmentation seeds from their own stream, so the data order (``gen``) is
    # that of a one-process run with the global batch whenever augmentation is off
    seed_gen = torch.Generator().manual_seed(cfg.seed + AUGMENT_SEED_OFFSET)
    opt = build_optimizer(detector, cfg)
    n = len(cache)
    global_batch = cfg.batch_size * world
    if world > 1 and n < global_batch:
        raise ValueError(f"{n} training images cannot fill one global batch of {global_batch} "
                         f"({world} ranks x {cfg.batch_size})")
    iters_per_epoch = max(1, n // global_batch)
    total = int(cfg.iters) if cfg.iters else max(1, round(cfg.epochs * iters_per_epoch))
    it, elapsed, perm = 0, 0.0, None
    history: list[dict] = []
    stateful = step_fn is not None and hasattr(step_fn, "state_dict") and hasattr(step_fn, "load_state_dict")
    if resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=True)
        detector.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["generator"])
        if "seed_generator" in ck:
            seed_gen.set_state(ck["seed_generator"])
        ck_world = int(ck.get("world_size", 1))
        if ck_world != world:
            log.warning("%s was written by a run with %d rank(s), resuming with %d: the data order and "
                        "random streams differ from an uninterrupted run", ckpt_path, ck_world, world)
        rng_ranks = ck.get("torch_rng_ranks")
        torch.set_rng_state(rng_ranks[rank] if rng_ranks and rank < len(rng_ranks) else ck["torch_rng"])
        method_ranks = ck.get("method_state_ranks")
        if stateful and method_ranks and rank < len(method_ranks) and method_ranks[rank] is not None:
            step_fn.load_state_dict(method_ranks[rank])
        it, elapsed, perm = int(ck["iteration"]), float(ck["elapsed"]), ck["perm"]
        history = list(ck.get("history", []))
        log.info("resumed from %s at iteration %d", ckpt_path, it)
    inner_step = step_fn or (lambda det, x, t: det.loss(x, t))
    runner = dist.wrap(detector, inner_step) if world > 1 else None
    device = next(detector.parameters()).device
    if device.type == "cuda":  # images on the GPU: the augmentation then runs there, not in the loop's CPU thread
        cache = TensorCache(cache.images.to(device), cache.boxes, cache.labels, cache.masks)

    def save() -> None:
        rng = torch.get_rng_state()
        method_state = step_fn.state_dict() if stateful else None
        if world > 1:
            rng_ranks, method_ranks = zip(*dist.all_gather_object((rng, method_state)))
        else:
            rng_ranks, method_ranks = (rng,), (method_state,)
        if rank == 0:
            ck = {"model": detector.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                  "torch_rng": rng, "iteration": it, "elapsed": elapsed, "perm": perm, "history": history,
                  "world_size": world, "torch_rng_ranks": list(rng_ranks), "seed_generator": seed_gen.get_state()}
            if stateful:
                ck["method_state_ranks"] = list(method_ranks)
            _atomic_save(ck, ckpt_path)
        if world > 1:
            dist.barrier()

    detector.train()
    t_start = time.perf_counter() - elapsed
    running: dict[str, float] = {}
    stopped_early = False
    while it < total:
        pos = it % iters_per_epoch
        if pos == 0 or perm is None:
            perm = torch.randperm(n, generator=gen)
        idx = perm[pos * global_batch:(pos + 1) * global_batch]
        if world == 1:
            x, targets = make_batch(cache, idx, gen, cfg.augment, with_masks)
        else:
            seeds = torch.randint(0, 2 ** 62, (len(idx),), generator=seed_gen)  # identical on every rank
            mine = shard_positions(len(idx), rank, world)
            x, targets = make_batch_seeded(cache, idx[mine], seeds[mine], cfg.augment, with_masks)
        x, targets = _to_device(x, targets, device)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * g.get("lr_mult", 1.0) * lr_factor(it, total, cfg.warmup_iters, cfg.lr_schedule)
        losses = runner(x, targets) if runner is not None else inner_step(detector, x, targets)
        loss = losses["loss"] if "loss" in losses else sum(losses.values())
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
            if rank == 0:
                log.info("%s", rec)
            running = {}
        out_of_time = cfg.max_minutes is not None and elapsed > cfg.max_minutes * 60
        if world > 1 and cfg.max_minutes is not None:
            out_of_time = bool(dist.broadcast_object(out_of_time))  # rank 0 decides for all
        stop = it < total and (out_of_time or (stop_after is not None and it >= stop_after))
        if it % cfg.checkpoint_every == 0 or it == total or stop:
            save()
        if stop:
            stopped_early = True
            break
    detector.eval()
    return {"iterations": it, "total_iterations": total, "seconds": round(elapsed, 1),
            "images_per_second": round(it * global_batch / max(elapsed, 1e-9), 2), "world_size": world,
            "finished": it >= total and not stopped_early, "history": history[-5:]}
