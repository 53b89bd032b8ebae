"""How the stored values of a packed weight turn back into floats.

Three kinds, shared by every packed format:
- ``float``: values are the weights themselves (any float dtype);
- ``int8``: ``value * scales[row, col // group_size]`` (one column of scales when per channel);
- ``codebook``: ``codebook[row or 0, value]`` (one codebook row when per layer).
"""

from __future__ import annotations

import torch

VALUE_KINDS = ("float", "int8", "codebook")


def value_kind(scales: torch.Tensor | None, codebook: torch.Tensor | None) -> str:
    """Name the value kind from which side tensors are present."""
    if codebook is not None:
        return "codebook"
    return "int8" if scales is not None else "float"


def group_of(cols: torch.Tensor, group_size: int) -> torch.Tensor:
    """Scale column for each weight column (0 for per-channel scales)."""
    return cols // group_size if group_size else torch.zeros_like(cols)


def decode_values(
    values: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    scales: torch.Tensor | None,
    codebook: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """Float32 weights for stored ``values`` at positions ``(rows, cols)``."""
    if codebook is not None:
        book_row = rows if codebook.shape[0] > 1 else torch.zeros_like(rows)
        return codebook[book_row, values.long()]
    if scales is not None:
        return values.float() * scales[rows, group_of(cols, group_size)]
    return values.float()


def int8_quantize(w: torch.Tensor, group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 of a 2-D weight: per output channel, or per ``group_size`` columns.

    Returns ``(q, scales)`` with ``q`` int8 in [-127, 127] and ``scales`` float32 ``[N, G]``;
    ``q * scale`` differs from ``w`` by at most ``scale / 2``.
    """
    n, k = w.shape
    g = group_size or k
    grouped = w.detach().float().reshape(n, k // g, g)
    amax = grouped.abs().amax(-1)
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(grouped / scales.unsqueeze(-1)).clamp_(-127, 127)
    return q.reshape(n, k).to(torch.int8), scales
