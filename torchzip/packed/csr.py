"""Unstructured sparse weight in compressed-sparse-row form, for high sparsity.

Row ``n`` keeps ``values[row_ptr[n]:row_ptr[n+1]]`` at columns ``col_idx[same range]`` (ascending).
Column indices are int16 when ``in_features <= 32768``, else int32. Values are floats, int8 with
scales, or uint8 codebook indices (see :mod:`torchzip.packed.values`). One row per GPU program
suits batch-1 GEMV at 80-95% sparsity. In a file, positions are gaps between flat indices, in
row- or column-major order, whichever codes smaller (:mod:`torchzip.export.streams`).
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from torchzip.errors import FormatError
from torchzip.export.streams import gaps_decode, gaps_encode
from torchzip.packed.base import PackedWeight, WeightState, register_format
from torchzip.packed.values import (CodebookValues, Int8Values, SparseValues, check_value_args, decode_side,
                                    decode_values_stream, encode_values, stored_values)


INT32_MAX = 2**31 - 1  # row_ptr is int32: a CSR weight holds at most this many nonzeros


@register_format
class CsrWeight(SparseValues, PackedWeight):
    """CSR sparse weight with float, int8 or codebook values."""

    format_name = "csr"
    priority = 20

    def __init__(self, row_ptr, col_idx, values, shape, dtype, scales=None, codebook=None, group_size: int = 0) -> None:
        PackedWeight.__init__(self, shape, dtype)
        self._init_values(values, scales, codebook, group_size)
        nnz = col_idx.numel()
        if nnz > INT32_MAX or values.numel() != nnz or row_ptr.numel() != shape[0] + 1:
            raise FormatError(f"CSR weight {tuple(shape)}: row_ptr must have {shape[0] + 1} entries and col_idx/values "
                              f"one length of at most {INT32_MAX} (int32 row offsets); got {row_ptr.numel()}, "
                              f"{nnz}, {values.numel()}")
        self.register_buffer("row_ptr", row_ptr.to(torch.int32).contiguous())
        self.register_buffer("col_idx", col_idx.contiguous())

    @staticmethod
    def index_dtype(k: int) -> torch.dtype:
        """Smallest column-index dtype for ``k`` input columns."""
        return torch.int16 if k <= 2**15 else torch.int32

    @classmethod
    def from_coo(cls, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape, dtype, scales=None,
                 codebook=None, group_size: int = 0) -> "CsrWeight":
        """From row-major ``(rows, cols, values)`` of the kept weights."""
        n, k = shape
        row_ptr = torch.zeros(n + 1, dtype=torch.int64, device=rows.device)
        row_ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
        return cls(row_ptr, cols.to(cls.index_dtype(k)), values, (n, k), dtype, scales, codebook, group_size)

    @classmethod
    def build(cls, values, mask, dtype, scales=None, codebook=None, group_size: int = 0) -> "CsrWeight":
        """From a full ``[N, K]`` tensor of stored values (floats, int8 or indices) and a keep-mask."""
        rows, cols = mask.nonzero(as_tuple=True)  # row-major, so columns ascend within a row
        return cls.from_coo(rows, cols, values[rows, cols], tuple(mask.shape), dtype, scales, codebook, group_size)

    @staticmethod
    def bytes_for(n: int, k: int, nnz: int, value_bytes: float) -> float:
        """Bytes a CSR weight of this size would take (to choose it over a dense form)."""
        index_bytes = 2 if k <= 2**15 else 4
        return 4 * (n + 1) + nnz * (index_bytes + value_bytes)

    @classmethod
    def pack(cls, state: WeightState) -> "CsrWeight | None":
        """Pruned codebook weights always (pruned zeros take no centroid); int8 and float values
        when CSR is smaller than their dense form."""
        if state.mask is None or bool(state.mask.all()):
            return None  # asked before the stored values, which may cost a full-size copy
        stored = stored_values(state)
        if stored is None:
            return None
        n, k = state.shape
        nnz = int(state.mask.sum())
        if nnz > INT32_MAX:
            return None  # int32 row offsets cannot address it: a dense format takes the layer
        if not isinstance(state.values, CodebookValues):
            value_bytes = 1 if isinstance(state.values, Int8Values) else state.weight.element_size()
            if cls.bytes_for(n, k, nnz, value_bytes) >= n * k * value_bytes:
                return None
        values, side = stored
        return cls.build(values, state.mask, state.dtype, **side)

    def rows(self) -> torch.Tensor:
        """Row of every stored value (int64)."""
        counts = (self.row_ptr[1:] - self.row_ptr[:-1]).long()
        # output_size (the static nnz) keeps the shape data-independent: no torch.compile graph break
        return torch.repeat_interleave(torch.arange(self.shape[0], device=counts.device), counts,
                                       output_size=self.col_idx.numel())

    def dequantize(self) -> torch.Tensor:
        rows, cols = self.rows(), self.col_idx.long()
        w = torch.zeros(self.shape, dtype=torch.float32, device=self.values.device)
        w[rows, cols] = self._decode(self.values, rows, cols)
        return w.to(self.dtype)

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # The gather below has a data-dependent size (a graph break); a compiled graph takes
            # the static-shape route through the whole weight instead.
            return self.dequantize()[rows]
        starts, lens = self.row_ptr[rows].long(), (self.row_ptr[rows + 1] - self.row_ptr[rows]).long()
        out_row = torch.repeat_interleave(torch.arange(len(rows), device=lens.device), lens)
        first = torch.cumsum(lens, 0) - lens  # where each selected row's nonzeros start in the gather
        at = starts[out_row] + torch.arange(out_row.numel(), device=lens.device) - first[out_row]
        cols = self.col_idx[at].long()
        w = torch.zeros(len(rows), self.shape[1], dtype=torch.float32, device=self.values.device)
        w[out_row, cols] = self._decode(self.values[at], rows[out_row], cols)
        return w.to(self.dtype)

    def row_view(self, start: int, stop: int) -> "CsrWeight":
        lo, hi = int(self.row_ptr[start]), int(self.row_ptr[stop])
        return CsrWeight(self.row_ptr[start: stop + 1] - lo, self.col_idx[lo:hi], self.values[lo:hi],
                         (stop - start, self.shape[1]), self.dtype, **self._side(slice(start, stop)))

    def kernel_linear(self, x, bias):
        from torchzip.kernels import csr

        return csr.csr_linear(
            x, self.row_ptr, self.col_idx, self.values, self.scales, self.codebook, bias, self.group_size, self.shape[1],
            self._kernel_segments(),
        )

    def _kernel_segments(self) -> list[torch.Tensor] | None:
        """The kernel's aligned copy of the nonzeros (``kernels.csr.aligned_segments``): built on
        first use, rebuilt when a buffer is replaced or changed in place. A torch.compile trace
        never builds it (data-dependent sizes); without one the kernel reads the plain CSR."""
        cached = self.__dict__.get("_segments")
        bufs = (self.row_ptr, self.col_idx, self.values)
        if torch.compiler.is_compiling():
            return cached[2] if cached is not None else None
        versions = tuple(t._version for t in bufs)
        if cached is not None and all(r() is t for r, t in zip(cached[0], bufs)) and cached[1] == versions:
            return cached[2]
        from torchzip.kernels import csr

        segments = csr.aligned_segments(*bufs)
        # Weak references: the cache must not keep buffers alive after .to() replaces them.
        self.__dict__["_segments"] = ([weakref.ref(t) for t in bufs], versions, segments)
        return segments

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("_segments", None)  # weak references do not pickle; the cache rebuilds itself
        return state

    def encode(self, out):
        n, k = self.shape
        rows, cols = self.rows().cpu().numpy(), self.col_idx.long().cpu().numpy()
        # Gaps in row-major or column-major order, whichever codes smaller (e.g. a dead input
        # feature prunes a whole column: one long gap column-major, many row-major).
        order = np.argsort(cols * n + rows, kind="stable")
        coded = {}
        for name, flat in (("row", rows * k + cols), ("col", (cols * n + rows)[order])):
            symbols, escape = gaps_encode(flat)
            coded[name] = (out.code(symbols, escape + 1), escape)
        best = min(coded, key=lambda o: out.coded_bytes(coded[o][0]))
        stream, escape = coded[best]
        values = self.values[torch.from_numpy(order).to(self.values.device)] if best == "col" else self.values
        t = {"positions": out.symbols(stream, escape + 1, escape=escape, count=int(rows.size), order=best)}
        t.update(encode_values(out, self.kind, values, self.scales, self.codebook, self.dtype))
        return {"values": self.kind, "group_size": self.group_size, "tensors": t}

    @classmethod
    def decode(cls, entry, src, shape, dtype):
        n, k = shape
        kind, g = check_value_args(src, entry, k)
        t = entry["tensors"]
        scales, codebook = decode_side(src, t, kind, g, n, k, dtype)
        spec = t.get("positions")
        src.need(isinstance(spec, dict) and type(spec.get("escape")) is int and spec["escape"] >= 1, "bad escape")
        src.need(spec.get("order", "row") in ("row", "col"),
                 f"position order must be 'row' or 'col', got {spec.get('order')!r}")
        sym = src.symbols(spec, "positions", spec["escape"] + 1).numpy()
        flat = torch.from_numpy(gaps_decode(sym, spec["escape"], n * k))
        src.need(spec.get("count") == flat.numel(), "position count does not match")
        values = decode_values_stream(src, t, kind, flat.numel(), codebook, dtype)
        if spec.get("order") == "col":  # back to row-major, values alongside
            flat = (flat % n) * k + flat // n
            flat, perm = torch.sort(flat)
            values = values[perm.to(values.device)]
        return cls.from_coo(flat // k, flat % k, values.cpu(), (n, k), dtype, scales, codebook, g)
