"""int8 weight-only quantization: symmetric, per output channel or per group of input columns.

While fine-tuning, the weight passes through :class:`Int8FakeQuant`, so the model trains against
exactly what ``freeze`` will store, with a straight-through gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from torchzip.errors import RecipeError
from torchzip.packed.values import Int8Values, int8_quantize
from torchzip.passes.base import register_pass
from torchzip.packed.layers import WeightView
from torchzip.passes.layer import LayerPass, attach


class Int8FakeQuant(nn.Module):
    """Parametrization: the tensor rounded to int8 with dynamic scales, one per output channel
    (or per group of ``group_size`` columns), or one for the whole tensor (``per_tensor``)."""

    role = "quantized"

    def __init__(self, group_size: int, per_tensor: bool = False, view: WeightView | None = None) -> None:
        super().__init__()
        self.group_size, self.per_tensor, self.view = group_size, per_tensor, view or WeightView()
        self.key = "quantize_bias" if per_tensor else "quantize"

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        w2 = w.reshape(1, -1) if self.per_tensor else self.view.matrix(w)
        q, scales = int8_quantize(w2, self.group_size)
        n, k = w2.shape
        g = self.group_size or k
        deq = (q.float().view(n, k // g, g) * scales.unsqueeze(-1)).view(n, k).to(w.dtype)
        # Straight-through: the value is exactly deq (adding an exact zero), the gradient is w's.
        out = (deq.view(w.shape) if self.per_tensor else self.view.tensor(deq, w.shape)) + (w - w.detach())
        return out.contiguous()  # a transposed view (HF Conv1D) reaches the layer in the layout it stores

    def describe(self, state, w: torch.Tensor) -> None:
        """For ``freeze``: quantize what this parametrization saw (not its output), exactly as it did."""
        q, scales = int8_quantize(self.view.matrix(w.detach()), self.group_size)
        state.values = Int8Values(q, scales, self.group_size)


@register_pass
@dataclass
class Quantize(LayerPass):
    """int8 weight-only quantization (``bits`` must be 8). ``group_size`` 0: one scale per output
    channel; otherwise one scale per ``group_size`` consecutive input weights."""

    key = "quantize"
    role = "quantized"
    bits: int = 8
    group_size: int = 0

    def validate(self, where: str) -> None:
        """Raise :class:`RecipeError` for argument values that cannot work."""
        if type(self.bits) is not int or self.bits != 8:
            raise RecipeError(f"quantize supports bits=8 only, got {self.bits!r} in {where}; use 'codebook' for 1..8-bit weight sharing")
        if type(self.group_size) is not int or self.group_size < 0:
            raise RecipeError(f"group_size must be 0 (per channel) or a positive integer, got {self.group_size!r} in {where}")

    def unfit(self, name: str, module: nn.Module) -> str | None:
        """Why ``module`` cannot take this quantization, or None."""
        for t, view in self.tensors(module):
            k = view.matrix_shape(getattr(module, t).shape)[1]
            if self.group_size and k % self.group_size:
                what = f"layer '{name}'" if t == "weight" else f"'{name}.{t}'"
                return f"group_size {self.group_size} does not divide in_features {k} of {what}"
        return None

    def apply(self, model: nn.Module, plan: list, group: str, progress: bool = False) -> None:
        """Attach fake-quantization to the planned layers."""
        attach(plan, lambda own, module, tensor, view: Int8FakeQuant(own.group_size, view=view))


@register_pass
@dataclass
class QuantizeBias(LayerPass):
    """int8 biases with one scale per layer (fake-quantized while trainable). Tiny layers' fp32
    biases can outweigh their compressed weights; ``export`` stores these biases as int8."""

    key = "quantize_bias"
    role = "quantized"
    tensor = "bias"

    def unfit(self, name: str, module: nn.Module) -> str | None:
        """Layers without a bias cannot take it."""
        return None if self.tensors(module) else f"layer '{name}' has no bias"

    def apply(self, model: nn.Module, plan: list, group: str, progress: bool = False) -> None:
        """Attach per-tensor int8 fake-quantization to the planned layers' biases."""
        attach(plan, lambda own, module, tensor, view: Int8FakeQuant(0, per_tensor=True))

