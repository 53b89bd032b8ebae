"""Dense int8 weight with float32 scales per output channel or per group of columns."""

from __future__ import annotations

import torch

from torchzip.kernels import cpu
from torchzip.packed.base import PackedWeight, WeightState, register_format
from torchzip.packed.values import Int8Values, check_group_size, int8_quantize, read_table, table


@register_format
class Int8Weight(PackedWeight):
    """``W[n, k] = qweight[n, k] * scales[n, k // group_size]`` (``group_size`` 0: per channel)."""

    format_name = "int8"
    priority = 40

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype) -> None:
        super().__init__(tuple(qweight.shape), dtype)
        self.group_size = int(group_size)
        self.register_buffer("qweight", qweight.to(torch.int8).contiguous())
        self.register_buffer("scales", scales.float().contiguous())

    @classmethod
    def from_float(cls, w: torch.Tensor, group_size: int = 0) -> "Int8Weight":
        """Quantize a float weight."""
        q, scales = int8_quantize(w, group_size)
        return cls(q, scales, group_size, w.dtype)

    @classmethod
    def pack(cls, state: WeightState) -> "Int8Weight | None":
        """int8 values that no sparse format took."""
        v = state.values
        return cls(v.q, v.scales, v.group_size, state.dtype) if isinstance(v, Int8Values) else None

    def dequantize(self) -> torch.Tensor:
        return self._dequantize(self.qweight, self.scales)

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self._dequantize(self.qweight[rows], self.scales[rows])

    def dequantize_block(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        q, scales = self.qweight[start:stop], self.scales[start:stop]
        if out.dtype != torch.float32 or self.dtype != torch.float32:
            return out.copy_(self._dequantize(q, scales))
        rows, k = q.shape
        g = self.group_size or k
        if q.device.type == "cpu" and cpu.available():  # one pass, the same bits
            return cpu.int8_dequantize_rows(q, scales.float().contiguous(), g, out)
        # Widen into the buffer, then scale in place (still in cache): the same single rounding as
        # _dequantize, and faster than a mixed-dtype multiply.
        out.copy_(q)
        out.view(rows, k // g, g).mul_(scales.unsqueeze(-1))
        return out

    def _dequantize(self, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        n, k = q.shape
        g = self.group_size or k
        return (q.float().view(n, k // g, g) * scales.unsqueeze(-1)).view(n, k).to(self.dtype)

    def row_view(self, start: int, stop: int) -> "Int8Weight":
        return Int8Weight(self.qweight[start:stop], self.scales[start:stop], self.group_size, self.dtype)

    def cpu_linear(self, x, bias):
        # The fused kernel reads the int8 weights once per four rows of x, widening and scaling in
        # registers; more rows take the blocked dequantize + BLAS matmul. It sums in fp32 whatever
        # x's dtype (the weights as q * scale in fp32, which a bf16/fp16 layer would round).
        k = self.shape[1]
        m = cpu.fused_rows(x, k, cpu.INT8_MAX_M)
        if not m:
            return None
        y = cpu.int8_linear(x.reshape(m, k).float(), self.qweight, self.scales, self.group_size or k)
        return cpu.fused_output(y, x, bias)

    def kernel_linear(self, x, bias):
        from torchzip.kernels import int8

        return int8.int8_linear(x, self.qweight, self.scales, bias, self.group_size)

    def encode(self, out):
        return {"group_size": self.group_size,
                "tensors": {"qweight": out.int8(self.qweight), "scales": out.raw(table(self.scales, self.dtype))}}

    @classmethod
    def decode(cls, entry, src, shape, dtype):
        n, k = shape
        g = check_group_size(src, entry, k)
        t = entry["tensors"]
        scales = read_table(src, t.get("scales"), "scales", dtype)
        src.need(tuple(scales.shape) == (n, k // g if g else 1), f"scales shape {tuple(scales.shape)} does not fit")
        qweight = src.int8(t.get("qweight"), n * k, "qweight", on_device=True).reshape(n, k)
        return cls(qweight, scales, g, dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"
