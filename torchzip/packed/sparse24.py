"""2:4 semi-structured sparse weight: two kept values per group of four input columns.

``values[n, j]`` is the ``j``-th kept value of row ``n``; it sits at column
``4 * (j // 2) + position[n, j]``, where the 2-bit positions (ascending within each group) are
packed 16 to an int32 word by :func:`torchzip.packed.bits.pack_bits`. Values are floats, int8 with
scales, or codebook indices (see :mod:`torchzip.packed.values`).
"""

from __future__ import annotations

import torch

from torchzip.packed.base import PackedWeight
from torchzip.packed.bits import pack_bits, unpack_bits
from torchzip.packed.values import decode_values, value_kind


class Sparse24Weight(PackedWeight):
    """2:4 sparse weight with float, int8 or codebook values."""

    format_name = "sparse24"

    def __init__(self, values, positions, shape, dtype, scales=None, codebook=None, group_size: int = 0) -> None:
        super().__init__(shape, dtype)
        self.group_size = int(group_size)
        self.register_buffer("values", values)
        self.register_buffer("positions", positions.to(torch.int32))
        self.register_buffer("scales", None if scales is None else scales.float())
        self.register_buffer("codebook", None if codebook is None else codebook.float())

    @property
    def kind(self) -> str:
        """Value kind: ``float``, ``int8`` or ``codebook``."""
        return value_kind(self.scales, self.codebook)

    @staticmethod
    def select(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept columns ``[N, K/2]`` (ascending) and their 2-bit positions, from a 2:4 mask."""
        n, k = mask.shape
        groups = mask.reshape(n, k // 4, 4)
        if not bool((groups.sum(-1) == 2).all()):
            raise ValueError("mask is not 2:4: every group of 4 input columns must keep exactly 2")
        # Stable sort puts the two kept slots of each group first, in ascending order.
        pos = torch.sort((~groups).to(torch.int8), dim=-1, stable=True).indices[..., :2]
        cols = pos + 4 * torch.arange(k // 4, device=mask.device).view(1, -1, 1)
        return cols.reshape(n, k // 2), pos.reshape(n, k // 2)

    @classmethod
    def build(cls, values, mask, dtype, scales=None, codebook=None, group_size: int = 0) -> "Sparse24Weight":
        """From a full ``[N, K]`` tensor of stored values (floats, int8 or indices) and a 2:4 mask."""
        cols, pos = cls.select(mask)
        kept = torch.gather(values, 1, cols)
        return cls(kept, pack_bits(pos, 2), tuple(mask.shape), dtype, scales, codebook, group_size)

    def columns(self) -> torch.Tensor:
        """Column of every stored value, ``[N, K/2]`` int64."""
        n, k = self.shape
        pos = unpack_bits(self.positions, 2, k // 2)
        return pos + 4 * (torch.arange(k // 2, device=pos.device) // 2)

    def dequantize(self) -> torch.Tensor:
        n, k = self.shape
        cols = self.columns()
        rows = torch.arange(n, device=cols.device).unsqueeze(1).expand_as(cols)
        vals = decode_values(self.values, rows, cols, self.scales, self.codebook, self.group_size)
        w = torch.zeros(n, k, dtype=torch.float32, device=cols.device)
        return w.scatter_(1, cols, vals).to(self.dtype)

    def kernel_linear(self, x, bias):
        from torchzip.kernels import dispatch

        return dispatch.sparse24_linear(
            x, self.values, self.positions, self.scales, self.codebook, bias, self.group_size, self.shape[1]
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, values={self.kind}"
