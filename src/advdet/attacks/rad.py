"""RAD, the Relevance Attack on Detectors (RAD paper sec. 3, Fig. 2, eq. 2-5; ALGORITHMS.md 2.3-2.4).

Each iteration k (Fig. 2):

1. select the target nodes T on the current adversarial image x_k (``on_step``): the ``m`` = 20 most
   confident boxes (static) or every box whose pre-softmax confidence exceeds ``threshold`` (dynamic),
   one node per box for ``node_type="cls"`` (the argmax class logit; the objectness logit for YOLO),
   two box-regression nodes per box for ``"loc"`` / ``"size"`` (RAD Table 1, Table 7);
2. compute the Multi-Node SGLRP relevance map h(x, T) (:func:`advdet.relevance.relevance_map`) in exact
   mode (``create_graph``), so that d h / d x is the true derivative through every LRP normaliser;
3. descend on the RAD loss with SI, changing only the letterboxed image.

Two presets (``preset=``) fix steps 2-3; every knob can still be set on its own:

``"reference"`` (default: the authors' code, Sizhe-Chen/RAD, which produced the paper's tables)
    - head: ``variant="rad_code"``, ``map = A - B * sum(A) / (sum(B) + 1e-18)`` (the map sums to zero);
    - loss ``"reference"``: ``L = 1e21 * mean_{c,i,j} max(h_c, 1e-21) + mean_{k<3000} max_c o_{r_k, c}``.
      The second term is the mean, over the 3000 boxes ``r_k`` ranked by objectness (YOLO; the first
      class for other families) **on the clean image**, of the box's largest class output *before* the
      output ReLU (YOLO: the raw class logit) at the current input (every SI copy included). Both terms
      are always summed: while the map has positive mass the first one dominates by 1e21, once the
      positive relevance is gone (every target node's output below 0 is gated by the output ReLU) the
      step comes from the second term alone;
    - update ``"term_mean_abs"``: every SI term ``d_i = g_i / mean|g_i|``, the step
      ``x - alpha * mean_i d_i`` with the average **not** normalised again (``utils.calculate_direction``);
      TI, when given, filters each term before its normalisation (``filter_terms``);
    - the letterbox padding is gray (128/255) in the surrogate's input (``yolov3_base.letterbox_image``)
      wherever the attack knows the letterbox (targets with ``letterbox`` or an explicit ``mask``); the
      returned image keeps the caller's padding.
``"paper"`` (eq. 2-5 as the paper writes them)
    - head ``variant="paper"`` (eq. 2), loss ``"sum"`` (eq. 3: ``L = sum_{c,i,j} h_c``), no second term;
    - SI as eq. 4: the raw gradients of ``x / 2^i``, i = 0..3, averaged, then eq. 5 normalises the
      average once (``update="mean_abs"``); zero padding.

Losses (``loss=``): ``"reference"``, ``"sum"`` and ``"positive"`` (the mean positive relevance alone,
without the second term).

Diagnostics (``last_state["diagnostics"]``, a :class:`RADDiagnostics`; merged over batches by the
benchmarks): the share of (image, gradient evaluation) pairs whose map had no positive relevance (under
the reference loss their step came from the second term alone), the mean positive relevance at x_k per
iteration, the mean |delta| (0-255) and the share of values at +-eps.

The node set is re-selected every iteration on x_k and then held fixed while the gradient is averaged
over the SI / DI copies of x_k (the code feeds the same ``index_place`` to every copy); where the
candidates at a copy are not the same boxes (two-stage detectors: the RPN proposals move with the input)
the nodes are selected on the copy itself (:class:`advdet.relevance.TrackedNodes`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Sequence

import torch

from advdet.attacks.base import Attack
from advdet.attacks.batches import knows_letterbox, micro_batches, padded
from advdet.attacks.transforms import SI, GradientTransform
from advdet.relevance import LRPRules, NodeSelection, TrackedNodes, output_vector, relevance_map
from advdet.relevance.nodes import OutputVector, foreground_columns, reference_rank_column, score_values

__all__ = ["RAD", "RADDiagnostics", "PRESETS", "rad_loss", "second_term", "top_ranked"]

log = logging.getLogger(__name__)

RADLoss = Literal["reference", "positive", "sum"]
LOSSES = ("reference", "positive", "sum")
#: the reference clamps its map at 1e-21 and scales its mean by 1e21 (interpreters.epsilon_small)
REFERENCE_FLOOR = 1e-21
#: RAD's code pads the letterbox with gray 128 (yolov3_base.letterbox_image)
GRAY = 128.0 / 255.0

PRESETS: dict[str, dict[str, Any]] = {
    "reference": dict(variant="rad_code", loss="reference", update="term_mean_abs", filter_terms=True,
                      pad_value=GRAY, si=dict(scales=4, extra_unscaled=True, normalize_terms=True)),
    "paper": dict(variant="paper", loss="sum", update="mean_abs", filter_terms=False,
                  pad_value=None, si=dict(scales=4, extra_unscaled=False, normalize_terms=False)),
}


def rad_loss(per_channel: torch.Tensor, loss: RADLoss = "positive") -> torch.Tensor:
    """Per-image relevance term (B,) of a per-channel map (B, C, H, W), without any scale factor:
    ``"positive"`` / ``"reference"`` the mean positive relevance (the reference's mean of
    ``max(map, 1e-21)``), ``"sum"`` the sum of the map (eq. 3)."""
    if loss == "positive":
        return per_channel.clamp(min=0).flatten(1).mean(1)
    if loss == "reference":
        return per_channel.clamp(min=REFERENCE_FLOOR).flatten(1).mean(1)
    if loss == "sum":
        return per_channel.flatten(1).sum(1)
    raise ValueError(f"RAD: loss must be one of {LOSSES}, got {loss!r}")


def top_ranked(detector, dense, cls_node: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's ``iou_sorted_index`` on the clean image: per image the ``k`` candidates with the
    largest raw value of :func:`~advdet.relevance.nodes.reference_rank_column` ((B, k) indices) and a
    (B, k) float weight (0 for padding candidates)."""
    ov = output_vector(detector, dense, include_boxes=False)
    col = reference_rank_column(detector, dense, ov, cls_node)
    key = ov.raw[..., col].detach().masked_fill(~dense.valid, float("-inf"))
    kk = min(int(k), key.shape[1])
    idx = key.topk(kk, dim=1).indices
    return idx, dense.valid.gather(1, idx).to(ov.raw.dtype)


def second_term(ov: OutputVector, values: str, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The reference's second loss term (B,): the mean over the ranked candidates ``idx`` of their largest
    class output before the output ReLU (``values``: raw logits or probabilities, as the output vector)."""
    cls = score_values(ov, ov.raw, values)[..., foreground_columns(ov)].amax(-1)  # (B, N)
    n = cls.shape[1]
    picked = cls.gather(1, idx.clamp(max=n - 1))
    w = weight * (idx < n).to(weight.dtype)
    return (picked * w).sum(1) / w.sum(1).clamp(min=1)


@contextlib.contextmanager
def frozen_heap():
    """Collect once, then ``gc.freeze()`` for the block: the per-step collections of :meth:`RAD.on_step`
    then walk only the objects made inside the block, not the whole interpreter's heap (the modules of
    torch, torchvision and the zoo: about 350,000 objects, 0.19 s per collection, about 9 % of a RAD
    iteration on 2 images of the zoo yolov3 on one CPU thread). The frozen objects are unfrozen at the
    end, unless a caller had frozen objects already (then its own ``gc.unfreeze`` releases them)."""
    gc.collect()
    outer = gc.get_freeze_count() > 0
    gc.freeze()
    try:
        yield
    finally:
        if not outer:
            gc.unfreeze()


@dataclass
class RADDiagnostics:
    """What a RAD run did, as sums that merge over batches (:meth:`merge`) and read as means
    (:meth:`as_dict`). A user can see here when RAD has stopped being a relevance attack."""

    evals: int = 0                 # (image, gradient evaluation) pairs
    no_relevance_evals: int = 0    # ... whose map had no positive relevance
    relevance_sum: list[float] = field(default_factory=list)  # per iteration: sum over images of mean(max(h, 0))
    images: int = 0
    abs_delta_sum: float = 0.0     # sum of |x_adv - x| (0-255) over the valid values
    at_eps: int = 0                # valid values with |delta| at eps
    values: int = 0                # valid values

    def merge(self, other: "RADDiagnostics") -> "RADDiagnostics":
        n = max(len(self.relevance_sum), len(other.relevance_sum))
        pad = lambda v: v + [0.0] * (n - len(v))  # noqa: E731
        return RADDiagnostics(self.evals + other.evals, self.no_relevance_evals + other.no_relevance_evals,
                              [a + b for a, b in zip(pad(self.relevance_sum), pad(other.relevance_sum))],
                              self.images + other.images, self.abs_delta_sum + other.abs_delta_sum,
                              self.at_eps + other.at_eps, self.values + other.values)

    def as_dict(self) -> dict:
        return {
            "second_term_share": self.no_relevance_evals / self.evals if self.evals else None,
            "gradient_evaluations": self.evals,
            "relevance_per_iteration": [r / self.images for r in self.relevance_sum] if self.images else [],
            "mean_abs_delta": self.abs_delta_sum / self.values if self.values else None,
            "share_at_eps": self.at_eps / self.values if self.values else None,
        }


def _merge_states(states: list[dict]) -> dict:
    """One ``last_state`` for the micro-batches of a batch: per-image tensors concatenated, node counts
    concatenated per iteration, diagnostics merged; other entries (``tracked``) from the last one."""
    out = dict(states[-1])
    for key, last in states[-1].items():
        vals = [s.get(key) for s in states]
        if key == "node_counts":
            out[key] = [sum((v[t] for v in vals), []) for t in range(len(last))]
        elif key == "diagnostics":
            merged = vals[0]
            for v in vals[1:]:
                merged = merged.merge(v)
            out[key] = merged
        elif key == "ranked":
            out[key] = tuple(torch.cat([v[i] for v in vals]) for i in range(2))
        elif isinstance(last, torch.Tensor) and all(isinstance(v, torch.Tensor) for v in vals):
            out[key] = torch.cat(vals)
    return out


class RAD(Attack):
    """RAD (Relevance Attack on Detectors): descend on the Multi-Node SGLRP relevance map of the most
    confident boxes (see the module docstring for the presets and the paper / reference choices).

    Args (keyword-only, besides those of :class:`~advdet.attacks.base.Attack`):
        preset: ``"reference"`` (default, the authors' code) or ``"paper"`` (eq. 2-5); the arguments
            below left at ``None`` take the preset's value.
        variant: ``"paper"`` (eq. 2) or ``"rad_code"`` (reference code's SGLRP head).
        loss: ``"reference"``, ``"positive"`` or ``"sum"`` (module docstring).
        second_k: number of clean-ranked boxes of the reference's second term (3000).
        pad_value: value of the letterbox padding in the surrogate's input (``None``: as given).
        nodes: ``"static"`` (the ``m`` most confident boxes) or ``"dynamic"`` (every box whose
            pre-softmax confidence exceeds ``threshold``, at most ``max_nodes``).
        m, threshold, max_nodes: node-selection parameters (RAD: m=20; Table 7: thresholds -1, -2, -3).
        node_type: ``"cls"`` (default), ``"loc"`` or ``"size"`` (RAD Table 1).
        cls_node: ``"auto"`` (YOLO: objectness logit, else the argmax class logit), ``"class"``,
            ``"objectness"``.
        outputs: ``"all"`` (box + objectness + class outputs in the SGLRP softmax, RAD's YOLOv3) or
            ``"scores"`` (class outputs only, RAD's RetinaNet).
        values: what the score entries of the output vector are: ``"auto"`` (probabilities for
            RetinaNet / FCOS as RAD's RetinaNet code, raw logits otherwise as its YOLOv3 code),
            ``"logits"``, ``"probs"`` (see :mod:`advdet.relevance.nodes`).
        rules: the LRP rules (default: the reference's).
        micro_batch: images per relevance computation (``"auto"``: the detector's
            ``relevance_cpu_micro_batch`` on the CPU, 1 by default and 2 for YOLOv3; the batch on a GPU;
            ``None``: the batch); bounds the memory of the exact second-order graph.
        transforms: default the preset's ``[SI(...)]``; pass ``[]`` for none, or e.g. ``[SI(), DI(), TI()]``.

    ``last_state``: ``node_counts`` (nodes per image at each iteration), ``tracked`` (the last node set;
    ``tracked.reselected`` counts copies on which two-stage proposals forced a new selection),
    ``diagnostics`` (:class:`RADDiagnostics`).
    """

    name: ClassVar[str] = "rad"
    description: ClassVar[str] = ("RAD: relevance attack on detectors, Multi-Node SGLRP of the top-20 boxes "
                                  "(eps 16, step 2, 10 steps, SI; preset reference = the authors' code)")

    def __init__(self, model, *, preset: Literal["reference", "paper"] = "reference", eps: float | None = 16.0,
                 step: float = 2.0, steps: int = 10, update: str | None = None, random_start: bool = False,
                 valid_only: bool = True, transforms: Sequence[GradientTransform] | None = None,
                 filter_terms: bool | None = None, seed: int = 0, device=None,
                 nodes: Literal["static", "dynamic"] = "static", m: int = 20, threshold: float = -1.0,
                 max_nodes: int | None = 1000, node_type: Literal["cls", "loc", "size"] = "cls",
                 cls_node: Literal["auto", "class", "objectness"] = "auto",
                 outputs: Literal["all", "scores"] = "all", values: Literal["auto", "logits", "probs"] = "auto",
                 variant: Literal["paper", "rad_code"] | None = None, loss: RADLoss | None = None,
                 second_k: int = 3000, pad_value: float | None | str = "preset", rules: LRPRules | None = None,
                 micro_batch: int | None | str = "auto"):
        if preset not in PRESETS:
            raise ValueError(f"RAD: preset must be one of {tuple(PRESETS)}, got {preset!r}")
        p = PRESETS[preset]
        super().__init__(model, eps=eps, step=step, steps=steps, update=p["update"] if update is None else update,
                         random_start=random_start, valid_only=valid_only,
                         transforms=[SI(**p["si"])] if transforms is None else transforms, seed=seed,
                         device=device, filter_terms=p["filter_terms"] if filter_terms is None else filter_terms)
        self.preset = preset
        self.variant = p["variant"] if variant is None else variant
        self.loss = p["loss"] if loss is None else loss
        if self.variant not in ("paper", "rad_code"):
            raise ValueError(f"RAD: variant must be 'paper' or 'rad_code', got {self.variant!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"RAD: loss must be one of {LOSSES}, got {self.loss!r}")
        if self.loss == "sum" and self.variant == "rad_code":
            raise ValueError("RAD: loss='sum' with variant='rad_code' is constant: the code's head rescales B so "
                             "that the map sums to zero; use loss='reference' or 'positive', or variant='paper'")
        if second_k < 1:
            raise ValueError(f"RAD: second_k must be >= 1, got {second_k}")
        self.pad_value = p["pad_value"] if pad_value == "preset" else pad_value
        if self.pad_value is not None and not 0 <= float(self.pad_value) <= 1:
            raise ValueError(f"RAD: pad_value must be in [0, 1] or None, got {self.pad_value!r}")
        self.selection = NodeSelection(kind=nodes, m=m, threshold=threshold, node_type=node_type,
                                       cls_node=cls_node, max_nodes=max_nodes, outputs=outputs, values=values)
        self.second_k = int(second_k)
        self.rules = rules if rules is not None else LRPRules()
        if not (micro_batch in ("auto", None) or (isinstance(micro_batch, int) and micro_batch >= 1)):
            raise ValueError(f"RAD: micro_batch must be 'auto', None or an int >= 1, got {micro_batch!r}")
        self.micro_batch = micro_batch
        self._knows_letterbox = False

    # ------------------------------------------------------------------ micro-batches, letterbox padding
    def chunk_size(self, x: torch.Tensor) -> int:
        """Images per relevance computation: ``micro_batch``; ``"auto"``: on the CPU the surrogate's
        ``relevance_cpu_micro_batch`` (the exact second-order graph of one image of the zoo yolov3 is about
        0.3 GB; two per graph keep a batch of 8 under 1.5 GB and cost yolov3 a fifth less CPU time, ssd_vgg
        1-15 % more, see docs/rad.md "Cost"), the whole batch on a GPU."""
        if self.micro_batch is None:
            return x.shape[0]
        if self.micro_batch == "auto":
            if self._device(x).type != "cpu":
                return x.shape[0]
            return min(x.shape[0], max(1, int(getattr(self.model, "relevance_cpu_micro_batch", 1))))
        return int(self.micro_batch)

    def attack(self, x: torch.Tensor, targets: Any = None, *, mask: torch.Tensor | None = None) -> torch.Tensor:
        """As :meth:`Attack.attack`, in micro-batches of :meth:`chunk_size` images (every part of RAD is
        per image, so the result is the same; random transforms (DI) draw per micro-batch)."""
        n = self.chunk_size(x) if x.ndim == 4 else 1
        if x.ndim != 4 or x.shape[0] <= n:
            return self._attack_one(x, targets, mask)
        outs, states = [], []
        for xs, ts, ms in micro_batches(x, targets, mask, n):
            outs.append(self._attack_one(xs, ts, ms))
            states.append(self.last_state)
        self.last_state = _merge_states(states)
        return torch.cat(outs)

    def _attack_one(self, x: torch.Tensor, targets: Any, mask: torch.Tensor | None) -> torch.Tensor:
        self._knows_letterbox = knows_letterbox(targets, mask)
        return super().attack(x, targets, mask=mask)

    def _run(self, x: torch.Tensor, targets: Any, mask: torch.Tensor | None) -> torch.Tensor:
        """The surrogate sees the preset's padding; the result keeps the caller's padding."""
        repad = self.pad_value is not None and mask is not None and self._knows_letterbox
        x_in = padded(x, mask, self.pad_value) if repad else x
        with frozen_heap():
            x_adv = super()._run(x_in, targets, mask)
        if repad:
            x_adv = torch.where(mask, x_adv, x)
        self._record_perturbation(x, x_adv, mask)
        return x_adv

    def _record_perturbation(self, x: torch.Tensor, x_adv: torch.Tensor, mask: torch.Tensor | None) -> None:
        d = self.last_state["diagnostics"]
        valid = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.expand_as(x)
        delta = ((x_adv - x).abs() * 255.0)[valid].double()
        d.abs_delta_sum += float(delta.sum())
        d.values += int(delta.numel())
        if self.eps is not None:
            d.at_eps += int((delta >= self.eps - 1e-3).sum())

    # ------------------------------------------------------------------ the framework's hooks
    def prepare(self, x: torch.Tensor, targets: Any) -> dict:
        state: dict = {"node_counts": [], "diagnostics": RADDiagnostics(images=x.shape[0])}
        if self.loss == "reference":
            state["ranked"] = top_ranked(self.model, self.model.dense(x), self.selection.cls_node, self.second_k)
        return state

    def on_step(self, t: int, x_adv: torch.Tensor, state: dict) -> None:
        """Select T on the current adversarial image (static top-m or dynamic threshold). First collects
        the previous step's garbage: the double-backward graphs leave reference cycles that hold their
        tensors until a collection, and Python's collector, which counts objects, not bytes, runs too
        rarely (measured: a batch of 8 in the demo grew from 1.6 to 3.4 GB over RAD's 10 steps without
        it; 2 images, 8 steps: 1.27 -> 1.53 GB without, flat at 1.2-1.3 GB with it). The objects that were
        alive when the attack began are frozen (:func:`frozen_heap`), so the collection walks only the
        attack's own objects."""
        gc.collect()
        dense = self.model.dense(x_adv)
        tracked = TrackedNodes.select(self.model, dense, self.selection)
        state["tracked"] = tracked
        state["node_counts"].append(tracked.nodes.counts)
        state["first_eval"] = True
        log.debug("RAD step %d: %s target nodes per image", t, tracked.nodes.counts)

    def relevance_loss(self, x_in: torch.Tensor, state: dict) -> torch.Tensor:
        """Per-image RAD loss (B,) at ``x_in`` for the nodes selected in ``on_step`` (differentiable
        w.r.t. ``x_in`` when grad is enabled)."""
        exact = torch.is_grad_enabled() and x_in.requires_grad
        second = self.loss == "reference"
        res = relevance_map(self.model, x_in, state["tracked"], rules=self.rules, variant=self.variant,
                            create_graph=exact or second)
        value = rad_loss(res.per_channel, self.loss)
        self._record_evaluation(res.per_channel.detach(), state)
        if second:
            idx, weight = state["ranked"]
            value = value / REFERENCE_FLOOR + second_term(res.outputs, res.nodes.values, idx, weight)
        return value

    def _record_evaluation(self, per_channel: torch.Tensor, state: dict) -> None:
        d = state.get("diagnostics")
        if d is None:
            return
        positive = per_channel.flatten(1).amax(1) > REFERENCE_FLOOR
        d.evals += per_channel.shape[0]
        d.no_relevance_evals += int((~positive).sum())
        if state.pop("first_eval", False):  # the first evaluation of a step is at x_k itself
            d.relevance_sum.append(float(per_channel.clamp(min=0).flatten(1).mean(1).sum()))

    def objective(self, x_in: torch.Tensor, state: dict) -> torch.Tensor:
        return -self.relevance_loss(x_in, state)
