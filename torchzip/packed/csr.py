"""Unstructured sparse weight in compressed-sparse-row form, for high sparsity.

Row ``n`` keeps ``values[row_ptr[n]:row_ptr[n+1]]`` at columns ``col_idx[same range]`` (ascending).
Column indices are int16 when ``in_features <= 32768``, else int32. Values are floats, int8 with
scales, or uint8 codebook indices (see :mod:`torchzip.packed.values`). One row per GPU program
suits batch-1 GEMV at 80-95% sparsity.
"""

from __future__ import annotations

import torch

from torchzip.packed.base import PackedWeight
from torchzip.packed.values import decode_values, value_kind


class CsrWeight(PackedWeight):
    """CSR sparse weight with float, int8 or codebook values."""

    format_name = "csr"

    def __init__(self, row_ptr, col_idx, values, shape, dtype, scales=None, codebook=None, group_size: int = 0) -> None:
        super().__init__(shape, dtype)
        self.group_size = int(group_size)
        self.register_buffer("row_ptr", row_ptr.to(torch.int32))
        self.register_buffer("col_idx", col_idx)
        self.register_buffer("values", values)
        self.register_buffer("scales", None if scales is None else scales.float())
        self.register_buffer("codebook", None if codebook is None else codebook.float())

    @property
    def kind(self) -> str:
        """Value kind: ``float``, ``int8`` or ``codebook``."""
        return value_kind(self.scales, self.codebook)

    @staticmethod
    def index_dtype(k: int) -> torch.dtype:
        """Smallest column-index dtype for ``k`` input columns."""
        return torch.int16 if k <= 2**15 else torch.int32

    @classmethod
    def build(cls, values, mask, dtype, scales=None, codebook=None, group_size: int = 0) -> "CsrWeight":
        """From a full ``[N, K]`` tensor of stored values (floats, int8 or indices) and a keep-mask."""
        n, k = mask.shape
        rows, cols = mask.nonzero(as_tuple=True)  # row-major, so columns ascend within a row
        counts = torch.bincount(rows, minlength=n)
        row_ptr = torch.zeros(n + 1, dtype=torch.int64, device=mask.device)
        row_ptr[1:] = torch.cumsum(counts, 0)
        return cls(row_ptr, cols.to(cls.index_dtype(k)), values[rows, cols], (n, k), dtype, scales, codebook, group_size)

    @staticmethod
    def bytes_for(n: int, k: int, nnz: int, value_bytes: float) -> float:
        """Bytes a CSR weight of this size would take (to choose it over a dense form)."""
        index_bytes = 2 if k <= 2**15 else 4
        return 4 * (n + 1) + nnz * (index_bytes + value_bytes)

    def rows(self) -> torch.Tensor:
        """Row of every stored value (int64)."""
        counts = (self.row_ptr[1:] - self.row_ptr[:-1]).long()
        return torch.repeat_interleave(torch.arange(self.shape[0], device=counts.device), counts)

    def dequantize(self) -> torch.Tensor:
        rows, cols = self.rows(), self.col_idx.long()
        vals = decode_values(self.values, rows, cols, self.scales, self.codebook, self.group_size)
        w = torch.zeros(self.shape, dtype=torch.float32, device=vals.device)
        w[rows, cols] = vals
        return w.to(self.dtype)

    def kernel_linear(self, x, bias):
        from torchzip.kernels import dispatch

        return dispatch.csr_linear(
            x, self.row_ptr, self.col_idx, self.values, self.scales, self.codebook, bias, self.group_size, self.shape[1]
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nnz={self.values.numel()}, values={self.kind}"
