"""Smooth activations as gates (``LRPRules(activation="pass")``): relevance passed through unchanged.

Why: in a ReLU network the activation's gradient *is* the identity on the relevance that reaches it (a
neuron with a negative pre-activation outputs 0, so the next layer's rules give it no relevance), and LRP's
conservation holds. For SiLU (YOLOv5/v8/11, RT-DETR's encoder), GELU, Mish, Hardswish, ELU and the like the
gradient is not a gate: SiLU's derivative reaches 1.1 and turns negative below z = -1.28 while the output is
non-zero there, so relevance x derivative neither conserves nor keeps its sign. ``"pass"`` treats them as
ReLU is treated, ``R(z) = R(a)`` element-wise (the identity rule of LRP for element-wise activations), and
the softmax the same way per element (the DFL softmax of ultralytics heads, whose vjp would otherwise sum
to zero over each distribution). The default stays ``"gradient"`` (:mod:`.smooth`): what RAD's reference
does for every smooth op, and what all zoo families before the ultralytics adapter see (none of them has a
smooth activation on the relevance path).

Exact mode needs nothing more: the identity does not depend on x, and the rules around it use the plain
pass's activations. Sigmoid, tanh and exp are not activations here (gates, box decoding): they keep their
gradient.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from advdet.relevance.rules.norm import PassThrough
from advdet.relevance.rules.smooth import first_tensor

if TYPE_CHECKING:
    from advdet.relevance.rules.context import LRPContext

#: element-wise activations and the softmax: relevance passed through under ``activation="pass"``
PASS_ACTIVATIONS = {F.silu, F.gelu, F.mish, F.hardswish, F.elu, F.selu, F.celu, F.softplus,
                    torch.softmax, torch.Tensor.softmax, F.softmax}


def pass_activation(ctx: "LRPContext", func, args, kwargs):
    """An activation under ``activation="pass"``: its value, relevance passed to its input unchanged."""
    out = func(*args, **kwargs)
    inp = first_tensor(args, kwargs)
    if isinstance(inp, torch.Tensor) and inp.requires_grad and isinstance(out, torch.Tensor) \
            and out.shape == inp.shape:
        ctx.stats.activations += 1
        return PassThrough.apply(inp, out.detach())
    return out
