"""torch.distributed for the benchmarks (sharded crafting): initialise from torchrun's environment, barriers,
sums over ranks, and deterministic cuDNN so that a batch gives the same bytes whichever rank crafts it."""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Iterator

import torch

__all__ = ["init_distributed", "shutdown_distributed", "dist_active", "dist_barrier", "all_sum",
           "deterministic_cudnn"]


def init_distributed(device: str | None = None) -> tuple[int, int, torch.device | None]:
    """Initialise ``torch.distributed`` from torchrun's environment when ``WORLD_SIZE > 1`` (through
    :func:`advdet.training.distributed.init_distributed`: NCCL on ``cuda:LOCAL_RANK``, gloo on CPU; a
    6-hour collective timeout, since ranks of a long crafting job can finish far apart).
    Returns (rank, world size, device or None = the default)."""
    from advdet.training.distributed import init_distributed as init_process_group

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None if device is None else torch.device(device)
    ctx = init_process_group(device, timeout=timedelta(hours=6))
    return ctx.rank, ctx.world_size, ctx.device


def shutdown_distributed() -> None:
    """Destroy the process group ``init_distributed`` created (no-op without one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def dist_active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def dist_barrier() -> None:
    import torch.distributed as dist

    if dist_active():
        dist.barrier()


def all_sum(n: int) -> int:
    import torch.distributed as dist

    if not dist_active():
        return n
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, int(n))
    return int(sum(out))


@contextmanager
def deterministic_cudnn(device: torch.device) -> Iterator[None]:
    """Deterministic cuDNN kernels during the job on CUDA (a resumed batch must give the same bytes)."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved
