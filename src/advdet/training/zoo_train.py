"""Reproduce a zoo entry from its recipe: train on shapes-train, evaluate on shapes-val, ship with a card."""

from __future__ import annotations

import json
import logging
import os
import platform
import shlex
from pathlib import Path

import torch

from advdet import __version__
from advdet.data.registry import build_dataset
from advdet.data.shapes import advdet_home
from advdet.models.evaluate import evaluate_detector
from advdet.models.weights import CheckpointError, load_weights_under, read_card, round_to_dtype, save_weights
from advdet.models.hub import get_model
from advdet.models.zoo import ZOO_DIR, ZOO_INPUT_SIZE, zoo_entry
from advdet.training.standard import TrainConfig, train_detector
from advdet.training.tensor_cache import TensorCache

log = logging.getLogger(__name__)

#: the state-dict prefix of a torchvision family's backbone + FPN (what ``ZooEntry.backbone_init`` loads)
BACKBONE_PREFIX = "model.backbone."


def train_command(name: str, dev: torch.device, overrides: dict | None) -> str:
    """The shell command that reproduces a zoo run: ``--set KEY=VALUE`` with every non-string value as JSON
    (what ``--set`` parses) and each item quoted for the shell where needed."""
    sets = "".join(f" --set {shlex.quote(f'{k}={v if isinstance(v, str) else json.dumps(v)}')}"
                   for k, v in (overrides or {}).items())
    return f"advdet zoo train {name}" + (f" --device {dev.type}" if dev.type != "cpu" else "") + sets


def train_zoo_model(name: str, *, out_dir: str | os.PathLike | None = None, run_dir: str | os.PathLike | None = None,
                    resume: bool = False, overrides: dict | None = None, eval_limit: int | None = None,
                    threads: int | None = None, device: str | torch.device | None = None,
                    workers: int = 1) -> dict:
    """Train zoo entry ``name`` with its recipe (fields in ``overrides`` replace the recipe's).

    ``workers``: processes that render the procedural set of a backbone entry (the same bytes for any count).

    ``device``: where to train (default cpu; "cuda" on a GPU). The weights are evaluated and written from
    the CPU either way; a GPU run follows the same recipe and seed but not the CPU run's exact numbers.

    Robust entries (``entry.method`` != "standard") start from the zoo's ``entry.init`` weights (a clear
    ``CheckpointError`` when they are missing) and train with their method; their recipe mixes
    ``TrainConfig`` and ``MethodConfig`` fields. Entries with ``entry.backbone_init`` start their backbone +
    FPN from that zoo entry's weights (the card records its name and sha256). Checkpoints go to ``run_dir``
    (default $ADVDET_HOME/runs/NAME, outside the work tree so a later session can ``resume``); when training
    finishes the weights and card are written to ``out_dir`` (default: the package's zoo_weights
    folder). Returns the card.
    """
    if threads:
        torch.set_num_threads(threads)
    entry = zoo_entry(name)
    method_cfg = None
    if entry.method == "standard" and not entry.init:
        cfg = TrainConfig(**{**entry.recipe, **(overrides or {})})
    else:
        from advdet.training.methods import split_recipe

        cfg, method_cfg = split_recipe({**entry.recipe, **(overrides or {})})
    run_dir = Path(run_dir or advdet_home() / "runs" / name)
    if entry.kind == "backbone":
        return _train_backbone(entry, cfg, run_dir, out_dir, resume, overrides, eval_limit, device, workers)
    if entry.kind == "classifier" and entry.backbone_init and not entry.recipe:
        return _adopt_pretrained(entry, out_dir, eval_limit)
    for start in (entry.init, entry.backbone_init):  # fail early and clearly when a starting point is missing
        if start and not zoo_entry(start).trained:
            raise CheckpointError(f"{zoo_entry(start).weights_path}: {name!r} starts from the zoo's {start!r} "
                                  f"weights, which are missing; train them first with `advdet zoo train {start}`")
    train_ds = build_dataset("shapes-train", size=ZOO_INPUT_SIZE)
    cache = TensorCache.from_dataset(train_ds, with_masks=entry.with_masks)
    if method_cfg is None:
        model = entry.builder()
        step_fn = None
        if entry.backbone_init:
            keys = load_backbone_init(model, entry)
            log.info("%s: %d backbone tensors from the zoo's %s", name, len(keys), entry.backbone_init)
    else:
        from advdet.training.methods import build_step_fn, prepare_model

        model = prepare_model(entry.method, name, entry.init, seed=cfg.seed, cfg=method_cfg)
        step_fn = build_step_fn(entry.method, method_cfg)
    dev = torch.device(device or "cpu")
    model.to(dev)
    summary = train_detector(model, cache, cfg, run_dir, resume=resume, with_masks=entry.with_masks,
                             step_fn=step_fn)
    if not summary["finished"]:
        log.warning("%s: stopped after %d of %d iterations (max_minutes); resume with --resume", name,
                    summary["iterations"], summary["total_iterations"])
    model.cpu()
    round_to_dtype(model, entry.storage_dtype)  # the card describes the stored (float16 / int8) weights
    metrics = shapes_val_metrics(model, entry.kind, eval_limit)
    command = train_command(name, dev, overrides)
    card = {
        "name": name, "family": entry.family, "kind": entry.kind, "description": entry.description,
        "architecture": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
        "input_size": ZOO_INPUT_SIZE, "num_classes": model.num_classes, "data": "shapes-train (4000 images, seed 0)",
        "recipe": cfg.as_dict(), "command": command, "seed": cfg.seed, "epochs": cfg.epochs,
        "iterations": summary["iterations"], "finished": summary["finished"],
        "training_seconds": summary["seconds"], "train_images_per_second": summary["images_per_second"],
        "shapes_val": metrics,
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, torch {torch.__version__}"
                   + (f", trained on {torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else ""),
        "advdet_version": __version__,
    }
    card.update(start_fields(entry))
    if method_cfg is not None:
        card.update(method=entry.method,
                    method_config=step_fn.config() if step_fn is not None else method_cfg.as_dict())
    return save_weights(model, Path(out_dir or ZOO_DIR) / f"{name}.safetensors", card, dtype=entry.storage_dtype)


def start_fields(entry) -> dict:
    """The card fields naming what a zoo entry starts from, with the sha256 of that zoo file as it is now:
    ``backbone_init`` / ``backbone_init_sha256`` and ``init`` / ``init_sha256`` (a fine-tune such as the
    robust entries), so that a card tells which file it was trained from after that entry is retrained."""
    fields: dict = {}
    for key in ("backbone_init", "init"):
        start = getattr(entry, key)
        if start:
            fields.update({key: start, f"{key}_sha256": zoo_entry(start).card.get("sha256")})
    return fields


def load_backbone_init(model: torch.nn.Module, entry) -> list[str]:
    """Fill ``model``'s backbone from the zoo entry ``entry.backbone_init`` (``entry.backbone_keys`` maps the
    model's key prefixes to the file's; default ``model.backbone.`` from the same prefix). Returns the keys."""
    path = zoo_entry(entry.backbone_init).weights_path
    keys: list[str] = []
    for prefix, src in (entry.backbone_keys or {BACKBONE_PREFIX: BACKBONE_PREFIX}).items():
        keys += load_weights_under(model, path, prefix, src)
    return keys


def pretrain_split(data: dict, split: str, workers: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, S, S) uint8 and labels (N,) of a backbone entry's procedural ``split`` (rendered once,
    then cached under $ADVDET_HOME/cache)."""
    from advdet.data.procedural import procedural_tensors

    per_class = data["train_per_class"] if split == "train" else data["val_per_class"]
    return procedural_tensors(data["num_classes"], data["num_classes"] * per_class, data["size"], data["seed"], split,
                              workers=workers)


@torch.no_grad()
def pretrain_val_metrics(model: torch.nn.Module, data: dict, limit: int | None = None, batch_size: int = 256) -> dict:
    """Top-1 and top-5 accuracy of a backbone classifier on its procedural validation split."""
    images, labels = pretrain_split(data, "val")
    if limit:
        images, labels = images[:limit], labels[:limit]
    model.eval()
    top1 = top5 = 0
    for i in range(0, len(images), batch_size):
        logits = model(images[i:i + batch_size].float() / 255.0)
        y = labels[i:i + batch_size]
        top5_idx = logits.topk(min(5, logits.shape[1]), 1).indices
        top1 += int((top5_idx[:, 0] == y).sum())
        top5 += int((top5_idx == y[:, None]).any(1).sum())
    n = max(1, len(images))
    return {"top1": round(top1 / n, 4), "top5": round(top5 / n, 4), "images": len(images)}


def _train_backbone(entry, cfg: TrainConfig, run_dir: Path, out_dir, resume: bool, overrides: dict | None,
                    eval_limit: int | None, device, workers: int = 1) -> dict:
    """Pretrain a ``kind="backbone"`` entry on its procedural set (the loop of :func:`train_detector`: the
    same checkpoints, resume and augmentation; each image's target is one full-image box with its class)."""
    data = entry.data
    images, labels = pretrain_split(data, "train", workers)
    s = images.shape[-1]
    full = torch.tensor([[0.0, 0.0, float(s), float(s)]])
    cache = TensorCache(images, [full] * len(images), [labels[i:i + 1] for i in range(len(labels))])
    model = entry.builder()
    dev = torch.device(device or "cpu")
    model.to(dev)
    summary = train_detector(model, cache, cfg, run_dir, resume=resume)
    if not summary["finished"]:
        log.warning("%s: stopped after %d of %d iterations (max_minutes); resume with --resume", entry.name,
                    summary["iterations"], summary["total_iterations"])
    model.cpu()
    round_to_dtype(model, entry.storage_dtype)
    metrics = pretrain_val_metrics(model, data, eval_limit)
    command = train_command(entry.name, dev, overrides)
    card = {
        "name": entry.name, "family": entry.family, "kind": entry.kind, "description": entry.description,
        "architecture": type(model).__name__ + "(" + type(model.body).__name__ + ")",
        "parameters": sum(p.numel() for p in model.parameters()),
        "body_parameters": sum(p.numel() for p in model.body.parameters()),
        "input_size": s, "work_size": getattr(model, "work_size", None), "num_classes": model.num_classes,
        "data": (f"procedural (advdet.data.procedural): {data['num_classes']} classes x {data['train_per_class']} "
                 f"train images, {data['size']} px, seed {data['seed']}"),
        "data_config": dict(data), "recipe": cfg.as_dict(), "command": command, "seed": cfg.seed,
        "epochs": cfg.epochs, "iterations": summary["iterations"], "finished": summary["finished"],
        "training_seconds": summary["seconds"], "train_images_per_second": summary["images_per_second"],
        "history": summary["history"],
        "procedural_val": metrics,
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, torch {torch.__version__}"
                   + (f", trained on {torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else ""),
        "advdet_version": __version__,
    }
    return save_weights(model, Path(out_dir or ZOO_DIR) / f"{entry.name}.safetensors", card, dtype=entry.storage_dtype)


def _adopt_pretrained(entry, out_dir, eval_limit: int | None) -> dict:
    """A classifier entry without a recipe of its own: the weights of its ``backbone_init`` entry (body and
    head) in its own input size, measured on that entry's procedural validation split."""
    src = zoo_entry(entry.backbone_init)
    if not src.trained:
        raise CheckpointError(f"{src.weights_path}: {entry.name!r} adopts the zoo's {src.name!r} weights, which are "
                              f"missing; train them first with `advdet zoo train {src.name}`")
    model = entry.builder()
    keys = load_backbone_init(model, entry)
    missing = [k for k in model.state_dict() if k not in keys]
    if missing:
        raise CheckpointError(f"{src.weights_path}: does not fill {entry.name!r}: {missing[:3]}")
    round_to_dtype(model, entry.storage_dtype)
    card = {
        "name": entry.name, "family": entry.family, "kind": entry.kind, "description": entry.description,
        "architecture": type(model).__name__ + "(" + type(model.body).__name__ + ")",
        "parameters": sum(p.numel() for p in model.parameters()), "input_size": ZOO_INPUT_SIZE,
        "num_classes": model.num_classes, "data": src.card.get("data"), "recipe": None,
        "command": f"advdet zoo train {entry.name}", **start_fields(entry), "training_seconds": 0.0,
        "procedural_val": pretrain_val_metrics(model, src.data, eval_limit),
        "note": f"the weights of {src.name} (body and head), used at {ZOO_INPUT_SIZE} px; procedural_val is "
                f"measured at the pretraining size ({src.data['size']} px)",
        "advdet_version": __version__,
    }
    return save_weights(model, Path(out_dir or ZOO_DIR) / f"{entry.name}.safetensors", card, dtype=entry.storage_dtype)


def shapes_val_metrics(model: torch.nn.Module, kind: str, limit: int | None) -> dict:
    """The card's ``shapes_val`` numbers: box (and mask) COCO mAP of a detector, top-1 of the classifier."""
    val_ds = build_dataset("shapes-val", size=ZOO_INPUT_SIZE)
    if kind == "classifier":
        from advdet.models.classifier import classifier_accuracy

        metrics = classifier_accuracy(model, val_ds, limit=limit)
    else:
        metrics = evaluate_detector(model, val_ds, limit=limit)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}


def compact_zoo_model(name: str, *, out_dir: str | os.PathLike | None = None, eval_limit: int | None = None) -> dict:
    """Rewrite the shipped weights of zoo entry ``name`` in its ``storage_dtype`` and re-measure its card.

    For entries stored before in a wider type (float32, or float16 for the int8 robust entries): the card
    keeps its recipe and training record, its ``shapes_val`` becomes the metrics of the rounded weights and
    the old metrics move to ``shapes_val_OLDDTYPE`` (``compacted_from`` names it). Entries already stored
    in their dtype are returned unchanged.
    """
    entry = zoo_entry(name)
    if not entry.trained:
        raise CheckpointError(f"{entry.weights_path}: zoo entry {name!r} has no weights to compact")
    card = read_card(entry.weights_path)
    dtype = str(entry.storage_dtype).removeprefix("torch.")
    if card.get("dtype") == dtype:
        return card
    old = card.get("dtype") or "float32"
    model = get_model(name)
    round_to_dtype(model, entry.storage_dtype)
    card[f"shapes_val_{old}"] = card.get("shapes_val")
    card["compacted_from"] = old
    card["shapes_val"] = shapes_val_metrics(model, entry.kind, eval_limit)
    return save_weights(model, Path(out_dir or ZOO_DIR) / f"{name}.safetensors", card, dtype=entry.storage_dtype)
