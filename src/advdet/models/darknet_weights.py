"""Darknet's binary ``.weights`` format, read and written for :class:`~advdet.models.yolov3_net.YOLOv3Net`.

Layout (little-endian): a header of int32 ``major``, ``minor``, ``revision``, then ``seen`` (images
seen in training) as int64 when ``major*10 + minor >= 2`` (and major, minor < 1000), else int32.
Then, for every convolution in cfg order, float32 arrays: with batch norm ``bn.bias``,
``bn.weight``, ``bn.running_mean``, ``bn.running_var``, ``conv.weight``; without it ``conv.bias``,
``conv.weight``. Nothing else (no layer names, no shapes), so the architecture must match exactly:
a file with fewer or more floats than the network needs is rejected with both counts.

A module is accepted when it has a ``darknet_convs()`` method returning ``(conv, bn_or_None)`` pairs
in cfg order (``YOLOv3Net`` does), or is a Detector whose ``model`` has one.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from advdet.data.errors import AdvdetError

__all__ = ["DarknetHeader", "DarknetWeightsError", "DarknetWeightsNotFound", "load_darknet_weights",
           "save_darknet_weights", "darknet_float_count"]


class DarknetWeightsError(AdvdetError):
    """A Darknet weights file that does not fit the network; the message names the file."""


class DarknetWeightsNotFound(DarknetWeightsError, FileNotFoundError):
    """The weights file does not exist (a ValueError and a FileNotFoundError)."""


@dataclass(frozen=True)
class DarknetHeader:
    major: int
    minor: int
    revision: int
    seen: int


def _convs(net: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d | None]]:
    fn = getattr(net, "darknet_convs", None)
    if fn is None and hasattr(net, "model"):
        fn = getattr(net.model, "darknet_convs", None)
    if fn is None:
        raise TypeError(f"{type(net).__name__} has no darknet_convs(): not a Darknet-layout network")
    return fn()


def _tensors(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> list[torch.Tensor]:
    if bn is not None:
        return [bn.bias, bn.weight, bn.running_mean, bn.running_var, conv.weight]
    if conv.bias is None:
        raise TypeError("a Darknet conv without batch norm must have a bias")
    return [conv.bias, conv.weight]


def darknet_float_count(net: nn.Module, num_convs: int | None = None) -> int:
    """Number of float32 values the weights file of ``net`` (its first ``num_convs`` convs) holds."""
    convs = _convs(net)[:num_convs]
    return sum(t.numel() for c, b in convs for t in _tensors(c, b))


def _read_header(buf: bytes, path: str) -> tuple[DarknetHeader, int]:
    if len(buf) < 16:
        raise DarknetWeightsError(f"{path}: not a Darknet weights file: {len(buf)} bytes, shorter than "
                                  f"the header")
    major, minor, revision = struct.unpack_from("<3i", buf, 0)
    if major * 10 + minor >= 2 and major < 1000 and minor < 1000:
        if len(buf) < 20:
            raise DarknetWeightsError(f"{path}: truncated header ({len(buf)} bytes)")
        (seen,) = struct.unpack_from("<q", buf, 12)
        return DarknetHeader(major, minor, revision, seen), 20
    (seen,) = struct.unpack_from("<i", buf, 12)
    return DarknetHeader(major, minor, revision, seen), 16


def load_darknet_weights(net: nn.Module, path: str | os.PathLike, num_convs: int | None = None
                         ) -> DarknetHeader:
    """Load a Darknet ``.weights`` file into ``net`` in place; returns the file's header.

    ``num_convs`` loads only the first convs (e.g. 52 for ``darknet53.conv.74``, the ImageNet backbone);
    the file must then hold exactly those. Raises :class:`DarknetWeightsNotFound` for a missing file and
    :class:`DarknetWeightsError` (a ValueError naming the file, with expected and found float counts)
    for an empty, truncated or too long file; nothing is copied unless the whole file fits.
    """
    path_s = str(path)
    p = Path(path)
    if not p.is_file():
        raise DarknetWeightsNotFound(f"{path_s}: no such Darknet weights file")
    buf = p.read_bytes()
    if not buf:
        raise DarknetWeightsError(f"{path_s}: empty file, not a Darknet weights file")
    header, off = _read_header(buf, path_s)
    convs = _convs(net)
    if num_convs is not None:
        if not 0 < num_convs <= len(convs):
            raise ValueError(f"num_convs must be in 1..{len(convs)}, got {num_convs}")
        convs = convs[:num_convs]
    expected = sum(t.numel() for c, b in convs for t in _tensors(c, b))
    body = len(buf) - off
    found = body // 4
    what = f"{len(convs)} convs of {type(net).__name__}"
    if body % 4:
        raise DarknetWeightsError(f"{path_s}: {body} bytes after the header is not a whole number of "
                                  f"float32 values (expected {expected} floats for {what})")
    if found != expected:
        kind = "truncated" if found < expected else "too long"
        raise DarknetWeightsError(f"{path_s}: {kind}: expected {expected} floats for {what}, found "
                                  f"{found} (a different architecture, class count or a damaged file?)")
    data = np.frombuffer(buf, dtype="<f4", offset=off, count=found)
    if not np.isfinite(data).all():
        raise DarknetWeightsError(f"{path_s}: contains non-finite values")
    pos = 0
    with torch.no_grad():
        for conv, bn in convs:
            for t in _tensors(conv, bn):
                n = t.numel()
                src = torch.from_numpy(data[pos:pos + n].copy()).view_as(t)
                t.copy_(src.to(device=t.device, dtype=t.dtype))
                pos += n
    return header


def save_darknet_weights(net: nn.Module, path: str | os.PathLike, seen: int = 0,
                         num_convs: int | None = None) -> None:
    """Write ``net`` (its first ``num_convs`` convs) as a Darknet ``.weights`` file (header 0.2.5, int64
    ``seen``), atomically (temp file, then rename)."""
    convs = _convs(net)[:num_convs]
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    chunks = [struct.pack("<3iq", 0, 2, 5, int(seen))]
    for conv, bn in convs:
        for t in _tensors(conv, bn):
            chunks.append(t.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes())
    with open(tmp, "wb") as f:
        for c in chunks:
            f.write(c)
    os.replace(tmp, p)
