"""Inference layers that hold a packed weight: the modules ``torchzip.freeze`` swaps in."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torchzip.packed.base import PackedWeight


class PackedLinear(nn.Module):
    """``nn.Linear`` whose weight is packed; ``forward`` is the format's (kernel-backed) linear."""

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.packed = packed
        self.in_features, self.out_features = packed.shape[1], packed.shape[0]
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """Dense weight, for code that reads ``.weight`` (e.g. ``nn.MultiheadAttention``)."""
        return self.packed.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.packed.linear(x, self.bias)


class PackedConv(nn.Module):
    """``nn.Conv1d``/``nn.Conv2d`` with a packed weight (rows: output channels, columns: the rest)."""

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None, conv: nn.Module) -> None:
        super().__init__()
        self.packed = packed
        self.weight_shape = tuple(conv.weight.shape)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.groups, self.padding_mode = conv.groups, conv.padding_mode
        # What nn.ConvNd pads explicitly for non-zero modes (also right for padding="same").
        self.explicit_pad = tuple(conv._reversed_padding_repeated_twice)
        self.dims = len(self.weight_shape) - 2
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """Dense weight in the original conv shape."""
        return self.packed.dequantize().view(self.weight_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = F.conv1d if self.dims == 1 else F.conv2d
        w = self.weight.to(x.dtype)
        if self.padding_mode != "zeros":
            x = F.pad(x, self.explicit_pad, mode=self.padding_mode)
            return conv(x, w, self.bias, self.stride, 0, self.dilation, self.groups)
        return conv(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class PackedEmbedding(nn.Module):
    """``nn.Embedding`` with a packed table (rows: embeddings)."""

    def __init__(self, packed: PackedWeight, emb: nn.Embedding) -> None:
        super().__init__()
        self.packed = packed
        self.num_embeddings, self.embedding_dim = packed.shape
        self.padding_idx, self.max_norm, self.norm_type = emb.padding_idx, emb.max_norm, emb.norm_type
        self.scale_grad_by_freq, self.sparse = emb.scale_grad_by_freq, emb.sparse

    @property
    def weight(self) -> torch.Tensor:
        """Dense embedding table."""
        return self.packed.dequantize()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight, self.padding_idx, self.max_norm, self.norm_type)


_KEEP = object()


def wrap(module: nn.Module, packed: PackedWeight, bias: torch.Tensor | None = _KEEP) -> nn.Module:
    """The packed layer that replaces ``module`` (with ``module``'s bias unless one is given)."""
    if isinstance(module, nn.Embedding):
        return PackedEmbedding(packed, module)
    bias = getattr(module, "bias", None) if bias is _KEEP else bias
    if isinstance(module, nn.Linear):
        return PackedLinear(packed, bias)
    return PackedConv(packed, bias, module)
