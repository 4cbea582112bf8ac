"""A crafting job of ``advdet attack`` (:mod:`advdet.bench.craft`): its surrogate, attack, data, targets and
output names (:class:`CraftJob`), the seed of each batch, and how one batch is attacked and recorded."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advdet import __version__
from advdet.attacks.base import Attack
from advdet.attacks.batches import letterbox_mask
from advdet.attacks.ensemble import is_ensemble_name
from advdet.attacks.quantize import quantize_adv, to_uint8
from advdet.attacks.rad import RADDiagnostics
from advdet.attacks.registry import ATTACKS, build_attack
from advdet.attacks.seeding import batch_seed, crafting_defaults
from advdet.attacks.spec import resolve_name
from advdet.bench.pipeline import Crafter
from advdet.bench.runtime import jsonable, resolve_device
from advdet.data.coco import decode_segmentation
from advdet.data.coco_writer import CocoWriter, encode_mask
from advdet.data.errors import AdvdetError, DatasetError, UnknownNameError
from advdet.data.io import atomic_write_json, read_json
from advdet.data.letterbox import letterbox_boxes, letterbox_masks
from advdet.data.registry import resolve_dataset
from advdet.metrics.perturbation import perturbation_stats
from advdet.models.detector import Detector
from advdet.models.hub import get_model, is_external, provenance

log = logging.getLogger(__name__)

__all__ = ["CraftJob", "CraftError", "MANIFEST_FORMAT", "PARTS_DIR", "batch_seed", "load_attack_registry",
           "surrogate_info"]

MANIFEST_FORMAT = "advdet-craft/1"
PARTS_DIR = "parts"


class CraftError(AdvdetError):
    """A crafting job that cannot run as asked (wrong model for the attack, an output folder that holds
    another job, ...); the message says what to change."""


def load_attack_registry() -> dict[str, type[Attack]]:
    """The attack registry (``advdet.attacks.registry`` registers every attack, RAD included, on import)."""
    return ATTACKS


def surrogate_info(model_name: str, model: nn.Module, weights: str | os.PathLike | None,
                   pretrained: bool) -> dict:
    """Name, kind, family, input size and the weights (path and sha256: :func:`advdet.models.hub.provenance`)
    of a built model, for cards."""
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
    prov = provenance(model_name, weights=weights or None, pretrained=pretrained)
    info.update(weights=prov.file, weights_sha256=prov.sha256, untrained=prov.origin == "untrained")
    return info


def build_ensemble(model_name: str, weights, pretrained: bool, input_size) -> nn.Module:
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
            det = get_model(m, pretrained=pretrained, input_size=input_size if is_external(m) else None)
        except KeyError as err:
            msg = err.args[0] if err.args else m
            raise UnknownNameError(f"ensemble {model_name!r}: unknown member {m!r} ({msg})") from None
        if not isinstance(det, Detector):
            raise CraftError(f"ensemble {model_name!r}: member {m!r} is not a detector")
        members.append(det)
    return SurrogateEnsemble(members, names)


class CraftJob:
    """Everything a crafting job needs, shared by its batches and its merge."""

    def __init__(self, *, attack_name: str, model_name: str, data: str, ann, weights, eps, step, steps,
                 attack_kwargs, limit, batch_size, seed, skip_bad, device, pretrained, labels, out_dir,
                 input_size=None):
        registry = load_attack_registry()
        try:
            attack_name = resolve_name(attack_name, registry)
        except UnknownNameError as err:
            raise CraftError(err.args[0]) from None
        if batch_size < 1:
            raise CraftError(f"batch_size must be >= 1, got {batch_size}")
        if limit is not None and limit < 1:
            raise CraftError(f"limit must be >= 1, got {limit}")
        self.attack_name, self.model_name = attack_name, model_name
        self.is_classifier_attack = registry[attack_name].surrogate_kind == "classifier"
        self.out_dir = Path(out_dir)
        self.batch_size, self.seed, self.skip_bad = int(batch_size), int(seed), bool(skip_bad)

        images_dir, ann_file = resolve_dataset(data, ann)  # a wrong path fails before the model is built
        weights = Path(weights).expanduser() if weights else None

        # surrogate (an untrained one is initialised from the job seed, so every run builds the same)
        torch.manual_seed(self.seed)
        if is_ensemble_name(model_name):
            self.model = build_ensemble(model_name, weights, pretrained, input_size)
        else:
            self.model = get_model(model_name, weights=weights, pretrained=pretrained,
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
        kw = crafting_defaults(registry[attack_name], kw)
        try:
            self.attack = build_attack(attack_name, self.model, **kw)
        except KeyError as err:
            raise CraftError(err.args[0]) from None
        except TypeError as err:
            raise CraftError(str(err)) from None
        self.crafter = Crafter(self.attack, self.seed, self.device)  # the seed policy of every crafting command
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
        files = [it["file_name"] for _, it in items]
        try:
            x_adv = self.crafter.craft(first, x, targets, mask)
        except (RuntimeError, FloatingPointError, ValueError) as err:
            raise RuntimeError(f"attack {self.attack_name!r} failed on images {files}: {err}") from err
        keep = mask if self.attack.valid_only else None
        try:
            q = quantize_adv(x_adv.detach().cpu(), x, self.eps, keep)
        except ValueError as err:
            raise RuntimeError(f"attack {self.attack_name!r} gave an invalid image for {files}: {err}") from err
        diag = self.crafter.diagnostics()
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
