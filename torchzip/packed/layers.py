"""Layer kinds: which modules passes target, how their weights are seen as matrices, and the packed
inference layers ``freeze`` swaps in.

A layer kind names a module type (matched exactly, so subclasses are never taken by accident; a
type may be named as ``"package.module.Class"`` so that it needs no import), lists the weight
tensors it compresses (each with its bias, if any), says how each weight is seen as an
``[N, K]`` matrix (:class:`WeightView`: rows are output channels), and builds the packed layer
that replaces such a module. :data:`LAYER_KINDS` is the one table that passes (``targets``),
``freeze``, ``export``/``load`` and ``summary`` read; :func:`register_layer_kind` adds to it.

Packed layers return a :class:`~torchzip.packed.view.PackedView` from ``.weight``, so modules
that read weights themselves (attention, Swin) still run the packed kernels.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from torchzip.packed.base import PackedWeight
from torchzip.packed.view import PackedView


@dataclass(frozen=True)
class WeightView:
    """How a weight tensor is seen as ``[N, K]`` (rows: output channels, or the first dim).

    ``transposed``: the tensor stores ``[in, out]`` (Hugging Face ``Conv1D``); otherwise rows
    are the first dimension and the rest is flattened.
    """

    transposed: bool = False

    def matrix(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` as its ``[N, K]`` matrix (a view where possible)."""
        return w.transpose(0, 1) if self.transposed else w.reshape(w.shape[0], -1)

    def tensor(self, m: torch.Tensor, shape) -> torch.Tensor:
        """Inverse of :meth:`matrix`: the ``[N, K]`` matrix back in the tensor's own ``shape``."""
        return m.transpose(0, 1) if self.transposed else m.reshape(shape)

    def matrix_shape(self, shape) -> tuple[int, int]:
        """``(N, K)`` of a tensor of ``shape``."""
        return (shape[1], shape[0]) if self.transposed else (shape[0], math.prod(shape[1:]))


class PackedLayer(nn.Module):
    """Base of the packed inference layers. ``kind`` names the layer kind they replace;
    :meth:`packed_weights` lists their packed weights (``tensor name -> attribute``) and
    ``bias_names`` the bias attribute of each (None: no bias)."""

    kind = ""
    bias_names: dict[str, str | None] = {"weight": "bias"}

    def packed_weights(self) -> dict[str, str]:
        """``{tensor name in the original module: attribute holding its PackedWeight}``."""
        return {"weight": "packed"}


class _OneWeight(PackedLayer):
    """A packed layer with one packed weight (``.packed``) and an optional ``.bias``."""

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None, weight_shape=None) -> None:
        super().__init__()
        self.packed = packed
        self.weight_shape = tuple(weight_shape or packed.shape)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def weight(self) -> PackedView:
        """The weight in the original module's shape, dequantized only where it is used."""
        return PackedView(self.packed, self.weight_shape)


class PackedLinear(_OneWeight):
    """``nn.Linear`` whose weight is packed; ``forward`` is the format's (kernel-backed) linear."""

    kind = "Linear"

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None, kind: str = "Linear") -> None:
        super().__init__(packed, bias)
        self.in_features, self.out_features = packed.shape[1], packed.shape[0]
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.packed.linear(x, self.bias)


class PackedConv1D(_OneWeight):
    """Hugging Face ``Conv1D`` (a linear layer storing its weight as ``[in, out]``), packed."""

    kind = "Conv1D"

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None) -> None:
        super().__init__(packed, bias, (packed.shape[1], packed.shape[0]))
        self.nf, self.nx = packed.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torchzip.kernels import dispatch

        if dispatch.use_kernels(x):
            return self.packed.linear(x, self.bias)
        # Conv1D's own matmul on its own [in, out] layout: the same bits as the trainable layer.
        w = self.packed.dequantize().t().contiguous().to(x.dtype)
        out = x.reshape(-1, self.nx) @ w if self.bias is None else torch.addmm(self.bias.to(x.dtype), x.reshape(-1, self.nx), w)
        return out.view(*x.shape[:-1], self.nf)


class PackedConv(_OneWeight):
    """``nn.Conv1d/2d/3d`` with a packed weight (rows: output channels, columns: the rest).

    ``forward`` is the original class's own ``_conv_forward`` (padding modes included) on the
    dequantized weight.
    """

    _CONFIG = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
               "padding_mode", "_reversed_padding_repeated_twice", "output_padding", "transposed")

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None, conv: nn.Module) -> None:
        super().__init__(packed, bias, tuple(conv.weight.shape))
        self.conv_type = parametrize.type_before_parametrizations(conv)
        for name in self._CONFIG:
            setattr(self, name, getattr(conv, name))
        self.dims = len(self.weight_shape) - 2

    @property
    def kind(self) -> str:
        return self.conv_type.__name__

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        w = self.packed.dequantize().view(self.weight_shape).to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if not self.transposed:
            return self.conv_type._conv_forward(self, x, w, bias)
        conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[self.dims - 1]
        pad = self.conv_type._output_padding(self, x, output_size, self.stride, self.padding, self.kernel_size,
                                             self.dims, self.dilation)
        return conv(x, w, bias, self.stride, self.padding, pad, self.groups, self.dilation)


class PackedEmbedding(_OneWeight):
    """``nn.Embedding`` with a packed table: the rows asked for are gathered, then dequantized."""

    kind = "Embedding"
    bias_names = {"weight": None}

    def __init__(self, packed: PackedWeight, emb: nn.Embedding) -> None:
        super().__init__(packed, None)
        self.num_embeddings, self.embedding_dim = packed.shape
        self.padding_idx, self.max_norm, self.norm_type = emb.padding_idx, emb.max_norm, emb.norm_type
        self.scale_grad_by_freq, self.sparse = emb.scale_grad_by_freq, emb.sparse

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"embedding indices must be int32 or int64, got {idx.dtype}")
        flat = idx.reshape(-1).long()
        if self.max_norm is None:
            return self.packed.dequantize_rows(flat).view(*idx.shape, self.embedding_dim)
        # F.embedding renormalises the rows it reads in place; here that happens to a copy of them.
        rows, inverse = torch.unique(flat, return_inverse=True)
        table = self.packed.dequantize_rows(rows)
        with torch.no_grad():
            torch.embedding_renorm_(table, torch.arange(len(rows), device=table.device), self.max_norm, self.norm_type)
        return F.embedding(inverse.view(idx.shape), table)


class PackedMultiheadAttention(nn.MultiheadAttention, PackedLayer):
    """``nn.MultiheadAttention`` whose in-projection (``in_proj_weight``, or the separate
    ``q/k/v_proj_weight`` when key and value widths differ) is packed; ``out_proj`` is packed as
    its own layer. ``forward`` is ``nn.MultiheadAttention``'s own (masks, ``need_weights``,
    ``batch_first``): the weights it reads are :class:`PackedView`\\ s, so its projections run the
    packed linears, and its fused fast path (which would need dense weights) steps aside.
    """

    kind = "MultiheadAttention"

    def __init__(self, mha: nn.MultiheadAttention, packed: dict[str, PackedWeight],
                 biases: dict[str, torch.Tensor | None] | None = None) -> None:
        nn.Module.__init__(self)
        for key, value in vars(mha).items():
            if key not in ("_parameters", "_buffers", "_modules"):
                self.__dict__[key] = copy.copy(value) if isinstance(value, (dict, list)) else value
        self.bias_names = {name: ("in_proj_bias" if name == "in_proj_weight" else None) for name in packed}
        # On load the bias comes with the packed weight in the file: the skeleton's own is only its init.
        given = {self.bias_names[t]: b for t, b in (biases or {}).items() if t in packed and b is not None}
        for name, p in mha._parameters.items():  # None entries too: MHA reads the weights it does not use
            if name not in packed:
                p = given.get(name, p)
                self._parameters[name] = None if p is None else nn.Parameter(p.detach().clone(), requires_grad=False)
        for name, child in mha.named_children():
            self.add_module(name, child)
        for name, p in packed.items():
            self.add_module(_PROJ[name], p)

    def packed_weights(self) -> dict[str, str]:
        return {name: _PROJ[name] for name in _PROJ if isinstance(self._modules.get(_PROJ[name]), PackedWeight)}

    def __getattr__(self, name: str):
        if name in _PROJ and isinstance(self._modules.get(_PROJ[name]), PackedWeight):
            return PackedView(self._modules[_PROJ[name]])
        return super().__getattr__(name)


class PackedRNN(PackedLayer):
    """``nn.LSTM``/``nn.GRU``/``nn.RNN`` with packed weight matrices. The fused recurrent kernels
    need every weight dense, so ``forward`` dequantizes them (one pass over the packed weights per
    call) and runs the original module's own ``forward`` on them; biases stay dense."""

    def __init__(self, rnn: nn.RNNBase, packed: dict[str, PackedWeight], biases: dict[str, torch.Tensor | None]) -> None:
        super().__init__()
        self.kind = parametrize.type_before_parametrizations(rnn).__name__
        inner = copy.copy(rnn)  # the configuration and forward of the original, holding no tensors
        inner._parameters, inner._buffers, inner._modules = {}, {}, {}
        object.__setattr__(self, "rnn", inner)  # not a submodule: its tensors are this layer's
        self._packed_attrs = {t: f"{t}_packed" for t in packed}
        self.bias_names = {t: _rnn_bias(t) for t in packed}
        self.shapes = {t: tuple(getattr(rnn, t).shape) for t in packed}
        for t, p in packed.items():
            self.add_module(self._packed_attrs[t], p)
        for name in rnn._flat_weights_names:
            if name not in packed:
                value = biases.get(next((t for t in packed if _rnn_bias(t) == name), ""), None)
                value = getattr(rnn, name) if value is None else value
                self.register_parameter(name, None if value is None else nn.Parameter(value.detach().clone(),
                                                                                     requires_grad=False))

    def packed_weights(self) -> dict[str, str]:
        return dict(self._packed_attrs)

    def forward(self, *args, **kwargs):
        flat = [getattr(self, self._packed_attrs[n]).dequantize().view(self.shapes[n]) if n in self._packed_attrs
                else getattr(self, n) for n in self.rnn._flat_weights_names]
        self.rnn._flat_weights, self.rnn._flat_weight_refs = flat, [None] * len(flat)
        return self.rnn(*args, **kwargs)


def _rnn_bias(weight: str) -> str | None:
    return weight.replace("weight_", "bias_", 1) if weight.startswith(("weight_ih", "weight_hh")) else None


def _rnn_weights(m: nn.RNNBase) -> dict[str, str | None]:
    return {n: (_rnn_bias(n) if m.bias else None) for n in m._flat_weights_names if n.startswith("weight_")}


_PROJ = {"in_proj_weight": "in_proj", "q_proj_weight": "q_proj", "k_proj_weight": "k_proj", "v_proj_weight": "v_proj"}


@dataclass(frozen=True)
class LayerKind:
    """A module type passes can target, and the packed layer that replaces it after ``freeze``.

    ``weights(module)``: the tensors it compresses, each with the name of its bias (or None).
    ``build(module, packed, biases)``: the packed layer, given ``{tensor: PackedWeight}`` and
    ``{tensor: bias or None}``. ``includes``: kinds that naming this one in ``targets`` also takes
    (``MultiheadAttention`` takes its ``out_proj``).
    """

    name: str
    module_type: type | str
    build: Callable[[nn.Module, dict, dict], nn.Module]
    weights: Callable[[nn.Module], dict[str, str | None]] = lambda m: {"weight": "bias"}
    view: WeightView = field(default_factory=WeightView)
    includes: tuple[str, ...] = ()

    def matches(self, cls: type) -> bool:
        """Whether ``cls`` is exactly this kind's type."""
        if isinstance(self.module_type, str):
            return f"{cls.__module__}.{cls.__qualname__}" == self.module_type
        return cls is self.module_type

    @property
    def type_name(self) -> str:
        return self.module_type if isinstance(self.module_type, str) else self.module_type.__qualname__


LAYER_KINDS: dict[str, LayerKind] = {}


def register_layer_kind(kind: LayerKind) -> LayerKind:
    """Add a layer kind; its name becomes a valid entry of a pass's ``targets``."""
    other = LAYER_KINDS.get(kind.name)
    if other is not None and other != kind:
        raise ValueError(f"layer kind '{kind.name}' is already registered for {other.type_name}")
    LAYER_KINDS[kind.name] = kind
    return kind


def _mha_weights(m: nn.MultiheadAttention) -> dict[str, str | None]:
    if m._qkv_same_embed_dim:
        return {"in_proj_weight": "in_proj_bias"}
    return {"q_proj_weight": None, "k_proj_weight": None, "v_proj_weight": None}


def _linear(kind: str):
    return lambda m, packed, biases: PackedLinear(packed["weight"], biases["weight"], kind)


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
for _kind in (
    LayerKind("Linear", nn.Linear, _linear("Linear")),
    LayerKind("Conv1D", "transformers.pytorch_utils.Conv1D", lambda m, p, b: PackedConv1D(p["weight"], b["weight"]),
              view=WeightView(transposed=True)),
    LayerKind("NonDynamicallyQuantizableLinear", nn.modules.linear.NonDynamicallyQuantizableLinear,
              _linear("NonDynamicallyQuantizableLinear")),
    LayerKind("MultiheadAttention", nn.MultiheadAttention, PackedMultiheadAttention,
              weights=_mha_weights, includes=("NonDynamicallyQuantizableLinear",)),
    *(LayerKind(c.__name__, c, lambda m, p, b: PackedConv(p["weight"], b["weight"], m)) for c in _CONVS),
    LayerKind("Embedding", nn.Embedding, lambda m, p, b: PackedEmbedding(p["weight"], m), weights=lambda m: {"weight": None}),
    *(LayerKind(c.__name__, c, PackedRNN, weights=_rnn_weights) for c in (nn.LSTM, nn.GRU, nn.RNN)),
):
    register_layer_kind(_kind)
DEFAULT_TARGETS = ("Linear", "Conv1D", "MultiheadAttention", *(c.__name__ for c in _CONVS), "Embedding", "LSTM", "GRU", "RNN")


def kind_of(module: nn.Module) -> LayerKind | None:
    """The layer kind of ``module``, by exact type (parametrized modules count as their own type)."""
    cls = parametrize.type_before_parametrizations(module)
    return next((k for k in LAYER_KINDS.values() if k.matches(cls)), None)


def build_packed(module: nn.Module, packed: dict[str, PackedWeight], biases: dict | None = None) -> nn.Module:
    """The packed layer that replaces ``module``, holding ``packed`` (``{tensor: PackedWeight}``)
    and ``biases`` (``{tensor: bias}``; by default the module's own)."""
    kind = kind_of(module)
    if kind is None:
        raise TypeError(f"no layer kind for {type(module).__name__}; known: {sorted(LAYER_KINDS)}")
    names = kind.weights(module)
    if biases is None:
        biases = {t: getattr(module, b, None) if b else None for t, b in names.items()}
    return kind.build(module, packed, {t: biases.get(t) for t in names})


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where the submodule ``name`` is; returns the model (``new`` itself when
    ``name`` is empty, i.e. the model is that module)."""
    if not name:
        return new
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)
    return model
