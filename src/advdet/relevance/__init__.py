"""The relevance layer: LRP rules per layer type, SGLRP and Multi-Node SGLRP for any Detector, and
relevance figures (RAD sections 3.3-3.4, ALGORITHMS.md 2.1-2.3).

Main entry points:

- :func:`relevance_map` ``(detector, x, nodes=NodeSelection(...), rules=LRPRules(), variant="paper",
  create_graph=False) -> RelevanceResult(map (B, H, W), per_channel (B, 3, H, W), nodes, dense)``
- :func:`sglrp_map` (one output node, eq. 1), :func:`box_relevance_maps` (single boxes)
- :class:`LRPContext` / :func:`lrp` / :func:`trace_forward`: the rules on any network
- :func:`relevance_figure`, :func:`explain_image`: RAD Fig. 1/5-style PNGs
"""

from advdet.relevance.figure import explain_image, relevance_figure
from advdet.relevance.nodes import (NodeSelection, NodeSet, OutputVector, TrackedNodes, box_regression,
                                    distinct_candidates, output_vector, resolve_values, score_values, select_nodes,
                                    selection_needs_boxes)
from advdet.relevance.rules import LRPContext, LRPRules, Traced, lrp, lrp_backward, trace_forward
from advdet.relevance.sglrp import (RelevanceResult, box_relevance_maps, multi_node_sglrp_init, output_softmax,
                                    rad_code_inits, relevance_map, sglrp_init, sglrp_map, trace)

__all__ = [
    "box_regression", "box_relevance_maps", "distinct_candidates", "explain_image", "lrp", "lrp_backward",
    "LRPContext", "LRPRules", "multi_node_sglrp_init", "NodeSelection", "NodeSet", "output_softmax",
    "output_vector", "OutputVector", "rad_code_inits", "relevance_figure", "relevance_map", "RelevanceResult",
    "resolve_values", "score_values", "select_nodes", "selection_needs_boxes", "sglrp_init", "sglrp_map",
    "trace", "trace_forward", "Traced", "TrackedNodes",
]
