"""SGLRP (Iwana et al. 2019; RAD eq. 1) and Multi-Node SGLRP (RAD eq. 2) for any Detector.

Initial relevance over the output vector ``o`` (see :mod:`advdet.relevance.nodes`: raw scores or
probabilities, ``values``), ``y = softmax(ReLU(o))`` over all valid entries of one image:

- **SGLRP, one target t** (eq. 1): ``R_t = y_t (1 - y_t)``, ``R_n = -y_n y_t`` (n != t).
- **Multi-Node SGLRP, target set T of m nodes** (eq. 2, ``variant="paper"``, default):
  ``R_n = y_n (1 - y_n)`` for n in T and ``R_n = -(y_n / m) * sum_{i<=m} y_{t_i}`` for n not in T, i.e. the
  dual term is the mean over the targets of eq. 1's dual term; for T = {t} it is eq. 1 exactly.
- ``variant="rad_code"``: what RAD's released code does (ALGORITHMS.md 2.3): two LRP passes, A from
  ``R_j = y_j`` (j in T) and B from ``R_j = -y_j * obar / (1 + 1e-18 - obar)`` (j not in T), ``obar`` the
  mean of ``o`` (ReLU'd, pre-softmax) over T, combined per image as ``A - B * sum(A) / (sum(B) + 1e-18)``
  (sums over C, H, W). RAD then clamps the map at 1e-21 inside its loss; that belongs to the attack.

The initial relevance is propagated to the pixels with the LRP rules of :mod:`advdet.relevance.rules`
(LRP is linear in the initial relevance, so eq. 2 needs one backward pass). The map h(x, T) is the
per-pixel relevance summed over the RGB channels. With ``create_graph=True`` everything, the softmax of
the initial relevance and the rules' normalisers included, stays in the graph, so ``d h / d x`` is exact
(the node set T itself is piecewise constant in x, as in RAD).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from advdet.models.detector import Detector, DenseOutput
from advdet.relevance.nodes import (NodeSelection, NodeSet, OutputVector, TrackedNodes, Values, candidate_scores,
                                    node_columns, output_vector, resolve_values, score_values, select_nodes,
                                    selection_needs_boxes)
from advdet.relevance.rules import LRPContext, LRPRules, lrp_backward, trace_forward
from advdet.relevance.rules.smooth import ShadowFn

Variant = Literal["paper", "rad_code"]


@dataclass
class RelevanceResult:
    """``map`` (B, H, W) relevance summed over channels; ``per_channel`` (B, 3, H, W); ``nodes`` the target
    set T; ``dense`` the detector's dense output at x (detached); ``stats`` what the LRP trace met;
    ``outputs`` the output vector o at x before the ReLU (with ``create_graph=True`` attached to the plain
    pass, so that a loss on the outputs can share the map's forward pass, as RAD's second term does)."""

    map: torch.Tensor
    per_channel: torch.Tensor
    nodes: NodeSet
    dense: DenseOutput
    stats: object = None
    outputs: OutputVector | None = None


# ---------------------------------------------------------------------------------------------- initial relevance
def output_softmax(ov: OutputVector, values: str = "logits") -> tuple[torch.Tensor, torch.Tensor]:
    """(o, y): o = ReLU of the flattened outputs (B, L) (raw scores or probabilities, ``values``);
    y = softmax(o) over each image's valid entries."""
    o = score_values(ov, ov.raw, values).reshape(ov.raw.shape[0], -1).relu()
    valid = ov.flat_valid()
    logits = o.masked_fill(~valid, float("-inf"))
    y = torch.softmax(logits, -1)
    y = torch.where(valid, y, torch.zeros_like(y))  # all-invalid rows (no candidates) -> 0 instead of NaN
    return o, y


def sglrp_init(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 1: initial relevance (B, L) for one target index per image ``target`` (B,)."""
    yt = y.gather(1, target[:, None])
    r = -y * yt
    own = yt * (1 - yt)
    return r.scatter(1, target[:, None], own)


def multi_node_sglrp_init(y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 2: initial relevance (B, L) for the target set ``mask`` (B, L) bool; zero rows where T is empty."""
    m = mask.sum(1, keepdim=True)
    ysum = (y * mask).sum(1, keepdim=True)
    dual = -y * ysum / m.clamp(min=1)
    r = torch.where(mask, y * (1 - y), dual)
    return torch.where(m > 0, r, torch.zeros_like(r))


def rad_code_inits(o: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RAD's released code: (A init, B init), see the module docstring."""
    m = mask.sum(1, keepdim=True)
    obar = (o * mask).sum(1, keepdim=True) / m.clamp(min=1)
    a = torch.where(mask, y, torch.zeros_like(y))
    b = torch.where(mask, torch.zeros_like(y), -y * obar / (1 + 1e-18 - obar))
    empty = m == 0
    return torch.where(empty, 0.0, a), torch.where(empty, 0.0, b)


# ---------------------------------------------------------------------------------------------- tracing
@dataclass
class _Trace:
    xr: torch.Tensor            # the tensor relevance is taken w.r.t. (the caller's x, or a leaf copy)
    dense: DenseOutput          # traced dense output: relevance is backpropagated through it
    dense_true: DenseOutput     # plain dense output (exact mode), else ``dense``: initial relevance, nodes
    ctx: LRPContext


def trace(detector: Detector, x: torch.Tensor, rules: LRPRules = LRPRules(), exact: bool = False) -> _Trace:
    """Run ``detector.dense(x)`` with the LRP rules attached (the graph can then be backpropagated several
    times with ``retain_graph=True``). ``exact=True``: also a plain pass, for an exact ``d map / d x``."""
    tr = trace_forward(detector.dense, x, rules=rules, module=detector, exact=exact)
    return _Trace(tr.xr, tr.out, tr.out_true, tr.ctx)


def _result(per_channel: torch.Tensor, nodes: NodeSet, tr: _Trace, ov: OutputVector | None = None) -> RelevanceResult:
    return RelevanceResult(per_channel.sum(1), per_channel, nodes, tr.dense_true.detach(), tr.ctx.stats, ov)


@dataclass
class _Outputs:
    ov: OutputVector       # layout over the plain pass (node selection)
    o_path: torch.Tensor   # (B, L) ReLU'd outputs of the traced pass: relevance flows back from here
    o: torch.Tensor        # (B, L) ReLU'd outputs of the plain pass
    y: torch.Tensor        # (B, L) softmax of o


def _outputs(detector: Detector, tr: _Trace, include_boxes: bool, values: str) -> _Outputs:
    ov_true = output_vector(detector, tr.dense_true, include_boxes)
    o, y = output_softmax(ov_true, values)
    if tr.dense is tr.dense_true:
        return _Outputs(ov_true, o, o, y)
    ov_path = output_vector(detector, tr.dense, include_boxes)
    if values == "logits":
        path = ov_path.raw
    else:  # exact mode: the sigmoid / softmax's vjp at the plain pass's scores (as the rules' smooth ops)
        path = ShadowFn.apply(ov_path.raw, lambda r: score_values(ov_true, r, values), ov_true.raw)
    return _Outputs(ov_true, path.reshape(path.shape[0], -1).relu(), o, y)


def _propagate(tr: _Trace, out: _Outputs, init: torch.Tensor, create_graph: bool, retain: bool) -> torch.Tensor:
    return lrp_backward(out.o_path, tr.xr, init, create_graph=create_graph, retain_graph=True if retain else None)


def _combine(tr: _Trace, out: _Outputs, mask: torch.Tensor, variant: str, create_graph: bool,
             retain: bool) -> torch.Tensor:
    if variant == "paper":
        return _propagate(tr, out, multi_node_sglrp_init(out.y, mask), create_graph, retain)
    if variant == "rad_code":
        a0, b0 = rad_code_inits(out.o, out.y, mask)
        a = _propagate(tr, out, a0, create_graph, True)
        b = _propagate(tr, out, b0, create_graph, retain)
        dims = tuple(range(1, a.ndim))
        ratio = a.sum(dims, keepdim=True) / (b.sum(dims, keepdim=True) + 1e-18)
        return a - b * ratio
    raise ValueError(f"variant must be 'paper' or 'rad_code', got {variant!r}")


# ---------------------------------------------------------------------------------------------- public API
@torch.enable_grad()  # the maps are gradients: they work inside torch.no_grad() too
def relevance_map(detector: Detector, x: torch.Tensor, nodes: NodeSelection | NodeSet | TrackedNodes | None = None, *,
                  rules: LRPRules = LRPRules(), variant: Variant = "paper",
                  create_graph: bool = False) -> RelevanceResult:
    """Multi-Node SGLRP relevance map h(x, T) of any Detector.

    Args:
        detector: a Detector (its ``dense`` is traced; use it in eval mode).
        x: (B, 3, S, S) float in [0, 1]; with ``create_graph=True`` and ``x.requires_grad`` the map is
            differentiable w.r.t. it.
        nodes: a :class:`NodeSelection` (default: static top-20 cls nodes), a fixed :class:`NodeSet`
            (built on the same layout, e.g. an earlier call's ``result.nodes``), or :class:`TrackedNodes`
            (selected at another input and reused where the candidates are the same boxes, as RAD does
            at the SI / DI copies of its current image).
        rules: the LRP rules (default: the reference's, :class:`LRPRules`).
        variant: ``"paper"`` (eq. 2) or ``"rad_code"`` (RAD's released code).
        create_graph: keep the graph so that the map can be differentiated w.r.t. x (RAD's loss); runs
            the forward twice (plain + traced) so that the derivative is exact.
    Returns:
        :class:`RelevanceResult` with ``map`` (B, S, S) and ``per_channel`` (B, 3, S, S).
    """
    if variant not in ("paper", "rad_code"):
        raise ValueError(f"variant must be 'paper' or 'rad_code', got {variant!r}")
    sel = nodes if nodes is not None else NodeSelection()
    if isinstance(sel, NodeSelection):
        include_boxes = selection_needs_boxes(sel)
    elif isinstance(sel, TrackedNodes):
        include_boxes = sel.include_boxes
    else:
        include_boxes = any(c.startswith("box") for c in sel.layout)
    tr = trace(detector, x, rules, exact=create_graph)
    if isinstance(sel, NodeSelection):
        values = resolve_values(detector, tr.dense_true, sel.values, sel.cls_node)
    else:
        values = (sel.nodes if isinstance(sel, TrackedNodes) else sel).values
    out = _outputs(detector, tr, include_boxes, values)
    ov = out.ov
    if isinstance(sel, TrackedNodes):
        node_set = sel.resolve(detector, tr.dense_true, ov)
    elif isinstance(sel, NodeSet):
        if tuple(sel.layout) != ov.columns or tuple(sel.mask.shape) != (ov.raw.shape[0], ov.raw.shape[1] * ov.width):
            raise ValueError("the given NodeSet was built for another output layout")
        node_set = sel
    else:
        node_set = select_nodes(detector, tr.dense_true, ov, sel)
    pc = _combine(tr, out, node_set.mask, variant, create_graph, retain=False)
    return _result(pc, node_set, tr, ov if create_graph else None)


@torch.enable_grad()  # the maps are gradients: they work inside torch.no_grad() too
def sglrp_map(detector: Detector, x: torch.Tensor, target: int | torch.Tensor, *,
              rules: LRPRules = LRPRules(), include_boxes: bool = True, values: Values = "auto",
              cls_node: str = "auto", create_graph: bool = False) -> RelevanceResult:
    """Single-node SGLRP (eq. 1) for one output node per image.

    ``target``: flat index into the image's output vector (candidate * D + column, see
    :class:`~advdet.relevance.nodes.OutputVector`), an int for all images or a (B,) tensor. ``values``
    (and ``cls_node`` for ``"auto"``): what the output vector holds (:func:`resolve_values`).
    """
    tr = trace(detector, x, rules, exact=create_graph)
    values = resolve_values(detector, tr.dense_true, values, cls_node)
    out = _outputs(detector, tr, include_boxes, values)
    ov = out.ov
    b, d = ov.raw.shape[0], ov.width
    t = torch.as_tensor(target, device=ov.raw.device).long().reshape(-1).expand(b).clone()
    nodes = NodeSet.from_nodes([t[i:i + 1] // d for i in range(b)], [t[i:i + 1] % d for i in range(b)], ov,
                               values)
    pc = _propagate(tr, out, sglrp_init(out.y, t), create_graph, retain=False)
    return _result(pc, nodes, tr)


@torch.enable_grad()  # the maps are gradients: they work inside torch.no_grad() too
def box_relevance_maps(detector: Detector, x: torch.Tensor, candidates: list[torch.Tensor] | torch.Tensor, *,
                       node_type: str = "cls", cls_node: str = "auto", outputs: str = "all",
                       values: Values = "auto", rules: LRPRules = LRPRules(),
                       variant: Variant = "paper") -> tuple[list[RelevanceResult], DenseOutput]:
    """SGLRP maps of single boxes: for each column j of ``candidates`` ((B, k), or per-image index tensors
    of equal length k), the map of T = the nodes of candidate j (one cls node: eq. 1 exactly). One traced
    forward pass, k backward passes. Returns the k results and the dense output."""
    tr = trace(detector, x, rules)
    values = resolve_values(detector, tr.dense_true, values, cls_node)
    out = _outputs(detector, tr, outputs == "all" or node_type != "cls", values)
    ov = out.ov
    if isinstance(candidates, torch.Tensor):
        candidates = list(candidates.reshape(candidates.shape[0], -1))
    ks = {int(c.numel()) for c in candidates}
    if len(ks) != 1:
        raise ValueError("box_relevance_maps needs the same number of candidates per image")
    k = ks.pop()
    _, _, label = candidate_scores(detector, tr.dense_true, cls_node)
    results = []
    for j in range(k):
        cands, cols = [], []
        for b, c in enumerate(candidates):
            cj = c[j:j + 1].to(label.device)
            cc, kk = node_columns(detector, tr.dense_true, ov, cj, label[b][cj], node_type, cls_node)
            cands.append(cc)
            cols.append(kk)
        ns = NodeSet.from_nodes(cands, cols, ov, values)
        pc = _combine(tr, out, ns.mask, variant, False, retain=j < k - 1)
        results.append(_result(pc, ns, tr))
    return results, tr.dense_true.detach()
