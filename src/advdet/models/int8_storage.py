"""Int8 weight storage: symmetric per-output-channel quantization of convolution and linear weights.

A conv kernel ``w`` (out, in, kh, kw) (or a dynamic conv's (K, out, in, kh, kw)) and a linear weight
(out, in) are stored as ``q = round(w / s)`` in int8, clamped to [-127, 127], with one float32 scale per
output channel, ``s = max |w| / 127`` over the channel's fan-in (the last 3 dims of a kernel, the last dim
of a linear weight); loading gives back ``q * s``. Every other floating tensor (biases, norms, priors)
is stored in float16. This is the storage of the large zoo entries (a quarter of float32's bytes);
``round_to_int8_storage`` applies the same rounding in place, so a card measured after it describes the
stored file.
"""

from __future__ import annotations

import torch

#: the key suffix of a quantized tensor's scales in a stored state dict
SCALE_SUFFIX = ".int8_scale"


def is_quantized_weight(key: str, t: torch.Tensor) -> bool:
    """Conv kernels (ndim >= 4) and linear weights (2-D ``*.weight``) are quantized; nothing else."""
    return t.is_floating_point() and (t.ndim >= 4 or (t.ndim == 2 and key.endswith("weight")))


def _fan_in_dims(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(t.ndim - 3, t.ndim)) if t.ndim >= 4 else (t.ndim - 1,)


def quantize_int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8, scale float32 of shape ``t.shape`` minus the fan-in dims); ``q * scale`` approximates ``t``."""
    dims = _fan_in_dims(t)
    amax = t.detach().float().abs().amax(dim=dims, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(t.detach().float() / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale.reshape(t.shape[:t.ndim - len(dims)])


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 ``q * scale`` (scale broadcast over the fan-in dims)."""
    return q.float() * scale.reshape(*scale.shape, *([1] * (q.ndim - scale.ndim)))


def to_int8_storage(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict as stored: quantized weights in int8 plus ``KEY.int8_scale``; other floats float16."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if is_quantized_weight(k, v):
            out[k], out[k + SCALE_SUFFIX] = quantize_int8(v)
        elif v.is_floating_point():
            out[k] = v.to(torch.float16)
        else:
            out[k] = v
    return out


def from_int8_storage(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo :func:`to_int8_storage`: quantized weights come back as float32 ``q * scale``."""
    out = {}
    for k, v in state.items():
        if k.endswith(SCALE_SUFFIX):
            continue
        scale = state.get(k + SCALE_SUFFIX)
        out[k] = dequantize_int8(v, scale) if scale is not None and v.dtype == torch.int8 else v
    return out


def round_to_int8_storage(module: torch.nn.Module) -> torch.nn.Module:
    """Round ``module``'s weights in place to what int8 storage gives back (its dtype stays)."""
    state = module.state_dict(keep_vars=True)
    stored = from_int8_storage(to_int8_storage({k: t.detach() for k, t in state.items()}))
    with torch.no_grad():
        for k, t in state.items():
            if t.is_floating_point():
                t.copy_(stored[k])
    return module
