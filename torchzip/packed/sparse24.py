"""2:4 semi-structured sparse weight: two kept values per group of four input columns.

``values[n, j]`` is the ``j``-th kept value of row ``n``; it sits at column
``4 * (j // 2) + position[n, j]``, where the 2-bit positions (ascending within each group) are
packed 16 to an int32 word by :func:`torchzip.packed.bits.pack_bits`. Values are floats, int8 with
scales, or codebook indices (see :mod:`torchzip.packed.values`). In a file, each group's pair of
positions is one of 6 symbols (:mod:`torchzip.export.streams`).
"""

from __future__ import annotations

import weakref

import torch

from torchzip.export.streams import pairs24_decode, pairs24_encode
from torchzip.packed.base import PackedWeight, WeightState, register_format
from torchzip.packed.bits import pack_bits, unpack_bits
from torchzip.packed.values import (SparseValues, check_value_args, decode_side, decode_values_stream, encode_values,
                                    stored_values)


@register_format
class Sparse24Weight(SparseValues, PackedWeight):
    """2:4 sparse weight with float, int8 or codebook values."""

    format_name = "sparse24"
    priority = 10

    def __init__(self, values, positions, shape, dtype, scales=None, codebook=None, group_size: int = 0) -> None:
        PackedWeight.__init__(self, shape, dtype)
        self._init_values(values, scales, codebook, group_size)
        self.register_buffer("positions", positions.to(torch.int32).contiguous())

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

    @classmethod
    def pack(cls, state: WeightState) -> "Sparse24Weight | None":
        """A 2:4 pruning mask, whatever the values."""
        if state.pattern != "2:4" or state.mask is None:
            return None  # asked before the stored values, which may cost a full-size copy
        stored = stored_values(state)
        if stored is None:
            return None
        values, side = stored
        return cls.build(values, state.mask, state.dtype, **side)

    def columns(self) -> torch.Tensor:
        """Column of every stored value, ``[N, K/2]`` int64."""
        n, k = self.shape
        pos = unpack_bits(self.positions, 2, k // 2)
        return pos + 4 * (torch.arange(k // 2, device=pos.device) // 2)

    def dequantize(self) -> torch.Tensor:
        n, k = self.shape
        cols = self.columns()
        rows = torch.arange(n, device=cols.device).unsqueeze(1).expand_as(cols)
        w = torch.zeros(n, k, dtype=torch.float32, device=cols.device)
        return w.scatter_(1, cols, self._decode(self.values, rows, cols)).to(self.dtype)

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self._rows(rows, len(rows)).dequantize()

    def row_view(self, start: int, stop: int) -> "Sparse24Weight":
        return self._rows(slice(start, stop), stop - start)

    def _rows(self, rows, count: int) -> "Sparse24Weight":
        return Sparse24Weight(self.values[rows], self.positions[rows], (count, self.shape[1]), self.dtype, **self._side(rows))

    def kernel_linear(self, x, bias):
        from torchzip.kernels import sparse24

        return sparse24.sparse24_linear(
            x, self.values, self.positions, self.scales, self.codebook, bias, self.group_size, self.shape[1],
            self._gemv_words(),
        )

    def _gemv_words(self) -> torch.Tensor | None:
        """The GEMV's rearranged copy of ``positions`` (``kernels.sparse24.gemv_words``, same size):
        built on first use, rebuilt when ``positions`` is replaced or changed in place. A
        torch.compile trace uses the cached copy or none (the kernel then builds it per call)."""
        cached = self.__dict__.get("_words")
        if torch.compiler.is_compiling():
            return cached[2] if cached is not None else None
        if cached is not None and cached[0]() is self.positions and cached[1] == self.positions._version:
            return cached[2]
        from torchzip.kernels import sparse24

        words = sparse24.gemv_words(self.positions)
        # A weak reference: the cache must not keep positions alive after .to() replaces them.
        self.__dict__["_words"] = (weakref.ref(self.positions), self.positions._version, words)
        return words

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("_words", None)  # weak references do not pickle; the cache rebuilds itself
        return state

    def encode(self, out):
        cols = self.columns().cpu().numpy()
        t = {"positions": out.symbols(pairs24_encode(cols % 4), 6)}
        t.update(encode_values(out, self.kind, self.values, self.scales, self.codebook, self.dtype))
        return {"values": self.kind, "group_size": self.group_size, "tensors": t}

    @classmethod
    def decode(cls, entry, src, shape, dtype):
        n, k = shape
        kind, g = check_value_args(src, entry, k)
        src.need(k % 4 == 0, f"2:4 weight needs in_features divisible by 4, got {k}")
        t = entry["tensors"]
        scales, codebook = decode_side(src, t, kind, g, n, k, dtype)
        sym = src.symbols(t.get("positions"), "positions", 6).numpy()
        src.need(sym.size == n * k // 4, f"{sym.size} position pairs for a {n}x{k} weight")
        pos = torch.from_numpy(pairs24_decode(sym).reshape(n, k // 2))
        values = decode_values_stream(src, t, kind, n * k // 2, codebook, dtype).reshape(n, k // 2)
        return cls(values, pack_bits(pos, 2), (n, k), dtype, scales, codebook, g)
