"""What every packed weight format has in common."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PackedWeight(nn.Module):
    """A 2-D weight ``[out_features, in_features]`` held in a compressed form.

    Subclasses register as buffers exactly the tensors that are the compressed form, so
    :meth:`nbytes` (and :func:`torchzip.summary`) count what is stored. ``linear`` runs a Triton
    kernel when the input is on CUDA and a torch reference everywhere else.
    """

    format_name = "base"

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype) -> None:
        super().__init__()
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = dtype

    def dequantize(self) -> torch.Tensor:
        """The dense weight, in the original dtype."""
        raise NotImplementedError

    def kernel_linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W.T + bias`` through the format's Triton kernel."""
        raise NotImplementedError

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W.T + bias``: the Triton kernel on CUDA, dequantize + ``F.linear`` elsewhere."""
        from torchzip.kernels import dispatch

        if dispatch.use_kernels(x):
            return self.kernel_linear(x, bias)
        return F.linear(x, self.dequantize().to(x.dtype), None if bias is None else bias.to(x.dtype))

    def nbytes(self) -> int:
        """Bytes of the tensors that make up the compressed form."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    @property
    def sparsity(self) -> float:
        """Fraction of weights that are exactly zero."""
        w = self.dequantize()
        return float((w == 0).sum()) / max(w.numel(), 1)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, dtype={self.dtype}"
