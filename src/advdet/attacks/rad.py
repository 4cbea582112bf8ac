"""RAD, the Relevance Attack on Detectors (RAD paper sec. 3, Fig. 2, eq. 2-5; ALGORITHMS.md 2.3-2.4).

Each iteration k (Fig. 2):

1. select the target nodes T on the current adversarial image x_k (``on_step``): the ``m`` = 20 most
   confident boxes (static) or every box whose pre-softmax confidence exceeds ``threshold`` (dynamic),
   one node per box for ``node_type="cls"`` (the argmax class logit; the objectness logit for YOLO),
   two box-regression nodes per box for ``"loc"`` / ``"size"`` (RAD Table 1, Table 7);
2. compute the Multi-Node SGLRP relevance map h(x, T) (eq. 2; :func:`advdet.relevance.relevance_map`)
   in exact mode (``create_graph``), so that d h / d x is the true derivative through every LRP
   normaliser;
3. descend on the RAD loss (eq. 3, ``g = d L_RAD / d x``) with SI (eq. 4) and the eq. 5 update
   ``x_{k+1} = clip_eps(x_k - alpha * g_SI / mean|g_SI|)``, changing only the letterboxed image.

The loss (``loss=``):

- ``"positive"`` (default, RAD's reference code, ALGORITHMS.md 2.3): ``L = mean over C, H, W of
  max(h_c(x, T), 0)``, the mean positive relevance of the per-channel map, i.e. RAD pushes the evidence
  *for* the attacked boxes out of the image. The reference writes it as ``1e21 * mean(max(map, 1e-21))
  + mean_top3000 max_c(class output)``; the second term only acts once no positive relevance is left
  (its gradient is 1e-21 times smaller otherwise), so here it is an explicit per-image switch: images
  with no positive relevance descend on the fallback ``mean over the top-k (3000) candidates of their
  max foreground probability`` (``fallback=True``).
- ``"sum"``: the paper's eq. 3 read literally, ``L = sum_{c,i,j} h_c(x, T)``. Because LRP (nearly)
  conserves relevance, this is close to a function of the outputs alone (the sum of eq. 2's initial
  relevance), which is why the reference minimises the positive part instead.

The map is eq. 2 of the paper (``variant="paper"``, default) or the reference code's two-pass SGLRP head
(``variant="rad_code"``, ALGORITHMS.md 2.3; twice the backward cost). The LRP rules are the reference's
(``LRPRules()``: z^B at the input layer, alpha1-beta0 with bias elsewhere, BatchNorm passed through).

Defaults (paper sec. 4.1 and reference code): eps=16, alpha=2 (0-255 units), 10 iterations, static
m=20 cls nodes, ``update="mean_abs"`` (eq. 5), ``transforms=[SI()]`` (RAD's code SI: x * 0.5^i for
i = 0..3 plus x once more, each term normalised), ``valid_only=True`` (``clip_valid``: the zero padding
of the letterbox is never changed). DI, TI and MI come from ``advdet.attacks.transforms``.

The node set is re-selected every iteration on x_k and then held fixed while the gradient is averaged
over the SI / DI copies of x_k; where the candidates at a copy are not the same boxes (two-stage
detectors: the RPN proposals move with the input) the nodes are selected on the copy itself
(:class:`advdet.relevance.TrackedNodes`).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal, Sequence

import torch

from advdet.attacks.base import Attack
from advdet.attacks.transforms import SI, GradientTransform
from advdet.relevance import LRPRules, NodeSelection, TrackedNodes, relevance_map

__all__ = ["RAD", "rad_loss", "fallback_loss"]

log = logging.getLogger(__name__)

RADLoss = Literal["positive", "sum"]


def rad_loss(per_channel: torch.Tensor, loss: RADLoss = "positive") -> torch.Tensor:
    """Per-image RAD loss (B,) of a per-channel relevance map (B, C, H, W) (see the module docstring)."""
    if loss == "positive":
        return per_channel.clamp(min=0).flatten(1).mean(1)
    if loss == "sum":
        return per_channel.flatten(1).sum(1)
    raise ValueError(f"RAD: loss must be 'positive' or 'sum', got {loss!r}")


def fallback_loss(dense, k: int) -> torch.Tensor:
    """Per-image (B,) mean max foreground probability of the ``k`` most confident valid candidates
    (RAD code's second loss term, ``mean_top3000 max_c``)."""
    score = dense.class_probs().amax(-1)
    valid = dense.valid
    kk = min(int(k), score.shape[1])
    top, idx = score.masked_fill(~valid, -1.0).topk(kk, dim=1)
    w = valid.gather(1, idx).to(score.dtype)
    return (top.clamp(min=0) * w).sum(1) / w.sum(1).clamp(min=1)


class RAD(Attack):
    """RAD (Relevance Attack on Detectors): descend on the Multi-Node SGLRP relevance map of the most
    confident boxes (see the module docstring for the method and the paper / reference choices).

    Args (keyword-only, besides those of :class:`~advdet.attacks.base.Attack`):
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
        variant: ``"paper"`` (eq. 2) or ``"rad_code"`` (reference code's SGLRP head).
        loss: ``"positive"`` (reference code, default) or ``"sum"`` (eq. 3 literally).
        fallback, fallback_k: the reference's second loss term for images with no positive relevance.
        rules: the LRP rules (default: the reference's).
        transforms: default ``[SI()]``; pass ``[]`` for none, or e.g. ``[SI(), DI(), TI(), MI()]``.

    Diagnostics in ``last_state``: ``node_counts`` (nodes per image at each iteration), ``tracked`` (the
    last node set; ``tracked.reselected`` counts copies on which two-stage proposals forced a new
    selection), ``fallback_images`` (image x gradient evaluations that used the fallback term).
    """

    name: ClassVar[str] = "rad"
    description: ClassVar[str] = ("RAD: relevance attack on detectors, Multi-Node SGLRP of the top-20 boxes "
                                  "(eps 16, step 2, 10 steps, eq. 5, SI)")

    def __init__(self, model, *, eps: float | None = 16.0, step: float = 2.0, steps: int = 10,
                 update: str = "mean_abs", random_start: bool = False, valid_only: bool = True,
                 transforms: Sequence[GradientTransform] | None = None, seed: int = 0, device=None,
                 nodes: Literal["static", "dynamic"] = "static", m: int = 20, threshold: float = -1.0,
                 max_nodes: int | None = 1000, node_type: Literal["cls", "loc", "size"] = "cls",
                 cls_node: Literal["auto", "class", "objectness"] = "auto",
                 outputs: Literal["all", "scores"] = "all", values: Literal["auto", "logits", "probs"] = "auto",
                 variant: Literal["paper", "rad_code"] = "paper",
                 loss: RADLoss = "positive", fallback: bool = True, fallback_k: int = 3000,
                 rules: LRPRules | None = None):
        super().__init__(model, eps=eps, step=step, steps=steps, update=update, random_start=random_start,
                         valid_only=valid_only, transforms=[SI()] if transforms is None else transforms,
                         seed=seed, device=device)
        if variant not in ("paper", "rad_code"):
            raise ValueError(f"RAD: variant must be 'paper' or 'rad_code', got {variant!r}")
        if loss not in ("positive", "sum"):
            raise ValueError(f"RAD: loss must be 'positive' or 'sum', got {loss!r}")
        if fallback_k < 1:
            raise ValueError(f"RAD: fallback_k must be >= 1, got {fallback_k}")
        self.selection = NodeSelection(kind=nodes, m=m, threshold=threshold, node_type=node_type,
                                       cls_node=cls_node, max_nodes=max_nodes, outputs=outputs, values=values)
        self.variant = variant
        self.loss = loss
        self.fallback = bool(fallback)
        self.fallback_k = int(fallback_k)
        self.rules = rules if rules is not None else LRPRules()

    # ------------------------------------------------------------------ the framework's hooks
    def prepare(self, x: torch.Tensor, targets: Any) -> dict:
        return {"node_counts": [], "fallback_images": 0}

    def on_step(self, t: int, x_adv: torch.Tensor, state: dict) -> None:
        """Select T on the current adversarial image (static top-m or dynamic threshold)."""
        dense = self.model.dense(x_adv)
        tracked = TrackedNodes.select(self.model, dense, self.selection)
        state["tracked"] = tracked
        state["node_counts"].append(tracked.nodes.counts)
        log.debug("RAD step %d: %s target nodes per image", t, tracked.nodes.counts)

    def relevance_loss(self, x_in: torch.Tensor, state: dict) -> torch.Tensor:
        """Per-image RAD loss (B,) at ``x_in`` for the nodes selected in ``on_step`` (differentiable
        w.r.t. ``x_in`` when grad is enabled)."""
        exact = torch.is_grad_enabled() and x_in.requires_grad
        res = relevance_map(self.model, x_in, state["tracked"], rules=self.rules, variant=self.variant,
                            create_graph=exact)
        value = rad_loss(res.per_channel, self.loss)
        if self.loss == "positive" and self.fallback:
            gone = value.detach() <= 0
            if bool(gone.any()):
                state["fallback_images"] = state.get("fallback_images", 0) + int(gone.sum())
                value = torch.where(gone, fallback_loss(self.model.dense(x_in), self.fallback_k), value)
        return value

    def objective(self, x_in: torch.Tensor, state: dict) -> torch.Tensor:
        return -self.relevance_loss(x_in, state)
