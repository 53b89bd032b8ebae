"""Integer streams of packed weights, as symbols for the Huffman coder, and back.

- ``int8``: int8 values as bytes 0..255 (two's complement).
- ``index``: codebook indices as they are, alphabet ``2**bits``.
- ``pairs24``: the two kept positions of each 2:4 group as one of the 6 possible pairs.
- ``gaps``: sorted flat positions ``row * K + col`` of nonzeros as gaps (``p[i] - p[i-1] - 1``,
  the first from -1); a gap ``d`` is written as ``d // E`` escape symbols ``E`` followed by
  ``d % E``, as in Deep Compression. ``E`` is chosen per stream to make the coded stream plus its table smallest.
"""

from __future__ import annotations

import numpy as np

from torchzip.errors import FormatError
from torchzip.export.huffman import code_lengths

# The 6 ways to keep 2 of 4, as (low, high) positions; a pair's symbol is its index here.
PAIRS24 = np.array([(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)], dtype=np.int64)
_PAIR_SYMBOL = {(int(a), int(b)): i for i, (a, b) in enumerate(PAIRS24)}
ESCAPES = tuple(2**b - 1 for b in range(1, 17))


def pairs24_encode(positions: np.ndarray) -> np.ndarray:
    """Positions ``[..., 2g]`` (ascending pairs per group) -> one symbol 0..5 per group."""
    p = positions.reshape(-1, 2).astype(np.int64)
    table = np.full((4, 4), -1, np.int64)
    for (a, b), s in _PAIR_SYMBOL.items():
        table[a, b] = s
    sym = table[p[:, 0], p[:, 1]]
    if (sym < 0).any():
        raise ValueError("2:4 positions must be ascending pairs in 0..3")
    return sym


def pairs24_decode(symbols: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pairs24_encode`: ``[groups * 2]`` positions."""
    if symbols.size and int(symbols.max()) >= len(PAIRS24):
        raise FormatError("2:4 position stream holds a symbol that is not one of the 6 pairs")
    return PAIRS24[symbols.astype(np.int64)].reshape(-1)


def _gaps(flat: np.ndarray) -> np.ndarray:
    return np.diff(flat.astype(np.int64), prepend=-1) - 1


def _escape_cost(gaps: np.ndarray, escape: int) -> int:
    counts = np.bincount(gaps % escape, minlength=escape + 1)
    counts[escape] = int((gaps // escape).sum())
    lengths = code_lengths(counts)
    return int((counts * lengths).sum()) + 8 * (escape + 1)  # payload + the stored lengths table


def gaps_encode(flat: np.ndarray) -> tuple[np.ndarray, int]:
    """Symbols and escape ``E`` for strictly increasing flat positions (alphabet ``E + 1``)."""
    gaps = _gaps(flat)
    if gaps.size and gaps.min() < 0:
        raise ValueError("flat positions must be strictly increasing")
    top = int(gaps.max()) + 1 if gaps.size else 1
    candidates = [e for e in ESCAPES if e <= max(top, 1)] + [e for e in ESCAPES if e > top][:1]
    escape = min(candidates, key=lambda e: (_escape_cost(gaps, e), e))
    n_esc = gaps // escape
    ends = np.cumsum(n_esc + 1) - 1  # where each gap's remainder symbol goes
    symbols = np.full(int(ends[-1]) + 1 if gaps.size else 0, escape, np.int64)
    symbols[ends] = gaps % escape
    return symbols, escape


def gaps_decode(symbols: np.ndarray, escape: int, limit: int) -> np.ndarray:
    """Inverse of :func:`gaps_encode`; every position must be below ``limit``."""
    symbols = symbols.astype(np.int64)
    if symbols.size and symbols[-1] == escape:
        raise FormatError("position stream ends with an escape symbol")
    is_esc = symbols == escape
    esc_before = np.cumsum(is_esc)[~is_esc]
    rem = symbols[~is_esc]
    n_esc = np.diff(esc_before, prepend=0)
    flat = np.cumsum(n_esc * escape + rem + 1) - 1
    if flat.size and int(flat[-1]) >= limit:
        raise FormatError(f"sparse position {int(flat[-1])} lies outside the weight ({limit} entries)")
    return flat
