"""The end of a crafting job: ``instances.json``, ``card.json`` and ``manifest.json`` built from every batch
record (``parts/b<first>.json``), identical whichever process or (resumed) run crafted the batches."""

from __future__ import annotations

import numpy as np

from advdet import __version__
from advdet.attacks.rad import RADDiagnostics
from advdet.attacks.registry import ATTACKS
from advdet.bench.craft_job import MANIFEST_FORMAT, CraftError, CraftJob
from advdet.data.coco_writer import CocoWriter
from advdet.data.io import atomic_write_json, read_json

__all__ = ["merge_job"]


def merge_job(job: CraftJob, seconds: float, crafting_seconds: float, crafted_now: int, world: int,
              remove_parts: bool) -> dict:
    """Build ``instances.json``, ``card.json`` and ``manifest.json`` from every batch record."""
    records = {}
    for first in (b[0] for b in job.batches):
        p = job.part_path(first)
        if not p.is_file():
            raise CraftError(f"{p}: batch record missing; run the job again to finish it")
        records[first] = read_json(p)
    if remove_parts:  # the only writer now: remove the temp files of killed writers
        for folder in (job.out_dir, job.out_dir / "images", job.parts_dir):
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
    data_skipped = [{"item": item, "problem": problem} for item, problem in job.ds.report.skipped]
    job.ds.note_formats(job.indices)  # conversions made in other processes too (workers, ranks)
    report = job.ds.report.as_dict()
    cls = ATTACKS[job.attack_name]
    info = {"description": f"advdet adversarial dataset: {job.attack_name} on {job.model_name}",
            "attack": job.attack_name, "surrogate": job.model_name, "seed": job.seed,
            "eps": job.eps, "advdet_version": __version__}
    writer = CocoWriter(job.out_dir, job.ds.categories, info)
    writer.images, writer.annotations = images, annotations
    writer.write_json()
    card = {
        "kind": "advdet adversarial dataset",
        "advdet_version": __version__,
        "attack": {"name": job.attack_name, "description": cls.description,
                   "hyperparameters": job.hyperparameters, "eps": job.eps},
        "surrogate": job.surrogate,
        "data": job.data,
        "targets": job.targets_mode,
        "seed": job.seed,
        "batch_size": job.batch_size,
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
                "world_size": world, "device": str(job.device)},
    }
    atomic_write_json(job.out_dir / "card.json", card, indent=2)
    atomic_write_json(job.out_dir / "manifest.json",
                      {"format": MANIFEST_FORMAT, "complete": True, "job": job.job,
                       "images": manifest_images, "skipped": skipped}, indent=1)
    if remove_parts:
        for first in records:
            job.part_path(first).unlink(missing_ok=True)
        try:
            job.parts_dir.rmdir()
        except OSError:
            pass
    return card
