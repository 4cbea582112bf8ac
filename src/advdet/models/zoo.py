"""The model zoo: the small detectors, classifier and pretrained backbones trained on ``shapes`` by the
project's own recipes, each a :class:`ZooEntry` with its shipped weights and model card.

The zoo is the hub's family of bare names (:mod:`advdet.models.hub`: ``get_model("ssd_vgg")``): an entry with
the shipped weights from ``advdet/zoo_weights/NAME.safetensors`` when they exist (``pretrained=True``; a
missing file is a ``CheckpointError``), or ``weights=PATH``. Prefixed names (``torchvision:``, ``darknet:``,
``ultralytics:``, ``hf:``) are the hub's other families. :func:`build_model` is a deprecated alias of
:func:`~advdet.models.hub.get_model`.
Zoo entries of optional extras (``yolov8``, ``rtdetr``) are registered only where the extra is installed.
Each entry carries the recipe (``TrainConfig`` fields) that ``advdet zoo train NAME`` runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from advdet.data.shapes import SHAPE_CLASSES
from advdet.models.hub import ModelInfo, get_model, is_external, register_model  # is_external: re-exported
from advdet.models.weights import CheckpointError, load_weights, read_card

ZOO_DIR = Path(__file__).resolve().parent.parent / "zoo_weights"
ZOO_INPUT_SIZE = 256  # every zoo detector takes the same letterboxed input, so one image feeds all
#: shipped weights are stored in float16 (half the bytes; the zoo must stay under 60 MB) and loaded into
#: float32 models; cards are measured with the weights rounded to float16, i.e. on the stored file
ZOO_STORAGE_DTYPE = torch.float16
#: the large robust entries (RobustDet's K=4 kernels make it 4x the size of ssd_vgg) store their conv and
#: linear weights in int8 with per-channel scales (advdet.models.int8_storage), again measured as stored
ROBUST_STORAGE_DTYPE = torch.int8


@dataclass
class ZooEntry:
    """A zoo model: how to build it, how to train it, and what it is."""

    name: str
    family: str
    builder: Callable[..., nn.Module]
    description: str
    recipe: dict = field(default_factory=dict)  # TrainConfig fields
    kind: str = "detector"  # detector | classifier | backbone (pretrained on the procedural set)
    with_masks: bool = False
    init: str | None = None  # zoo name whose weights initialise training (robust models)
    #: zoo name whose trained backbone starts training: a pretrained backbone, as torchvision's detectors
    #: start from ImageNet weights (the rest of the model is freshly initialised)
    backbone_init: str | None = None
    #: which keys ``backbone_init`` fills: {prefix in this model: prefix in the backbone entry's file}; None:
    #: ``model.backbone.`` from ``model.backbone.`` (a detector of the same family: backbone + FPN)
    backbone_keys: dict[str, str] | None = None
    #: the pretraining data of a ``kind="backbone"`` entry (:data:`PRETRAIN_DATA` fields)
    data: dict | None = None
    storage_dtype: torch.dtype = ZOO_STORAGE_DTYPE  # how the shipped file stores the weights
    method: str = "standard"
    #: the optional extra the entry needs (``"ultralytics"``, ``"hf"``); registered only where it is installed
    extra: str | None = None

    @property
    def weights_path(self) -> Path:
        return ZOO_DIR / f"{self.name}.safetensors"

    @property
    def card(self) -> dict:
        return read_card(self.weights_path)

    @property
    def trained(self) -> bool:
        return self.weights_path.is_file()


ZOO: dict[str, ZooEntry] = {}


def register(entry: ZooEntry) -> ZooEntry:
    if entry.name in ZOO:
        raise ValueError(f"zoo entry {entry.name!r} registered twice")
    ZOO[entry.name] = entry
    return entry


def _register_defaults() -> None:
    from advdet.models import ssd_vgg

    k = len(SHAPE_CLASSES)
    _register_pretrained()
    register(ZooEntry(
        "ssd_vgg", "ssd_vgg", lambda: ssd_vgg.ssd_vgg_small(num_classes=k, input_size=ZOO_INPUT_SIZE),
        "small SSD-VGG16 (no BN, width x0.25), the base of RobustDet",
        # the VGG body (from vgg_pre) at a tenth of the rate: at the full rate every ReLU after conv3_3 died
        # within the first epochs (mAP50 0.0001 after 5,600 updates); docs/benchmark.md "ssd_vgg from vgg_pre"
        recipe=dict(epochs=24, batch_size=16, lr=1e-3, optimizer="adamw", weight_decay=5e-4, warmup_iters=300,
                    lr_mults={"model.vgg.": 0.1}),
        backbone_init="vgg_pre", backbone_keys={"model.vgg.": "body.vgg."}))
    try:
        from advdet.models import yolov3
    except ImportError:  # pragma: no cover - family not available
        yolov3 = None
    if yolov3 is not None:
        register(ZooEntry(
            "yolov3", "yolov3", lambda: yolov3.yolov3_small(num_classes=k, input_size=ZOO_INPUT_SIZE),
            "small YOLOv3-style detector (Darknet-53 layout, reduced width and depth), RAD's surrogate",
            recipe=dict(epochs=16, batch_size=16, lr=1e-3, optimizer="adamw", weight_decay=5e-4,
                        warmup_iters=300),
            backbone_init="darknet_pre",
            backbone_keys={"model.stem.": "body.stem.", "model.stages.": "body.stages."}))
    try:
        from advdet.models import torchvision_adapter as tva
    except ImportError:  # pragma: no cover
        tva = None
    if tva is not None:
        # fasterrcnn: 6 epochs (3000 updates, ~50 min on one CPU thread) reach the quality goal; maskrcnn
        # (the same detector plus a mask head) takes the same schedule
        # all four start from ONE pretrained body, the zoo's resnet_pre (issue 21: families that share an
        # architecture share its pretrained weights, as real detectors share ImageNet ResNets); the shipped
        # weights older than that recipe say so in their cards (no backbone_init, or retinanet's "fcos")
        for name, fn, masks, epochs, desc in (
            ("fcos", "fcos_tiny", False, 16, "FCOS on a tiny ResNet-FPN"),
            # retinanet: 32 epochs; its focal-loss head learns slowest of the four (16 from resnet_pre: mAP50 0.760)
            ("retinanet", "retinanet_tiny", False, 32, "RetinaNet on a tiny ResNet-FPN"),
            ("fasterrcnn", "fasterrcnn_tiny", False, 6, "Faster R-CNN on a tiny ResNet-FPN"),
            ("maskrcnn", "maskrcnn_tiny", True, 6, "Mask R-CNN on a tiny ResNet-FPN"),
        ):
            builder = getattr(tva, fn, None)
            if builder is None:
                continue
            register(ZooEntry(
                name, name, (lambda b=builder: b(num_classes=k, input_size=ZOO_INPUT_SIZE)), desc,
                recipe=dict(epochs=epochs, batch_size=8, lr=1e-3, optimizer="adamw", weight_decay=1e-4,
                            warmup_iters=300), with_masks=masks, backbone_init="resnet_pre",
                backbone_keys={"model.backbone.body.": "body."}))


    from advdet.models.pretrained_backbone import resnet_tiny_pretrain

    # the surrogate of RAD's classifier-transfer baselines is an ImageNet classifier (InceptionV3) in the
    # paper; here it is the pretraining net itself, resnet_pre with its head, at the zoo's input size: its
    # weights are resnet_pre's (no recipe of its own: `advdet zoo train classifier` adopts them)
    register(ZooEntry(
        "classifier", "classifier",
        lambda: resnet_tiny_pretrain(num_classes=PRETRAIN_DATA["num_classes"], input_size=ZOO_INPUT_SIZE),
        "resnet_pre with its head (256 procedural classes) at 256 px: the surrogate of RAD's classifier-transfer "
        "baselines, as InceptionV3 on ImageNet in the paper; its body is the one fcos, retinanet, fasterrcnn "
        "and maskrcnn start from", kind="classifier", backbone_init="resnet_pre",
        backbone_keys={"body.": "body.", "fc.": "fc."}))
    _register_robust(k)
    _register_extras(k)


#: recipe of the zoo's YOLOv8n (advdet[ultralytics]) at 256 px: AdamW at 2e-3, batch 8, the zoo's loop (ultralytics'
#: own optimizer="auto" takes AdamW for short runs, SGD at 0.01 past 10,000 iterations); ultralytics' loss gains
#: (box 7.5, cls 0.5, dfl 1.5). Its backbone starts from yolov8_pre (pretrained on the procedural set, as
#: darknet_pre for yolov3): 24 epochs, a guess until a run confirms it reaches the zoo bar (0.39 s CPU per
#: update on one thread: ~1.3 h).
YOLOV8_RECIPE = dict(epochs=24, batch_size=8, lr=2e-3, optimizer="adamw", weight_decay=5e-4, warmup_iters=500,
                     checkpoint_every=200, log_every=50)
#: recipe of the zoo's RT-DETR (advdet[hf], rtdetr_resnet_pre: starts from resnet_pre's body) at 256 px: AdamW with
#: RT-DETR's lr 1e-4 (its pretrained backbone at a tenth) and weight decay 1e-4, gradient clipping 0.1 as its
#: reference configs; batch 8; 40 epochs, a guess (0.67 s CPU per update on one thread: ~3.7 h)
RTDETR_RECIPE = dict(epochs=40, batch_size=8, lr=1e-4, optimizer="adamw", weight_decay=1e-4, warmup_iters=500,
                     grad_clip=0.1, lr_mults={"model.model.backbone.": 0.1}, checkpoint_every=200, log_every=50)


def _register_extras(k: int) -> None:
    """Zoo entries of the families behind optional extras, registered only where the extra is importable
    (without it, ``advdet zoo list``, the cards and the tests see no such entry)."""
    from advdet.models import hf_rtdetr, ultralytics_adapter as ula

    if ula.available():
        n, s = PRETRAIN_DATA["num_classes"], PRETRAIN_DATA["size"]
        register(ZooEntry(
            "yolov8_pre", "yolov8_backbone", lambda: ula.yolov8_backbone_pretrain(num_classes=n, input_size=s),
            "YOLOv8n backbone (CSP-Darknet with C2f blocks and SPPF, ultralytics' yolov8n.yaml) pretrained on the "
            "procedural set; needs advdet[ultralytics]", kind="backbone", recipe=dict(PRETRAIN_RECIPE),
            data=dict(PRETRAIN_DATA), extra="ultralytics"))
        nb = len(ula.YOLOV8_BACKBONE_LAYERS)
        register(ZooEntry(
            "yolov8", "ultralytics",
            lambda: ula.ultralytics_detector("yolov8n.yaml", num_classes=k, input_size=ZOO_INPUT_SIZE),
            "YOLOv8n (ultralytics' yolov8n.yaml, anchor-free, DFL boxes); needs advdet[ultralytics] (AGPL-3.0)",
            recipe=dict(YOLOV8_RECIPE), extra="ultralytics", backbone_init="yolov8_pre",
            backbone_keys={f"model.model.{i}.": f"body.{i}." for i in range(nb)}))
    if hf_rtdetr.available():
        register(ZooEntry(
            "rtdetr", "rtdetr",
            lambda: hf_rtdetr.rtdetr_detector("rtdetr_resnet_pre", num_classes=k, input_size=ZOO_INPUT_SIZE),
            "small RT-DETR (Hugging Face transformers: 128-d hybrid encoder, 3 decoder layers, 100 queries) on the "
            "tiny ResNet body that resnet_pre pretrains, as the torchvision families; needs advdet[hf]",
            recipe=dict(RTDETR_RECIPE), extra="hf", backbone_init="resnet_pre",
            backbone_keys={"model.model.backbone.model.body.": "body."}))


#: the procedural pretraining set of the backbone entries (advdet.data.procedural): 256 IFS classes, 320
#: training images per class (81,920), 8 validation images per class (2,048), 96 px, seed 0
PRETRAIN_DATA = dict(dataset="procedural", num_classes=256, train_per_class=320, val_per_class=8, size=96, seed=0)
#: pretraining recipe (TrainConfig fields): AdamW, batch 128, cosine; the training loop's augmentation (zoom
#: 0.6-1.4, flip, colour jitter) on top of the rendered images. 28 epochs = 17,920 updates (~0.19 s each on one
#: CPU thread: about an hour).
PRETRAIN_RECIPE = dict(epochs=28, batch_size=128, lr=2e-3, optimizer="adamw", weight_decay=0.05, warmup_iters=300,
                       checkpoint_every=200, log_every=50)


#: vgg_pre's recipe: the BN-free VGG trunk does not learn at lr 2e-3 under AdamW (a first run stayed at chance,
#: loss ln 256, for 1,850 updates; at lr 1e-3 with He init it leaves chance after ~400), and it costs ~9x the
#: tiny ResNet per pixel, so: lr 1e-3, 64 px (:func:`~advdet.models.pretrained_backbone.vgg_tiny_pretrain`),
#: 16 epochs = 10,240 updates (~0.5 s each on one CPU thread: about 1.5 hours)
VGG_PRETRAIN_RECIPE = dict(PRETRAIN_RECIPE, lr=1e-3, epochs=16)


def _register_pretrained() -> None:
    """The backbone entries: each zoo architecture's body with a linear head, trained on the procedural set;
    the detectors of that architecture start from it (``backbone_init``)."""
    from advdet.models import pretrained_backbone as pb

    n, s = PRETRAIN_DATA["num_classes"], PRETRAIN_DATA["size"]
    for name, family, fn, recipe, desc in (
        ("resnet_pre", "resnet_tiny", pb.resnet_tiny_pretrain, PRETRAIN_RECIPE,
         "tiny ResNet body (16-128 channels) of RetinaNet, FCOS, Faster R-CNN and Mask R-CNN, pretrained on "
         "the procedural set (256 IFS-fractal classes)"),
        ("vgg_pre", "vgg_tiny", pb.vgg_tiny_pretrain, VGG_PRETRAIN_RECIPE,
         "VGG16-style body (no BN, width x0.25) of ssd_vgg, pretrained on the procedural set resized to 64 px"),
        ("darknet_pre", "darknet_tiny", pb.darknet_tiny_pretrain, PRETRAIN_RECIPE,
         "Darknet-53-style body (width 0.25, depth 0.34) of yolov3, pretrained on the procedural set"),
    ):
        register(ZooEntry(name, family, (lambda f=fn: f(num_classes=n, input_size=s)), desc, kind="backbone",
                          recipe=dict(recipe), data=dict(PRETRAIN_DATA)))


#: recipe of the robust zoo models: adversarial fine-tuning of the zoo's ssd_vgg with the papers' optimiser
#: (SGD, lr 1e-3, momentum 0.9, weight decay 5e-4, constant lr; ALGORITHMS.md 1.5) for 800 updates of
#: batch 16 (8 clean + 8 adversarial images, 1.6 epochs of clean images), interleaved PGD (eps 8, step 8)
#: with 5-step cycles (160 adversarial batches; the papers use 20-step cycles over 40k-120k updates).
#: Measured / expected wall times are in docs/robustdet.md (benchmarks/bench_training.py).
ROBUST_RECIPE = dict(iters=800, batch_size=16, lr=1e-3, optimizer="sgd", weight_decay=5e-4, lr_schedule="constant",
                     warmup_iters=0, checkpoint_every=100, seed=0, schedule="interleaved", pgd_steps=5, eps=8.0,
                     alpha=8.0)
#: the RobustDet entries add to it a supervised start for the AID (not in the paper; docs/robustdet.md, "Why
#: the AID did not learn"): a cross-entropy of its softmax (clean -> kernel 0, adversarial -> kernel 1) with
#: weight 1 and a 10x learning rate for the AID's parameters. The reference starts the AID from an
#: ImageNet-pretrained ResNet-18; from a fresh AID the triplet loss alone stays at its collapsed start.
ROBUSTDET_RECIPE = dict(ROBUST_RECIPE, aid_ce=1.0, lr_mults={"model.aid.": 10.0})


def _register_robust(k: int) -> None:
    from advdet.models import robustdet, ssd_vgg

    def ssd() -> nn.Module:
        return ssd_vgg.ssd_vgg_small(num_classes=k, input_size=ZOO_INPUT_SIZE)

    for name, method, desc in (
        ("ssd_vgg-at-cls", "at-cls", "SSD-AT(A_cls): zoo ssd_vgg fine-tuned on half clean, half A_cls images"),
        ("ssd_vgg-at-loc", "at-loc", "SSD-AT(A_loc): zoo ssd_vgg fine-tuned on half clean, half A_loc images"),
        ("ssd_vgg-mtd", "mtd", "MTD: zoo ssd_vgg fine-tuned on half clean, half per-image stronger of A_cls/A_loc"),
        ("ssd_vgg-cwat", "cwat", "CWAT: zoo ssd_vgg fine-tuned on half clean, half class-wise (CWA) images"),
    ):
        register(ZooEntry(name, "ssd_vgg", ssd, desc, recipe=dict(ROBUST_RECIPE), init="ssd_vgg", method=method,
                          storage_dtype=ROBUST_STORAGE_DTYPE))
    for name, cfr, desc in (
        ("robustdet", False, "RobustDet: zoo ssd_vgg with adversarially-aware convs (K=4) mixed by a small AID"),
        ("robustdet-cfr", True, "RobustDet*: RobustDet with CFR (VAE-style conv4_3 + clean-image decoder)"),
    ):
        register(ZooEntry(name, "robustdet",
                          (lambda c=cfr: robustdet.robustdet_small(num_classes=k, input_size=ZOO_INPUT_SIZE, cfr=c)),
                          desc, recipe=dict(ROBUSTDET_RECIPE), init="ssd_vgg", method=name,
                          storage_dtype=ROBUST_STORAGE_DTYPE))


def zoo_entry(name: str) -> ZooEntry:
    if not ZOO:
        _register_defaults()
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(sorted(ZOO))}")
    return ZOO[name]


def zoo_entries() -> list[ZooEntry]:
    if not ZOO:
        _register_defaults()
    return list(ZOO.values())


def _zoo_names() -> list[ModelInfo]:
    return [ModelInfo(e.name, e.family, e.kind, e.trained, False, e.description) for e in zoo_entries()]


@register_model("", family="zoo", names=_zoo_names)
def _zoo_model(name: str, *, weights: str | os.PathLike | None = None, pretrained: bool = True,
               num_classes: int | None = None, input_size: int | None = None) -> nn.Module:
    """The zoo's builder in the hub: entry ``name`` with its shipped weights (``pretrained``) or ``weights``;
    a missing file is a ``CheckpointError`` (zoo models are built at their own size and class count)."""
    entry = zoo_entry(name)
    model = entry.builder()
    path = Path(weights) if weights else (entry.weights_path if pretrained else None)
    if path is not None:
        if not path.is_file():
            if weights:
                raise CheckpointError(f"{path}: weights file not found")
            raise CheckpointError(f"{path}: zoo model {name!r} has no shipped weights yet; "
                                  f"train them with `advdet zoo train {name}`")
        load_weights(model, path)
    return model.eval()


def build_model(name: str, *, weights: str | os.PathLike | None = None, pretrained: bool = True,
                num_classes: int | None = None, input_size: int | None = None) -> nn.Module:
    """Deprecated alias of :func:`advdet.models.hub.get_model` (the same arguments, the same code path)."""
    return get_model(name, weights=weights, pretrained=pretrained, num_classes=num_classes, input_size=input_size)
