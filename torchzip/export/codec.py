"""The stream API packed formats encode and decode themselves with (see docs/FORMAT.md).

A format's ``encode(out)`` calls :class:`StreamWriter` methods, each of which writes one piece
(or a few) into the current section and returns the manifest entry that describes it. Its
``decode(entry, src, ...)`` reads those entries back through a :class:`StreamReader`, which checks
every field of a (possibly hostile) entry and raises :class:`FormatError` naming the layer.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from torchzip.errors import FormatError
from torchzip.export import huffman
from torchzip.export.container import SectionWriter, brief, release_pages

DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
ITEM_BYTES = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in DTYPES.items()}
MAX_ELEMENTS = 1 << 40
MAX_DIMS = 64  # dimensions of one tensor


def dtype_name(dtype: torch.dtype) -> str:
    """The manifest name of a torch dtype."""
    return DTYPE_NAMES[dtype]


def lookup(table: dict, key: Any) -> Any:
    """``table[key]`` for a string key, else None (manifest values may be any JSON)."""
    return table.get(key) if isinstance(key, str) else None


def need(cond: bool, where: str, what: str) -> None:
    """Raise :class:`FormatError` ``"<where>: <what>"`` unless ``cond``."""
    if not cond:
        raise FormatError(f"{where}: {what}")


def checked_shape(shape: Any, where: str) -> list[int]:
    """``shape`` if it is a list of at most :data:`MAX_DIMS` non-negative ints holding at most
    :data:`MAX_ELEMENTS` elements (each dimension is bounded before they are multiplied)."""
    need(isinstance(shape, list) and len(shape) <= MAX_DIMS
         and all(type(d) is int and 0 <= d <= MAX_ELEMENTS for d in shape), where,
         f"bad shape {brief(shape)}: a list of at most {MAX_DIMS} integers in 0..{MAX_ELEMENTS}")
    need(math.prod(shape) <= MAX_ELEMENTS, where, f"shape {shape} has more than {MAX_ELEMENTS} elements")
    return shape


def piece_bytes(spec: dict) -> int:
    """Bytes of the pieces of a stream entry that a :class:`StreamReader` has read (so checked)."""
    keys = ("at",) if spec["codec"] == "raw" else ("lengths", "chunks", "payload")
    return sum(spec[k][1] for k in keys)


class StreamWriter:
    """Writes tensors and symbol streams into one section; each method returns a manifest entry."""

    def __init__(self, section: SectionWriter | None = None) -> None:
        self.section = section or SectionWriter()

    def raw(self, t: torch.Tensor, **extra: Any) -> dict:
        """A tensor as its little-endian bytes, lossless."""
        t = t.detach().contiguous().cpu()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return {"codec": "raw", "dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "at": self.section.add(data), **extra}

    @staticmethod
    def code(symbols: Any, alphabet: int) -> huffman.HuffmanStream:
        """Huffman-code symbols in ``0..alphabet-1`` (to compare options before writing one)."""
        if isinstance(symbols, torch.Tensor):
            symbols = symbols.detach().cpu().numpy()
        symbols = np.asarray(symbols).reshape(-1)
        if symbols.dtype.kind not in "ui":
            symbols = symbols.astype(np.int64)
        return huffman.encode(symbols, alphabet, max_len=huffman.TZIP_MAX_LEN)

    @staticmethod
    def coded_bytes(stream: huffman.HuffmanStream) -> int:
        """Bytes a coded stream takes in the file (payload and tables)."""
        return huffman.stored_bytes(stream)

    def symbols(self, symbols: Any, alphabet: int, **extra: Any) -> dict:
        """A Huffman-coded stream of symbols (or an already coded :class:`HuffmanStream`)."""
        s = symbols if isinstance(symbols, huffman.HuffmanStream) else self.code(symbols, alphabet)
        chunks, median, rice = huffman.pack_chunks(s.chunk_bits)
        add = self.section.add
        return {
            "codec": "huffman", "n": s.n_symbols, "alphabet": alphabet, "group": s.group, "chunk_size": s.chunk_size,
            "chunk_median": median, "chunk_rice": rice, "lengths": add(huffman.pack_lengths(s.lengths)),
            "chunks": add(chunks), "payload": add(bytes(s.payload)), **extra,
        }

    def int8(self, q: torch.Tensor, **extra: Any) -> dict:
        """int8 values: Huffman-coded bytes, or raw when that is smaller (short streams)."""
        data = q.detach().cpu().numpy().astype(np.int8, copy=False).reshape(-1)
        stream = self.code(data.view(np.uint8), 256)
        if huffman.stored_bytes(stream) >= data.size:
            return self.raw(torch.from_numpy(data.copy()), **extra)
        return self.symbols(stream, 256, **extra)


class Section:
    """One section's bytes and the pieces read from it so far.

    Pieces may not overlap (docs/FORMAT.md): every byte is decoded at most once, so what a file
    can make a reader do is bounded by its size. :meth:`take` refuses a piece as soon as the
    pieces taken hold more bytes than the section (some must overlap), before it is decoded;
    :meth:`check_overlaps`, called once everything is read, finds any other overlap exactly.
    """

    def __init__(self, data: memoryview, label: str = "section") -> None:
        self.data, self.label = data, label
        self.taken: list[tuple[int, int, str]] = []  # (start, end, what) of non-empty pieces
        self.bytes_taken = 0

    def __len__(self) -> int:
        return len(self.data)

    def take(self, start: int, length: int, what: str) -> memoryview:
        """The ``length`` bytes at ``start`` (which the caller has checked lie in the section)."""
        if length:
            self.bytes_taken += length
            need(self.bytes_taken <= len(self.data), what,
                 f"the pieces read from {self.label} hold {self.bytes_taken} bytes, more than its {len(self.data)}: "
                 "some overlap (pieces of a section may not overlap)")
            self.taken.append((start, start + length, what))
        return self.data[start: start + length]

    def release(self) -> None:
        """Hand back the pages of a memory-mapped file read so far (see
        :func:`torchzip.export.container.release_pages`); nothing for bytes in memory."""
        release_pages([self.data])

    def check_overlaps(self) -> None:
        """Raise :class:`FormatError` if two pieces taken share a byte."""
        ranges = sorted(self.taken)
        for (_, end, a), (start, _, b) in zip(ranges, ranges[1:]):
            need(start >= end, a, f"its bytes overlap those of {b} in {self.label} (pieces of a section may not overlap)")


class StreamReader:
    """Reads the pieces of one section back, checking every manifest field it is given.

    ``section``: the section's bytes, or a :class:`Section` shared by every reader of that
    section (so pieces of different layers cannot overlap either). ``device``: where
    :meth:`symbols` may decode value streams with the Triton decoder (None: the numpy decoder on
    the CPU).
    """

    def __init__(self, section: memoryview | Section, where: str, device: torch.device | None = None) -> None:
        self.section = section if isinstance(section, Section) else Section(section)
        self.where, self.device = where, device

    def need(self, cond: bool, what: str) -> None:
        need(cond, self.where, what)

    def piece(self, ref: Any, what: str) -> memoryview:
        """The bytes ``[offset, length]`` names, which must lie inside the section and overlap no
        piece read before."""
        size = len(self.section)
        ok = isinstance(ref, list) and len(ref) == 2 and all(type(v) is int for v in ref)
        need(ok and ref[0] >= 0 and ref[1] >= 0 and ref[0] + ref[1] <= size, f"{self.where} {what}",
             f"byte range {brief(ref)} lies outside its section ({size} bytes)")
        return self.section.take(ref[0], ref[1], f"{self.where} {what}")

    def shape(self, spec: dict, what: str = "") -> list[int]:
        """The entry's checked ``shape`` (see :func:`checked_shape`)."""
        return checked_shape(spec.get("shape"), f"{self.where} {what}".strip())

    def raw(self, spec: Any, what: str, dtypes: tuple[str, ...] | None = None) -> torch.Tensor:
        """A raw tensor entry (see :meth:`StreamWriter.raw`), of one of ``dtypes`` if given."""
        where = f"{self.where} {what}"
        need(isinstance(spec, dict) and spec.get("codec") == "raw", where, "expected a raw tensor entry")
        dtype = lookup(DTYPES, spec.get("dtype"))
        need(dtype is not None, where, f"unknown dtype {brief(spec.get('dtype'))}; allowed: {sorted(DTYPES)}")
        need(dtypes is None or spec["dtype"] in dtypes, where,
             f"is stored as {spec['dtype']}; allowed: {', '.join(dtypes or ())}")
        shape = self.shape(spec, what)
        size = math.prod(shape) * ITEM_BYTES[spec["dtype"]]
        data = self.piece(spec.get("at"), what)
        need(len(data) == size, where, f"holds {len(data)} bytes, shape {shape} of {spec['dtype']} needs {size}")
        if not size:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)

    def float_raw(self, spec: Any, what: str) -> torch.Tensor:
        """A raw entry that must hold floats."""
        t = self.raw(spec, what)
        need(t.dtype.is_floating_point, f"{self.where} {what}", f"must be a float tensor, got {t.dtype}")
        return t

    def symbols(self, spec: Any, what: str, alphabet: int | None = None, on_device: bool = False) -> torch.Tensor:
        """A Huffman stream decoded to symbols (with ``on_device``, on :attr:`device`): uint8 for
        alphabets of at most 256 symbols (one byte a symbol: a big layer's stream is never widened
        on the CPU), else int32."""
        out = self._symbols(spec, what, alphabet, on_device)
        return out if isinstance(out, torch.Tensor) else torch.from_numpy(out)

    def symbol_buffer(self, spec: Any, what: str, alphabet: int | None = None,
                      on_device: bool = False) -> torch.Tensor | np.ndarray:
        """As :meth:`symbols`, but a stream decoded on the CPU comes back as the numpy array that
        owns its memory (at least ``n`` symbols; the first ``n`` are the stream), which the caller
        may overwrite and shrink in place (``ndarray.resize``)."""
        return self._symbols(spec, what, alphabet, on_device, owner=True)

    def codes_into(self, spec: Any, what: str, alphabet: int, out: np.ndarray) -> np.ndarray:
        """A Huffman stream decoded on the CPU to its code values, one per code, written into
        ``out`` (see :func:`torchzip.export.huffman.decode_codes`); the caller has checked the
        entry's ``n`` and ``group``, which give ``out``'s size."""
        where = f"{self.where} {what}"
        stream = self._stream(spec, what, alphabet)
        try:
            return huffman.decode_codes(stream, out, self.section.release)
        except FormatError as err:
            raise FormatError(f"{where}: {err}") from None

    def _stream(self, spec: Any, what: str, alphabet: int | None) -> huffman.HuffmanStream:
        """The checked header and pieces of a Huffman stream entry (its bytes not yet decoded)."""
        where = f"{self.where} {what}"
        need(isinstance(spec, dict) and spec.get("codec") == "huffman", where, "expected a Huffman stream entry")
        n, a, g, chunk = spec.get("n"), spec.get("alphabet"), spec.get("group"), spec.get("chunk_size")
        need(all(type(v) is int for v in (n, a, g, chunk)) and n >= 0 and 1 <= a <= huffman.MAX_ALPHABET and chunk >= 1,
             where, "stream header (n, alphabet, group, chunk_size) is invalid")
        need(g == 1 or (g in huffman.GROUPS and a**g <= 256), where,
             f"group {g} is not allowed: 1, or {huffman.GROUPS[1:]} with alphabet**group <= 256")
        need(alphabet is None or a == alphabet, where, f"alphabet {a} does not match the layer (expected {alphabet})")
        payload = self.piece(spec.get("payload"), what)
        need(n <= 8 * g * len(payload), where, f"{n} symbols cannot fit in {len(payload)} payload bytes")
        median, rice = spec.get("chunk_median"), spec.get("chunk_rice")
        need(type(median) is int and type(rice) is int, where, "chunk table header (chunk_median, chunk_rice) is invalid")
        try:
            full = huffman.unpack_lengths(self.piece(spec.get("lengths"), what), a**g)
            chunks = huffman.unpack_chunks(self.piece(spec.get("chunks"), what), huffman.lane_count(n, g, chunk),
                                           median, rice)
        except FormatError as err:
            raise FormatError(f"{where}: {err}") from None
        return huffman.HuffmanStream(full, np.frombuffer(payload, np.uint8), chunks, n, chunk, g, a)

    def _symbols(self, spec: Any, what: str, alphabet: int | None, on_device: bool,
                 owner: bool = False) -> torch.Tensor | np.ndarray:
        where = f"{self.where} {what}"
        stream = self._stream(spec, what, alphabet)
        n, a = stream.n_symbols, stream.alphabet
        try:
            if on_device and self.device is not None and -(-n // stream.group) < 1 << 31:  # the kernel indexes codes with int32
                from torchzip.kernels.huffman_decode import decode_triton

                out = decode_triton(stream, self.device)
                return out.to(torch.uint8) if a <= 256 else out
            decoded = huffman.decode(stream, self.section.release)
            if a > 256:
                return decoded.astype(np.int32)
            # decode returns a view of its (possibly group-padded) output array.
            return decoded.base if owner and decoded.base is not None and decoded.base.flags.owndata else decoded
        except FormatError as err:
            raise FormatError(f"{where}: {err}") from None

    def int8(self, spec: Any, count: int, what: str, on_device: bool = False) -> torch.Tensor:
        """``count`` int8 values, Huffman-coded or raw (see :meth:`StreamWriter.int8`)."""
        where = f"{self.where} {what}"
        if isinstance(spec, dict) and spec.get("codec") == "raw":
            q = self.raw(spec, what, ("int8",)).reshape(-1)
        else:
            if isinstance(spec, dict):  # before decoding a stream of the wrong length
                need(spec.get("n") == count, where, f"{brief(spec.get('n'))} int8 values where {count} are needed")
            q = self.symbols(spec, what, 256, on_device).to(torch.uint8).view(torch.int8)
        need(q.numel() == count, where, f"{q.numel()} int8 values where {count} are needed")
        return q
