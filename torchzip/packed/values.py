"""How the stored values of a packed weight turn back into floats.

Three kinds, shared by every packed format:
- ``float``: values are the weights themselves (any float dtype);
- ``int8``: ``value * scales[row, col // group_size]`` (one column of scales when per channel);
- ``codebook``: ``codebook[row or 0, value]`` (one codebook row when per layer).

:class:`Int8Values` and :class:`CodebookValues` are how quantizing passes describe a whole
``[N, K]`` weight to ``freeze`` (``WeightState.values``); the sparse formats keep the values at
their kept positions only, with the same side tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from torchzip.export.codec import dtype_name
from torchzip.packed.bits import unpack_codes_u8, unpack_fields

VALUE_KINDS = ("float", "int8", "codebook")


@dataclass
class Int8Values:
    """``W = q * scales[:, col // group_size]``: int8 ``q [N, K]``, float32 ``scales [N, G]``."""

    q: torch.Tensor
    scales: torch.Tensor
    group_size: int

    kind = "int8"


@dataclass
class CodebookValues:
    """``W = codebook[row or 0, index]`` for an ``[N, K]`` weight whose indices are ``bits`` wide in
    int32 words (``packed [N, words]``, the layout of :func:`~torchzip.packed.bits.pack_bits`), as
    the trainable codebook holds them. ``kept`` (1-bit fields in the same layout, or None when every
    weight has a centroid): where it is 0 the weight takes no centroid (its index field is 0)."""

    packed: torch.Tensor
    codebook: torch.Tensor
    bits: int
    shape: tuple[int, int]
    kept: torch.Tensor | None = None
    half_table: bool = False  # the pass rounded the codebook to float16: store it in 16 bits
    group_rows: int = 1  # codebook rows repeat in groups of this many rows: store one per group

    kind = "codebook"

    def codes_u8(self) -> torch.Tensor:
        """The ``[N, K]`` indices, one byte each (0 where no centroid), unpacked a block of rows at a time."""
        return unpack_codes_u8(self.packed, self.bits, self.shape[1])

    def keep_mask(self) -> torch.Tensor | None:
        """``[N, K]`` bool, True where a weight has a centroid (None: all have one)."""
        return None if self.kept is None else unpack_fields(self.kept, 1, self.shape[1], torch.bool)


def value_kind(scales: torch.Tensor | None, codebook: torch.Tensor | None) -> str:
    """Name the value kind from which side tensors are present."""
    if codebook is not None:
        return "codebook"
    return "int8" if scales is not None else "float"


def stored_values(state: Any) -> tuple[torch.Tensor, dict] | None:
    """``(full [N, K] tensor of stored values, side tensors)`` for a sparse format, or None when
    the values are of a kind the sparse formats do not hold. ``state``: a
    :class:`~torchzip.packed.base.WeightState`; only float values read ``state.weight`` (which
    ``freeze`` computes on first use)."""
    v = state.values
    if v is None:
        return state.weight, {}
    if isinstance(v, Int8Values):
        return v.q, {"scales": v.scales, "group_size": v.group_size}
    if isinstance(v, CodebookValues):
        return v.codes_u8(), {"codebook": v.codebook}
    return None


class SparseValues:
    """What the two sparse formats share: values of a value kind, with their side tensors."""

    def _init_values(self, values, scales, codebook, group_size: int) -> None:
        self.group_size = int(group_size)
        self.register_buffer("values", values.contiguous())
        self.register_buffer("scales", None if scales is None else scales.float().contiguous())
        self.register_buffer("codebook", None if codebook is None else codebook.float().contiguous())

    @property
    def kind(self) -> str:
        """Value kind: ``float``, ``int8`` or ``codebook``."""
        return value_kind(self.scales, self.codebook)

    @property
    def label(self) -> str:
        return f"{self.format_name}/{self.kind}"

    def _decode(self, values, rows, cols) -> torch.Tensor:
        return decode_values(values, rows, cols, self.scales, self.codebook, self.group_size)

    def _side(self, rows) -> dict:
        """Side tensors of the rows ``rows`` (a slice or an index tensor), as constructor arguments."""
        book = self.codebook
        return {"scales": None if self.scales is None else self.scales[rows],
                "codebook": book if book is None or book.shape[0] == 1 else book[rows], "group_size": self.group_size}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, values={self.kind}"


def group_of(cols: torch.Tensor, group_size: int) -> torch.Tensor:
    """Scale column for each weight column (0 for per-channel scales)."""
    return cols // group_size if group_size else torch.zeros_like(cols)


def decode_values(
    values: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    scales: torch.Tensor | None,
    codebook: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """Float32 weights for stored ``values`` at positions ``(rows, cols)``."""
    if codebook is not None:
        book_row = rows if codebook.shape[0] > 1 else torch.zeros_like(rows)
        return codebook[book_row, values.long()]
    if scales is not None:
        return values.float() * scales[rows, group_of(cols, group_size)]
    return values.float()


HALF_DTYPES = (torch.float16, torch.bfloat16)


def int8_quantize(w: torch.Tensor, group_size: int = 0,
                  scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 of a 2-D weight: per output channel, or per ``group_size`` columns.

    Returns ``(q, scales)`` with ``q`` int8 in [-127, 127] and ``scales`` float32 ``[N, G]``;
    ``q * scale`` differs from ``w`` by at most ``scale / 2``. For an fp16/bf16 weight the scales
    are rounded up to values of that dtype, so a file can store them in it without loss.
    ``scales`` given (e.g. chosen on calibration data): round on those instead.
    """
    n, k = w.shape
    g = group_size or k
    w = w.detach()
    if n * k <= _QUANT_BLOCK or n <= 1:
        return _int8_rows(w, g, scales)
    # A block of rows at a time: each row is rounded on its own, so the result is the same, and a
    # big layer (an embedding) needs float temporaries of one block, not of the whole weight.
    rows = max(1, _QUANT_BLOCK // k)
    q = torch.empty(n, k, dtype=torch.int8, device=w.device)
    parts = []
    for r in range(0, n, rows):
        q[r:r + rows], s = _int8_rows(w[r:r + rows], g, None if scales is None else scales[r:r + rows])
        parts.append(s)
    return q, torch.cat(parts) if scales is None else scales


_QUANT_BLOCK = 1 << 20  # elements rounded at once by int8_quantize


def _int8_rows(w: torch.Tensor, g: int, scales: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    grouped = w.float().reshape(n, k // g, g)
    if scales is None:
        amax = grouped.abs().amax(-1)
        scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        if w.dtype in HALF_DTYPES:
            scales = round_up_to(scales, w.dtype)
    q = torch.round(grouped / scales.unsqueeze(-1)).clamp_(-127, 127)
    return q.reshape(n, k).to(torch.int8), scales


def round_up_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Positive float32 ``x`` rounded up to the nearest value of ``dtype`` (kept float32)."""
    low = x.to(dtype)
    up = torch.where(low.float() < x, torch.nextafter(low, torch.full_like(low, float("inf"))), low)
    return up.float()


def table(t: torch.Tensor, dtype: torch.dtype, half: bool = False) -> torch.Tensor:
    """A float32 side table (scales, codebook) as the file should store it: in the weight's 16-bit
    dtype when every value survives that exactly (``half``: float16 too, for codebooks a pass
    rounded to it), else float32."""
    if dtype in HALF_DTYPES and torch.equal(t.to(dtype).float(), t):
        return t.to(dtype)
    if half and torch.equal(t.half().float(), t):
        return t.half()
    return t


# ---- value streams in a .tzip file (the sparse formats share them) --------------------------


def encode_values(out: Any, kind: str, values: torch.Tensor, scales: torch.Tensor | None,
                  codebook: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> dict:
    """Stream entries of ``values`` (in file order) and their side tensors."""
    t: dict[str, Any] = {}
    if kind == "int8":
        t["values"] = out.int8(values)
    elif kind == "codebook":
        t["values"] = out.symbols(values, codebook.shape[1])
    else:
        t["values"] = out.raw(values)
    if scales is not None:
        t["scales"] = out.raw(table(scales, dtype))
    if codebook is not None:
        t["codebook"] = out.raw(table(codebook, dtype))
    return t


def read_table(src: Any, spec: Any, what: str, dtype: torch.dtype, half: bool = False) -> torch.Tensor:
    """A scales or codebook table: float32, or the weight's 16-bit dtype (``half``: or float16),
    widened to float32."""
    allowed = ("float32",) + ((dtype_name(dtype),) if dtype in HALF_DTYPES else ()) + (("float16",) if half else ())
    return src.raw(spec, what, allowed).float()


def decode_side(src: Any, tensors: dict, kind: str, group_size: int, n: int, k: int, dtype: torch.dtype):
    """``(scales, codebook)`` of a value kind, checked against an ``[n, k]`` weight of ``dtype``."""
    scales = codebook = None
    if kind == "int8":
        scales = read_table(src, tensors.get("scales"), "scales", dtype)
        src.need(tuple(scales.shape) == (n, k // group_size if group_size else 1),
                 f"scales shape {tuple(scales.shape)} does not fit")
    if kind == "codebook":
        codebook = read_table(src, tensors.get("codebook"), "codebook", dtype)
        src.need(codebook.dim() == 2 and codebook.shape[0] in (1, n) and 1 <= codebook.shape[1] <= 256,
                 f"codebook shape {tuple(codebook.shape)} does not fit {n} rows")
    return scales, codebook


def decode_values_stream(src: Any, tensors: dict, kind: str, count: int, codebook: torch.Tensor | None,
                         dtype: torch.dtype) -> torch.Tensor:
    """``count`` stored values of ``kind`` (decoded on the target device where possible); float
    values are the weights themselves, in the layer's ``dtype``."""
    if kind == "float":
        values = src.raw(tensors.get("values"), "values", (dtype_name(dtype),)).reshape(-1)
    elif kind == "int8":
        values = src.int8(tensors.get("values"), count, "values", on_device=True)
    else:
        values = src.symbols(tensors.get("values"), "values", codebook.shape[1], on_device=True).to(torch.uint8)
    src.need(values.numel() == count, f"{values.numel()} values for {count} positions")
    return values


def check_value_args(src: Any, entry: dict, k: int) -> tuple[str, int]:
    """``(value kind, group_size)`` of a sparse layer's manifest entry, checked."""
    kind = entry.get("values")
    src.need(kind in VALUE_KINDS, f"unknown value kind {kind!r}; allowed: {', '.join(VALUE_KINDS)}")
    g = check_group_size(src, entry, k)
    return kind, g


def check_group_size(src: Any, entry: dict, k: int) -> int:
    """The entry's ``group_size`` (0: per channel), which must divide ``k``."""
    g = entry.get("group_size", 0)
    src.need(type(g) is int and g >= 0 and (g == 0 or k % g == 0), f"bad group_size {g!r}")
    return g
