"""The AOCO protocol of RAD (section 5): adversarial COCO-format datasets for detection and segmentation.

RAD publishes AOCO, "Adversarial Objects in COntext": the COCO 2017 validation images attacked by RAD
on YOLOv3 (the detection split, for every detector) and on Mask R-CNN (the segmentation split, for
instance segmentation models), each evaluated as a black-box transfer benchmark. ``build_aoco``
builds the same from any COCO-format dataset::

    out/det/   images/*.png, instances.json, card.json, manifest.json   (crafted on ``det_surrogate``)
    out/seg/   the same, crafted on ``seg_surrogate`` (masks in instances.json when the source has them)
    out/aoco.json                                                        summary of both splits

Each split is one ``craft_dataset`` job (resumable, shardable under torchrun, see ``bench.craft``).
With ``victims``, every victim is evaluated on the source images (clean) and on each split
(adversarial): box mAP / mAP50 / mAP75, plus segmentation mAP for mask models on data with masks;
the numbers go into each split's ``card.json`` under ``evaluation``.

The clean numbers are the victim on the source images letterboxed to its own input size; the
adversarial numbers are the victim on the crafted PNGs (at the surrogate's input size, letterboxed
again to the victim's). With the zoo (every model takes 256 px) the two resolutions are equal; for
real models pick a surrogate size equal to the victims' or read the gap with that in mind.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

from torch.utils.data import Dataset

from advdet import __version__
from advdet.bench.craft import CraftError, craft_dataset
from advdet.bench.distributed import dist_active, dist_barrier
from advdet.bench.runtime import resolve_device
from advdet.data.coco import CocoDetection
from advdet.data.io import atomic_write_json, read_json
from advdet.models.detector import Detector
from advdet.models.evaluate import predict_dataset, score_results
from advdet.models.hub import get_model, is_external

log = logging.getLogger(__name__)

__all__ = ["build_aoco", "check_victims", "evaluate_split", "parse_victims", "METRIC_KEYS"]

#: the metrics kept in cards (box, and segm_ for mask models)
METRIC_KEYS = ("map", "map50", "map75")


def parse_victims(spec: str | Sequence[str] | None) -> list[tuple[str, str | None]]:
    """``"yolov3,torchvision:fasterrcnn_resnet50_fpn=/w/frcnn.pth"`` -> [(name, weights or None), ...]."""
    if not spec:
        return []
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        name, _, weights = item.partition("=")
        out.append((name.strip(), str(Path(weights.strip()).expanduser()) if weights.strip() else None))
    return out


class _ImageIdSubset(Dataset):
    """The items of a ``CocoDetection`` whose image ids are in ``ids`` (keeps ``label_to_cat_id``)."""

    def __init__(self, ds: CocoDetection, ids: set[int]):
        self.ds = ds
        self.label_to_cat_id = ds.label_to_cat_id
        self.positions = [k for k, iid in enumerate(ds.image_ids) if iid in ids]

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, k: int):
        return self.ds[self.positions[k]]


def _scores(detector: Detector, ds, gt: dict, batch_size: int, masks: bool) -> tuple[dict, int]:
    results, ids = predict_dataset(detector, ds, batch_size)
    s = score_results(gt, results, ids, masks)
    keep = {k: round(float(s[k]), 6) for k in METRIC_KEYS}
    if masks:
        keep.update({f"segm_{k}": round(float(s[f"segm_{k}"]), 6) for k in METRIC_KEYS})
    return keep, len(ids)


def evaluate_split(split_dir: str | os.PathLike, victims: Sequence[tuple[str, str | None]], *,
                   batch_size: int = 8, device: str | None = None, pretrained: bool = True,
                   write_card: bool = True) -> dict:
    """Clean vs adversarial COCO mAP of each victim on a crafted split (a ``craft_dataset`` output).

    Clean: the victim on the source images of the split (the same image ids); adversarial: on the
    split's PNGs. Returns ``{victim: {"clean": {...}, "adversarial": {...}, "images": n, "weights": ...}}``
    and, with ``write_card``, stores it in the split's ``card.json`` under ``evaluation``.
    """
    import torch

    split_dir = Path(split_dir)
    card = read_json(split_dir / "card.json")
    src = card["data"]
    dev = resolve_device(device)
    evaluation = dict(card.get("evaluation", {}))
    for name, weights in victims:
        torch.manual_seed(int(card["seed"]))  # the initialisation of an untrained victim (tests)
        # torchvision victims see the split's resolution (clean and adversarial alike); zoo models are 256
        det = get_model(name, weights=weights, pretrained=pretrained,
                        input_size=int(src["size"]) if is_external(name) else None)
        if not isinstance(det, Detector):
            raise CraftError(f"victim {name!r} is not a detector (no mAP to measure)")
        det.to(dev).eval()
        size = det.input_size
        adv = CocoDetection(split_dir / "images", split_dir / "instances.json", size=size)
        clean = CocoDetection(src["images_dir"], src["ann_file"], size=size, skip_bad=True, validate_images=False)
        if det.num_classes != adv.num_classes:
            raise CraftError(f"victim {name!r} has {det.num_classes} classes but {split_dir} has "
                             f"{adv.num_classes}: it cannot be scored on this dataset")
        clean_sub = _ImageIdSubset(clean, set(adv.image_ids))
        masks = bool(getattr(det, "has_masks", False)) and adv.with_masks and clean.with_masks
        log.info("evaluating %s on %s (%d images)", name, split_dir, len(adv))
        c, n = _scores(det, clean_sub, clean.coco_gt, batch_size, masks)
        a, _ = _scores(det, adv, adv.coco_gt, batch_size, masks)
        key = name if weights is None else f"{name}={weights}"
        evaluation[key] = {"clean": c, "adversarial": a, "images": n,
                           "white_box": name == card["surrogate"]["name"]}
        del det
    if write_card:
        card["evaluation"] = evaluation
        atomic_write_json(split_dir / "card.json", card, indent=2)
    return evaluation


def check_victims(victims: Sequence[tuple[str, str | None]], data: str | os.PathLike,
                  ann: str | os.PathLike | None = None, *, pretrained: bool = True,
                  input_size: int | None = None) -> None:
    """Fail before any crafting when a victim cannot be scored on ``data``: unknown name, weights that
    do not fit, not a detector, or another number of classes than the dataset."""
    import torch

    from advdet.data.registry import resolve_dataset

    images_dir, ann_file = resolve_dataset(data, ann)
    ds = CocoDetection(images_dir, ann_file, size=64, skip_bad=True, validate_images=False)  # annotations only
    for name, weights in victims:
        torch.manual_seed(0)
        det = get_model(name, weights=weights, pretrained=pretrained,
                        input_size=input_size if is_external(name) else None)
        if not isinstance(det, Detector):
            raise CraftError(f"victim {name!r} is not a detector (no mAP to measure)")
        if det.num_classes != ds.num_classes:
            raise CraftError(f"victim {name!r} has {det.num_classes} classes but {data} has {ds.num_classes}: "
                             f"it cannot be scored on this dataset")
        del det


def build_aoco(data: str | os.PathLike, out_dir: str | os.PathLike, *, ann: str | os.PathLike | None = None,
               det_surrogate: str | None = "yolov3", seg_surrogate: str | None = "maskrcnn",
               det_weights: str | os.PathLike | None = None, seg_weights: str | os.PathLike | None = None,
               attack: str = "rad", eps: float | None = 16.0, step: float | None = None,
               steps: int | None = None, attack_kwargs: dict | None = None, limit: int | None = None,
               batch_size: int = 8, seed: int = 0, skip_bad: bool = False,
               victims: Sequence[tuple[str, str | None]] = (), device: str | None = None,
               pretrained: bool = True, labels: bool = True, workers: int = 0,
               progress: bool = True, input_size: int | None = None,
               seg_input_size: int | None = None) -> dict:
    """Build the AOCO protocol (module docstring): ``out/det`` on ``det_surrogate`` and ``out/seg`` on
    ``seg_surrogate`` (None skips a split), both with ``attack`` at ``eps``, then the victims' clean
    vs adversarial mAP in each card when ``victims`` are given. ``input_size`` sets the letterbox size
    of ``torchvision:BUILDER`` surrogates, ``seg_input_size`` that of the seg split when it differs
    (RAD's AOCO: 416 and 448). Under torchrun the crafting is sharded
    and rank 0 evaluates. Returns ``{"det": card, "seg": card}`` and writes ``out/aoco.json``."""
    out_dir = Path(out_dir)
    seg_input_size = seg_input_size if seg_input_size is not None else input_size
    splits = [(s, m, w, z) for s, m, w, z in (("det", det_surrogate, det_weights, input_size),
                                              ("seg", seg_surrogate, seg_weights, seg_input_size)) if m]
    if not splits:
        raise CraftError("no split to build: give a detection and/or a segmentation surrogate")
    if victims:
        check_victims(victims, data, ann, pretrained=pretrained, input_size=input_size)
    cards: dict[str, Any] = {}
    for split, model, weights, size in splits:
        log.info("AOCO %s split: %s on %s", split, attack, model)
        cards[split] = craft_dataset(attack, model, data, out_dir / split, ann=ann, weights=weights, eps=eps,
                                     step=step, steps=steps, attack_kwargs=attack_kwargs, limit=limit,
                                     batch_size=batch_size, seed=seed, skip_bad=skip_bad, device=device,
                                     progress=progress, pretrained=pretrained, labels=labels, workers=workers,
                                     input_size=size)
        if split == "seg" and not cards[split]["data"]["with_masks"]:
            log.warning("%s has no segmentation masks: the seg split has boxes only", data)
    import torch.distributed as dist

    rank = dist.get_rank() if dist_active() else 0
    if rank == 0:
        if victims:
            for split in cards:
                cards[split]["evaluation"] = evaluate_split(out_dir / split, victims, batch_size=batch_size,
                                                            device=device, pretrained=pretrained)
        summary = {"kind": "advdet AOCO", "advdet_version": __version__, "attack": attack, "seed": seed,
                   "data": str(data), "splits": {}}
        for split, card in cards.items():
            summary["splits"][split] = {
                "surrogate": card["surrogate"]["name"], "eps": card["attack"]["eps"], "images": card["images"],
                "num_skipped": card["num_skipped"], "rmse_mean": card["rmse_mean"], "linf_max": card["linf_max"],
                "evaluation": card.get("evaluation", {})}
        atomic_write_json(out_dir / "aoco.json", summary, indent=2)
    dist_barrier()
    if rank != 0:
        cards = {split: read_json(out_dir / split / "card.json") for split in cards}
    return cards
