"""Dense codebook weight: bit-packed centroid indices and a per-layer or per-channel codebook."""

from __future__ import annotations

import torch

from torchzip.packed.base import PackedWeight
from torchzip.packed.bits import pack_bits, unpack_bits


class CodebookWeight(PackedWeight):
    """``W[n, k] = codebook[n or 0, index[n, k]]``, indices packed ``bits`` wide in int32 words."""

    format_name = "codebook"

    def __init__(self, packed: torch.Tensor, codebook: torch.Tensor, bits: int, shape, dtype: torch.dtype) -> None:
        super().__init__(shape, dtype)
        self.bits = int(bits)
        self.register_buffer("packed", packed.to(torch.int32))
        self.register_buffer("codebook", codebook.float())

    @classmethod
    def from_indices(cls, indices: torch.Tensor, codebook: torch.Tensor, bits: int, dtype: torch.dtype) -> "CodebookWeight":
        """Pack ``[N, K]`` integer indices into a codebook weight."""
        return cls(pack_bits(indices, bits), codebook, bits, tuple(indices.shape), dtype)

    def indices(self) -> torch.Tensor:
        """The ``[N, K]`` centroid indices (int64)."""
        return unpack_bits(self.packed, self.bits, self.shape[1])

    def dequantize(self) -> torch.Tensor:
        idx = self.indices()
        book = self.codebook if self.codebook.shape[0] > 1 else self.codebook.expand(self.shape[0], -1)
        return torch.gather(book, 1, idx).to(self.dtype)

    def kernel_linear(self, x, bias):
        from torchzip.kernels import dispatch

        return dispatch.codebook_linear(x, self.packed, self.codebook, bias, self.bits, self.shape[1])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, codebooks={self.codebook.shape[0]}"
