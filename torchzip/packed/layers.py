"""Layer kinds: which modules passes target, and the packed inference layers ``freeze`` swaps in.

A layer kind names a module type (matched exactly, so subclasses are never taken by accident),
and says how to build the packed layer that replaces such a module. :data:`LAYER_KINDS` is the
one table passes (``targets``), ``freeze``, ``export``/``load`` and ``summary`` read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from torchzip.packed.base import PackedWeight


class PackedLayer(nn.Module):
    """Base of the packed inference layers: one packed weight (``.packed``) and an optional bias.

    ``kind`` is the layer kind it replaces (see :data:`LAYER_KINDS`).
    """

    kind = ""

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.packed = packed
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)


class PackedLinear(PackedLayer):
    """``nn.Linear`` whose weight is packed; ``forward`` is the format's (kernel-backed) linear."""

    kind = "Linear"

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None) -> None:
        super().__init__(packed, bias)
        self.in_features, self.out_features = packed.shape[1], packed.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        """Dense weight, for code that reads ``.weight`` (e.g. ``nn.MultiheadAttention``)."""
        return self.packed.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.packed.linear(x, self.bias)


class PackedConv(PackedLayer):
    """``nn.Conv1d``/``nn.Conv2d`` with a packed weight (rows: output channels, columns: the rest)."""

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None, conv: nn.Module) -> None:
        super().__init__(packed, bias)
        self.weight_shape = tuple(conv.weight.shape)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.groups, self.padding_mode = conv.groups, conv.padding_mode
        # What nn.ConvNd pads explicitly for non-zero modes (also right for padding="same").
        self.explicit_pad = tuple(conv._reversed_padding_repeated_twice)
        self.dims = len(self.weight_shape) - 2

    @property
    def kind(self) -> str:
        return f"Conv{self.dims}d"

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


class PackedEmbedding(PackedLayer):
    """``nn.Embedding`` with a packed table (rows: embeddings)."""

    kind = "Embedding"

    def __init__(self, packed: PackedWeight, emb: nn.Embedding) -> None:
        super().__init__(packed, None)
        self.num_embeddings, self.embedding_dim = packed.shape
        self.padding_idx, self.max_norm, self.norm_type = emb.padding_idx, emb.max_norm, emb.norm_type
        self.scale_grad_by_freq, self.sparse = emb.scale_grad_by_freq, emb.sparse

    @property
    def weight(self) -> torch.Tensor:
        """Dense embedding table."""
        return self.packed.dequantize()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight, self.padding_idx, self.max_norm, self.norm_type)


@dataclass(frozen=True)
class LayerKind:
    """A module type passes can target, and the packed layer that replaces it after ``freeze``.

    ``build(module, packed, bias)`` returns that packed layer; ``bias`` is the (maybe re-read)
    bias to give it, None for layers without one.
    """

    name: str
    module_type: type[nn.Module]
    build: Callable[[nn.Module, PackedWeight, torch.Tensor | None], nn.Module]


LAYER_KINDS: dict[str, LayerKind] = {}


def register_layer_kind(kind: LayerKind) -> LayerKind:
    """Add a layer kind; its name becomes a valid entry of a pass's ``targets``."""
    other = LAYER_KINDS.get(kind.name)
    if other is not None and other != kind:
        raise ValueError(f"layer kind '{kind.name}' is already registered for {other.module_type.__qualname__}")
    LAYER_KINDS[kind.name] = kind
    return kind


for _kind in (
    LayerKind("Linear", nn.Linear, lambda m, p, b: PackedLinear(p, b)),
    LayerKind("Conv1d", nn.Conv1d, lambda m, p, b: PackedConv(p, b, m)),
    LayerKind("Conv2d", nn.Conv2d, lambda m, p, b: PackedConv(p, b, m)),
    LayerKind("Embedding", nn.Embedding, lambda m, p, b: PackedEmbedding(p, m)),
):
    register_layer_kind(_kind)
DEFAULT_TARGETS = ("Linear", "Conv1d", "Conv2d", "Embedding")


def kind_of(module: nn.Module) -> LayerKind | None:
    """The layer kind of ``module``, by exact type (parametrized modules count as their own type)."""
    cls = parametrize.type_before_parametrizations(module)
    return next((k for k in LAYER_KINDS.values() if k.module_type is cls), None)


_KEEP = object()


def wrap(module: nn.Module, packed: PackedWeight, bias: torch.Tensor | None = _KEEP) -> nn.Module:
    """The packed layer that replaces ``module`` (with ``module``'s bias unless one is given)."""
    kind = kind_of(module)
    if kind is None:
        raise TypeError(f"no layer kind for {type(module).__name__}; known: {sorted(LAYER_KINDS)}")
    return kind.build(module, packed, getattr(module, "bias", None) if bias is _KEEP else bias)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where the submodule ``name`` is; returns the model (``new`` itself when
    ``name`` is empty, i.e. the model is that module)."""
    if not name:
        return new
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)
    return model
