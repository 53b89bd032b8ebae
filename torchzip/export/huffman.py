"""Canonical, length-limited Huffman coding of integer streams, vectorised with numpy.

Used inside ``.tzip`` artifacts for codebook indices, int8 values (as 0..255) and sparse-position
gaps. Only the per-code lengths are stored; codes are rebuilt canonically from them.

Format of a coded stream (what :class:`HuffmanStream` holds; docs/FORMAT.md says the same):

* ``group`` ``G`` symbols share one code: code ``i`` stands for symbols ``i*G .. i*G + G - 1``
  (symbols past the end count as 0) and its value is ``sum(s[i*G + k] * A**k)`` for an alphabet of
  ``A`` symbols. Coding pairs or quads of a small alphabet (``A**G <= 256``) gets much closer to the
  entropy than one code per symbol (a code is at least one bit, and lengths are whole bits), and
  decodes ``G`` symbols per table lookup. ``G`` is 1 for larger alphabets.
* ``lengths``: one uint8 per code value (``A**G`` of them), ``0`` for values that never occur.
  Codes are canonical: used values sorted by (length, value) get consecutive code values, the
  first one all zeros, shifting left whenever the length grows (as in DEFLATE). With two or more
  used values the code must be complete (Kraft sum exactly 1); a lone used value has length 1 and
  code ``0``.
* Lanes: the ``M = ceil(n / G)`` codes are dealt round-robin to ``L = ceil(M / chunk_size)``
  lanes: lane ``j`` holds codes ``j, j + L, j + 2L, ...``. Decoders step all lanes at once and
  step ``t`` yields codes ``t*L .. t*L + L - 1``, already in stream order (nothing to transpose,
  and neighbouring GPU threads store to neighbouring addresses).
* ``payload``: lane 0's codes, then lane 1's, and so on, each code written most significant bit
  first, the stream filling every byte from its most significant bit (bit ``i`` of the stream is
  bit ``7 - i % 8`` of byte ``i // 8``). The last byte is padded with zero bits; no other bytes
  follow.
* ``chunk_bits``: int64 bit offset of the first code of each lane (a "chunk" of the stream), so
  ``chunk_bits[0] == 0``. Each lane must end exactly where the next one starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from torchzip.errors import FormatError

# Longest code the format allows. Decode tables have 2**max(lengths) entries, so this bounds them.
MAX_CODE_LEN = 20
# Largest code alphabet: code values must fit in uint16.
MAX_ALPHABET = 65536
# Symbols per code that a stream may use; more than one only while A**G <= 256.
GROUPS = (1, 2, 4, 8)
# Symbols encoded per slab, to bound the encoder's temporary memory on long streams.
_ENCODE_SLAB = 1 << 18
# Default lane length (see `encode`): numpy decoding runs one step per code of a lane over all
# lanes at once, so short lanes decode faster, but each lane costs its Rice-coded span in the
# chunk table (`pack_chunks`: about 7 bits, 0.25% of a 3000-bit lane). Streams of short codes
# stop at 640 codes per lane, where the step count starts to cost more than the table saves.
_LANE_BITS = 3000
_MIN_LANE = 64
_MAX_LANE = 640
# Most codes a lane may hold (`chunk_size`): decoders take one step per code of a lane, so this
# bounds their time by the payload size, whatever a file declares.
MAX_LANE_CODES = 1 << 16
# Largest chunk-table median a reader accepts (spans never exceed the payload anyway).
_MAX_MEDIAN = 1 << 62


@dataclass
class HuffmanStream:
    """A Huffman-coded stream of integers (see the module docstring for the exact layout)."""

    lengths: np.ndarray  # uint8 per code value, 0 = unused; the only table stored
    payload: bytes | np.ndarray  # MSB-first concatenated codes, lane after lane, zero-padded
    chunk_bits: np.ndarray  # int64 starting bit offset of each lane
    n_symbols: int
    chunk_size: int  # codes per lane (nominal: lanes = ceil(codes / chunk_size))
    group: int = 1  # symbols per code
    alphabet: int | None = None  # symbols' alphabet A; None means len(lengths) (needs group 1)

    @property
    def symbol_alphabet(self) -> int:
        return int(self.alphabet) if self.alphabet is not None else int(np.asarray(self.lengths).size)


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


def group_codes(symbols: np.ndarray, alphabet: int, group: int) -> np.ndarray:
    """Code values of ``symbols`` taken ``group`` at a time (see the module docstring)."""
    if group == 1:
        return symbols
    m = -(-symbols.size // group)
    if alphabet**group <= 256:  # the usual case (pairs and quads of small alphabets): one byte a code
        # Summed in uint8 (the largest code, alphabet**group - 1, fits), a code's symbols read in
        # strides: no padded copy of the stream and no wider temporary. A short last code is
        # padded with zero symbols.
        codes = np.zeros(m, np.uint8)
        full = symbols.size // group
        for j in range(group):
            codes[:full] += symbols[j: full * group: group].astype(np.uint8, copy=False) * np.uint8(alphabet**j)
        for j, s in enumerate(symbols[full * group:]):
            codes[full] += np.uint8(int(s) * alphabet**j)
        return codes
    padded = np.zeros(m * group, symbols.dtype)
    padded[: symbols.size] = symbols
    return padded.reshape(m, group).astype(np.int64) @ (np.int64(alphabet) ** np.arange(group, dtype=np.int64))


def _bincount(codes: np.ndarray, values: int) -> np.ndarray:
    """``np.bincount(codes, minlength=values)`` a slab at a time (bincount widens its input to
    int64: eight bytes a code for a whole stream)."""
    counts = np.zeros(values, np.int64)
    for first in range(0, codes.size, _ENCODE_SLAB):
        counts += np.bincount(codes[first: first + _ENCODE_SLAB], minlength=values)[:values] \
            if values else 0
    return counts


def _choose_group(symbols: np.ndarray, alphabet: int, max_len: int) -> tuple[int, np.ndarray, np.ndarray]:
    """The group size whose payload plus stored lengths table is smallest (1 unless A <= 16),
    with the stream's code values and their counts for it."""
    best, best_bytes = (1, symbols, None), None
    for g in GROUPS:
        if g > 1 and alphabet**g > 256:
            break
        codes = group_codes(symbols, alphabet, g)
        counts = _bincount(codes, alphabet**g)
        size = _coded_size(counts, alphabet, g, max_len)
        if size is not None and (best_bytes is None or size < best_bytes):
            best, best_bytes = (g, codes, counts), size
    return best


def _coded_size(counts: np.ndarray, alphabet: int, group: int, max_len: int) -> float | None:
    """Payload plus lengths-table bytes of a stream with these code-value ``counts`` (None when
    more values are used than codes of at most ``max_len`` bits can tell apart)."""
    if np.count_nonzero(counts) > 1 << max_len:
        return None
    return int((counts * code_lengths(counts, max_len)).sum()) / 8 + alphabet**group / 2


def encode_packed(data: np.ndarray, bits: int, *, max_len: int = 16, group: int | None = None) -> HuffmanStream:
    """``encode(symbols, 2**bits, max_len=max_len)`` for symbols given packed ``8 // bits`` to a
    byte, the first in the lowest bits (the layout of :func:`torchzip.packed.bits.pack_bits` for
    rows that fill whole words): ``data.size * (8 // bits)`` symbols, the same stream bit for bit.

    With ``8 // bits`` symbols a code the code values are the bytes themselves, so the stream is
    coded without ever holding its symbols one byte each; the group is chosen from the byte
    counts as :func:`encode` chooses it from the symbols (or is ``group``, which must divide
    ``8 // bits``)."""
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"bits must be 1, 2, 4 or 8 (symbols that tile a byte), got {bits}")
    data = np.asarray(data)
    if data.ndim != 1 or data.dtype != np.uint8:
        raise ValueError(f"data must be 1-D uint8, got {data.dtype} of shape {data.shape}")
    alphabet, per_byte = 1 << bits, 8 // bits
    if group is not None and (group not in GROUPS or per_byte % group):
        raise ValueError(f"group must divide {per_byte} (symbols a byte) and be one of {GROUPS}, got {group}")
    n = data.size * per_byte
    if n == 0:
        return encode(np.zeros(0, np.uint8), alphabet, max_len=max_len)
    byte_counts = _bincount(data, 256)
    value = np.arange(256)
    best, best_bytes = None, None
    for g in GROUPS:  # g divides per_byte: every code lies inside one byte
        if g > 1 and alphabet**g > 256:
            break
        if group is not None and g != group:
            continue
        mask, fields = alphabet**g - 1, per_byte // g
        counts = sum(np.bincount((value >> (p * g * bits)) & mask, weights=byte_counts, minlength=alphabet**g)
                     for p in range(fields)).astype(np.int64)
        size = _coded_size(counts, alphabet, g, max_len)
        if size is not None and (best_bytes is None or size < best_bytes):
            best, best_bytes = (g, counts), size
    g, counts = best
    fields = per_byte // g
    if fields == 1:
        codes = data
    else:  # a smaller group won: code p of each byte is its p-th field of g symbols
        codes = np.empty(data.size * fields, np.uint8)
        for p in range(fields):
            codes[p::fields] = (data >> np.uint8(p * g * bits)) & np.uint8(alphabet**g - 1)
    return _code_stream(codes, counts, n, alphabet, g, None, max_len)


def lane_count(n: int, group: int, chunk_size: int) -> int:
    """Lanes of a stream of ``n`` symbols, ``group`` per code, about ``chunk_size`` codes a lane."""
    return -(-(-(-n // group)) // chunk_size)


def lane_order(m: int, lanes: int) -> np.ndarray:
    """Indices of ``m`` codes in payload order: lane 0's (0, L, 2L, ...), then lane 1's, ..."""
    grid = np.arange(-(-m // lanes) * lanes, dtype=np.int64).reshape(-1, lanes).T.reshape(-1)
    return grid[grid < m]


def _in_lane_order(codes: np.ndarray, lanes: int) -> np.ndarray:
    """``codes[lane_order(codes.size, lanes)]`` without an int64 index per code: a transpose of
    the codes dealt into rows of ``lanes``, the unfilled places of the last row left out."""
    m = codes.size
    rows = -(-m // lanes)
    full = m - (rows - 1) * lanes  # lanes 0 .. full-1 hold `rows` codes, the others one fewer
    out = np.empty(m, codes.dtype)
    # Copied straight into place: no padded copy and no per-part copies of a big stream.
    grid = codes[: (rows - 1) * lanes].reshape(rows - 1, lanes)  # the complete rows
    head = out[: full * rows].reshape(full, rows)
    head[:, : rows - 1] = grid[:, :full].T
    head[:, rows - 1] = codes[(rows - 1) * lanes:]
    out[full * rows:].reshape(lanes - full, rows - 1)[...] = grid[:, full:].T
    return out


def lane_counts(m: int, lanes: int) -> np.ndarray:
    """Codes per lane when ``m`` codes are dealt round-robin to ``lanes`` lanes."""
    q, r = divmod(m, lanes)
    return np.where(np.arange(lanes) < r, q + 1, q).astype(np.int64)


def encode(
    symbols: np.ndarray,
    alphabet_size: int | None = None,
    *,
    chunk_size: int | None = None,
    max_len: int = 16,
    group: int | None = None,
) -> HuffmanStream:
    """Huffman-code a 1-D stream of integers in ``0 .. alphabet_size - 1``.

    ``alphabet_size`` defaults to ``max(symbols) + 1``. ``group`` symbols share one code (see the
    module docstring); by default (``None``) the encoder picks the group that codes smallest.
    Code lengths are fitted to the stream's own counts and limited to ``max_len`` bits. Codes are
    dealt to lanes of about ``chunk_size`` codes each, whose starting bit offsets are recorded so
    decoders can work on all lanes at once. Shorter lanes decode faster (fewer steps) but need
    more offsets; by default lanes hold about 3000 coded bits (at most 640 codes), so an offset
    costs about 0.25%.
    """
    symbols = np.asarray(symbols)
    if symbols.ndim != 1:
        raise ValueError(f"symbols must be 1-D, got shape {symbols.shape}")
    if symbols.size and symbols.dtype.kind not in "ui":
        raise ValueError(f"symbols must be integers, got dtype {symbols.dtype}")
    if chunk_size is not None and not 1 <= chunk_size <= MAX_LANE_CODES:
        raise ValueError(f"chunk_size must be in 1..{MAX_LANE_CODES}, got {chunk_size}")
    lo = int(symbols.min()) if symbols.size else 0
    hi = int(symbols.max()) if symbols.size else -1
    if alphabet_size is None:
        alphabet_size = hi + 1
    if not 0 <= alphabet_size <= MAX_ALPHABET:
        raise ValueError(f"alphabet_size must be in 0..{MAX_ALPHABET}, got {alphabet_size}")
    if lo < 0 or hi >= alphabet_size:
        raise ValueError(f"symbols must lie in 0..{alphabet_size - 1}, got {lo}..{hi}")
    # The narrowest type that holds every symbol: the coder's temporaries scale with it.
    narrow = np.uint8 if alphabet_size <= 256 else np.uint16 if alphabet_size <= 1 << 16 else np.int64
    symbols = symbols.astype(narrow, copy=False)
    codes = counts = None
    if group is None:
        group, codes, counts = _choose_group(symbols, alphabet_size, max_len) if symbols.size else \
            (1, symbols, np.zeros(alphabet_size, np.int64))
    if group not in GROUPS or (group > 1 and not 1 <= alphabet_size**group <= 256):
        raise ValueError(f"group must be one of {GROUPS} with alphabet_size**group <= 256 when above 1, "
                         f"got {group} for an alphabet of {alphabet_size}")

    values = max(alphabet_size**group, 1) if group > 1 else alphabet_size
    if codes is None:
        codes = group_codes(symbols, alphabet_size, group)
    if counts is None:
        counts = _bincount(codes, values)
    return _code_stream(codes, counts, symbols.size, alphabet_size, group, chunk_size, max_len)


def _code_stream(codes: np.ndarray, counts: np.ndarray, n_symbols: int, alphabet_size: int, group: int,
                 chunk_size: int | None, max_len: int) -> HuffmanStream:
    """The coded stream of ``n_symbols`` symbols given as their code values (``group`` symbols
    each) and the counts of those values."""
    lengths = code_lengths(counts, max_len)
    m = codes.size
    if m == 0:
        return HuffmanStream(lengths, b"", np.zeros(0, np.int64), 0, chunk_size or _MIN_LANE, group, alphabet_size)

    sym_len = lengths.astype(np.int64)
    if chunk_size is None:
        mean_bits = float((counts * sym_len).sum()) / m
        chunk_size = min(max(_MIN_LANE, round(_LANE_BITS / mean_bits)), _MAX_LANE)
    lanes = -(-m // min(chunk_size, m))
    codes = _in_lane_order(codes, lanes)
    # Bits per lane, then lane starts: no running offset per code is held for the whole stream.
    firsts = np.concatenate(([0], np.cumsum(lane_counts(m, lanes))[:-1]))  # payload index of each lane's first code
    # Summed a slab of whole lanes at a time: reduceat would widen every code's length to int64.
    lane_bits = np.empty(lanes, np.int64)
    step = max(1, _ENCODE_SLAB // min(chunk_size, m))
    for j in range(0, lanes, step):
        a, b = int(firsts[j]), int(firsts[j + step]) if j + step < lanes else m
        lane_bits[j: j + step] = np.add.reduceat(sym_len[codes[a:b]], firsts[j: j + step] - a)
    total_bits = int(lane_bits.sum())
    chunk_bits = np.concatenate(([0], np.cumsum(lane_bits)[:-1])).astype(np.int64)
    return HuffmanStream(lengths, _pack_codes(codes, sym_len, canonical_codes(lengths, max_len), total_bits),
                         chunk_bits, n_symbols, chunk_size, group, alphabet_size)


def _pack_codes(codes: np.ndarray, sym_len: np.ndarray, table: np.ndarray, total_bits: int) -> bytes:
    """The MSB-first bit string of ``codes`` (``sym_len``, ``table``: length and code of each value)."""
    # Build the stream as big-endian 64-bit words. Neighbouring codes are first joined into codes
    # of at most 64 bits (two, then four at a time: each join halves the work below); a code of
    # at most 64 bits spills into at most the next word, so every word holds the start of one.
    words = np.zeros(total_bits // 64 + 2, np.uint64)
    sym_code = table.astype(np.uint64)
    longest = int(sym_len.max()) if sym_len.size else 0
    at = 0  # bits before this slab
    for first in range(0, codes.size, _ENCODE_SLAB):
        part = codes[first : first + _ENCODE_SLAB]
        lens = sym_len[part]
        code = sym_code[part]
        width = longest
        while 0 < 2 * width <= 64 and lens.size > 1:
            if lens.size % 2:  # an empty code (no bits) pairs with the last one
                lens, code = np.append(lens, 0), np.append(code, np.uint64(0))
            code = (code[0::2] << lens[1::2].astype(np.uint64)) | code[1::2]
            lens = lens[0::2] + lens[1::2]
            width *= 2
        ends = at + np.cumsum(lens)
        starts = ends - lens
        at = int(ends[-1])
        word = starts >> 6
        room = 64 - (starts & 63) - lens  # bits left in the word after the code; < 0 spills
        head = (code << np.maximum(room, 0).astype(np.uint64)) >> np.maximum(-room, 0).astype(np.uint64)
        # Codes never share bits, so summing a word's pieces is the same as OR-ing them.
        first_in_word = np.flatnonzero(np.diff(word)) + 1
        base = int(word[0])
        words[base : base + first_in_word.size + 1] += np.add.reduceat(head, np.concatenate(([0], first_in_word)))
        spill = np.flatnonzero(room < 0)
        words[word[spill] + 1] += code[spill] << (64 + room[spill]).astype(np.uint64)
    if words.dtype.byteorder != ">" and np.little_endian:
        words.byteswap(inplace=True)  # big-endian words, in place: no second copy of the stream
    return words.view(np.uint8)[: (total_bits + 7) // 8].tobytes()


def decode_table(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """One-level decode table for a lengths table: ``(value, length, width)``.

    ``width`` is the longest code length. Entry ``w`` of the two arrays (``2**width`` of each)
    gives the code value whose code is a prefix of the ``width``-bit window ``w`` and that code's
    length. Entries no code reaches (only possible with a lone value) have length 0. Raises
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


def expand_table(alphabet: int, group: int) -> np.ndarray:
    """Per code value, its ``group`` symbols packed little-endian, one byte each (``uint{8G}``)."""
    values = np.arange(alphabet**group, dtype=np.uint64)
    packed = np.zeros(values.size, np.uint64)
    for k in range(group):
        packed |= ((values // np.uint64(alphabet**k)) % np.uint64(alphabet)) << np.uint64(8 * k)
    return packed.astype(f"<u{group}")


def check_stream(stream: HuffmanStream) -> np.ndarray:
    """Validate a stream's structure and return its payload as a uint8 array.

    Checks the group and alphabet, the lengths table, that the symbol count, lane size, chunk
    table and payload size are consistent, and that every lane's bit span is possible for its
    code count. The symbol count is bounded by the payload size here, so decoders can size
    buffers from it safely. Raises :class:`FormatError` on the first problem found.
    """
    lengths = _check_lengths(stream.lengths)
    n, cs, g = stream.n_symbols, stream.chunk_size, stream.group
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise FormatError(f"Huffman n_symbols must be a non-negative integer, got {n!r}")
    if not isinstance(cs, (int, np.integer)) or not 1 <= cs <= MAX_LANE_CODES:
        raise FormatError(f"Huffman chunk_size must be an integer in 1..{MAX_LANE_CODES}, got {cs!r}")
    if not isinstance(g, (int, np.integer)) or int(g) not in GROUPS:
        raise FormatError(f"Huffman group must be one of {GROUPS}, got {g!r}")
    a = stream.alphabet
    if a is not None and not isinstance(a, (int, np.integer)):
        raise FormatError(f"Huffman alphabet must be an integer, got {a!r}")
    a = None if a is None else int(a)  # Python ints: numpy's would overflow in a**g
    g = int(g)
    if g > 1 and (a is None or not 1 <= a or a**g > 256 or lengths.size != a**g):
        raise FormatError(f"Huffman stream with group {g} (codes for {g} symbols) needs an alphabet A with "
                          f"A**{g} <= 256 and A**{g} code lengths, got alphabet {a!r} and {lengths.size} lengths")
    if g == 1 and a is not None and a != lengths.size:
        raise FormatError(f"Huffman stream of alphabet {a!r} has {lengths.size} code lengths")
    n, cs, g = int(n), int(cs), int(g)
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
    m = -(-n // g)
    lanes = lane_count(n, g, cs)
    if chunk_bits.size != lanes:
        raise FormatError(
            f"Huffman chunk table has {chunk_bits.size} entries, but {m} codes in lanes of {cs} "
            f"need {lanes}"
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
    if m * min_len > total:
        raise FormatError(
            f"Huffman payload too short: {m} codes need at least {m * min_len} bits, got {total}"
        )
    if total - 8 >= m * max_len:
        raise FormatError(
            f"Huffman payload too long: {m} codes take at most {m * max_len} bits, got {total}"
        )
    chunk_bits = chunk_bits.astype(np.int64)
    if chunk_bits[0] != 0:
        raise FormatError(f"first Huffman chunk must start at bit 0, got {chunk_bits[0]}")
    counts = lane_counts(m, lanes)
    spans = np.diff(chunk_bits)
    if spans.size and ((spans < counts[:-1] * min_len).any() or (spans > counts[:-1] * max_len).any()):
        raise FormatError(
            f"Huffman chunk offsets are inconsistent: chunk spans {spans.min()}..{spans.max()} bits, "
            f"lanes of {counts.min()}..{counts.max()} codes take {counts.min() * min_len}.."
            f"{counts.max() * max_len}"
        )
    if chunk_bits[-1] + counts[-1] * min_len > total:
        raise FormatError(
            f"last Huffman chunk starts at bit {chunk_bits[-1]}, beyond what {total} payload bits allow"
        )
    return payload


def check_chunk_ends(end: np.ndarray, chunk_bits: np.ndarray, payload: np.ndarray) -> None:
    """Raise :class:`FormatError` unless every lane ended where the next begins and the last
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


def decode(stream: HuffmanStream, release: Callable[[], None] | None = None) -> np.ndarray:
    """Decode a :class:`HuffmanStream` back to its symbols.

    ``release``: called after each slab of lanes is decoded (a reader of a memory-mapped file
    hands back the payload pages read so far, so a big stream's pages do not pile up).

    Returns uint8 symbols when the alphabet has at most 256 entries, else uint16. Works on all
    lanes at once: each step decodes the next code of every lane with a table lookup. Checks that
    every lane ends exactly where the next begins and that the padding is zero; any malformed or
    corrupted stream raises :class:`FormatError`.
    """
    payload = check_stream(stream)
    g = int(stream.group)
    alphabet = stream.symbol_alphabet
    out_dtype = np.uint8 if alphabet <= 256 else np.uint16
    n = int(stream.n_symbols)
    if n == 0:
        return np.zeros(0, out_dtype)
    # What a code writes: its symbol, or its G symbols packed into one little-endian word.
    item = expand_table(alphabet, g) if g > 1 else np.arange(alphabet, dtype=out_dtype)
    out = np.empty(-(-n // g) * g, out_dtype)
    _decode_codes(stream, payload, item, out.view(item.dtype), release)
    check_group_padding(out[n:], n)
    return out[:n]


def decode_codes(stream: HuffmanStream, out: np.ndarray | None = None,
                 release: Callable[[], None] | None = None) -> np.ndarray:
    """Decode a :class:`HuffmanStream` to its code values, one per code (not per symbol).

    Code ``i`` is ``sum(s[i*G + k] * A**k)`` over its ``G`` symbols (see the module docstring),
    so for an alphabet of ``A = 2**b`` symbols coded ``G = 8 // b`` to a code, each code value is
    the byte that packs its symbols ``b`` bits each, the first in the lowest bits: the layout of
    :func:`torchzip.packed.bits.pack_bits`, which a codebook layer's indices can then decode
    straight into, never held one byte a symbol.

    ``out``: where to write the ``ceil(n / G)`` values (uint8 when ``A**G <= 256``, else uint16);
    a new array when None. ``release`` as in :func:`decode`. Checks the stream as
    :func:`decode` does (symbols a last, partial code adds past ``n`` must be 0) and raises
    :class:`FormatError` for any malformed or corrupted stream.
    """
    payload = check_stream(stream)
    g, n = int(stream.group), int(stream.n_symbols)
    alphabet = stream.symbol_alphabet
    values = alphabet**g
    m = -(-n // g)
    dtype = np.uint8 if values <= 256 else np.uint16
    if out is None:
        out = np.empty(m, dtype)
    if out.dtype != dtype or out.shape != (m,):
        raise ValueError(f"out must be a 1-D {np.dtype(dtype).name} array of {m} code values, "
                         f"got {out.dtype} {out.shape}")
    if m:
        _decode_codes(stream, payload, np.arange(values, dtype=dtype), out, release)
        if n % g and int(out[-1]) >= alphabet ** (n % g):  # its symbols past n are not all 0
            raise FormatError(f"Huffman stream's last code adds non-zero symbols past its {n} symbols")
    return out


def _decode_codes(stream: HuffmanStream, payload: np.ndarray, item: np.ndarray, out: np.ndarray,
                  release: Callable[[], None] | None) -> None:
    """Decode the (checked, non-empty) stream's codes into ``out``, code value ``v`` as ``item[v]``."""
    syms, sizes, width = decode_table(stream.lengths)
    table = item[syms]
    if sizes[-1] == 0:  # lone code value: every code is the single bit 0
        if payload.any():
            raise FormatError("Huffman stream of a lone symbol has non-zero bits")
        out[:] = table[0]
        return
    chunk_bits = np.asarray(stream.chunk_bits).astype(np.int64)
    _decode_lanes(payload, chunk_bits, out.size, table, sizes, width, out, release)


def check_group_padding(past_end: np.ndarray, n: int) -> None:
    """Raise :class:`FormatError` unless the symbols a last, partial code adds past the stream's
    ``n`` symbols (``past_end``, fewer than a group) are 0 (shared by the GPU decoder)."""
    if np.any(past_end):
        raise FormatError(f"Huffman stream's last code adds non-zero symbols past its {n} symbols")


def _windows(payload: np.ndarray, n_words: int) -> np.ndarray:
    """``win[i]``: the 64 bits at byte ``4 * i`` of ``payload`` (zero padded to ``4 * n_words``
    bytes), big-endian. Filled a 32-bit half at a time straight from the payload: no padded copy
    of it and no array of its words (each would be another payload or two of memory)."""
    win = np.zeros(n_words - 1, np.uint64)
    k = payload.size // 4  # whole words; n_words >= k + 2, so the partial one and its successor fit
    tail = np.zeros(4, np.uint8)
    tail[: payload.size - 4 * k] = payload[4 * k:]
    words, last = payload[: 4 * k].view(">u4"), tail.view(">u4")[0]
    if np.little_endian:
        halves = win.view(np.uint32).reshape(-1, 2)
        high, low = halves[:, 1], halves[:, 0]
        high[:k], high[k] = words, last
        if k:
            low[: k - 1], low[k - 1] = words[1:], last
    else:  # pragma: no cover - big-endian hosts
        padded = np.concatenate([words, [last]]).astype(np.uint64)
        win[: k + 1] = padded << np.uint64(32)
        win[:k] |= padded[1:]
    return win


def _decode_lanes(
    payload: np.ndarray,
    chunk_bits: np.ndarray,
    m: int,
    packed: np.ndarray,
    sizes: np.ndarray,
    width: int,
    out: np.ndarray,
    release: Callable[[], None] | None = None,
) -> None:
    """Decode all ``m`` codes into ``out`` (``packed[value]`` each), stepping every lane at once.

    Lanes are taken a slab at a time: each slab's windows cover only its own
    bytes of the payload (a lane's codes lie in its own bits, so a slab needs nothing else), and
    its working arrays stay in cache; memory beyond ``out`` is a few bytes a lane."""
    lanes = chunk_bits.size
    q, r = divmod(m, lanes)
    rows = out[: q * lanes].reshape(q, lanes)
    last = np.empty(lanes, out.dtype)  # the partial last step, for lanes < r
    end = np.empty(lanes, np.int64)
    # Slabs of about _DECODE_BYTES of payload (their windows take twice that), of at least
    # _DECODE_LANES lanes (fewer would make the loop's per-call cost show).
    per = max(_DECODE_LANES, -(-lanes * _DECODE_BYTES // max(payload.size, 1)))
    for j0 in range(0, lanes, per):
        j1 = min(lanes, j0 + per)
        byte0 = int(chunk_bits[j0]) // 32 * 4  # windows start on 4-byte boundaries
        stop = (int(chunk_bits[j1]) + 7) // 8 if j1 < lanes else payload.size
        block = np.empty((q + (r > 0), j1 - j0), out.dtype)
        _decode_slab(payload[byte0:stop], chunk_bits[j0:j1] - 8 * byte0, q, max(0, min(r, j1) - j0), packed, sizes,
                     width, block, end[j0:j1])
        rows[:, j0:j1] = block[:q]
        if r > j0:
            last[j0:j1] = block[q]
        end[j0:j1] += 8 * byte0
        if release is not None:
            release()
    if r:
        out[q * lanes:] = last[:r]
    check_chunk_ends(end, chunk_bits, payload)


_DECODE_LANES = 2048  # fewest lanes decoded together (see _decode_lanes)
_DECODE_BYTES = 1 << 20  # payload bytes decoded together


def _decode_slab(payload: np.ndarray, chunk_bits: np.ndarray, q: int, r: int, packed: np.ndarray, sizes: np.ndarray,
                 width: int, block: np.ndarray, end: np.ndarray) -> None:
    """Decode a slab of lanes (``chunk_bits``: their starts within ``payload``) into ``block``
    (one row a step; the last row only for the first ``r`` lanes, which hold ``q + 1`` codes);
    ``end`` gets each lane's final bit cursor."""
    lanes = chunk_bits.size
    steps = q + (r > 0)
    # 64-bit big-endian windows starting at every 4-byte boundary. Lanes past their own codes
    # (in the last, partial step) read on into the next lane or past the payload: pad with zeros
    # as far as any lane can reach.
    reach = int(chunk_bits[-1]) + steps * width + 64
    win = _windows(payload, max(payload.size, reach // 8) // 4 + 2)
    c = chunk_bits.astype(np.int64)  # bit cursor of every lane
    word = np.empty(lanes, np.int64)
    offset = np.empty(lanes, np.uint64)
    w = np.empty(lanes, np.uint64)
    x = np.empty(lanes, np.uint64)
    adv = np.empty(lanes, np.int64)
    # Array operands throughout: numpy's per-call cost is lower than with scalars, and the loop
    # is bound by calls (one step per code of a lane).
    five = np.full(lanes, 5, np.int64)
    low5 = np.full(lanes, 31, np.uint64)
    shift = np.full(lanes, 64 - width, np.uint64)
    xi, c_u, adv_u = x.view(np.int64), c.view(np.uint64), adv.view(np.uint64)
    rshift, lshift, add, band = np.right_shift, np.left_shift, np.add, np.bitwise_and
    win_take, code_take, size_take = win.take, packed.take, sizes.take
    # A window loaded at bit offset <= 31 has >= 33 bits after it: room for two lookups when codes
    # are at most 16 bits (always, in .tzip files), which saves reloading it. The loop is bound by
    # numpy calls, so the two-lookup body is written out; "clip" skips the buffered bounds check
    # (every index is in range by construction).
    pairs = q // 2 if 2 * width <= 33 else 0
    for t in range(0, 2 * pairs, 2):
        rshift(c, five, word)
        win_take(word, None, w, "clip")
        band(c_u, low5, offset)
        lshift(w, offset, w)
        rshift(w, shift, x)
        code_take(xi, None, block[t], "clip")
        size_take(xi, None, adv, "clip")
        add(c, adv, c)
        lshift(w, adv_u, w)
        rshift(w, shift, x)
        code_take(xi, None, block[t + 1], "clip")
        size_take(xi, None, adv, "clip")
        add(c, adv, c)
    end[:] = c
    for t in range(2 * pairs, steps):
        if t == q:  # lanes >= r hold only q codes: they end here
            end[:] = c
        rshift(c, five, word)
        win_take(word, None, w, "clip")
        band(c_u, low5, offset)
        lshift(w, offset, w)
        rshift(w, shift, x)
        code_take(xi, None, block[t], "clip")
        size_take(xi, None, adv, "clip")
        add(c, adv, c)
    if steps == q:
        end[:] = c
    else:
        end[:r] = c[:r]


# ---- how a stream's tables are stored (docs/FORMAT.md) -------------------------------------

# Longest code in a .tzip stream: its code lengths are stored one 4-bit nibble each.
TZIP_MAX_LEN = 15


def pack_lengths(lengths: np.ndarray) -> bytes:
    """Code lengths (each at most 15) two per byte, the first in the low nibble; trailing unused
    symbols are dropped."""
    lengths = np.asarray(lengths, np.uint8)
    if lengths.size and int(lengths.max()) > 15:
        raise ValueError("nibble-packed tables need code lengths of at most 15 (encode with max_len=TZIP_MAX_LEN)")
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
    """The chunk table as ``(data, median, k)``: lane spans Rice-coded around their median.

    Every lane's span in bits but the last's is ``median + d``; ``d`` is folded to ``u >= 0``
    (``2d`` for ``d >= 0``, ``-2d - 1`` below) and split into ``u >> k``, written in unary (that
    many 1 bits and a 0), and the low ``k`` bits. All unary parts come first, then all low parts in
    ``k`` bits each, least significant bit first, the bit string packed from each byte's least
    significant bit. Spans are sums of hundreds of code lengths, near-normal around their median,
    so this costs about a bit per lane less than fixed-width fields wide enough for the extremes.
    ``k`` is the one that makes the table smallest.
    """
    spans = np.diff(np.asarray(chunk_bits, np.int64))
    if not spans.size:
        return b"", 0, 0
    median = int(np.median(spans))
    d = spans - median
    u = np.where(d >= 0, 2 * d, -2 * d - 1)
    top = min(int(u.max()).bit_length(), 40)
    k = min(range(top + 1), key=lambda k: int((u >> k).sum()) + k * u.size)
    q = u >> k
    unary = np.ones(int(q.sum()) + u.size, np.uint8)
    unary[np.cumsum(q + 1) - 1] = 0
    low = ((u[:, None] >> np.arange(k, dtype=np.int64)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(np.concatenate((unary, low)), bitorder="little").tobytes(), median, k


def unpack_chunks(data: bytes, count: int, median: int, k: int) -> np.ndarray:
    """Inverse of :func:`pack_chunks`: the starting bit of each of ``count`` lanes."""
    if count < 0 or not 0 <= median <= _MAX_MEDIAN or not 0 <= k <= 40:
        raise FormatError(f"chunk table header is invalid (count {count}, median {median}, k {k})")
    if count <= 1:
        if len(data):
            raise FormatError(f"chunk table of {count} lane(s) holds {len(data)} bytes, expected 0")
        return np.zeros(count, np.int64)
    bits = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")
    ends = np.flatnonzero(bits == 0)[: count - 1]  # where each unary part ends
    if ends.size < count - 1:
        raise FormatError(f"chunk table holds {len(data)} bytes, too few for {count - 1} Rice-coded spans")
    start = int(ends[-1]) + 1
    if (start + (count - 1) * k + 7) // 8 != len(data):
        raise FormatError(
            f"chunk table holds {len(data)} bytes, but its {count - 1} Rice-coded spans (k = {k}) take "
            f"{(start + (count - 1) * k + 7) // 8}"
        )
    q = np.diff(ends, prepend=-1) - 1
    low = bits[start : start + (count - 1) * k].reshape(count - 1, k).astype(np.int64)
    u = (q << k) | (low @ (np.int64(1) << np.arange(k, dtype=np.int64)))
    spans = median + np.where(u & 1, -(u + 1) // 2, u // 2)
    return np.concatenate(([0], np.cumsum(spans))).astype(np.int64)


def stored_bytes(stream: HuffmanStream) -> int:
    """Bytes of payload, code length table and chunk table, as a .tzip file stores them."""
    return len(bytes(stream.payload)) + len(pack_lengths(stream.lengths)) + len(pack_chunks(stream.chunk_bits)[0])
