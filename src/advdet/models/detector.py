"""The Detector contract (DESIGN.md, models/): one wrapper so that attacks never special-case a model.

Input of every method: ``x`` float32 RGB in [0, 1], shape (B, 3, S, S), already letterboxed; the
wrapper normalises internally, so gradients reach raw pixels.

- ``dense(x) -> DenseOutput``: pre-NMS candidates, differentiable w.r.t. ``x``.
- ``predict(x) -> list[dict]``: per image ``boxes`` (M, 4) xyxy in input pixels, ``scores`` (M,),
  ``labels`` (M,) int64 contiguous in 0..K-1 (and ``masks`` (M, S, S) float in [0, 1] for mask models).
- ``loss(x, targets) -> dict[str, Tensor]``: the family's training losses by name; always has ``cls``
  and ``loc`` (plus family-specific terms). ``targets`` is a list of dicts with ``boxes`` (N, 4) xyxy in
  input pixels and ``labels`` (N,) int64 contiguous (``masks`` (N, S, S) for mask models).
- ``model``: the wrapped ``nn.Module``, so relevance rules can be applied to its layers.
- capabilities (family knowledge, declared by each family and read by attacks / relevance, which never
  ask which family a detector is): ``per_image_loss`` / ``total_loss`` with ``loss_is_batch_mean`` (losses
  per image, batched where the family allows it), ``positive_prior_losses`` and ``match_targets``
  (prior-matching families), ``two_stage`` with ``proposal_settings`` / ``use_proposal_settings``
  (input-dependent proposals), ``DenseOutput.box_deltas`` (the typed raw box regression),
  ``objectness_nodes`` and ``relevance_passthrough`` (relevance). Each has a default here.
- ``feature_layers() -> dict[str, nn.Module]``: the backbone maps that feature-level attacks (``osfd``)
  distort, by qualified module name inside the detector (family knowledge: each family declares its own;
  the base raises :class:`FeatureLayerError`); ``features(x, layers)`` returns their outputs for ``x``,
  differentiable, running the forward only as far as the last of them.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar, Iterator, Literal, Sequence

import torch
from torch import nn
from torchvision.ops import batched_nms

from advdet.data.errors import AdvdetError

ScoreMode = Literal["softmax_bg", "sigmoid"]


class FeatureLayerError(AdvdetError):
    """A detector declares no backbone feature layer, or not the one asked for (a user error: pick another
    surrogate or layer)."""


class _FeaturesReached(Exception):
    """Raised by the forward hooks of ``Detector.features`` once every requested map is captured: the rest of
    the forward pass (neck, heads, decoding) is skipped."""


@dataclass
class DenseOutput:
    """Pre-NMS candidates of a batch; every tensor has batch dim B and candidate dim N.

    logits: (B, N, C) raw class scores. With ``score_mode == "softmax_bg"`` C = K + 1 and column 0 is
        background (SSD, Faster R-CNN); with ``"sigmoid"`` C = K (RetinaNet, FCOS, YOLO).
    boxes: (B, N, 4) decoded xyxy boxes in input pixels (for class-specific regression: the box of
        the best foreground class).
    anchors: (B, N, 4) the prior / anchor / proposal boxes the candidates were decoded from.
    objectness: (B, N) objectness (YOLO) or centerness (FCOS) logits, else None.
    valid: (B, N) bool; False marks padding (two-stage models pad proposals to a common N).
    box_deltas: the raw box-regression outputs the boxes were decoded from, in the family's own
        parametrisation (YOLO tx, ty, tw, th; SSD / RetinaNet / R-CNN dx, dy, dw, dh; FCOS l, t, r, b
        distances): (B, N, 4), or (B, N, C, 4) for class-specific regression with one row per logits
        column (two-stage models); None where the family has none. Read it through
        :meth:`candidate_box_deltas`. (A legacy ``extra["bbox_regression"]`` fills it when not given.)
    extra: family-specific tensors (e.g. per-level candidate counts, class-specific boxes).
    """

    logits: torch.Tensor
    boxes: torch.Tensor
    anchors: torch.Tensor
    score_mode: ScoreMode
    objectness: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)
    box_deltas: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.valid is None:
            self.valid = torch.ones(self.logits.shape[:2], dtype=torch.bool, device=self.logits.device)
        if self.box_deltas is None and isinstance(self.extra.get("bbox_regression"), torch.Tensor):
            self.box_deltas = self.extra["bbox_regression"]
        if self.box_deltas is not None and (self.box_deltas.shape[:2] != self.logits.shape[:2]
                                            or self.box_deltas.shape[-1] != 4 or self.box_deltas.ndim not in (3, 4)):
            raise ValueError(f"box_deltas must be (B, N, 4) or (B, N, C, 4) for logits {tuple(self.logits.shape)}, "
                             f"got {tuple(self.box_deltas.shape)}")

    def candidate_box_deltas(self) -> torch.Tensor | None:
        """(B, N, 4) the raw box regression of each candidate (class-specific regression: the row of the
        candidate's best foreground class by ``class_probs``), or None where the family has none."""
        d = self.box_deltas
        if d is None or d.ndim == 3:
            return d
        b, n = d.shape[:2]
        col = self.class_probs().detach().argmax(-1) + (1 if self.score_mode == "softmax_bg" else 0)
        return d.gather(2, col[..., None, None].expand(b, n, 1, 4)).squeeze(2)

    @property
    def num_classes(self) -> int:
        c = self.logits.shape[-1]
        return c - 1 if self.score_mode == "softmax_bg" else c

    def class_probs(self) -> torch.Tensor:
        """(B, N, K) per-class confidence in [0, 1] of foreground classes (times objectness if any)."""
        if self.score_mode == "softmax_bg":
            p = self.logits.softmax(-1)[..., 1:]
        else:
            p = self.logits.sigmoid()
        if self.objectness is not None:
            p = p * self.objectness.sigmoid()[..., None]
        return p

    def fg_logits(self) -> torch.Tensor:
        """(B, N, K) foreground class logits (background column dropped)."""
        return self.logits[..., 1:] if self.score_mode == "softmax_bg" else self.logits

    def detach(self) -> "DenseOutput":
        def d(t):
            return t.detach() if isinstance(t, torch.Tensor) else t

        return replace(self, logits=d(self.logits), boxes=d(self.boxes), anchors=d(self.anchors),
                       objectness=d(self.objectness), valid=d(self.valid), box_deltas=d(self.box_deltas),
                       extra={k: d(v) for k, v in self.extra.items()})


@dataclass(frozen=True)
class ProposalSettings:
    """Eval-mode proposal settings of a two-stage detector: NMS IoU among proposals, candidates kept per
    feature level before that NMS, proposals kept after it (torchvision's RPN conventions)."""

    nms_thresh: float
    pre_nms_top_n: int
    post_nms_top_n: int


def loop_per_image_loss(loss: Callable[[torch.Tensor, list[dict]], dict[str, torch.Tensor]], x: torch.Tensor,
                        targets: Sequence[dict]) -> dict[str, torch.Tensor]:
    """``loss`` called once per image (a batch of one): name -> (B,)."""
    if len(targets) != x.shape[0]:
        raise ValueError(f"{x.shape[0]} images but {len(targets)} targets")
    parts = [loss(x[i:i + 1], [targets[i]]) for i in range(x.shape[0])]
    return {k: torch.stack([p[k].reshape(()) for p in parts]) for k in parts[0]}


@dataclass(frozen=True)
class NMSConfig:
    """Post-processing settings: per-class score threshold, NMS IoU, candidates kept before NMS, output cap."""

    score_thresh: float = 0.01
    nms_thresh: float = 0.45
    pre_nms_topk: int = 1000
    max_detections: int = 100


def postprocess_dense(dense: DenseOutput, cfg: NMSConfig, image_size: int) -> list[dict]:
    """Class-wise NMS over dense candidates: the post-processing of the one-stage families here.

    Every (candidate, class) pair with score > ``score_thresh`` competes; the ``pre_nms_topk`` best go
    through per-class NMS at ``nms_thresh``; the best ``max_detections`` survive. Boxes are clipped to the
    input.
    """
    probs = dense.class_probs().detach()
    boxes_all = dense.boxes.detach().clamp(0, image_size)
    out = []
    for b in range(probs.shape[0]):
        p = probs[b].masked_fill(~dense.valid[b, :, None], 0)
        scores = p.flatten()
        keep = torch.nonzero(scores > cfg.score_thresh).squeeze(1)
        if keep.numel() > cfg.pre_nms_topk:
            keep = keep[scores[keep].topk(cfg.pre_nms_topk).indices]
        k = p.shape[1]
        idx, labels = keep // k, keep % k
        bx, sc = boxes_all[b][idx], scores[keep]
        nonempty = (bx[:, 2] > bx[:, 0]) & (bx[:, 3] > bx[:, 1])
        bx, sc, labels = bx[nonempty], sc[nonempty], labels[nonempty]
        kept = batched_nms(bx, sc, labels, cfg.nms_thresh)[: cfg.max_detections]
        out.append({"boxes": bx[kept], "scores": sc[kept], "labels": labels[kept]})
    return out


class Detector(nn.Module):
    """Base class of every wrapped detector; subclasses implement ``dense``, ``predict`` and ``loss``.

    Attributes: ``family`` (str, a label for cards and messages: nothing outside models/ branches on it),
    ``num_classes`` (K, foreground only), ``input_size`` (S), ``model`` (the wrapped module), ``has_masks``.

    Capabilities (class attributes and methods below, each with a default; a family overrides what it
    knows): ``loss_is_batch_mean``, ``per_image_loss``, ``total_loss``, ``positive_prior_losses``,
    ``match_targets``, ``two_stage``, ``proposal_settings``, ``use_proposal_settings``,
    ``objectness_nodes``, ``relevance_passthrough``, ``relevance_cpu_micro_batch``, ``feature_layers``.
    """

    family: str = "detector"
    has_masks: bool = False
    #: ``loss(batch)`` is the mean over its images of ``loss(image alone)`` (model in eval mode), so the
    #: batch total of the per-image losses is ``B * loss(batch)``: one batched pass (``total_loss``).
    #: False where the family normalises over the whole batch (e.g. by its foreground count).
    loss_is_batch_mean: ClassVar[bool] = False
    #: the dense candidates are input-dependent proposals (two-stage models): ``dense(x, proposals=...)``
    #: evaluates the head on given per-image proposals, and ``proposal_settings`` /
    #: ``use_proposal_settings`` read and change how proposals are made.
    two_stage: ClassVar[bool] = False
    #: a candidate's class node (RAD) is its objectness logit, ranked by objectness (YOLO-style detectors)
    objectness_nodes: ClassVar[bool] = False
    #: module types of this family whose relevance passes to their (single) input unchanged (norm-like
    #: modules written as plain arithmetic, e.g. SSD's L2Norm)
    relevance_passthrough: ClassVar[tuple[type, ...]] = ()
    #: images per exact relevance graph on the CPU (RAD's ``micro_batch="auto"``): 1 keeps the memory lowest;
    #: a family whose graph of one image is dominated by per-call overhead and PyTorch's single-image
    #: convolution path runs faster with more (measured in docs/rad.md "Cost")
    relevance_cpu_micro_batch: ClassVar[int] = 1

    def __init__(self, model: nn.Module, num_classes: int, input_size: int):
        super().__init__()
        self.model = model
        self.num_classes = num_classes
        self.input_size = input_size

    def dense(self, x: torch.Tensor) -> DenseOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> list[dict]:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, x: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    # -- losses per image -----------------------------------------------------------------------------------
    def per_image_loss(self, x: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        """The losses of each image as if it were its own batch: name -> (B,). Default: ``loss`` once per
        image; families override it with one batched pass where they can."""
        return loop_per_image_loss(self.loss, x, targets)

    def total_loss(self, x: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        """The sum over the batch of ``per_image_loss`` (name -> 0-dim tensor): ``B * loss(x, targets)`` in
        one pass where ``loss_is_batch_mean``, else ``per_image_loss(x, targets)`` summed."""
        if len(targets) != x.shape[0]:
            raise ValueError(f"{x.shape[0]} images but {len(targets)} targets")
        if self.loss_is_batch_mean:
            b = x.shape[0]
            return {k: v * b for k, v in self.loss(x, list(targets)).items()}
        return {k: v.sum() for k, v in self.per_image_loss(x, targets).items()}

    def positive_prior_losses(self, x: torch.Tensor, targets: list[dict]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For families that match ground truth to fixed priors: (loss of each prior (B, P), zero on
        non-positive priors; its matched class (B, P), 0 = background, k + 1 = class k), as CWA groups
        them. None (default) where the contract has no per-prior losses."""
        return None

    def match_targets(self, targets: list[dict]) -> torch.Tensor | None:
        """(B, N) the class each dense candidate is assigned by the family's own training matching (0 =
        background, k + 1 = class k), or None (default) where the family has no fixed assignment."""
        return None

    # -- two-stage proposals -----------------------------------------------------------------------------------
    def proposal_settings(self) -> ProposalSettings | None:
        """The current eval-mode proposal settings (two-stage models), None for one-stage models."""
        return None

    @contextmanager
    def use_proposal_settings(self, *, nms_thresh: float | None = None, pre_nms_top_n: int | None = None,
                              post_nms_top_n: int | None = None) -> Iterator[None]:
        """Temporarily change the eval-mode proposal settings (None: keep); a no-op for one-stage models."""
        yield

    # -- backbone features (feature-level attacks) -------------------------------------------------------
    def feature_layers(self) -> dict[str, nn.Module]:
        """The backbone maps a feature-level attack (``osfd``) distorts: qualified module name inside this
        detector (``dict(self.named_modules())[name]`` is the module) -> module whose output is the map,
        ordered shallow to deep. Each family declares its own (see its class); the base has none."""
        raise FeatureLayerError(
            f"{type(self).__name__} (family {self.family!r}) declares no backbone feature layers; "
            "feature-level attacks (osfd) need a detector class that implements feature_layers() "
            "(ssd_vgg, robustdet, yolov3 and the torchvision families do)")

    def feature_forward(self, x: torch.Tensor) -> Any:
        """A forward pass that runs every feature layer (default ``dense(x)``); ``features`` stops it right
        after the last requested map."""
        return self.dense(x)

    def features(self, x: torch.Tensor, layers: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Outputs of the feature layers ``layers`` (names of ``feature_layers()``; None: all of them) for
        ``x`` (B, 3, S, S) in [0, 1], differentiable w.r.t. ``x``, in the order asked. Captured with
        forward hooks during ``feature_forward(x)``, which stops once every map is captured."""
        available = self.feature_layers()
        names = list(available) if layers is None else list(dict.fromkeys(layers))
        unknown = [n for n in names if n not in available]
        if unknown or not names:
            raise FeatureLayerError(f"{type(self).__name__} (family {self.family!r}) has no feature layer "
                                    f"{', '.join(map(repr, unknown)) or '(none asked)'}; "
                                    f"its layers: {', '.join(available)}")
        captured: dict[str, torch.Tensor] = {}

        def hook(name: str):
            def fn(module: nn.Module, inputs: Any, output: Any) -> None:
                if not isinstance(output, torch.Tensor):
                    raise TypeError(f"feature layer {name!r} of {type(self).__name__} returned "
                                    f"{type(output).__name__}, not a tensor")
                captured.setdefault(name, output)
                if len(captured) == len(names):
                    raise _FeaturesReached

            return fn

        handles = [available[n].register_forward_hook(hook(n)) for n in names]
        try:
            self.feature_forward(x)
        except _FeaturesReached:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in names if n not in captured]
        if missing:  # a declared layer the forward never ran: a bug of the family's declaration
            raise RuntimeError(f"{type(self).__name__}.feature_forward did not run feature layers {missing}")
        return {n: captured[n] for n in names}

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a clear error for a wrongly shaped input (the contract is (B, 3, S, S) in [0, 1])."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{type(self).__name__} expects (B, 3, S, S) RGB in [0, 1], got {tuple(x.shape)}")

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def check_finite(name: str, **tensors: torch.Tensor) -> None:
    """Raise a clear error when a model output is NaN or infinite."""
    for k, t in tensors.items():
        if t is not None and not torch.isfinite(t).all():
            raise FloatingPointError(f"{name}: non-finite values in {k} (diverged weights or bad input?)")


def check_targets(name: str, targets: list[dict], batch: int, num_classes: int) -> None:
    """Raise a clear error unless ``targets`` holds one ``{"boxes": (G, 4) xyxy, "labels": (G,)}`` per image
    of the batch, with finite boxes of positive width and height and labels in ``0..num_classes-1``."""
    if len(targets) != batch:
        raise ValueError(f"{name}: {len(targets)} targets for a batch of {batch} images")
    for i, t in enumerate(targets):
        boxes, labels = t["boxes"], t["labels"]
        if boxes.ndim != 2 or boxes.shape[1] != 4 or labels.shape != (boxes.shape[0],):
            raise ValueError(f"{name}: target {i}: boxes must be (G, 4) and labels (G,), got "
                             f"{tuple(boxes.shape)} and {tuple(labels.shape)}")
        if boxes.numel() and (not torch.isfinite(boxes).all() or ((boxes[:, 2:] - boxes[:, :2]) <= 0).any()):
            raise ValueError(f"{name}: target {i}: boxes must be finite with positive width and height (drop "
                             f"degenerate boxes in the data pipeline)")
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"{name}: target {i}: labels must be in 0..{num_classes - 1}, "
                             f"got {labels.min().item()}..{labels.max().item()}")
