"""Dense codebook weight: bit-packed centroid indices and a per-layer or per-channel codebook."""

from __future__ import annotations

import sys

import numpy as np
import torch

from torchzip.export import huffman
from torchzip.export.container import brief
from torchzip.kernels import cpu
from torchzip.packed.base import PackedWeight, WeightState, register_format
from torchzip.packed.bits import pack_bits, packed_words, unpack_bits, unpack_codes_u8
from torchzip.packed.values import CodebookValues, read_table, table


def _compiled(t: torch.Tensor) -> bool:
    """Whether the compiled CPU kernels take this tensor (CPU, eager, kernels built)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling() and cpu.available()


def _byte_fields(bits: int, device: torch.device) -> torch.Tensor:
    """``[256, 8 // bits]``: the fields a byte holds, least significant first."""
    shifts = torch.arange(0, 8, bits, device=device)
    return (torch.arange(256, device=device).unsqueeze(1) >> shifts) & ((1 << bits) - 1)


def _rows_are_bytes(k: int, bits: int) -> bool:
    """Whether rows of ``k`` indices, packed by :func:`pack_bits`, are bytes of ``8 // bits``
    whole indices, the first in the low bits: fields that tile bytes, rows that fill whole words
    (no padding fields), a little-endian host. Export codes such rows from their bytes and load
    decodes them straight into them."""
    return 8 % bits == 0 and k % (32 // bits) == 0 and sys.byteorder == "little"


def _codes_are_bytes(spec: dict, k: int, bits: int) -> bool:
    """Whether an index stream's code values are the bytes of its packed rows: ``8 // bits``
    indices a code (``huffman.decode_codes``) of rows that :func:`_rows_are_bytes`."""
    group = spec.get("group") if isinstance(spec, dict) else None
    return type(group) is int and _rows_are_bytes(k, bits) and group == 8 // bits


def _pack_in_place_ok(buf: np.ndarray, n: int, k: int, bits: int) -> bool:
    """Whether :func:`_pack_in_place` may take ``buf``: an owning uint8 array of at least the
    ``n * k`` indices, whose rows pack to no more bytes than they hold (``4 * words <= k``)."""
    return (buf.dtype == np.uint8 and buf.flags.owndata and buf.flags.c_contiguous and buf.ndim == 1
            and buf.size >= n * k and n > 0 and 0 < 4 * packed_words(k, bits) <= k)


def _pack_in_place(buf: np.ndarray, n: int, k: int, bits: int) -> torch.Tensor:
    """Pack the ``[n, k]`` uint8 indices at the front of ``buf`` into ``[n, words]`` int32 words
    in ``buf``'s own memory, then shrink ``buf`` to them: the packed layer never sits next to
    its indices (one byte each, twice its size).

    Front to back, a block at a time: block r's words land at ``r * 4 * words`` bytes, at or before
    its own indices (``4 * words <= k``), so they overwrite only indices already read."""
    words = packed_words(k, bits)
    row_bytes = 4 * words
    rows = max(1, (1 << 20) // k)
    flat = torch.from_numpy(buf)
    idx = flat[:n * k].view(n, k)
    for r in range(0, n, rows):
        block = pack_bits(idx[r:r + rows], bits)  # a copy: read before the write below
        flat[r * row_bytes:r * row_bytes + block.numel() * 4] = block.view(torch.uint8).reshape(-1)
    del flat, idx
    # realloc to a smaller size keeps the front in place and hands back the tail.
    buf.resize(n * row_bytes, refcheck=False)
    return torch.from_numpy(buf).view(torch.int32).view(n, words)


@register_format
class CodebookWeight(PackedWeight):
    """``W[n, k] = codebook[n or 0, index[n, k]]``, indices packed ``bits`` wide in int32 words."""

    format_name = "codebook"
    priority = 30

    def __init__(self, packed: torch.Tensor, codebook: torch.Tensor, bits: int, shape, dtype: torch.dtype,
                 half_table: bool = False, group_rows: int = 1) -> None:
        super().__init__(shape, dtype)
        self.bits, self.half_table = int(bits), bool(half_table)  # half_table: store the codebook in float16
        self.group_rows = int(group_rows)  # rows of the (per-row) codebook repeat in groups: stored once each
        self.register_buffer("packed", packed.to(torch.int32).contiguous())
        self.register_buffer("codebook", codebook.float().contiguous())

    @classmethod
    def from_indices(cls, indices: torch.Tensor, codebook: torch.Tensor, bits: int, dtype: torch.dtype,
                     half_table: bool = False, group_rows: int = 1) -> "CodebookWeight":
        """Pack ``[N, K]`` integer indices into a codebook weight (a block of rows at a time, so a
        big layer's indices never widen to int64 whole)."""
        n, k = indices.shape
        rows = max(1, (1 << 20) // max(k, 1))
        # Filled in place: a list of blocks joined by cat would hold the packed rows twice.
        packed = torch.empty(n, packed_words(k, bits), dtype=torch.int32, device=indices.device)
        for r in range(0, n, rows):
            packed[r:r + rows] = pack_bits(indices[r:r + rows], bits)
        return cls(packed, codebook, bits, (n, k), dtype, half_table, group_rows)

    @classmethod
    def pack(cls, state: WeightState) -> "CodebookWeight | None":
        """Codebook values where every weight has a centroid (pruned ones go to a sparse format).
        The trainable layer's packed indices are taken as they are: freezing copies nothing."""
        v = state.values
        if not isinstance(v, CodebookValues) or v.kept is not None:
            return None
        return cls(v.packed, v.codebook, v.bits, v.shape, state.dtype, v.half_table, v.group_rows)

    def indices(self) -> torch.Tensor:
        """The ``[N, K]`` centroid indices (int64)."""
        return unpack_bits(self.packed, self.bits, self.shape[1])

    def dequantize(self) -> torch.Tensor:
        if _compiled(self.packed) and self.dtype in (torch.float32, torch.bfloat16, torch.float16):
            # The same table entries without int64 indices: bit for bit the lookup below.
            out = torch.empty(self.shape, dtype=self.dtype)
            return cpu.dequantize_rows(self.packed, self.codebook.to(self.dtype), self.bits, out)
        return self._lookup(self.indices(), self.codebook)

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        book = self.codebook[rows] if self.codebook.shape[0] > 1 else self.codebook
        return self._lookup(unpack_bits(self.packed[rows], self.bits, self.shape[1]), book)

    def dequantize_block(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        rows, k = stop - start, self.shape[1]
        book = self.codebook[start:stop] if self.codebook.shape[0] > 1 else self.codebook
        if _compiled(out) and out.stride(-1) == 1 and out.dtype in (torch.float32, torch.bfloat16, torch.float16):
            # Table entries rounded as the eager lookup rounds them: the same values, bit for bit.
            return cpu.dequantize_rows(self.packed[start:stop], book.to(self.dtype).to(out.dtype), self.bits, out)
        if 8 % self.bits:  # fields straddle bytes: unpack, then look up
            return out.copy_(self._lookup(unpack_bits(self.packed[start:stop], self.bits, k), book))
        # Fields never straddle a byte: each byte of the packed words indexes a small table of the
        # 8 // bits values it stands for, built straight in the compute dtype. Nothing widens to int64.
        per_byte = 8 // self.bits
        table = book[:, _byte_fields(self.bits, book.device)].to(self.dtype).to(out.dtype)  # [C, 256, per_byte]
        index = self.packed[start:stop].view(torch.uint8).to(torch.int32)  # little-endian: fields in order
        if book.shape[0] > 1:
            index += torch.arange(0, rows * 256, 256, dtype=torch.int32, device=index.device).unsqueeze(1)
        width = index.shape[1] * per_byte
        dest = out if width == k else torch.empty(rows, width, dtype=out.dtype, device=out.device)
        torch.index_select(table.view(-1, per_byte), 0, index.view(-1), out=dest.view(-1, per_byte))
        return dest if dest is out else out.copy_(dest[:, :k])

    def _lookup(self, idx: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
        book = book if book.shape[0] > 1 else book.expand(idx.shape[0], -1)
        return torch.gather(book, 1, idx).to(self.dtype)

    def row_view(self, start: int, stop: int) -> "CodebookWeight":
        book = self.codebook[start:stop] if self.codebook.shape[0] > 1 else self.codebook
        return CodebookWeight(self.packed[start:stop], book, self.bits, (stop - start, self.shape[1]), self.dtype,
                              self.half_table, self.group_rows if start % self.group_rows == 0 else 1)

    def cpu_linear(self, x, bias):
        # The fused kernel reads the packed codes once for up to LINEAR_MAX_M rows of x; more rows
        # take the blocked dequantize + BLAS matmul (dequantize_block above).
        m = cpu.fused_rows(x, self.shape[1], cpu.LINEAR_MAX_M)
        if not m:
            return None
        book = self.codebook.to(self.dtype).to(x.dtype)  # what dequantize().to(x.dtype) holds
        y = cpu.linear(x.reshape(m, self.shape[1]).float(), self.packed, book, self.bits, self.shape[1])
        return cpu.fused_output(y, x, bias)

    def kernel_linear(self, x, bias):
        from torchzip.kernels import codebook

        return codebook.codebook_linear(x, self.packed, self.codebook, bias, self.bits, self.shape[1])

    def encode(self, out):
        book, g = self.codebook, self.group_rows
        entry = {"bits": self.bits}
        if g > 1 and book.shape[0] > 1 and torch.equal(book[::g].repeat_interleave(g, 0)[:book.shape[0]], book):
            book, entry["group_rows"] = book[::g], g  # one table per group of rows
        entry["tensors"] = {"indices": out.symbols(self._index_stream(), 2**self.bits),
                            "codebook": out.raw(table(book, self.dtype, self.half_table))}
        return entry

    def _index_stream(self):
        # Rows that fill whole words of fields tiling bytes: the packed bytes are the coder's input
        # as they are (huffman.encode_packed), never one byte an index.
        n, k = self.shape
        if n * k and _rows_are_bytes(k, self.bits):
            data = self.packed.detach().cpu().contiguous().view(torch.uint8).numpy().reshape(-1)
            return huffman.encode_packed(data, self.bits, max_len=huffman.TZIP_MAX_LEN)
        return self._indices_u8()

    def _indices_u8(self) -> torch.Tensor:
        # One byte an index, unpacked a block of rows at a time (never widened to int64).
        return unpack_codes_u8(self.packed.cpu(), self.bits, self.shape[1])

    @classmethod
    def decode(cls, entry, src, shape, dtype):
        n, k = shape
        bits = entry.get("bits")
        src.need(type(bits) is int and 1 <= bits <= 8, f"bad bits {bits!r}")
        t = entry["tensors"]
        spec = t.get("codebook")
        codebook = read_table(src, spec, "codebook", dtype, half=True)
        half = isinstance(spec, dict) and spec.get("dtype") == "float16" and dtype != torch.float16
        g = entry.get("group_rows", 1)
        src.need(type(g) is int and 1 <= g <= max(1, n), f"bad group_rows {g!r}")
        groups = -(-n // g) if g > 1 else n
        src.need(codebook.dim() == 2 and codebook.shape[0] in (1, groups) and codebook.shape[1] == 2**bits,
                 f"codebook shape {tuple(codebook.shape)} does not fit {n} rows of {2**bits} entries"
                 + (f" in groups of {g}" if g > 1 else ""))
        if g > 1 and codebook.shape[0] > 1:
            codebook = codebook.repeat_interleave(g, 0)[:n]  # kernels read one table per row
        spec = t.get("indices")
        src.need(not isinstance(spec, dict) or spec.get("n") == n * k, f"{brief(spec.get('n'))} indices for a {n}x{k} weight")
        if src.device is None and _codes_are_bytes(spec, k, bits):
            # Each code is one byte of the packed rows: decoded straight into them.
            packed = torch.empty(n, packed_words(k, bits), dtype=torch.int32)
            src.codes_into(spec, "indices", 2**bits, packed.view(torch.uint8).numpy().reshape(-1))
            return cls(packed, codebook, bits, (n, k), dtype, half, g)
        idx = src.symbol_buffer(spec, "indices", 2**bits, on_device=True)
        if isinstance(idx, np.ndarray) and _pack_in_place_ok(idx, n, k, bits):
            return cls(_pack_in_place(idx, n, k, bits), codebook, bits, (n, k), dtype, half, g)
        idx = torch.from_numpy(idx[:n * k]) if isinstance(idx, np.ndarray) else idx
        src.need(idx.numel() == n * k, f"{idx.numel()} indices for a {n}x{k} weight")
        return cls.from_indices(idx.reshape(n, k), codebook, bits, dtype, half, g)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, codebooks={self.codebook.shape[0]}"
