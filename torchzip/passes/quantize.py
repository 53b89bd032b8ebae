"""int8 weight-only quantization: symmetric, per output channel or per group of input columns.

While fine-tuning, the weight passes through :class:`Int8FakeQuant`, so the model trains against
exactly what ``freeze`` will store, with a straight-through gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from torchzip.errors import RecipeError
from torchzip.packed.values import HALF_DTYPES, Int8Values, int8_quantize, round_up_to
from torchzip.passes.base import check_choice, register_pass
from torchzip.packed.layers import WeightView
from torchzip.passes.calibrated import act_order, gptq, int8_round, search_int8_scales
from torchzip.passes.layer import LayerPass, attach, raw_tensor
from torchzip.passes.prune import masks_of

METHODS = ("auto", "round", "gptq")


class Int8FakeQuant(nn.Module):
    """Parametrization: the tensor rounded to int8 with dynamic scales, one per output channel
    (or per group of ``group_size`` columns), or one for the whole tensor (``per_tensor``).
    ``scales`` (``[N, G]`` float32): fixed scales chosen on calibration data instead."""

    role = "quantized"

    def __init__(self, group_size: int, per_tensor: bool = False, view: WeightView | None = None,
                 scales: torch.Tensor | None = None) -> None:
        super().__init__()
        self.group_size, self.per_tensor, self.view = group_size, per_tensor, view or WeightView()
        self.key = "quantize_bias" if per_tensor else "quantize"
        self.register_buffer("scales", scales)


    def forward(self, w: torch.Tensor) -> torch.Tensor:
        w2 = w.reshape(1, -1) if self.per_tensor else self.view.matrix(w)
        q, scales = int8_quantize(w2, self.group_size, self.scales)
        n, k = w2.shape
        g = self.group_size or k
        deq = (q.float().view(n, k // g, g) * scales.unsqueeze(-1)).view(n, k).to(w.dtype)
        # Straight-through: the value is exactly deq (adding an exact zero), the gradient is w's.
        out = (deq.view(w.shape) if self.per_tensor else self.view.tensor(deq, w.shape)) + (w - w.detach())
        return out.contiguous()  # a transposed view (HF Conv1D) reaches the layer in the layout it stores

    def describe(self, state, w: torch.Tensor) -> None:
        """For ``freeze``: quantize what this parametrization saw (not its output), exactly as it did."""
        q, scales = int8_quantize(self.view.matrix(w.detach()), self.group_size, self.scales)
        state.values = Int8Values(q, scales, self.group_size)


@register_pass
@dataclass
class Quantize(LayerPass):
    """int8 weight-only quantization (``bits`` must be 8). ``group_size`` 0: one scale per output
    channel; otherwise one scale per ``group_size`` consecutive input weights. ``method``:
    ``round`` (to nearest, scales from ``max|w|``), ``gptq`` (scales and rounding chosen for the
    least output error on calibration data), ``auto``: ``gptq`` when ``compress`` is given
    calibration data, else ``round``."""

    key = "quantize"
    role = "quantized"
    bits: int = 8
    group_size: int = 0
    method: str = "auto"

    def validate(self, where: str) -> None:
        """Raise :class:`RecipeError` for argument values that cannot work."""
        if type(self.bits) is not int or self.bits != 8:
            raise RecipeError(f"quantize supports bits=8 only, got {self.bits!r} in {where}; use 'codebook' for 1..8-bit weight sharing")
        if type(self.group_size) is not int or self.group_size < 0:
            raise RecipeError(f"group_size must be 0 (per channel) or a positive integer, got {self.group_size!r} in {where}")
        check_choice(where, "method", self.method, METHODS)

    def needs_calibration(self) -> bool:
        """GPTQ needs calibration data."""
        return self.method == "gptq"

    def uses_calibration(self) -> bool:
        """Uses data when given unless ``method`` is ``round``."""
        return self.method != "round"

    def compress_calibrated(self, name: str, module: nn.Module, h: torch.Tensor, group: str) -> None:
        """GPTQ int8 of one layer: per-row (or per-group) scales searched for the least output
        error, then rounding with error feedback; the master weight becomes the rounded one."""
        (tensor, view), = self.tensors(module)
        w = getattr(module, tensor)
        m = view.matrix(w.detach())
        n, k = m.shape
        g = self.group_size or k
        mask = masks_of(module, tensor)
        keep = None if mask is None else view.matrix(mask.mask)
        scales = torch.zeros(n, k // g, dtype=torch.float64, device=m.device)

        def fit(j: int, cols: torch.Tensor) -> None:
            s = search_int8_scales(cols, h[j:j + g, j:j + g]).float()
            scales[:, j // g] = (round_up_to(s, w.dtype) if w.dtype in HALF_DTYPES else s).double()

        def rounded(j: int, col: torch.Tensor) -> torch.Tensor:
            return int8_round(col.unsqueeze(1), scales[:, j // g]).squeeze(1)

        if self.group_size:  # group scales fitted as the feedback reaches each group, in column order
            new = gptq(m, h, rounded, keep=keep, group_size=g, fit_group=fit)
        else:  # row scales from the weight as it is, then columns in act order
            fit(0, m)
            new = gptq(m, h, rounded, keep=keep, order=act_order(h))
        with torch.no_grad():
            raw_tensor(module, tensor).copy_(view.tensor(new.to(w.dtype), w.shape))
        fixed = scales.float()
        attach([(name, module, self)], lambda own, mod, t, v: Int8FakeQuant(self.group_size, view=v, scales=fixed))

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

