"""Turn an attack into an adversarial dataset in COCO format (``advdet attack``, RAD section 5).

``craft_dataset(attack, model, data, out_dir)`` letterboxes every image of a COCO-format dataset to
the surrogate's input size S, attacks it in fixed batches, and writes::

    out_dir/images/<source stem>.png   adversarial image, S x S, uint8; |png - clean uint8| <= eps
    out_dir/instances.json             COCO instances: the letterboxed ground truth, original category
                                       ids (masks as RLE when the source has them; crowd regions kept)
    out_dir/card.json                  attack, hyper-parameters, surrogate (+ weights sha256), data,
                                       seed, images, skipped images with reasons, RMSE / Linf, timing
    out_dir/manifest.json              per image: file, source id, RMSE, L2, Linf (the finished list)
    out_dir/job.json                   what this folder is being crafted with (checked on resume)

Reproducibility and resume
--------------------------
The images ``0..N-1`` (``limit``) are cut into fixed batches of ``batch_size`` consecutive indices;
batch ``k`` is seeded with ``batch_seed(seed, first index)`` (``attack.manual_seed`` and
``torch.manual_seed``), so its result never depends on which process or which (resumed) run crafts
it. After a batch's PNGs are written (each atomically), one atomic record ``out_dir/parts/b<first>.json``
marks it finished, with its images' statistics and annotations. A run killed at any point and started
again skips the finished batches, redoes the unfinished one (same seed, same bytes) and merges: the
final folder is byte-identical to an uninterrupted run's (``card.json`` differs only in ``run``:
seconds, images/s, world size, device). Finished output is never redone or lost.

Sharding: ``shard=(rank, world)`` crafts batches ``k % world == rank``. Under ``torchrun`` (a process
group is initialised, see ``init_distributed``) every rank crafts its batches, then rank 0 merges the
records into the same ``instances.json`` / ``card.json`` / ``manifest.json`` as a single process. Same
bytes across world sizes need the same float arithmetic: same device type and thread count
(``torchrun`` sets ``OMP_NUM_THREADS=1``); on CUDA the job runs with deterministic cuDNN.
"""

from __future__ import annotations

import logging
import os
import time

import torch
from torch.utils.data import DataLoader, Dataset

from advdet.bench.craft_job import CraftError, CraftJob
from advdet.bench.craft_merge import merge_job
from advdet.bench.distributed import all_sum, deterministic_cudnn, dist_active, dist_barrier
from advdet.bench.runtime import release_memory
from advdet.data.errors import DatasetError
from advdet.data.io import atomic_write_json, read_json

log = logging.getLogger(__name__)

__all__ = ["craft_dataset", "CraftError"]


class _SafeItems(Dataset):
    """Dataset items that never raise ``DatasetError`` (a picklable wrapper for DataLoader workers):
    ``(index, item, None)`` or ``(index, None, (file, problem))``."""

    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int):
        try:
            return index, self.ds[index], None
        except DatasetError as err:
            return index, None, (err.path, err.problem)


def _collate_list(batch: list) -> list:
    return batch


def craft_dataset(attack_name: str, model_name: str, data: str | os.PathLike, out_dir: str | os.PathLike, *,
                  ann: str | os.PathLike | None = None, weights: str | os.PathLike | None = None,
                  eps: float | None = None, step: float | None = None, steps: int | None = None,
                  attack_kwargs: dict | None = None, limit: int | None = None, batch_size: int = 8,
                  seed: int = 0, skip_bad: bool = False, device: str | torch.device | None = None,
                  shard: tuple[int, int] | None = None, progress: bool = True, pretrained: bool = True,
                  labels: bool = True, workers: int = 0, input_size: int | None = None) -> dict:
    """Craft the adversarial COCO-format dataset of ``attack_name`` on surrogate ``model_name``.

    Args:
        attack_name: a registered attack (``advdet attack --list``); classifier attacks
            (``cls-pgd``, ...) need a classifier surrogate (the zoo's ``classifier``).
        model_name: any name of ``advdet.models.hub.get_model`` (zoo, ``torchvision:BUILDER``, ...);
            ``weights`` overrides its weights, ``pretrained=False`` builds it untrained (tests).
        data: ``shapes-train``, ``shapes-val``, an advdet output folder, or an images folder with ``ann``.
        out_dir: output folder (see the module docstring for its layout).
        eps, step, steps: budget, step (0-255 units) and iterations; None = the attack's defaults.
        attack_kwargs: other hyper-parameters of the attack class.
        limit: attack the first N images only.
        batch_size: images per attack call; part of the job (it fixes the batches and their seeds).
        seed: job seed; batch seeds are ``batch_seed(seed, first index)``.
        skip_bad: skip unreadable / truncated images (and bad annotations) and list them in the card,
            instead of failing with an error naming the file.
        device: ``cuda`` / ``cpu`` (default: CUDA when present).
        shard: (rank, world); default: torch.distributed's when initialised, else (0, 1).
        labels: attack detectors with the ground-truth boxes (loss-based attacks) when the label
            spaces agree; False: with the surrogate's clean predictions.
        workers: DataLoader worker processes that decode images.
        input_size: letterbox size S of a ``torchvision:BUILDER`` surrogate (default: the builder's own,
            e.g. 800); zoo models have a fixed size (256).

    Returns the card (also written to ``out_dir/card.json``); a shard of a job that is not yet
    complete (no process group to wait on) returns ``{"complete": False, ...}``.
    """
    t0 = time.perf_counter()
    if shard is None:
        if dist_active():
            import torch.distributed as dist

            shard = (dist.get_rank(), dist.get_world_size())
        else:
            shard = (0, 1)
    rank, world = (int(v) for v in shard)
    if not 0 <= rank < world:
        raise CraftError(f"shard rank {rank} is not in 0..{world - 1}")
    job = CraftJob(attack_name=attack_name, model_name=model_name, data=str(data), ann=ann, weights=weights,
                   eps=eps, step=step, steps=steps, attack_kwargs=attack_kwargs, limit=limit, batch_size=batch_size,
                   seed=seed, skip_bad=skip_bad, device=device, pretrained=pretrained, labels=labels,
                   out_dir=out_dir, input_size=input_size)
    dist_on = dist_active() and world > 1
    if job.finished():
        job.check_out_dir(write=False)
        log.info("%s: already complete", job.out_dir)
        return read_json(job.out_dir / "card.json")
    if not dist_on:
        job.check_out_dir(write=True)
    else:  # rank 0 checks and writes job.json; the others check it after the barrier
        if rank == 0:
            job.check_out_dir(write=True)
        dist_barrier()
        if rank != 0:
            job.check_out_dir(write=False)

    done = job.done_batches()
    mine = [b for k, b in enumerate(job.batches) if k % world == rank and b[0] not in done]
    log.info("%s on %s: %d images, %d batches (%d finished, %d for this shard)", attack_name, model_name,
             len(job.indices), len(job.batches), len(done), len(mine))
    crafted = 0
    t_craft = time.perf_counter()
    if mine:
        loader = DataLoader(_SafeItems(job.ds), batch_sampler=mine, collate_fn=_collate_list,
                            num_workers=int(workers))
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("images"), TimeRemainingColumn(), console=Console(stderr=True),
                       disable=not progress or rank != 0)
        with bar, deterministic_cudnn(job.device):
            task = bar.add_task(f"{attack_name} on {model_name}", total=sum(len(b) for b in mine))
            for batch, loaded in zip(mine, loader):
                record = job.craft_batch(batch[0], loaded)
                atomic_write_json(job.part_path(batch[0]), record)
                crafted += len(record["images"])
                release_memory()
                bar.advance(task, len(batch))
    crafted_all = all_sum(crafted) if dist_on else crafted
    craft_seconds = time.perf_counter() - t_craft  # wall time of the crafting (every rank: after the gather)
    if dist_on:
        dist_barrier()
        if rank == 0:
            merge_job(job, time.perf_counter() - t0, craft_seconds, crafted_all, world, remove_parts=True)
        dist_barrier()
        return read_json(job.out_dir / "card.json")
    if world == 1:
        return merge_job(job, time.perf_counter() - t0, craft_seconds, crafted, world, remove_parts=True)
    # a shard without a process group: the last one to finish merges (identical bytes if two do)
    remaining = len(job.batches) - len(job.done_batches())
    if remaining:
        log.info("shard %d/%d done; %d batches left to other shards", rank, world, remaining)
        return {"complete": False, "rank": rank, "world_size": world, "images_crafted": crafted,
                "batches_left": remaining}
    return merge_job(job, time.perf_counter() - t0, craft_seconds, crafted, world, remove_parts=False)
