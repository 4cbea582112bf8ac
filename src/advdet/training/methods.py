"""The training methods by name, how each builds its model and its step, and :func:`train_with_method`,
the one entry point behind ``advdet train`` and the robust zoo recipes.

| method | step | training examples | reference |
| --- | --- | --- | --- |
| ``standard`` | the detector's own losses | - | - |
| ``at-cls`` | L_det on [clean; adv] | A_cls (PGD on L_cls) | SSD-AT(A_cls), Zhang & Wang ICCV 2019 |
| ``at-loc`` | L_det on [clean; adv] | A_loc (PGD on L_loc) | SSD-AT(A_loc), Zhang & Wang ICCV 2019 |
| ``mtd`` | L_det on [clean; adv] | per image the stronger of A_cls / A_loc | MTD, Zhang & Wang ICCV 2019 |
| ``cwat`` | L_det on [clean; adv] | CWA (class-wise) | CWAT, Chen et al. CVPR 2021 |
| ``robustdet`` | eq. 5 on a RobustSSD | MTD (the reference's default) | RobustDet, Dong et al. ECCV 2022 |
| ``robustdet-cfr`` | eq. 5 with CFR (RobustDet*) | MTD | RobustDet*, Dong et al. ECCV 2022 |

Adversarial methods share :class:`MethodConfig` (PGD eps 8, step 8, 20 steps, ``interleaved`` schedule;
see :mod:`advdet.training.adversarial`). Their recommended optimisation (the papers': SGD, lr 1e-3,
momentum 0.9, weight decay 5e-4, constant lr, batch 32 = 16 clean + 16 adversarial, starting from a
clean model) is :data:`ADVERSARIAL_TRAIN_DEFAULTS`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from advdet.models.robustdet import A_AID, B_RE, BETA, C_KLD, robustdet_for_training
from advdet.models.weights import CheckpointError, load_weights
from advdet.training.adversarial import (SCHEDULES, TRAINING_ATTACKS, AdversarialExamples, AdversarialTrainingStep,
                                         RobustDetStep)
from advdet.training.distributed import DistContext
from advdet.training.standard import TrainConfig, train_detector
from advdet.training.tensor_cache import TensorCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    """A training method: its attack (None for clean training) and whether it trains a RobustSSD."""

    name: str
    description: str
    reference: str
    attack: str | None = None
    robustdet: bool = False
    cfr: bool = False


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("standard", "clean training with the detector's own losses", "-"),
    Method("at-cls", "SSD-AT: half clean, half A_cls (PGD on the classification loss) images", "Zhang & Wang, "
           "Towards Adversarially Robust Object Detection, ICCV 2019 (SSD-AT(A_cls))", attack="cls"),
    Method("at-loc", "SSD-AT: half clean, half A_loc (PGD on the localization loss) images", "Zhang & Wang, "
           "ICCV 2019 (SSD-AT(A_loc))", attack="loc"),
    Method("mtd", "MTD: half clean, half per-image stronger of A_cls / A_loc by total loss", "Zhang & Wang, "
           "ICCV 2019 (MTD)", attack="mtd"),
    Method("cwat", "CWAT: half clean, half class-wise (CWA) examples", "Chen et al., Class-Aware Robust "
           "Adversarial Training for Object Detection, CVPR 2021", attack="cwa"),
    Method("robustdet", "RobustDet: adversarially-aware convs mixed by the AID, triplet loss (eq. 5)",
           "Dong, Wei, Lin, Adversarially-Aware Robust Object Detector, ECCV 2022", attack="mtd", robustdet=True),
    Method("robustdet-cfr", "RobustDet*: RobustDet with CFR (reconstruction + KL terms of eq. 5)",
           "Dong, Wei, Lin, ECCV 2022 (RobustDet*)", attack="mtd", robustdet=True, cfr=True),
)}

#: the papers' optimisation for adversarial fine-tuning (ALGORITHMS.md 1.5), as TrainConfig fields
ADVERSARIAL_TRAIN_DEFAULTS = dict(optimizer="sgd", lr=1e-3, weight_decay=5e-4, lr_schedule="constant",
                                  warmup_iters=0, batch_size=32, epochs=1.0)


@dataclass
class MethodConfig:
    """Settings of the adversarial methods (ignored by ``standard``).

    ``attack``: override the method's training attack (``cls``, ``loc``, ``pgd``, ``mtd``, ``cwa``);
    ``schedule``: ``interleaved`` (default, the reference code) or ``plain``; ``pgd_steps``, ``eps``,
    ``alpha``: PGD settings in 0-255 units. RobustDet only: ``triplet`` (``code`` | ``paper``),
    ``margin``, the eq. 5 weights ``beta``, ``a``, ``b``, ``c``, ``cfr_divisor`` (255, the reference) and
    ``adc`` (the reference's extra branch), ``aid_ce`` (weight of the AID cross-entropy, 0: off, not in the
    paper), ``aid`` (``small`` | ``resnet18``) and ``K`` for a RobustSSD
    built from an SSD.
    """

    schedule: str = "interleaved"
    pgd_steps: int = 20
    eps: float = 8.0
    alpha: float = 8.0
    attack: str | None = None
    triplet: str = "code"
    margin: float = 0.6
    beta: float = BETA
    a: float = A_AID
    b: float = B_RE
    c: float = C_KLD
    cfr_divisor: float = 255.0
    adc: bool = False
    aid_ce: float = 0.0
    aid: str = "small"
    K: int = 4

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {SCHEDULES}")
        if self.attack is not None and self.attack not in TRAINING_ATTACKS:
            raise ValueError(f"unknown training attack {self.attack!r}; choose one of {TRAINING_ATTACKS}")

    def as_dict(self) -> dict:
        return asdict(self)


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown training method {name!r}; known: {', '.join(METHODS)}") from None


def split_recipe(recipe: dict) -> tuple[TrainConfig, MethodConfig]:
    """Split a flat recipe (TrainConfig and MethodConfig fields) into the two; unknown keys raise."""
    tf = {f.name for f in dataclasses.fields(TrainConfig)}
    mf = {f.name for f in dataclasses.fields(MethodConfig)}
    unknown = sorted(set(recipe) - tf - mf)
    if unknown:
        raise KeyError(f"unknown recipe field(s) {unknown}; TrainConfig: {sorted(tf)}; MethodConfig: {sorted(mf)}")
    return (TrainConfig(**{k: v for k, v in recipe.items() if k in tf}),
            MethodConfig(**{k: v for k, v in recipe.items() if k in mf}))


def build_step_fn(method: str, cfg: MethodConfig | None = None) -> Callable | None:
    """The ``step_fn`` of ``method`` for :func:`~advdet.training.standard.train_detector` (None: standard)."""
    m = get_method(method)
    cfg = cfg or MethodConfig()
    if m.attack is None:
        return None
    examples = AdversarialExamples(cfg.attack or m.attack, schedule=cfg.schedule, steps=cfg.pgd_steps,
                                   eps=cfg.eps, alpha=cfg.alpha)
    if not m.robustdet:
        return AdversarialTrainingStep(examples)
    return RobustDetStep(examples, triplet=cfg.triplet, margin=cfg.margin, beta=cfg.beta, a=cfg.a, b=cfg.b,
                         c=cfg.c, cfr_divisor=cfg.cfr_divisor, adc=cfg.adc, aid_ce=cfg.aid_ce)


def resolve_init(init: str | os.PathLike) -> Path:
    """A weights file for ``--init``: an existing path, or a zoo name (its shipped weights)."""
    p = Path(init).expanduser()
    if p.is_file():
        return p
    from advdet.models.zoo import zoo_entry

    try:
        entry = zoo_entry(str(init))
    except KeyError:
        raise CheckpointError(f"{init}: --init is neither a weights file nor a zoo model name") from None
    if not entry.trained:
        raise CheckpointError(f"{entry.weights_path}: the zoo's {entry.name!r} weights (--init {init}) are missing; "
                              f"train them first with `advdet zoo train {entry.name}`")
    return entry.weights_path


def prepare_model(method: str, model: str | torch.nn.Module, init: str | os.PathLike | None = None, *,
                  seed: int = 0, cfg: MethodConfig | None = None) -> torch.nn.Module:
    """The detector that ``method`` trains: ``model`` (zoo name or module) initialised from ``init``.

    Non-RobustDet methods load ``init`` into ``model``. RobustDet methods need an SSD-VGG: ``model`` is an
    SSDVGG or a RobustSSD, converted by :func:`~advdet.models.robustdet.robustdet_for_training` (every kernel
    copied into all K slots, a fresh AID and, for ``robustdet-cfr``, fresh CFR heads). New parameters are
    drawn after ``torch.manual_seed(seed)``.
    """
    m = get_method(method)
    cfg = cfg or MethodConfig()
    torch.manual_seed(seed)
    if isinstance(model, str):
        from advdet.models.hub import get_model

        det = get_model(model, pretrained=False)
    else:
        det = model
    path = resolve_init(init) if init is not None else None
    if not m.robustdet:
        if path is not None:
            load_weights(det, path)
        return det
    return robustdet_for_training(det, path, K=cfg.K, cfr=m.cfr, aid=cfg.aid, seed=seed, method=method)


def train_with_method(method: str, detector: torch.nn.Module, cache: TensorCache, out_dir: str | os.PathLike, *,
                      train_cfg: TrainConfig, method_cfg: MethodConfig | None = None,
                      init: str | os.PathLike | None = None, model_name: str | None = None, resume: bool = False,
                      dist: DistContext | None = None, data: str = "", eval_dataset=None,
                      eval_limit: int | None = None, weights_name: str = "weights", command: str | None = None,
                      extra_card: dict | None = None, stop_after: int | None = None) -> dict:
    """Train ``detector`` (built by :func:`prepare_model`) with ``method``; write
    ``out_dir/WEIGHTS_NAME.safetensors`` and its JSON card.

    Checkpoints go to ``out_dir/checkpoint.pt`` (every ``train_cfg.checkpoint_every`` updates; ``resume``
    continues bit-exactly on CPU). When training finishes (not when it stops early on ``max_minutes`` /
    ``stop_after``) rank 0 writes the weights and a card with the method, recipe, ``init`` (recorded, not
    applied here), data, seed, seconds, images/s, command and, with ``eval_dataset``, its clean COCO
    metrics under ``"eval"``. Returns the card (``"finished": False`` and no weights file when stopped
    early).
    """
    from advdet import __version__
    from advdet.models.weights import save_weights

    m = get_method(method)
    method_cfg = method_cfg or MethodConfig()
    dist = dist or DistContext()
    det = detector.to(dist.device)
    step_fn = build_step_fn(method, method_cfg)
    t0 = time.perf_counter()
    summary = train_detector(det, cache, train_cfg, out_dir, resume=resume, step_fn=step_fn, dist=dist,
                             stop_after=stop_after, with_masks=bool(getattr(det, "has_masks", False)))
    card: dict[str, Any] = {
        "method": method, "method_description": m.description, "reference": m.reference,
        "model": model_name or type(det).__name__, "architecture": type(det).__name__,
        "family": getattr(det, "family", None),
        "parameters": sum(p.numel() for p in det.parameters()), "input_size": getattr(det, "input_size", None),
        "num_classes": getattr(det, "num_classes", None), "init": None if init is None else str(init),
        "data": data, "train_images": len(cache), "seed": train_cfg.seed, "recipe": train_cfg.as_dict(),
        "method_config": step_fn.config() if step_fn is not None and hasattr(step_fn, "config") else {},
        "iterations": summary["iterations"], "total_iterations": summary["total_iterations"],
        "finished": summary["finished"], "world_size": summary["world_size"],
        "training_seconds": summary["seconds"], "train_images_per_second": summary["images_per_second"],
        "command": command or " ".join(shlex.quote(a) for a in sys.argv),
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads, device {dist.device}",
        "advdet_version": __version__, "history": summary["history"],
    }
    card.update(extra_card or {})
    if not summary["finished"]:
        log.warning("stopped after %d of %d iterations; continue with --resume", summary["iterations"],
                    summary["total_iterations"])
        return card
    if eval_dataset is not None and dist.is_main:
        from advdet.models.evaluate import evaluate_detector

        metrics = evaluate_detector(det, eval_dataset, limit=eval_limit)
        card["eval"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
    card["wall_seconds"] = round(time.perf_counter() - t0, 1)
    if dist.is_main:
        card = save_weights(det, Path(out_dir) / f"{weights_name}.safetensors", card)
    dist.barrier()
    return card
