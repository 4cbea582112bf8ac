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

import dataclasses
import hashlib
import logging
import os
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from advdet import __version__
from advdet.attacks.base import Attack, letterbox_mask
from advdet.attacks.quantize import quantize_adv, to_uint8
from advdet.attacks.rad import RADDiagnostics
from advdet.attacks.registry import ATTACKS, CLASSIFIER_ATTACKS, build_attack
from advdet.bench.runtime import jsonable, release_memory, resolve_device
from advdet.data.coco import decode_segmentation
from advdet.data.coco_writer import CocoWriter, encode_mask
from advdet.attacks.ensemble import is_ensemble_name
from advdet.data.errors import AdvdetError, DatasetError, UnknownNameError
from advdet.data.io import atomic_write_json, read_json
from advdet.data.letterbox import letterbox_boxes, letterbox_masks
from advdet.data.registry import resolve_dataset
from advdet.metrics.perturbation import perturbation_stats
from advdet.models.detector import Detector
from advdet.models.weights import read_card, sha256_file
from advdet.models.zoo import build_model, is_external, zoo_entry

log = logging.getLogger(__name__)

__all__ = ["craft_dataset", "batch_seed", "init_distributed", "dist_active", "dist_barrier",
           "shutdown_distributed", "load_attack_registry", "surrogate_info", "CraftError", "MANIFEST_FORMAT"]

MANIFEST_FORMAT = "advdet-craft/1"
PARTS_DIR = "parts"


class CraftError(AdvdetError):
    """A crafting job that cannot run as asked (wrong model for the attack, an output folder that holds
    another job, ...); the message says what to change."""


# --------------------------------------------------------------------------------------------- helpers


def load_attack_registry() -> dict[str, type[Attack]]:
    """The attack registry (``advdet.attacks.registry`` registers every attack, RAD included, on import)."""
    return ATTACKS


def batch_seed(seed: int, first_index: int) -> int:
    """Seed of the batch whose first dataset index is ``first_index``: sha256 of (seed, index), 63 bits.

    Depends only on the job seed and the batch, never on the process or run that crafts it."""
    digest = hashlib.sha256(f"advdet-craft:{int(seed)}:{int(first_index)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


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


def _all_sum(n: int) -> int:
    import torch.distributed as dist

    if not dist_active():
        return n
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, int(n))
    return int(sum(out))


@contextmanager
def _deterministic_cudnn(device: torch.device) -> Iterator[None]:
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


def surrogate_info(model_name: str, model: nn.Module, weights: str | os.PathLike | None,
                   pretrained: bool) -> dict:
    """Name, kind, family, input size and the weights (path and sha256) of a built model, for cards."""
    from advdet.attacks.ensemble import SurrogateEnsemble

    if isinstance(model, SurrogateEnsemble):  # a+b+c: every member's weights; one digest over theirs
        members = {n: surrogate_info(n, m, None, pretrained) for n, m in zip(model.names, model.members)}
        shas = [members[n]["weights_sha256"] for n in model.names]
        digest = None if None in shas else hashlib.sha256(",".join(shas).encode()).hexdigest()
        return {"name": model_name, "kind": "detector", "family": "ensemble", "input_size": int(model.input_size),
                "num_classes": model.num_classes, "weights": None, "weights_sha256": digest,
                "untrained": any(members[n]["untrained"] for n in model.names), "members": members}
    info: dict[str, Any] = {"name": model_name, "kind": "detector" if isinstance(model, Detector) else "classifier",
                            "family": getattr(model, "family", type(model).__name__),
                            "input_size": int(getattr(model, "input_size", 0)) or None,
                            "num_classes": getattr(model, "num_classes", None)}
    path: Path | None = None
    if weights:
        path = Path(weights)
    elif pretrained and not is_external(model_name):
        path = zoo_entry(model_name).weights_path
    if path is None:
        info.update(weights=None, weights_sha256=None, untrained=True)
        return info
    card = read_card(path) if path.suffix == ".safetensors" else {}
    info.update(weights=str(path), weights_sha256=card.get("sha256") or sha256_file(path), untrained=False)
    return info


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


def _build_ensemble(model_name: str, weights, pretrained: bool, input_size) -> nn.Module:
    """The ``a+b+c`` surrogate (``advdet.attacks.ensemble.SurrogateEnsemble``) of zoo / torchvision models,
    each with its own zoo weights; one-line errors for unknown members, classifiers, a weights file."""
    from advdet.attacks.ensemble import SurrogateEnsemble, parse_ensemble

    names = parse_ensemble(model_name)
    if weights is not None:
        raise CraftError(f"ensemble {model_name!r}: --weights takes one model's file; an ensemble uses each "
                         f"member's zoo weights")
    members = []
    for m in names:
        try:
            det = build_model(m, pretrained=pretrained, input_size=input_size if is_external(m) else None)
        except KeyError as err:
            msg = err.args[0] if err.args else m
            raise UnknownNameError(f"ensemble {model_name!r}: unknown member {m!r} ({msg})") from None
        if not isinstance(det, Detector):
            raise CraftError(f"ensemble {model_name!r}: member {m!r} is not a detector")
        members.append(det)
    return SurrogateEnsemble(members, names)


# --------------------------------------------------------------------------------------------- the job


class _Job:
    """Everything a crafting job needs, shared by its batches and its merge."""

    def __init__(self, *, attack_name: str, model_name: str, data: str, ann, weights, eps, step, steps,
                 attack_kwargs, limit, batch_size, seed, skip_bad, device, pretrained, labels, out_dir,
                 input_size=None):
        registry = load_attack_registry()
        if attack_name not in registry:
            raise CraftError(f"unknown attack {attack_name!r}; known: {', '.join(registry)} "
                             f"(`advdet attack --list` describes them)")
        if batch_size < 1:
            raise CraftError(f"batch_size must be >= 1, got {batch_size}")
        if limit is not None and limit < 1:
            raise CraftError(f"limit must be >= 1, got {limit}")
        self.attack_name, self.model_name = attack_name, model_name
        self.is_classifier_attack = attack_name in CLASSIFIER_ATTACKS
        self.out_dir = Path(out_dir)
        self.batch_size, self.seed, self.skip_bad = int(batch_size), int(seed), bool(skip_bad)

        images_dir, ann_file = resolve_dataset(data, ann)  # a wrong path fails before the model is built
        weights = Path(weights).expanduser() if weights else None

        # surrogate (an untrained one is initialised from the job seed, so every run builds the same)
        torch.manual_seed(self.seed)
        if is_ensemble_name(model_name):
            self.model = _build_ensemble(model_name, weights, pretrained, input_size)
        else:
            self.model = build_model(model_name, weights=weights, pretrained=pretrained,
                                     input_size=input_size if is_external(model_name) else None)
        if input_size is not None and getattr(self.model, "input_size", None) != input_size:
            raise CraftError(f"{model_name!r} takes {getattr(self.model, 'input_size', None)} px inputs; "
                             f"input_size={input_size} only applies to torchvision:BUILDER models")
        is_det = isinstance(self.model, Detector)
        if self.is_classifier_attack and is_det:
            raise CraftError(f"attack {attack_name!r} attacks an image classifier; use a classifier as the "
                             f"surrogate (e.g. --model classifier), not the detector {model_name!r}")
        if not self.is_classifier_attack and not is_det:
            raise CraftError(f"attack {attack_name!r} needs a detector surrogate; {model_name!r} is a classifier")
        self.device = resolve_device(device)
        self.model.to(self.device).eval()
        self.surrogate = surrogate_info(model_name, self.model, weights, pretrained)

        # attack
        kw = dict(attack_kwargs or {})
        for k, v in (("eps", eps), ("step", step), ("steps", steps)):
            if v is not None:
                kw[k] = v
        try:
            self.attack = build_attack(attack_name, self.model, **kw)
        except KeyError as err:
            raise CraftError(err.args[0]) from None
        except TypeError as err:
            raise CraftError(str(err)) from None
        hp = self.attack.hyperparameters()
        for k in ("seed", "device"):
            hp.pop(k, None)
        self.hyperparameters = jsonable(hp)
        self.eps = getattr(self.attack, "eps", None)

        # data: bad images are found while crafting (one decode each), not in a separate pass
        from advdet.data.coco import CocoDetection

        size = int(getattr(self.model, "input_size"))
        self.ds = CocoDetection(images_dir, ann_file, size=size, skip_bad=skip_bad, validate_images=False)
        self.data = {"data": str(data), "images_dir": str(images_dir.resolve()),
                     "ann_file": str(ann_file.resolve()), "size": size, "with_masks": self.ds.with_masks,
                     "num_classes": self.ds.num_classes, "source_images": len(self.ds)}
        n = len(self.ds) if limit is None else min(int(limit), len(self.ds))
        if n == 0:
            raise DatasetError(ann_file, "no images to attack")
        self.indices = list(range(n))
        self.batches = [self.indices[i:i + self.batch_size] for i in range(0, n, self.batch_size)]

        # targets of detector attacks: ground truth when asked for and the label spaces agree
        self.targets_mode = "classifier clean prediction" if self.is_classifier_attack else "clean predictions"
        if not self.is_classifier_attack and labels:
            if getattr(self.model, "num_classes", None) != self.ds.num_classes:
                log.warning("%s has %s classes but the dataset %d: attacking with the clean predictions "
                            "as pseudo ground truth", model_name, getattr(self.model, "num_classes", None),
                            self.ds.num_classes)
            elif getattr(self.model, "has_masks", False) and not self.ds.with_masks:
                log.warning("%s needs masks but the dataset has none: attacking with the clean "
                            "predictions as pseudo ground truth", model_name)
            else:
                self.targets_mode = "ground truth"
        if attack_name == "gaussian":
            self.targets_mode = "none"

        # output names: the source stem + .png, unique
        source_names = {img["id"]: img["file_name"] for img in self.ds.coco_gt["images"]}
        self.png_names: dict[int, str] = {}
        seen: dict[str, str] = {}
        for i in self.indices:
            source = source_names[self.ds.image_ids[i]]
            name = CocoWriter._png_name(source)
            if name in seen:
                raise DatasetError(ann_file, f"images {seen[name]!r} and {source!r} would both be saved as "
                                             f"{name!r}")
            seen[name] = source
            self.png_names[i] = name
        ids = ",".join(str(self.ds.image_ids[i]) for i in self.indices)
        self.job = {"format": MANIFEST_FORMAT, "advdet_version": __version__, "attack": attack_name,
                    "hyperparameters": self.hyperparameters, "surrogate": model_name,
                    "weights_sha256": self.surrogate["weights_sha256"],
                    "data": {k: v for k, v in self.data.items() if k != "data"},  # resolved paths only
                    "images": n, "image_ids_sha256": hashlib.sha256(ids.encode()).hexdigest(),
                    "batch_size": self.batch_size, "seed": self.seed, "targets": self.targets_mode}
        self._crowd: dict[int, list[dict]] | None = None

    # ----------------------------------------------------------------------------------------- files
    @property
    def parts_dir(self) -> Path:
        return self.out_dir / PARTS_DIR

    def part_path(self, first: int) -> Path:
        return self.parts_dir / f"b{first:09d}.json"

    def check_out_dir(self, write: bool) -> None:
        """Refuse a folder that holds another job (or unrelated files); write ``job.json`` if asked."""
        job_file = self.out_dir / "job.json"
        if job_file.is_file():
            old = read_json(job_file)
            if old != self.job:
                diff = sorted(k for k in set(old) | set(self.job) if old.get(k) != self.job.get(k))
                raise CraftError(f"{self.out_dir}: holds another crafting job (differs in {', '.join(diff)}); "
                                 f"use a new output folder or delete this one")
            return
        ours = (PARTS_DIR, "images")  # and the temp files of a writer killed before job.json existed
        if self.out_dir.is_dir() and any(p.name not in ours and not (p.name.startswith(".") and p.name.endswith(".tmp"))
                                         for p in self.out_dir.iterdir()):
            raise CraftError(f"{self.out_dir}: folder is not empty and is not an advdet crafting output; "
                             f"use a new output folder")
        if write:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(job_file, self.job, indent=2)

    def finished(self) -> bool:
        """The merged output exists (``manifest.json`` is written last)."""
        m = self.out_dir / "manifest.json"
        return (m.is_file() and (self.out_dir / "instances.json").is_file()
                and (self.out_dir / "card.json").is_file() and read_json(m).get("complete") is True)

    def done_batches(self) -> set[int]:
        if not self.parts_dir.is_dir():
            return set()
        return {int(p.stem[1:]) for p in self.parts_dir.glob("b*.json") if p.stem[1:].isdigit()}

    # ----------------------------------------------------------------------------------------- crafting
    def crowd_annotations(self, image_id: int) -> list[dict]:
        """The crowd annotations of an image (not targets, kept as crowd regions for evaluation)."""
        if self._crowd is None:
            self._crowd = {}
            for a in self.ds.coco_gt["annotations"]:
                if a.get("iscrowd", 0):
                    self._crowd.setdefault(a["image_id"], []).append(a)
        return self._crowd.get(image_id, [])

    def _crowd_letterboxed(self, image_id: int, params, h: int, w: int) -> list[dict]:
        out = []
        for a in self.crowd_annotations(image_id):
            x, y, bw, bh = (float(v) for v in a["bbox"])
            b = letterbox_boxes(torch.tensor([[x, y, x + bw, y + bh]], dtype=torch.float64), params)[0]
            x1, y1 = max(0.0, float(b[0])), max(0.0, float(b[1]))
            x2, y2 = min(float(w), float(b[2])), min(float(h), float(b[3]))
            if x2 <= x1 or y2 <= y1:
                continue
            x1, y1, x2, y2 = (round(v, 3) for v in (x1, y1, x2, y2))
            ann = {"image_id": image_id, "category_id": int(a["category_id"]),
                   "bbox": [x1, y1, round(x2 - x1, 3), round(y2 - y1, 3)],
                   "area": round((x2 - x1) * (y2 - y1), 3), "iscrowd": 1}
            if self.ds.with_masks and a.get("segmentation"):
                m = decode_segmentation(a["segmentation"], params.orig_h, params.orig_w)
                lm = letterbox_masks(torch.from_numpy(m)[None], params)[0].numpy()
                ann["segmentation"] = encode_mask(lm)
                ann["area"] = float(lm.sum())
            out.append(ann)
        return out

    def craft_batch(self, first: int, loaded: list) -> dict:
        """Attack one batch, write its PNGs, return its record (not yet written)."""
        items, skipped = [], []
        for index, item, bad in loaded:
            if bad is not None:
                if not self.skip_bad:
                    raise DatasetError(*bad)
                skipped.append({"index": index, "item": bad[0], "problem": bad[1]})
                log.warning("skipping %s: %s", *bad)
            else:
                items.append((index, item))
        record: dict[str, Any] = {"first": first, "seed": batch_seed(self.seed, first), "images": [],
                                  "skipped": skipped}
        if not items:
            return record
        x = torch.stack([it["image"] for _, it in items])
        s = x.shape[-1]
        params = [it["letterbox"] for _, it in items]
        mask = letterbox_mask(params, s, s)
        targets = None
        if self.targets_mode == "ground truth":
            targets = []
            for _, it in items:
                t = {"boxes": it["boxes"], "labels": it["labels"], "letterbox": it["letterbox"]}
                if getattr(self.model, "has_masks", False):
                    t["masks"] = it["masks"]
                targets.append(t)
        seed = record["seed"]
        self.attack.manual_seed(seed)
        torch.manual_seed(seed)
        files = [it["file_name"] for _, it in items]
        try:
            x_adv = self.attack(x.to(self.device), targets, mask=mask.to(self.device))
        except (RuntimeError, FloatingPointError, ValueError) as err:
            raise RuntimeError(f"attack {self.attack_name!r} failed on images {files}: {err}") from err
        keep = mask if self.attack.valid_only else None
        try:
            q = quantize_adv(x_adv.detach().cpu(), x, self.eps, keep)
        except ValueError as err:
            raise RuntimeError(f"attack {self.attack_name!r} gave an invalid image for {files}: {err}") from err
        diag = (getattr(self.attack, "last_state", None) or {}).get("diagnostics")
        if isinstance(diag, RADDiagnostics):  # sums, merged over the batch records into the card
            record["diagnostics"] = dataclasses.asdict(diag)
        clean = to_uint8(x)
        stats = perturbation_stats(clean, q)
        writer = CocoWriter(self.out_dir, self.ds.categories)
        for j, (index, it) in enumerate(items):
            cids = [self.ds.label_to_cat_id[int(v)] for v in it["labels"]]
            image_id = int(it["image_id"])
            writer.add(self.png_names[index], q[j].permute(1, 2, 0).numpy(), it["boxes"].numpy(), cids,
                       it["masks"].numpy() if self.ds.with_masks else None, image_id=image_id,
                       image_info={"source_file": it["file_name"], "letterbox": it["letterbox"].as_dict()})
            anns = [{k: v for k, v in a.items() if k != "id"} for a in writer.annotations
                    if a["image_id"] == image_id]
            anns += self._crowd_letterboxed(image_id, it["letterbox"], s, s)
            record["images"].append({
                "index": index, "image_id": image_id, "file_name": self.png_names[index],
                "rmse": round(stats["rmse"][j], 6), "l2": round(stats["l2"][j], 4),
                "linf": round(stats["linf"][j], 4), "image": writer.images[j], "annotations": anns})
        return record

    # ----------------------------------------------------------------------------------------- merge
    def merge(self, seconds: float, crafting_seconds: float, crafted_now: int, world: int,
              remove_parts: bool) -> dict:
        """Build ``instances.json``, ``card.json`` and ``manifest.json`` from every batch record."""
        records = {}
        for first in (b[0] for b in self.batches):
            p = self.part_path(first)
            if not p.is_file():
                raise CraftError(f"{p}: batch record missing; run the job again to finish it")
            records[first] = read_json(p)
        if remove_parts:  # the only writer now: remove the temp files of killed writers
            for folder in (self.out_dir, self.out_dir / "images", self.parts_dir):
                for tmp in folder.glob(".*.tmp"):
                    tmp.unlink(missing_ok=True)
        images, annotations, manifest_images, skipped = [], [], [], []
        for first in sorted(records):
            rec = records[first]
            skipped += rec["skipped"]
            for im in rec["images"]:
                images.append(im["image"])
                for a in im["annotations"]:
                    annotations.append({"id": len(annotations) + 1, **a})
                manifest_images.append({k: im[k] for k in ("index", "image_id", "file_name", "rmse", "l2", "linf")})
        diags = [RADDiagnostics(**records[f]["diagnostics"]) for f in sorted(records) if records[f].get("diagnostics")]
        diagnostics = None
        if diags:
            merged = diags[0]
            for d in diags[1:]:
                merged = merged.merge(d)
            diagnostics = merged.as_dict()
        rmse = [m["rmse"] for m in manifest_images]
        linf = [m["linf"] for m in manifest_images]
        l2 = [m["l2"] for m in manifest_images]
        data_skipped = [{"item": item, "problem": problem} for item, problem in self.ds.report.skipped]
        self.ds.note_formats(self.indices)  # conversions made in other processes too (workers, ranks)
        report = self.ds.report.as_dict()
        cls = ATTACKS[self.attack_name]
        info = {"description": f"advdet adversarial dataset: {self.attack_name} on {self.model_name}",
                "attack": self.attack_name, "surrogate": self.model_name, "seed": self.seed,
                "eps": self.eps, "advdet_version": __version__}
        writer = CocoWriter(self.out_dir, self.ds.categories, info)
        writer.images, writer.annotations = images, annotations
        writer.write_json()
        card = {
            "kind": "advdet adversarial dataset",
            "advdet_version": __version__,
            "attack": {"name": self.attack_name, "description": cls.description,
                       "hyperparameters": self.hyperparameters, "eps": self.eps},
            "surrogate": self.surrogate,
            "data": self.data,
            "targets": self.targets_mode,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "images": len(images),
            "annotations": len(annotations),
            "skipped": skipped + data_skipped,
            "num_skipped": len(skipped) + len(data_skipped),
            "dropped": report["dropped"],  # zero-area boxes: no target (counted, listed, printed)
            "converted": report["converted"],  # images not 8-bit RGB (16-bit, RGBA, palette, CMYK, ...)
            "clipped_boxes": report["clipped_boxes"],
            "rmse_mean": round(float(np.mean(rmse)), 6) if rmse else None,
            "rmse_max": round(float(np.max(rmse)), 6) if rmse else None,
            "l2_mean": round(float(np.mean(l2)), 4) if l2 else None,
            "linf_mean": round(float(np.mean(linf)), 4) if linf else None,
            "linf_max": round(float(np.max(linf)), 4) if linf else None,
            "diagnostics": diagnostics,
            "files": {"images": "images/", "annotations": "instances.json", "manifest": "manifest.json"},
            "run": {"seconds": round(seconds, 3), "crafting_seconds": round(crafting_seconds, 3),
                    "images_crafted": crafted_now,
                    "images_per_s": (round(crafted_now / crafting_seconds, 4)
                                     if crafted_now and crafting_seconds > 0 else None),
                    "world_size": world, "device": str(self.device)},
        }
        atomic_write_json(self.out_dir / "card.json", card, indent=2)
        atomic_write_json(self.out_dir / "manifest.json",
                          {"format": MANIFEST_FORMAT, "complete": True, "job": self.job,
                           "images": manifest_images, "skipped": skipped}, indent=1)
        if remove_parts:
            for first in records:
                self.part_path(first).unlink(missing_ok=True)
            try:
                self.parts_dir.rmdir()
            except OSError:
                pass
        return card


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
        model_name: zoo name or ``torchvision:BUILDER`` (see ``build_model``); ``weights`` overrides
            its weights, ``pretrained=False`` builds it untrained (tests).
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
    job = _Job(attack_name=attack_name, model_name=model_name, data=str(data), ann=ann, weights=weights, eps=eps,
               step=step, steps=steps, attack_kwargs=attack_kwargs, limit=limit, batch_size=batch_size,
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
        with bar, _deterministic_cudnn(job.device):
            task = bar.add_task(f"{attack_name} on {model_name}", total=sum(len(b) for b in mine))
            for batch, loaded in zip(mine, loader):
                record = job.craft_batch(batch[0], loaded)
                atomic_write_json(job.part_path(batch[0]), record)
                crafted += len(record["images"])
                release_memory()
                bar.advance(task, len(batch))
    crafted_all = _all_sum(crafted) if dist_on else crafted
    craft_seconds = time.perf_counter() - t_craft  # wall time of the crafting (every rank: after the gather)
    if dist_on:
        dist_barrier()
        if rank == 0:
            job.merge(time.perf_counter() - t0, craft_seconds, crafted_all, world, remove_parts=True)
        dist_barrier()
        return read_json(job.out_dir / "card.json")
    if world == 1:
        return job.merge(time.perf_counter() - t0, craft_seconds, crafted, world, remove_parts=True)
    # a shard without a process group: the last one to finish merges (identical bytes if two do)
    remaining = len(job.batches) - len(job.done_batches())
    if remaining:
        log.info("shard %d/%d done; %d batches left to other shards", rank, world, remaining)
        return {"complete": False, "rank": rank, "world_size": world, "images_crafted": crafted,
                "batches_left": remaining}
    return job.merge(time.perf_counter() - t0, craft_seconds, crafted, world, remove_parts=False)
