"""What every packed weight format has in common, and the one table of formats.

A format is a :class:`PackedWeight` subclass registered with :func:`register_format`. It carries
everything the rest of torchzip needs from it:

- ``pack(state)`` (classmethod): its selection rule. ``freeze`` describes each compressed weight
  as a :class:`WeightState` and asks the formats in ``priority`` order; the first that returns a
  packed weight wins (none: the layer stays dense);
- ``dequantize()`` and ``linear(x, bias)``: inference (``kernel_linear`` runs its Triton kernel);
- ``encode(out)`` / ``decode(entry, src, shape, dtype)`` (classmethod): its ``.tzip`` streams,
  written and read through the small stream API of ``torchzip.export.codec``.

``freeze``, ``export``, ``load``, ``inspect`` and ``summary`` read :data:`FORMATS` only.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

FORMATS: dict[str, type["PackedWeight"]] = {}

# On CPU a weight bigger than this many values is multiplied a block of rows at a time: each
# block is dequantized into a reused buffer that stays in cache for its matmul, so memory traffic
# is the packed bytes (a quarter of fp32 for int8), not a full-size dense copy per call.
BLOCK = 1 << 20
_scratch = threading.local()


def scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat CPU buffer of at least ``numel`` values, reused across calls on this thread (a fresh
    large allocation would page-fault on every forward)."""
    buffers = _scratch.__dict__.setdefault("by_dtype", {})
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def blocked_linear(weight: "PackedWeight", x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` on CPU, dequantizing ``BLOCK``-sized blocks of rows with
    ``weight.dequantize_block``; the same matmul per output column as ``F.linear``."""
    n, k = weight.shape
    rows = max(1, BLOCK // max(k, 1))
    flat = x.reshape(-1, k)
    out = torch.empty(flat.shape[0], n, dtype=x.dtype)
    buf = scratch(min(rows, n) * k, x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        w = weight.dequantize_block(start, stop, buf[: (stop - start) * k].view(stop - start, k))
        if bias is None:
            torch.mm(flat, w.t(), out=out[:, start:stop])
        else:
            torch.addmm(bias[start:stop], flat, w.t(), out=out[:, start:stop])
    return out.view(*x.shape[:-1], n)


def register_format(cls: type["PackedWeight"]) -> type["PackedWeight"]:
    """Add ``cls`` to :data:`FORMATS` under its ``format_name`` (usable as a class decorator)."""
    name = cls.__dict__.get("format_name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__qualname__} needs a format_name of its own to be registered")
    other = FORMATS.get(name)
    if other is not None and other is not cls:
        raise ValueError(f"packed format '{name}' is already registered by {other.__module__}.{other.__qualname__}")
    FORMATS[name] = cls
    return cls


def formats_in_order() -> list[type["PackedWeight"]]:
    """Registered formats by ``priority`` (lowest first), then by registration order."""
    return sorted(FORMATS.values(), key=lambda cls: cls.priority)


class WeightState:
    """What the passes left on one weight, seen as a ``[N, K]`` matrix (rows: output channels).

    ``weight``: the float weight ``forward`` sees (given as a tensor, or as a function that
    computes it on first use: ``freeze`` does so, since only formats that store float values
    read it). ``mask``: keep-mask (None: nothing pruned).
    ``pattern``: the pruning pattern (``"2:4"``, ``"unstructured"``, ``"channel"``...).
    ``values``: how the weight's values are quantized (None: float; else an object such as
    :class:`~torchzip.packed.values.Int8Values` or :class:`~torchzip.packed.values.CodebookValues`).
    Parametrizations fill it in through a ``describe(state, w)`` method, ``w`` being the weight
    as the parametrizations before them make it. ``shape``: ``[N, K]``, needed only when
    ``weight`` is a function.
    """

    def __init__(self, weight: torch.Tensor | Callable[[], torch.Tensor], dtype: torch.dtype,
                 mask: torch.Tensor | None = None, pattern: str | None = None, values: Any = None,
                 shape: tuple[int, int] | None = None) -> None:
        if callable(weight) and not isinstance(weight, torch.Tensor) and shape is None:
            raise ValueError("WeightState: a weight given as a function needs its shape")
        self._weight = weight
        self._shape = tuple(shape) if shape is not None else tuple(weight.shape)
        self.dtype, self.mask, self.pattern, self.values = dtype, mask, pattern, values

    @property
    def weight(self) -> torch.Tensor:
        if not isinstance(self._weight, torch.Tensor):
            self._weight = self._weight()
        return self._weight

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape  # type: ignore[return-value]


class PackedWeight(nn.Module):
    """A 2-D weight ``[out_features, in_features]`` held in a compressed form.

    Subclasses register as buffers exactly the tensors that are the compressed form, so
    :meth:`nbytes` (and :func:`torchzip.summary`) count what is stored. ``linear`` runs a Triton
    kernel when the input is on CUDA and a torch reference everywhere else.
    """

    format_name: ClassVar[str] = ""
    priority: ClassVar[int] = 100  # freeze asks formats with lower numbers first
    # Side tables the kernels read in fp32: they keep it when the model moves to fp16/bf16.
    fp32_buffers: ClassVar[tuple[str, ...]] = ("scales", "codebook")

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype) -> None:
        super().__init__()
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = dtype

    @classmethod
    def pack(cls, state: WeightState) -> "PackedWeight | None":
        """This format's packed form of ``state``, or None when the format does not apply."""
        return None

    def dequantize(self) -> torch.Tensor:
        """The dense weight, in the original dtype."""
        raise NotImplementedError

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """``dequantize()[rows]`` for a 1-D index tensor (embeddings gather rows before they
        dequantize); formats override it to touch only those rows."""
        return self.dequantize()[rows]

    def dequantize_block(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Rows ``start:stop`` dequantized into ``out`` (``[stop - start, K]``, the compute dtype),
        equal to ``dequantize()[start:stop].to(out.dtype)``; returns ``out``. Formats that
        override it get the blocked CPU ``linear``."""
        return out.copy_(self.dequantize()[start:stop])

    def row_view(self, start: int, stop: int) -> "PackedWeight":
        """Rows ``start:stop`` as a packed weight of the same format sharing this one's storage."""
        raise NotImplementedError(f"format '{self.format_name}' has no row views")

    def _apply(self, fn, recurse=True):
        # `.to(dtype)`, `.half()`, `.bfloat16()` change the compute dtype: dequantize() follows it;
        # packed integers are untouched by float casts anyway, and fp32_buffers keep fp32 (moving
        # device only), so nothing is rounded.
        keep = {k: self._buffers[k] for k in self.fp32_buffers if self._buffers.get(k) is not None}
        super()._apply(fn, recurse)
        for k, old in keep.items():
            self._buffers[k] = old.to(self._buffers[k].device)
        probe = fn(torch.empty(0, dtype=self.dtype))
        if probe.is_floating_point():
            self.dtype = probe.dtype
        return self

    def kernel_linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """``x @ W.T + bias`` through the format's Triton kernel (None: the format has none)."""
        return None

    def cpu_linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """``x @ W.T + bias`` through a compiled CPU kernel for eager, no-grad CPU inputs and weights
        of more than ``BLOCK`` values (None: the format has none, or it does not take this input;
        ``linear`` then uses torch)."""
        return None

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W.T + bias``: the Triton kernel on CUDA; on CPU, large weights through the format's
        compiled kernel (:meth:`cpu_linear`) or a block of rows at a time (:func:`blocked_linear`);
        else dequantize + ``F.linear``."""
        from torchzip.kernels import dispatch

        if dispatch.use_kernels(x):
            out = self.kernel_linear(x, bias)
            if out is not None:
                return out
        # Eager only: under torch.compile, inductor fuses dequantize + F.linear itself (and the
        # Python loop over blocks or a foreign call would be a graph break).
        # Large weights only: a small one is dequantized (cheaply, in cache) for F.linear, so its
        # outputs stay bitwise those of the trainable layer. Neither the compiled kernels nor the
        # out= matmuls of the blocks have a backward.
        if (x.device.type == "cpu" and x.is_floating_point() and not torch.compiler.is_compiling()
                and self.shape[0] * self.shape[1] > BLOCK
                and not (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))):
            out = self.cpu_linear(x, bias)
            if out is not None:
                return out
            if type(self).dequantize_block is not PackedWeight.dequantize_block:
                return blocked_linear(self, x, bias)
        return F.linear(x, self.dequantize().to(x.dtype), None if bias is None else bias.to(x.dtype))

    def encode(self, out: Any) -> dict[str, Any]:
        """Manifest keys of this weight (``"tensors"``: name -> stream entry), written to ``out``
        (a :class:`torchzip.export.codec.StreamWriter`)."""
        raise NotImplementedError(f"format '{self.format_name}' cannot be exported")

    @classmethod
    def decode(cls, entry: dict, src: Any, shape: tuple[int, int], dtype: torch.dtype) -> "PackedWeight":
        """Rebuild from a manifest ``entry`` and its streams in ``src`` (a
        :class:`torchzip.export.codec.StreamReader`, which raises ``FormatError`` on bad data)."""
        raise NotImplementedError(f"format '{cls.format_name}' cannot be loaded")

    def nbytes(self) -> int:
        """Bytes of the tensors that make up the compressed form."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    @property
    def label(self) -> str:
        """Format name as reports show it (sparse formats add their value kind)."""
        return self.format_name

    @property
    def sparsity(self) -> float:
        """Fraction of weights that are exactly zero."""
        w = self.dequantize()
        return float((w == 0).sum()) / max(w.numel(), 1)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, dtype={self.dtype}"
