"""Canonical, length-limited Huffman coding of integer streams, vectorised with numpy.

Used inside ``.tzip`` artifacts for codebook indices, int8 values (as 0..255) and sparse-position
gaps. Only the per-symbol code lengths are stored; codes are rebuilt canonically from them.

Format of a coded stream (what :class:`HuffmanStream` holds):

* ``lengths``: one uint8 per alphabet symbol, ``0`` for symbols that never occur. Codes are
  canonical: used symbols sorted by (length, symbol value) get consecutive code values, the
  first one all zeros, shifting left whenever the length grows (as in DEFLATE). With two or more
  used symbols the code must be complete (Kraft sum exactly 1); a lone used symbol has length 1
  and code ``0``.
* ``payload``: the codes of all symbols concatenated, each code written most significant bit
  first, the stream filling every byte from its most significant bit (bit ``i`` of the stream is
  bit ``7 - i % 8`` of byte ``i // 8``). The last byte is padded with zero bits; no other bytes
  follow.
* ``chunk_bits``: int64 bit offset (into the stream above) of the first code of each chunk.
  Chunk ``k`` holds symbols ``k * chunk_size`` up to ``(k + 1) * chunk_size`` (the last chunk may
  be shorter), so ``chunk_bits[0] == 0`` and there are ``ceil(n_symbols / chunk_size)`` entries.
  Chunks let decoders work on many chunks at once (numpy lanes here, GPU programs in
  ``torchzip.kernels.huffman_decode``). Each chunk must end exactly where the next one starts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from torchzip.errors import FormatError

# Longest code the format allows. Decode tables have 2**max(lengths) entries, so this bounds them.
MAX_CODE_LEN = 20
# Largest alphabet: symbols must fit in uint16.
MAX_ALPHABET = 65536
# Symbols encoded per slab, to bound the encoder's temporary memory on long streams.
_ENCODE_SLAB = 1 << 18
# Default chunking (see `encode`): numpy decoding runs one step per symbol of a chunk over all
# chunks at once, so short chunks are fast, but each chunk costs its span in the chunk table
# (a few bits once bit-packed by `pack_chunks`: about 1% at 1024 coded bits per chunk).
_CHUNK_BITS = 1024
_MIN_CHUNK = 128
_MAX_CHUNK = 4096


@dataclass
class HuffmanStream:
    """A Huffman-coded stream of integers (see the module docstring for the exact layout)."""

    lengths: np.ndarray  # uint8 per alphabet symbol, 0 = unused; the only table stored
    payload: bytes | np.ndarray  # MSB-first concatenated codes, zero-padded to a whole byte
    chunk_bits: np.ndarray  # int64 starting bit offset of each chunk
    n_symbols: int
    chunk_size: int  # symbols per chunk, except the last


def entropy_bits(symbols: np.ndarray) -> float:
    """Order-0 Shannon entropy of ``symbols`` times their count, in bits (0 for empty input)."""
    symbols = np.asarray(symbols).reshape(-1)
    if symbols.size == 0:
        return 0.0
    if symbols.dtype.kind not in "ui" or symbols.min() < 0:
        raise ValueError("entropy_bits needs non-negative integer symbols")
    counts = np.bincount(symbols.astype(np.int64, copy=False))
    counts = counts[counts > 0].astype(np.float64)
    return float(-(counts * np.log2(counts / symbols.size)).sum())


def code_lengths(counts: np.ndarray, max_len: int = 16) -> np.ndarray:
    """Optimal prefix-code lengths for ``counts`` with no code longer than ``max_len`` bits.

    Uses package-merge, which gives the minimum total ``sum(count * length)`` under the length
    limit (and so plain Huffman lengths whenever the limit does not bind). Returns uint8 lengths,
    0 for symbols with count 0; a lone used symbol gets length 1; all-zero counts give all zeros.
    """
    counts = np.asarray(counts)
    if counts.ndim != 1:
        raise ValueError(f"counts must be 1-D, got shape {counts.shape}")
    if counts.size > MAX_ALPHABET:
        raise ValueError(f"alphabet of {counts.size} symbols exceeds the limit of {MAX_ALPHABET}")
    if counts.size and (counts.dtype.kind not in "ui" or counts.min() < 0):
        raise ValueError("counts must be non-negative integers")
    if not 1 <= max_len <= MAX_CODE_LEN:
        raise ValueError(f"max_len must be in 1..{MAX_CODE_LEN}, got {max_len}")
    counts = counts.astype(np.int64, copy=False)
    lengths = np.zeros(counts.size, np.uint8)
    used = np.flatnonzero(counts)
    if used.size == 0:
        return lengths
    if used.size == 1:
        lengths[used] = 1
        return lengths
    if used.size > 1 << max_len:
        raise ValueError(f"{used.size} used symbols cannot all get codes of at most {max_len} bits")
    order = used[np.argsort(counts[used], kind="stable")]  # lightest first
    lengths[order] = _package_merge(counts[order], max_len)
    return lengths


def _package_merge(weights: np.ndarray, max_len: int) -> np.ndarray:
    """Lengths for ascending ``weights`` (at least 2 of them) by package-merge."""
    n = weights.size
    leaf_flags = []  # per level, deepest first: which items of the merged list are leaves
    prev = np.empty(0, np.int64)
    for _ in range(max_len):
        half = prev.size // 2
        packages = prev[0 : 2 * half : 2] + prev[1 : 2 * half : 2]
        # Merge two sorted lists; leaves go first on ties (keeps the choice deterministic).
        leaf_pos = np.arange(n) + np.searchsorted(packages, weights, side="left")
        pack_pos = np.arange(half) + np.searchsorted(weights, packages, side="right")
        merged = np.empty(n + half, np.int64)
        merged[leaf_pos] = weights
        merged[pack_pos] = packages
        is_leaf = np.zeros(n + half, bool)
        is_leaf[leaf_pos] = True
        leaf_flags.append(is_leaf)
        prev = merged
    # Take the 2n-2 cheapest items of the top list; each package taken at one level means its
    # two parts are taken at the level below. A leaf's length is the number of levels it is taken at,
    # and the leaves taken at a level are always the lightest ones.
    lengths = np.zeros(n, np.uint8)
    take = 2 * n - 2
    for is_leaf in reversed(leaf_flags):
        if take == 0:
            break
        leaves = int(np.count_nonzero(is_leaf[:take]))
        lengths[:leaves] += 1
        take = 2 * (take - leaves)
    return lengths


def canonical_codes(lengths: np.ndarray, max_len: int = MAX_CODE_LEN) -> np.ndarray:
    """Canonical code values (uint32, 0 for unused symbols) for a table of code lengths.

    Raises :class:`FormatError` unless ``lengths`` describe a usable prefix code: every length at
    most ``max_len``, Kraft sum not above 1, and exactly 1 when two or more symbols are used (a
    lone used symbol must have length 1).
    """
    lengths = _check_lengths(lengths, max_len)
    codes = np.zeros(lengths.size, np.uint32)
    used = np.flatnonzero(lengths)
    if used.size == 0:
        return codes
    lens = lengths[used].astype(np.int64)
    order = np.lexsort((used, lens))  # by length, then symbol
    used, lens = used[order], lens[order]
    top = int(lens.max())
    # Each code is the running Kraft sum so far, left-aligned to `top` bits then cut to its length.
    span = np.left_shift(1, top - lens)
    starts = np.cumsum(span) - span
    codes[used] = (starts >> (top - lens)).astype(np.uint32)
    return codes


def _check_lengths(lengths: np.ndarray, max_len: int = MAX_CODE_LEN) -> np.ndarray:
    """Validate a lengths table (see :func:`canonical_codes`) and return it as uint8."""
    lengths = np.asarray(lengths)
    if lengths.ndim != 1:
        raise FormatError(f"Huffman lengths table must be 1-D, got shape {lengths.shape}")
    if lengths.size > MAX_ALPHABET:
        raise FormatError(f"Huffman alphabet of {lengths.size} symbols exceeds {MAX_ALPHABET}")
    if lengths.size and lengths.dtype.kind not in "ui":
        raise FormatError(f"Huffman lengths must be integers, got dtype {lengths.dtype}")
    if lengths.size == 0:
        return lengths.astype(np.uint8)
    lo, hi = int(lengths.min()), int(lengths.max())
    if lo < 0 or hi > min(max_len, MAX_CODE_LEN):
        raise FormatError(
            f"Huffman code lengths must be in 0..{min(max_len, MAX_CODE_LEN)}, got {lo}..{hi}"
        )
    lengths = lengths.astype(np.uint8)
    used = lengths[lengths > 0].astype(np.int64)
    if used.size == 0:
        return lengths
    if used.size == 1:
        if used[0] != 1:
            raise FormatError(f"a lone used Huffman symbol must have length 1, got {used[0]}")
        return lengths
    # Kraft sum in exact integer units of 2**-hi.
    kraft = int(np.left_shift(1, hi - used).sum())
    if kraft > 1 << hi:
        raise FormatError(
            f"Huffman lengths are not a prefix code: Kraft sum {kraft}/{1 << hi} exceeds 1"
        )
    if kraft < 1 << hi:
        raise FormatError(
            f"Huffman lengths are an incomplete code: Kraft sum {kraft}/{1 << hi} is below 1"
        )
    return lengths


def encode(
    symbols: np.ndarray,
    alphabet_size: int | None = None,
    *,
    chunk_size: int | None = None,
    max_len: int = 16,
) -> HuffmanStream:
    """Huffman-code a 1-D stream of integers in ``0 .. alphabet_size - 1``.

    ``alphabet_size`` defaults to ``max(symbols) + 1``. Code lengths are fitted to the stream's own
    counts and limited to ``max_len`` bits. Chunks of ``chunk_size`` symbols get their starting bit
    offsets recorded so decoders can work on all chunks at once. Smaller chunks decode faster
    (more chunks in flight) but need more offsets; by default (``None``) chunks hold the fewest
    symbols (a power of two, 128..4096) that make up at least 1024 coded bits on average, so a
    chunk's bit-packed span (:func:`pack_chunks`) costs about 1% of the payload.
    """
    symbols = np.asarray(symbols)
    if symbols.ndim != 1:
        raise ValueError(f"symbols must be 1-D, got shape {symbols.shape}")
    if symbols.size and symbols.dtype.kind not in "ui":
        raise ValueError(f"symbols must be integers, got dtype {symbols.dtype}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    symbols = symbols.astype(np.int64, copy=False)
    lo = int(symbols.min()) if symbols.size else 0
    hi = int(symbols.max()) if symbols.size else -1
    if alphabet_size is None:
        alphabet_size = hi + 1
    if not 0 <= alphabet_size <= MAX_ALPHABET:
        raise ValueError(f"alphabet_size must be in 0..{MAX_ALPHABET}, got {alphabet_size}")
    if lo < 0 or hi >= alphabet_size:
        raise ValueError(f"symbols must lie in 0..{alphabet_size - 1}, got {lo}..{hi}")

    lengths = code_lengths(np.bincount(symbols, minlength=alphabet_size), max_len)
    codes = canonical_codes(lengths, max_len)
    n = symbols.size
    if n == 0:
        return HuffmanStream(lengths, b"", np.zeros(0, np.int64), 0, chunk_size or _MIN_CHUNK)

    sym_len = lengths.astype(np.int64)
    ends = np.cumsum(sym_len[symbols])
    total_bits = int(ends[-1])
    if chunk_size is None:
        chunk_size = _auto_chunk_size(n, total_bits)
    chunk_bits = np.concatenate(([0], ends[chunk_size - 1 : -1 : chunk_size])).astype(np.int64)
    # Build the stream as big-endian 64-bit words. Codes are at most 20 bits, so every word holds
    # the start of at least one code, and a code spills into at most the next word.
    words = np.zeros(total_bits // 64 + 2, np.uint64)
    sym_code = codes.astype(np.uint64)
    for first_sym in range(0, n, _ENCODE_SLAB):
        part = symbols[first_sym : first_sym + _ENCODE_SLAB]
        lens = sym_len[part]
        starts = ends[first_sym : first_sym + part.size] - lens
        word = starts >> 6
        room = 64 - (starts & 63) - lens  # bits left in the word after the code; < 0 spills
        code = sym_code[part]
        head = (code << np.maximum(room, 0).astype(np.uint64)) >> np.maximum(-room, 0).astype(np.uint64)
        # Codes never share bits, so summing a word's pieces is the same as OR-ing them.
        first = np.flatnonzero(np.diff(word)) + 1
        base = int(word[0])
        words[base : base + first.size + 1] += np.add.reduceat(head, np.concatenate(([0], first)))
        spill = np.flatnonzero(room < 0)
        words[word[spill] + 1] += code[spill] << (64 + room[spill]).astype(np.uint64)
    payload = words.astype(">u8").tobytes()[: (total_bits + 7) // 8]
    return HuffmanStream(lengths, payload, chunk_bits, n, chunk_size)


def _auto_chunk_size(n: int, total_bits: int) -> int:
    """Fewest symbols per chunk (a power of two) that average _CHUNK_BITS coded bits."""
    want = _CHUNK_BITS * n / max(total_bits, 1)
    size = _MIN_CHUNK
    while size < want and size < _MAX_CHUNK:
        size *= 2
    return size


def decode_table(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """One-level decode table for a lengths table: ``(symbol, length, width)``.

    ``width`` is the longest code length. Entry ``w`` of the two arrays (``2**width`` of each)
    gives the symbol whose code is a prefix of the ``width``-bit window ``w`` and that code's
    length. Entries no code reaches (only possible with a lone symbol) have length 0. Raises
    :class:`FormatError` if the lengths are not a valid code; an unused table gives width 0.
    """
    lengths = _check_lengths(lengths)
    used = np.flatnonzero(lengths)
    if used.size == 0:
        return np.zeros(1, np.int64), np.zeros(1, np.int64), 0
    lens = lengths[used].astype(np.int64)
    order = np.lexsort((used, lens))
    used, lens = used[order], lens[order]
    width = int(lens.max())
    # Canonical codes tile the windows in order, each code owning 2**(width - len) of them.
    reps = np.left_shift(1, width - lens)
    size = 1 << width
    syms = np.zeros(size, np.int64)
    sizes = np.zeros(size, np.int64)
    filled = int(reps.sum())
    syms[:filled] = np.repeat(used, reps)
    sizes[:filled] = np.repeat(lens, reps)
    return syms, sizes, width


def check_stream(stream: HuffmanStream) -> np.ndarray:
    """Validate a stream's structure and return its payload as a uint8 array.

    Checks the lengths table, that the symbol count, chunk size, chunk table and payload size are
    consistent, and that every chunk's bit span is possible for its symbol count. The symbol count
    is bounded by the payload size here, so decoders can size buffers from it safely. Raises
    :class:`FormatError` on the first problem found.
    """
    lengths = _check_lengths(stream.lengths)
    n, cs = stream.n_symbols, stream.chunk_size
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise FormatError(f"Huffman n_symbols must be a non-negative integer, got {n!r}")
    if not isinstance(cs, (int, np.integer)) or cs < 1:
        raise FormatError(f"Huffman chunk_size must be a positive integer, got {cs!r}")
    n, cs = int(n), int(cs)
    payload = stream.payload
    if isinstance(payload, np.ndarray):
        if payload.dtype != np.uint8 or payload.ndim != 1:
            raise FormatError(f"Huffman payload must be 1-D uint8, got {payload.dtype} {payload.shape}")
    else:
        try:
            payload = np.frombuffer(payload, np.uint8)
        except TypeError:
            raise FormatError(f"Huffman payload must be bytes, got {type(payload).__name__}") from None
    chunk_bits = np.asarray(stream.chunk_bits)
    if chunk_bits.ndim != 1 or (chunk_bits.size and chunk_bits.dtype.kind not in "ui"):
        raise FormatError("Huffman chunk table must be a 1-D integer array")
    n_chunks = -(-n // cs)
    if chunk_bits.size != n_chunks:
        raise FormatError(
            f"Huffman chunk table has {chunk_bits.size} entries, but {n} symbols in chunks of {cs} "
            f"need {n_chunks}"
        )
    total = 8 * payload.size
    if n == 0:
        if payload.size:
            raise FormatError(f"empty Huffman stream has {payload.size} payload bytes, expected 0")
        return payload
    used = lengths[lengths > 0]
    if used.size == 0:
        raise FormatError(f"Huffman stream has {n} symbols but its lengths table codes none")
    min_len, max_len = int(used.min()), int(used.max())
    if n * min_len > total:
        raise FormatError(
            f"Huffman payload too short: {n} symbols need at least {n * min_len} bits, got {total}"
        )
    if total - 8 >= n * max_len:
        raise FormatError(
            f"Huffman payload too long: {n} symbols take at most {n * max_len} bits, got {total}"
        )
    chunk_bits = chunk_bits.astype(np.int64)
    if chunk_bits[0] != 0:
        raise FormatError(f"first Huffman chunk must start at bit 0, got {chunk_bits[0]}")
    spans = np.diff(chunk_bits)
    if spans.size and (spans.min() < cs * min_len or spans.max() > cs * max_len):
        raise FormatError(
            f"Huffman chunk offsets are inconsistent: chunk spans {spans.min()}..{spans.max()} bits, "
            f"{cs} symbols take {cs * min_len}..{cs * max_len}"
        )
    last = n - (n_chunks - 1) * cs
    if chunk_bits[-1] + last * min_len > total:
        raise FormatError(
            f"last Huffman chunk starts at bit {chunk_bits[-1]}, beyond what {total} payload bits allow"
        )
    return payload


def check_chunk_ends(end: np.ndarray, chunk_bits: np.ndarray, payload: np.ndarray) -> None:
    """Raise :class:`FormatError` unless every chunk ended where the next begins and the last
    ended in the payload's final byte, followed by zero padding (shared by the GPU decoder)."""
    bad = np.flatnonzero(end[:-1] != chunk_bits[1:])
    if bad.size:
        i = int(bad[0])
        raise FormatError(
            f"Huffman chunk {i} decodes to end at bit {end[i]}, but chunk {i + 1} starts at bit "
            f"{chunk_bits[i + 1]}: corrupted payload, lengths or chunk table"
        )
    total = 8 * payload.size
    pad = total - int(end[-1])
    if not 0 <= pad < 8 or (pad and int(payload[-1]) & ((1 << pad) - 1)):
        raise FormatError(
            f"Huffman stream decodes to end at bit {end[-1]}, but its payload holds {total} bits "
            "(expected under 8 zero padding bits): corrupted payload, lengths or chunk table"
        )


def decode(stream: HuffmanStream) -> np.ndarray:
    """Decode a :class:`HuffmanStream` back to its symbols.

    Returns uint8 symbols when the alphabet has at most 256 entries, else uint16. Works on all
    chunks at once: each step decodes the next one or more symbols of every chunk with a table
    lookup. Checks that every chunk ends exactly where the next begins and that the padding is
    zero; any malformed or corrupted stream raises :class:`FormatError`.
    """
    payload = check_stream(stream)
    lengths = np.asarray(stream.lengths).astype(np.uint8)
    out_dtype = np.uint8 if lengths.size <= 256 else np.uint16
    # A chunk size beyond the stream means one chunk; clamp it so arrays never see a huge value.
    n, cs = int(stream.n_symbols), min(int(stream.chunk_size), int(stream.n_symbols))
    if n == 0:
        return np.zeros(0, out_dtype)
    syms, sizes, width = decode_table(lengths)
    if sizes[-1] == 0:  # lone symbol: every code is the single bit 0
        if payload.any():
            raise FormatError("Huffman stream of a lone symbol has non-zero bits")
        return np.full(n, syms[0], out_dtype)
    return _decode_lanes(payload, np.asarray(stream.chunk_bits).astype(np.int64), n, cs,
                         syms, sizes, width, out_dtype)


def _steps_table(
    syms: np.ndarray, sizes: np.ndarray, width: int, k: int, sym_bits: int
) -> tuple[np.ndarray, np.ndarray]:
    """Table over ``k * width``-bit windows: the next ``k`` symbols packed little-endian, and
    the bits they take. ``k`` codes of at most ``width`` bits always fit in the window."""
    if k == 1:
        return syms.astype(f"<u{sym_bits // 8}"), sizes
    bits = k * width
    window = np.arange(1 << bits, dtype=np.int32)
    mask = (1 << width) - 1
    syms = syms.astype(np.uint64)
    sizes32 = sizes.astype(np.int32)
    used = np.zeros(window.size, np.int32)
    packed = np.zeros(window.size, np.uint64)
    for j in range(k):
        idx = (window >> (bits - width - used)) & mask
        packed |= syms[idx] << np.uint64(j * sym_bits)
        used += sizes32[idx]
    return packed.astype(f"<u{k * sym_bits // 8}"), used.astype(np.int64)


def _symbols_per_step(width: int, n: int, sym_bits: int) -> int:
    """How many symbols one table lookup decodes: more per step means fewer numpy calls, but the
    table has 2**(k * width) entries and costs time to build, so only big streams get big tables."""
    cap = 16 if n >= 1 << 19 else 12  # a 16-bit table takes ~1.5 ms to build
    for k in (4, 2):
        if k * width <= cap and k * sym_bits <= 64:
            return k
    return 1


def _decode_lanes(
    payload: np.ndarray,
    chunk_bits: np.ndarray,
    n: int,
    cs: int,
    syms: np.ndarray,
    sizes: np.ndarray,
    width: int,
    out_dtype: type,
) -> np.ndarray:
    """Decode every chunk at once, one lane per chunk (see :func:`decode`)."""
    lanes = chunk_bits.size
    sym_bits = 8 * np.dtype(out_dtype).itemsize
    k = _symbols_per_step(width, n, sym_bits)
    bits = k * width
    packed, step_bits = _steps_table(syms, sizes, width, k, sym_bits)
    steps = -(-cs // k)

    # 64-bit big-endian windows starting at every 4-byte boundary. Lanes keep stepping after their
    # chunk ends (the last one past the payload), so pad with zeros as far as any lane can reach.
    reach = int(chunk_bits[-1]) + steps * bits + 64
    n_words = max(payload.size, reach // 8) // 4 + 2
    buf = np.zeros(4 * n_words, np.uint8)
    buf[: payload.size] = payload
    words = np.frombuffer(buf, ">u4").astype(np.uint64)
    win = (words[:-1] << np.uint64(32)) | words[1:]

    target = np.full(lanes, cs, np.int64)  # symbols of each lane's own chunk
    target[-1] = n - (lanes - 1) * cs
    full, full_last = cs // k, int(target[-1]) // k
    c = chunk_bits.copy()  # bit cursor of every lane
    end = c.copy()  # each lane's cursor after its last whole step of own symbols
    end_last = 0
    out = np.empty((steps, lanes), packed.dtype)
    word = np.empty(lanes, np.int64)
    offset = np.empty(lanes, np.int64)
    w = np.empty(lanes, np.uint64)
    x = np.empty(lanes, np.uint64)
    adv = np.empty(lanes, np.int64)
    shift = np.uint64(64 - bits)
    xi = x.view(np.int64)
    offset_u = offset.view(np.uint64)
    # A window loaded at bit offset <= 31 has >= 33 bits after it: room for two lookups when a
    # lookup takes at most 16 bits, which saves reloading it (numpy calls dominate the cost).
    per_load = 2 if 2 * bits <= 33 else 1
    for t0 in range(0, steps, per_load):
        np.right_shift(c, 5, out=word)
        win.take(word, out=w)
        np.bitwise_and(c, 31, out=offset)
        for t in range(t0, min(t0 + per_load, steps)):
            if t == full:
                end[:] = c
            if t == full_last:
                end_last = int(c[-1])
            np.left_shift(w, offset_u, out=x)
            np.right_shift(x, shift, out=x)
            packed.take(xi, out=out[t])
            step_bits.take(xi, out=adv)
            np.add(c, adv, out=c)
            if t + 1 < t0 + per_load:
                np.add(offset, adv, out=offset)
    if full == steps:
        end[:] = c
    end[-1] = end_last if full_last < steps else c[-1]

    # Finish each lane's chunk one symbol at a time, then check it ends where the next begins.
    rest = target % k
    for r in range(1, k):
        more = rest >= r
        at = end[more]
        idx = (win[at >> 5] << (at & 31).astype(np.uint64)) >> np.uint64(64 - width)
        end[more] = at + sizes[idx.astype(np.int64)]
    check_chunk_ends(end, chunk_bits, payload)

    # Lane-major order: each lane's steps in turn, each step's k symbols in order. torch's
    # transpose copy is several times faster than numpy's for narrow dtypes (signed view: torch
    # lacks some unsigned copies).
    signed = out.view(f"i{out.itemsize}")
    flat = torch.from_numpy(signed).T.contiguous().numpy().view(out_dtype).reshape(lanes, steps * k)
    if steps * k != cs:
        flat = flat[:, :cs]
    return flat.reshape(-1)[:n]


# ---- how a stream's tables are stored (docs/FORMAT.md) -------------------------------------


def pack_lengths(lengths: np.ndarray) -> bytes:
    """Code lengths (each at most 15) two per byte, the first in the low nibble; trailing unused
    symbols are dropped."""
    lengths = np.asarray(lengths, np.uint8)
    if lengths.size and int(lengths.max()) > 15:
        raise ValueError("nibble-packed tables need code lengths of at most 15 (encode with max_len=15)")
    used = int(np.flatnonzero(lengths)[-1]) + 1 if lengths.any() else 0
    padded = np.zeros(used + used % 2, np.uint8)
    padded[:used] = lengths[:used]
    return (padded[0::2] | (padded[1::2] << 4)).astype(np.uint8).tobytes()


def unpack_lengths(data: bytes, alphabet: int) -> np.ndarray:
    """Inverse of :func:`pack_lengths` for an alphabet of ``alphabet`` symbols."""
    packed = np.frombuffer(data, np.uint8)
    lengths = np.stack([packed & 15, packed >> 4], axis=1).reshape(-1)
    if lengths.size > alphabet + 1 or lengths[alphabet:].any():
        raise FormatError(f"code length table has {lengths.size} entries for an alphabet of {alphabet}")
    out = np.zeros(alphabet, np.uint8)
    out[: min(lengths.size, alphabet)] = lengths[:alphabet]
    return out


def pack_chunks(chunk_bits: np.ndarray) -> tuple[bytes, int, int]:
    """The chunk table as ``(data, base, width)``: each chunk's span in bits (but the last's) minus
    ``base`` (the smallest span), in ``width`` bits, least significant bit first."""
    spans = np.diff(np.asarray(chunk_bits, np.int64))
    if not spans.size:
        return b"", 0, 0
    base = int(spans.min())
    width = int(spans.max() - base).bit_length()
    bits = ((spans - base)[:, None] >> np.arange(width, dtype=np.int64)) & 1
    return np.packbits(bits.astype(np.uint8).reshape(-1), bitorder="little").tobytes(), base, width


def unpack_chunks(data: bytes, count: int, base: int, width: int) -> np.ndarray:
    """Inverse of :func:`pack_chunks`: the starting bit of each of ``count`` chunks."""
    if count < 0 or base < 0 or not 0 <= width <= 40:
        raise FormatError(f"chunk table header is invalid (count {count}, base {base}, width {width})")
    need = (max(count - 1, 0) * width + 7) // 8
    if len(data) != need:
        raise FormatError(f"chunk table holds {len(data)} bytes, {count} chunks of {width}-bit spans need {need}")
    if count == 0:
        return np.zeros(0, np.int64)
    bits = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")[: (count - 1) * width]
    spans = bits.reshape(count - 1, width).astype(np.int64) @ (np.int64(1) << np.arange(width, dtype=np.int64)) + base
    return np.concatenate(([0], np.cumsum(spans))).astype(np.int64)


def stored_bytes(stream: HuffmanStream) -> int:
    """Bytes of payload, code length table and chunk table, as a .tzip file stores them."""
    return len(bytes(stream.payload)) + len(pack_lengths(stream.lengths)) + len(pack_chunks(stream.chunk_bits)[0])
