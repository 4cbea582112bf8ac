"""Which LRP rule each layer type gets: :class:`LRPRules` (defaults: the reference, ALGORITHMS.md 2.2)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

InputRule = Literal["zB", "alpha1beta0", "zero", "epsilon"]


LayerRule = Literal["alpha1beta0", "zero", "epsilon"]


@dataclass(frozen=True)
class LRPRules:
    """Which LRP rule each layer type gets (defaults: the reference, ALGORITHMS.md 2.2).

    input_rule: rule of the input layer(s): ``"zB"`` (bounded, reference), or any layer rule.
    layer_rule: rule of every other conv / linear: ``"alpha1beta0"`` (reference), ``"zero"`` (LRP-0),
        ``"epsilon"`` (LRP-0 with the stabiliser ``epsilon``).
    bias: include the bias in the denominator of the layer rule (reference: True; z^B always ignores it).
    epsilon: signed stabiliser added to every denominator; 0 only guards exact zeros (reference).
    bounds: z^B bounds, ``"minmax"`` (per-image min / max of the layer input, reference) or ``"pixel"``
        ([0, 1] mapped through the detector's normalisation).
    upsample: ``"average"`` (RAD patch) or ``"gradient"``, for nearest-mode enlarging ``interpolate``.
    norm: ``"pass"`` (normalisation layers pass relevance through unchanged, reference) or ``"gradient"``.
    activation: smooth activations (SiLU, GELU, Mish, Hardswish, ELU, softplus, softmax): ``"gradient"``
        (relevance x local derivative, reference) or ``"pass"`` (relevance passed through unchanged, as the
        ReLU gate does; conserving: :mod:`.activation`).
    passthrough_modules: extra module types whose output relevance is passed to their (single) input
        unchanged (norm-like modules written as plain arithmetic).
    """

    input_rule: InputRule = "zB"
    layer_rule: LayerRule = "alpha1beta0"
    bias: bool = True
    epsilon: float = 0.0
    bounds: Literal["minmax", "pixel"] = "minmax"
    upsample: Literal["average", "gradient"] = "average"
    norm: Literal["pass", "gradient"] = "pass"
    activation: Literal["gradient", "pass"] = "gradient"
    passthrough_modules: tuple[type, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.input_rule not in ("zB", "alpha1beta0", "zero", "epsilon"):
            raise ValueError(f"unknown input_rule {self.input_rule!r}")
        if self.layer_rule not in ("alpha1beta0", "zero", "epsilon"):
            raise ValueError(f"unknown layer_rule {self.layer_rule!r}")
        if self.bounds not in ("minmax", "pixel"):
            raise ValueError(f"bounds must be 'minmax' or 'pixel', got {self.bounds!r}")
        if self.upsample not in ("average", "gradient"):
            raise ValueError(f"upsample must be 'average' or 'gradient', got {self.upsample!r}")
        if self.norm not in ("pass", "gradient"):
            raise ValueError(f"norm must be 'pass' or 'gradient', got {self.norm!r}")
        if self.activation not in ("gradient", "pass"):
            raise ValueError(f"activation must be 'gradient' or 'pass', got {self.activation!r}")
        if self.epsilon < 0:
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")
