"""`advdet train`: standard and adversarial training (SSD-AT, MTD, CWAT, RobustDet), one process or torchrun."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Optional

import typer

from advdet.cli.app import app, console, parse_overrides
from advdet.cli.options import Device, Threads


def _command_line(ctx: typer.Context) -> str:
    """The `advdet train` command with every option that differs from its default (for the card)."""
    parts = ["advdet", "train"]
    for p in ctx.command.params:
        v = ctx.params.get(p.name)
        if v is None or v == p.default or (isinstance(v, (list, tuple)) and not v):
            continue
        if getattr(p, "is_flag", False) and isinstance(v, bool):
            parts.append(p.opts[0] if v else p.secondary_opts[0])
            continue
        for item in (v if isinstance(v, (list, tuple)) else [v]):
            parts += [p.opts[0], shlex.quote(str(item))]
    return " ".join(parts)


@app.command("train")
def train_cmd(
    click_ctx: typer.Context,
    method: str = typer.Option("standard", help="standard, at-cls, at-loc, mtd, cwat, robustdet or robustdet-cfr."),
    model: str = typer.Option(..., help="Zoo name (the architecture, e.g. ssd_vgg, robustdet) or torchvision:BUILDER."),
    data: str = typer.Option("shapes-train", help="shapes-train, shapes-val, or a COCO-format images folder."),
    ann: Optional[Path] = typer.Option(None, help="COCO instances JSON for an images folder."),
    out: Path = typer.Option(..., help="Run folder: checkpoint.pt, then weights.safetensors + weights.json."),
    init: Optional[str] = typer.Option(None, help="Initial weights: a weights file or a zoo name (its shipped "
                                       "weights). RobustDet methods accept an SSD checkpoint (copied into all K "
                                       "kernel slots)."),
    epochs: Optional[float] = typer.Option(None, help="Epochs (of the images drawn per update)."),
    iters: Optional[int] = typer.Option(None, help="Updates (overrides --epochs)."),
    batch_size: Optional[int] = typer.Option(None, help="Images per update (per rank); adversarial methods: "
                                             "half clean, half adversarial."),
    lr: Optional[float] = typer.Option(None, help="Learning rate."),
    seed: int = typer.Option(0, help="Seed of data order, augmentation and new parameters."),
    resume: bool = typer.Option(False, help="Continue from OUT/checkpoint.pt (bit-exact on CPU)."),
    schedule: str = typer.Option("interleaved", help="Adversarial examples: interleaved (one PGD step per "
                                 "update, the reference code) or plain (full PGD per update)."),
    pgd_steps: int = typer.Option(20, help="PGD steps per adversarial batch."),
    eps: float = typer.Option(8.0, help="PGD Linf budget (0-255 units)."),
    alpha: float = typer.Option(8.0, help="PGD step (0-255 units)."),
    attack: Optional[str] = typer.Option(None, help="Override the method's training attack (cls, loc, pgd, mtd, cwa)."),
    set_: list[str] = typer.Option([], "--set", help="Override any TrainConfig/MethodConfig field, e.g. "
                                   "--set optimizer=adamw --set triplet=paper."),
    threads: Threads = 0,
    max_minutes: Optional[float] = typer.Option(None, help="Stop (and checkpoint) after this wall time."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Checkpoint every N updates."),
    evaluate: bool = typer.Option(False, "--eval/--no-eval", help="Evaluate clean COCO mAP at the end."),
    eval_data: str = typer.Option("shapes-val", help="Dataset for --eval."),
    eval_limit: Optional[int] = typer.Option(None, help="Evaluate the first N images only."),
    device: Device = None,
    skip_bad: bool = typer.Option(False, help="Skip and count bad images instead of failing."),
) -> None:
    """Train a detector with a method; writes checkpoints, weights (safetensors) and a JSON card.

    Under `torchrun --nproc_per_node N -m advdet train ...` it runs DistributedDataParallel (gloo on CPU,
    nccl on CUDA); --batch-size is per rank and only rank 0 writes.
    """
    import torch

    from advdet.data.registry import build_dataset
    from advdet.training.distributed import init_distributed, shutdown_distributed
    from advdet.training.methods import (ADVERSARIAL_TRAIN_DEFAULTS, get_method, prepare_model, split_recipe,
                                         train_with_method)
    from advdet.training.tensor_cache import TensorCache

    if threads:
        torch.set_num_threads(threads)
    try:
        m = get_method(method)
    except KeyError as err:
        raise typer.BadParameter(str(err.args[0]), param_hint="--method") from None
    recipe: dict = {}
    if m.attack is None:
        from advdet.models.zoo import is_external, zoo_entry

        try:
            entry = zoo_entry(model) if not is_external(model) else None
        except KeyError:
            entry = None
        if entry is not None and entry.method == "standard":
            recipe.update(entry.recipe)  # the zoo's own recipe for its architecture
    else:
        recipe.update(ADVERSARIAL_TRAIN_DEFAULTS)
    for k, v in (("epochs", epochs), ("iters", iters), ("batch_size", batch_size), ("lr", lr),
                 ("max_minutes", max_minutes), ("checkpoint_every", checkpoint_every), ("attack", attack)):
        if v is not None:
            recipe[k] = v
    recipe.update(seed=seed, schedule=schedule, pgd_steps=pgd_steps, eps=eps, alpha=alpha)
    recipe.update(parse_overrides(set_))
    try:
        train_cfg, method_cfg = split_recipe(recipe)
    except (KeyError, ValueError, TypeError) as err:
        raise typer.BadParameter(str(err)) from None

    dist = init_distributed(device)
    try:
        det = prepare_model(method, model, init, seed=train_cfg.seed, cfg=method_cfg)
        if dist.is_distributed and not dist.is_main:
            dist.barrier()  # rank 0 decodes the tensor cache first; the others load it
        ds = build_dataset(data, ann, size=det.input_size, skip_bad=skip_bad)
        cache = TensorCache.from_dataset(ds, with_masks=bool(getattr(det, "has_masks", False)))
        if dist.is_distributed and dist.is_main:
            dist.barrier()
        eval_ds = build_dataset(eval_data, size=det.input_size) if evaluate and dist.is_main else None
        command = _command_line(click_ctx)
        if dist.is_distributed:
            command = f"torchrun --nproc_per_node {dist.world_size} -m {command}"
        card = train_with_method(method, det, cache, out, train_cfg=train_cfg, method_cfg=method_cfg, init=init,
                                 model_name=model, resume=resume, dist=dist, data=str(data if ann is None else
                                                                                   f"{data} ({ann})"),
                                 eval_dataset=eval_ds, eval_limit=eval_limit, command=command)
    finally:
        shutdown_distributed(dist)
    if not dist.is_main:
        return
    line = (f"{method} on {model}: {card['iterations']}/{card['total_iterations']} updates, "
            f"{card['training_seconds']:.0f} s, {card['train_images_per_second']:.2f} images/s"
            + (f" ({card['world_size']} ranks)" if card["world_size"] > 1 else ""))
    if not card["finished"]:
        console.print(line + f"; stopped early, continue with --resume (checkpoint in {out})")
        return
    if "eval" in card:
        v = card["eval"]
        line += f"; {eval_data} mAP {v['map']:.3f}, mAP50 {v['map50']:.3f}"
    console.print(line + f"; weights {Path(out) / card['file']}")
    last = card["history"][-1] if card["history"] else {}
    console.print("last losses: " + json.dumps({k: v for k, v in last.items() if k not in ("iteration", "epoch")}))
