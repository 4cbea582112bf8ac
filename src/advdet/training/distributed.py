"""Training under ``torchrun``: process group from the environment, DDP wrapping, deterministic sharding.

``torchrun --nproc_per_node N -m advdet train ...`` starts N processes with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set. :func:`init_distributed` reads them and joins the
process group (``gloo`` on CPU, ``nccl`` on CUDA, where rank r uses ``cuda:LOCAL_RANK``); without them
(or with ``WORLD_SIZE=1``) it returns a single-process context and nothing is initialised.

:meth:`DistContext.wrap` puts a training step (``step_fn(detector, images, targets) -> losses``) inside a
:class:`torch.nn.parallel.DistributedDataParallel` module, so the whole step, attack generation included,
runs in DDP's forward and the backward of its loss all-reduces (averages) the gradients. Attacks inside the
step use the unwrapped detector and only differentiate w.r.t. the input, so they trigger no reduction.

Sharding (:func:`shard_positions`) is by position in the global batch that every rank draws with the same
generator: with an even per-rank batch, each rank takes its slice of the first half and of the second half,
so the clean / adversarial halves of the adversarial-training methods keep the images a one-process run
with the global batch would give them (see :mod:`advdet.training.adversarial`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as tdist
from torch import nn

log = logging.getLogger(__name__)


class _StepModule(nn.Module):
    """A module whose forward is one training step: ``step_fn(detector, images, targets)``."""

    def __init__(self, detector: nn.Module, step_fn: Callable):
        super().__init__()
        self.detector = detector
        self._step_fn = step_fn

    def forward(self, images: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        return self._step_fn(self.detector, images, targets)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.is_distributed:
            tdist.barrier()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.is_distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.is_distributed:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def wrap(self, detector: nn.Module, step_fn: Callable, *, find_unused_parameters: bool = False) -> nn.Module:
        """``step_fn`` on ``detector`` inside DistributedDataParallel: call it as ``module(images, targets)``.

        DDP broadcasts rank 0's parameters and buffers at construction, so every rank starts identical.
        """
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index if self.device.index is not None else self.local_rank] \
            if self.device.type == "cuda" else None
        return DDP(_StepModule(detector, step_fn), device_ids=ids,
                   find_unused_parameters=find_unused_parameters)


def init_distributed(device: str | torch.device | None = None, *,
                     timeout: timedelta | None = None) -> DistContext:
    """The process group from torchrun's environment variables, or a single-process context.

    ``device``: ``None`` picks ``cuda:LOCAL_RANK`` when CUDA is present, else CPU; ``"cuda"`` means
    ``cuda:LOCAL_RANK``; ``"cpu"`` forces CPU (and gloo). ``timeout``: the collectives' timeout
    (torch's default when None; long jobs whose ranks finish far apart need more).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local if world > 1 else 0)
    if world <= 1:
        return DistContext(device=dev)
    rank = int(os.environ["RANK"])
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend, init_method="env://",
                                 **({} if timeout is None else {"timeout": timeout}))
    log.info("rank %d of %d (local %d) on %s, backend %s", rank, world, local, dev, backend)
    return DistContext(rank=rank, world_size=world, local_rank=local, backend=backend, device=dev)


def shutdown_distributed(ctx: DistContext) -> None:
    """Leave the process group (no-op for a single process)."""
    if ctx.is_distributed and tdist.is_initialized():
        tdist.destroy_process_group()


def shard_positions(n: int, rank: int, world: int) -> torch.Tensor:
    """Positions (in a global batch of ``n``) that rank ``rank`` of ``world`` trains on.

    ``n = world * b``. With ``b`` even, rank r takes ``[r*b/2, (r+1)*b/2)`` of the first half and the same
    slice of the second half (so per-rank "first half / second half" splits compose to the global split);
    with ``b`` odd, the contiguous slice ``[r*b, (r+1)*b)``.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    if n % world:
        raise ValueError(f"a global batch of {n} does not split evenly over {world} ranks")
    b = n // world
    pos = torch.arange(n)
    if b % 2 == 0:
        return pos.view(2, world, b // 2)[:, rank].reshape(-1)
    return pos[rank * b:(rank + 1) * b]
