"""Dense int8 weight with float32 scales per output channel or per group of columns."""

from __future__ import annotations

import torch

from torchzip.packed.base import PackedWeight
from torchzip.packed.values import int8_quantize


class Int8Weight(PackedWeight):
    """``W[n, k] = qweight[n, k] * scales[n, k // group_size]`` (``group_size`` 0: per channel)."""

    format_name = "int8"

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype) -> None:
        super().__init__(tuple(qweight.shape), dtype)
        self.group_size = int(group_size)
        self.register_buffer("qweight", qweight.to(torch.int8))
        self.register_buffer("scales", scales.float())

    @classmethod
    def from_float(cls, w: torch.Tensor, group_size: int = 0) -> "Int8Weight":
        """Quantize a float weight."""
        q, scales = int8_quantize(w, group_size)
        return cls(q, scales, group_size, w.dtype)

    def dequantize(self) -> torch.Tensor:
        n, k = self.shape
        g = self.group_size or k
        w = self.qweight.float().view(n, k // g, g) * self.scales.unsqueeze(-1)
        return w.view(n, k).to(self.dtype)

    def kernel_linear(self, x, bias):
        from torchzip.kernels import dispatch

        return dispatch.int8_linear(x, self.qweight, self.scales, bias, self.group_size)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"
