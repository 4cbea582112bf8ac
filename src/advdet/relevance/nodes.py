"""The output vector o of a detector and the target node set T (RAD sections 3.4, ALGORITHMS.md 2.3).

Output vector
-------------
Per candidate box the dense outputs are laid out as ``D`` columns (:class:`OutputVector`):
``[box regression (4)] [objectness (1)] [class logits (C)]`` where present, flattened over candidates
to ``o`` of length ``L = N * D`` per image; the SGLRP softmax ``y = softmax(ReLU(o))`` runs over all of
it (RAD's code: "ReLU of the flattened raw model output", which for YOLOv3 is box + objectness + classes).
``outputs="scores"`` leaves the box columns out (RAD's RetinaNet variant used only class outputs) unless
the node type needs them. Padded candidates (``dense.valid`` False) are excluded from the softmax.

``values`` says what the objectness / class entries of ``o`` are (the box columns are always the raw
regression outputs): ``"logits"`` (raw scores, as RAD's YOLOv3 code: pre-sigmoid outputs) or
``"probs"`` (sigmoid of sigmoid-family scores and objectness, softmax over the classes of softmax
families; as RAD's RetinaNet code, whose outputs were post-sigmoid probabilities). ``"auto"`` (default):
``"probs"`` for sigmoid families whose cls nodes are class scores (RetinaNet, FCOS), ``"logits"``
otherwise (YOLO-style objectness nodes, softmax families). The difference matters through the ReLU:
a logit below 0 (a box with score < 0.5) carries no relevance at all, a probability always does.

Box regression columns are the raw regression outputs the family declares as ``DenseOutput.box_deltas``
(YOLO tx, ty, tw, th; SSD / RetinaNet dx, dy, dw, dh; FCOS distances l, t, r, b; two-stage: the deltas
of each proposal's argmax class).

Node sets (RAD Table 1 and Table 7)
-----------------------------------
- ``kind="static"``: the ``m`` candidates with the highest confidence (RAD: m = 20).
- ``kind="dynamic"``: every candidate whose pre-softmax confidence (the logit of its node) exceeds
  ``threshold`` (RAD Table 7: -1, -2, -3), at most ``max_nodes`` (the most confident).
- node types: ``"cls"`` one node per box: the class logit of the candidate's argmax class, or for
  YOLO-style detectors (``cls_node="auto"`` and ``Detector.objectness_nodes``) its objectness logit, ranked by
  objectness (ALGORITHMS.md 2.3); ``"loc"`` two nodes per box, box columns 0 and 1 (centre offsets);
  ``"size"`` two nodes per box, box columns 2 and 3 (size offsets; for FCOS the r, b distances).
- confidence: the objectness logit for objectness nodes, else the best foreground class probability
  (``dense.class_probs()``, which includes objectness / centerness where the family has it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torchvision.ops import nms

from advdet.models.detector import Detector, DenseOutput

NodeKind = Literal["static", "dynamic"]
Values = Literal["auto", "logits", "probs"]
NodeType = Literal["cls", "loc", "size"]
ClsNode = Literal["auto", "class", "objectness"]


@dataclass(frozen=True)
class NodeSelection:
    """How to pick the target nodes T from the current dense output (see the module docstring)."""

    kind: NodeKind = "static"
    m: int = 20
    threshold: float = -1.0
    node_type: NodeType = "cls"
    cls_node: ClsNode = "auto"
    max_nodes: int | None = 1000
    outputs: Literal["all", "scores"] = "all"
    values: Values = "auto"

    def __post_init__(self) -> None:
        if self.kind not in ("static", "dynamic"):
            raise ValueError(f"NodeSelection.kind must be 'static' or 'dynamic', got {self.kind!r}")
        if self.node_type not in ("cls", "loc", "size"):
            raise ValueError(f"NodeSelection.node_type must be 'cls', 'loc' or 'size', got {self.node_type!r}")
        if self.cls_node not in ("auto", "class", "objectness"):
            raise ValueError(f"NodeSelection.cls_node must be auto/class/objectness, got {self.cls_node!r}")
        if self.outputs not in ("all", "scores"):
            raise ValueError(f"NodeSelection.outputs must be 'all' or 'scores', got {self.outputs!r}")
        if self.values not in ("auto", "logits", "probs"):
            raise ValueError(f"NodeSelection.values must be 'auto', 'logits' or 'probs', got {self.values!r}")
        if self.m < 1:
            raise ValueError(f"NodeSelection.m must be >= 1, got {self.m}")
        if self.max_nodes is not None and self.max_nodes < 1:
            raise ValueError(f"NodeSelection.max_nodes must be >= 1 or None, got {self.max_nodes}")


@dataclass
class OutputVector:
    """The per-candidate output layout. ``raw`` (B, N, D) pre-ReLU outputs (attached to the graph),
    ``valid`` (B, N), ``columns`` the D column names, ``box``/``obj``/``cls`` the column positions
    (``box`` a start index of 4 columns or None, ``obj`` an index or None, ``cls`` the first logit column),
    ``score_mode`` the dense output's (how the class logits read)."""

    raw: torch.Tensor
    valid: torch.Tensor
    columns: tuple[str, ...]
    box: int | None
    obj: int | None
    cls: int
    score_mode: str = "sigmoid"

    @property
    def num_candidates(self) -> int:
        return self.raw.shape[1]

    @property
    def width(self) -> int:
        return self.raw.shape[2]

    def flat(self) -> torch.Tensor:
        """(B, L) the flattened raw outputs."""
        return self.raw.reshape(self.raw.shape[0], -1)

    def flat_valid(self) -> torch.Tensor:
        """(B, L) bool: entries of valid candidates."""
        return self.valid[..., None].expand(-1, -1, self.width).reshape(self.valid.shape[0], -1)


@dataclass
class NodeSet:
    """Target nodes T per image: ``mask`` (B, L) bool over the flattened output vector, and per image
    the candidate index and column of each node (``candidates[b][i]``, ``columns[b][i]``); ``values``
    (``"logits"`` / ``"probs"``) what the output vector holds (see the module docstring)."""

    mask: torch.Tensor
    candidates: list[torch.Tensor]
    columns: list[torch.Tensor]
    layout: tuple[str, ...]
    values: str = "logits"

    @property
    def counts(self) -> list[int]:
        return [int(c.numel()) for c in self.candidates]

    def flat_indices(self, b: int) -> torch.Tensor:
        return self.candidates[b] * len(self.layout) + self.columns[b]

    def boxes(self, dense: DenseOutput) -> list[torch.Tensor]:
        """Decoded xyxy boxes of the distinct candidates of each image's nodes."""
        return [dense.boxes[b].detach()[torch.unique(c)] for b, c in enumerate(self.candidates)]

    @classmethod
    def from_nodes(cls, candidates: list[torch.Tensor], columns: list[torch.Tensor], ov: OutputVector,
                   values: str = "logits") -> "NodeSet":
        b, n, d = ov.raw.shape
        mask = torch.zeros(b, n * d, dtype=torch.bool, device=ov.raw.device)
        for i, (c, k) in enumerate(zip(candidates, columns)):
            if c.numel():
                if (c < 0).any() or (c >= n).any() or (k < 0).any() or (k >= d).any():
                    raise IndexError(f"node out of range: candidates in [0, {n}), columns in [0, {d})")
                mask[i, c * d + k] = True
        return cls(mask, [c.to(ov.raw.device) for c in candidates], [k.to(ov.raw.device) for k in columns],
                   ov.columns, values)


def box_regression(detector: Detector, dense: DenseOutput) -> torch.Tensor | None:
    """(B, N, 4) the raw box-regression outputs of each candidate (``DenseOutput.box_deltas``, the row of
    the best foreground class for class-specific regression), or None if the family has none."""
    return dense.candidate_box_deltas()


def output_vector(detector: Detector, dense: DenseOutput, include_boxes: bool = True) -> OutputVector:
    """Lay the dense outputs out as (B, N, D): [box (4)] [objectness] [class logits]."""
    parts, names = [], []
    box = obj = None
    if include_boxes:
        br = box_regression(detector, dense)
        if br is not None:
            box = 0
            parts.append(br.to(dense.logits.dtype))
            names += ["box0", "box1", "box2", "box3"]
    if dense.objectness is not None:
        obj = len(names)
        parts.append(dense.objectness[..., None].to(dense.logits.dtype))
        names.append("obj")
    cls = len(names)
    parts.append(dense.logits)
    c = dense.logits.shape[-1]
    if dense.score_mode == "softmax_bg":
        names += ["bg"] + [f"cls{i}" for i in range(c - 1)]
    else:
        names += [f"cls{i}" for i in range(c)]
    raw = torch.cat(parts, -1) if len(parts) > 1 else parts[0]
    return OutputVector(raw, dense.valid, tuple(names), box, obj, cls, dense.score_mode)


def resolve_values(detector: Detector, dense: DenseOutput, values: Values, cls_node: ClsNode = "auto") -> str:
    """``"logits"`` or ``"probs"`` for a ``values`` setting (``"auto"``: see the module docstring)."""
    if values != "auto":
        return values
    if dense.score_mode == "sigmoid" and not _uses_objectness(detector, dense, cls_node):
        return "probs"
    return "logits"


def score_values(ov: OutputVector, raw: torch.Tensor, values: str) -> torch.Tensor:
    """(B, N, D) the output vector's entries before the ReLU: ``raw`` itself for ``"logits"``; for
    ``"probs"`` the objectness / class columns as probabilities (sigmoid, or softmax over the class
    columns of softmax families), the box columns unchanged."""
    if values == "logits":
        return raw
    if values != "probs":
        raise ValueError(f"values must be 'logits' or 'probs', got {values!r}")
    parts = [raw[..., :ov.cls]] if ov.cls > 0 else []
    if ov.obj is not None:
        parts = [raw[..., :ov.obj], raw[..., ov.obj:ov.obj + 1].sigmoid()] + (
            [raw[..., ov.obj + 1:ov.cls]] if ov.cls > ov.obj + 1 else [])
    logits = raw[..., ov.cls:]
    parts.append(logits.softmax(-1) if ov.score_mode == "softmax_bg" else logits.sigmoid())
    return torch.cat(parts, -1) if len(parts) > 1 else parts[0]


def _uses_objectness(detector: Detector, dense: DenseOutput, cls_node: ClsNode) -> bool:
    if cls_node == "objectness":
        if dense.objectness is None:
            raise ValueError(f"{type(detector).__name__} has no objectness output (cls_node='objectness')")
        return True
    if cls_node == "class":
        return False
    return dense.objectness is not None and isinstance(detector, Detector) and detector.objectness_nodes


def reference_rank_column(detector: Detector, dense: DenseOutput, ov: OutputVector, cls_node: ClsNode = "auto") -> int:
    """The output-vector column RAD's code ranks its top-3000 boxes by (``attack_dimension``): the
    objectness for objectness nodes (YOLOv3: column 4), else the first foreground class (RetinaNet: 0)."""
    if _uses_objectness(detector, dense, cls_node):
        return ov.obj
    return ov.cls + (1 if ov.score_mode == "softmax_bg" else 0)


def foreground_columns(ov: OutputVector) -> slice:
    """The class columns of the output vector without the background column of softmax families."""
    return slice(ov.cls + (1 if ov.score_mode == "softmax_bg" else 0), ov.width)


def candidate_scores(detector: Detector, dense: DenseOutput, cls_node: ClsNode = "auto"):
    """Per candidate (B, N): ranking confidence, the pre-softmax value of its cls node, its argmax
    foreground class; invalid candidates get -inf confidence."""
    probs = dense.class_probs().detach()
    conf, label = probs.max(-1)
    if _uses_objectness(detector, dense, cls_node):
        pre = dense.objectness.detach()
        conf = pre
    else:
        pre = dense.fg_logits().detach().gather(-1, label[..., None]).squeeze(-1)
    conf = conf.masked_fill(~dense.valid, float("-inf"))
    return conf, pre, label


def node_columns(detector: Detector, dense: DenseOutput, ov: OutputVector, candidates: torch.Tensor,
                 labels: torch.Tensor, node_type: NodeType, cls_node: ClsNode) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes of the given candidates (1-D, one image): (candidate per node, column per node)."""
    if node_type == "cls":
        if _uses_objectness(detector, dense, cls_node):
            cols = torch.full_like(candidates, ov.obj)
        else:
            offset = ov.cls + (1 if dense.score_mode == "softmax_bg" else 0)
            cols = labels + offset
        return candidates, cols
    if ov.box is None:
        raise ValueError(f"{type(detector).__name__}: node_type={node_type!r} needs box-regression outputs, "
                         "which its dense output does not expose")
    first = ov.box + (0 if node_type == "loc" else 2)
    cand = candidates.repeat_interleave(2)
    cols = torch.tensor([first, first + 1], device=candidates.device).repeat(candidates.numel())
    return cand, cols


def select_nodes(detector: Detector, dense: DenseOutput, ov: OutputVector, sel: NodeSelection) -> NodeSet:
    """The target node set T of every image (no gradient: T is re-selected at each attack step)."""
    values = resolve_values(detector, dense, sel.values, sel.cls_node)
    conf, pre, label = candidate_scores(detector, dense, sel.cls_node)
    cands, cols = [], []
    for b in range(conf.shape[0]):
        valid = torch.isfinite(conf[b])
        if sel.kind == "static":
            k = min(sel.m, int(valid.sum()))
            idx = conf[b].topk(k).indices if k > 0 else conf.new_zeros(0, dtype=torch.long)
        else:
            keep = torch.nonzero(valid & (pre[b] > sel.threshold)).squeeze(1)
            if sel.max_nodes is not None and keep.numel() > sel.max_nodes:
                keep = keep[conf[b][keep].topk(sel.max_nodes).indices]
            idx = keep[conf[b][keep].argsort(descending=True)]
        c, k = node_columns(detector, dense, ov, idx, label[b][idx], sel.node_type, sel.cls_node)
        cands.append(c)
        cols.append(k)
    return NodeSet.from_nodes(cands, cols, ov, values)


@dataclass
class TrackedNodes:
    """A node set selected at one input and reused at related inputs (RAD: T is selected on the current
    adversarial image, then the relevance is taken at its SI / DI copies).

    Per image the nodes are reused where the candidates at the new input are the same boxes, i.e. the
    node candidates have the same anchors (always true for one-stage detectors, whose anchors / priors /
    grid cells do not depend on the input); otherwise (two-stage detectors, whose proposals move with
    the input) they are selected anew at the new input with ``selection``. ``reselected`` counts the
    images for which that happened (a diagnostic).
    """

    nodes: NodeSet
    anchors: list[torch.Tensor]
    selection: NodeSelection
    reselected: int = 0

    @classmethod
    def select(cls, detector: Detector, dense: DenseOutput, selection: NodeSelection) -> "TrackedNodes":
        """Select T on ``dense`` (the current input) with ``selection`` and remember the anchors."""
        ov = output_vector(detector, dense, include_boxes=selection_needs_boxes(selection))
        ns = select_nodes(detector, dense, ov, selection)
        anchors = [dense.anchors[b].detach()[c] for b, c in enumerate(ns.candidates)]
        return cls(ns, anchors, selection)

    @property
    def include_boxes(self) -> bool:
        return any(c.startswith("box") for c in self.nodes.layout)

    def resolve(self, detector: Detector, dense: DenseOutput, ov: OutputVector) -> NodeSet:
        """The node set for the input whose dense output is ``dense`` (laid out as ``ov``)."""
        if tuple(self.nodes.layout) != ov.columns or len(self.nodes.candidates) != ov.raw.shape[0]:
            raise ValueError("TrackedNodes: the output layout differs from the one the nodes were selected on")
        n = ov.num_candidates
        cands, cols, fresh = [], [], None
        for b, (c, k) in enumerate(zip(self.nodes.candidates, self.nodes.columns)):
            same = c.numel() == 0 or (int(c.max()) < n and bool(dense.valid[b][c].all())
                                      and torch.equal(dense.anchors[b].detach()[c], self.anchors[b]))
            if same:
                cands.append(c)
                cols.append(k)
                continue
            if fresh is None:
                fresh = select_nodes(detector, dense, ov, self.selection)
            self.reselected += 1
            cands.append(fresh.candidates[b])
            cols.append(fresh.columns[b])
        return NodeSet.from_nodes(cands, cols, ov, self.nodes.values)


def selection_needs_boxes(sel: NodeSelection) -> bool:
    """Whether the output vector of ``sel`` includes the box-regression columns."""
    return sel.outputs == "all" or sel.node_type != "cls"


def distinct_candidates(detector: Detector, dense: DenseOutput, k: int = 3, iou: float = 0.45,
                        cls_node: ClsNode = "auto") -> list[torch.Tensor]:
    """Per image, up to ``k`` candidate indices of distinct objects: the most confident candidates after
    greedy NMS at ``iou`` (the single boxes of RAD Fig. 5)."""
    conf, _, _ = candidate_scores(detector, dense, cls_node)
    out = []
    for b in range(conf.shape[0]):
        valid = torch.nonzero(torch.isfinite(conf[b])).squeeze(1)
        boxes = dense.boxes[b].detach()[valid].float()
        kept = nms(boxes, conf[b][valid].float(), iou)[:k]
        out.append(valid[kept])
    return out
