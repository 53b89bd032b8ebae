"""Decode canonical Huffman streams (``torchzip.export.huffman``) on the GPU with Triton.

Every chunk of a :class:`~torchzip.export.huffman.HuffmanStream` starts at a known bit offset, so
chunks decode independently. One kernel program takes ``BLOCK`` chunks as a vector, one lane per
chunk, and steps through the chunk's symbols: each step reads a 64-bit window of the payload at
the lane's bit cursor (two 32-bit words), looks the leading ``width`` bits up in a table built on
the host from the code lengths, writes the symbol and advances the cursor by the code length.
Symbols are written step-major (``out[step, chunk]``) so neighbouring lanes store to neighbouring
addresses; the launcher transposes afterwards. Each lane also reports where its chunk ended, and
the launcher checks those against the chunk table exactly as the CPU decoder does.

Runs on CPU under ``TRITON_INTERPRET=1`` (set before importing triton), which the tests use.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from torchzip.errors import FormatError
from torchzip.export.huffman import HuffmanStream, check_chunk_ends, check_stream, decode_table

# Table entries pack the symbol above a 5-bit code length (lengths are at most 20).
_LEN_BITS = 5


@triton.jit
def _huffman_decode_kernel(
    words_ptr,  # int32: the payload as big-endian 32-bit words, zero-padded
    n_words,
    table_ptr,  # int32 per `WIDTH`-bit window: symbol << 5 | code length
    starts_ptr,  # int64 bit offset of each chunk
    out_ptr,  # int32 [chunk_size, n_chunks], step-major
    ends_ptr,  # int64: bit offset where each chunk's last code ends
    n_chunks,
    n_symbols,
    chunk_size,  # at most n_symbols
    WIDTH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    lane = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = lane < n_chunks
    cursor = tl.load(starts_ptr + lane, mask=live, other=0)
    count = tl.minimum(n_symbols - lane.to(tl.int64) * chunk_size, chunk_size)  # last is short
    for t in range(0, chunk_size):
        on = live & (t < count)
        word = cursor >> 5
        # Out-of-range reads (only a corrupted stream gets there) load zeros; the end check fails.
        hi = tl.load(words_ptr + word, mask=on & (word < n_words), other=0)
        lo = tl.load(words_ptr + word + 1, mask=on & (word + 1 < n_words), other=0)
        hi = hi.to(tl.uint32, bitcast=True).to(tl.uint64)
        lo = lo.to(tl.uint32, bitcast=True).to(tl.uint64)
        window = ((hi << 32) | lo) << (cursor & 31).to(tl.uint64)
        index = (window >> (64 - WIDTH)).to(tl.int32)
        entry = tl.load(table_ptr + index, mask=on, other=0)
        tl.store(out_ptr + t * n_chunks + lane, entry >> 5, mask=on)  # 5 = _LEN_BITS
        cursor += (entry & 31).to(tl.int64)  # masked lanes loaded 0: they stay put
    tl.store(ends_ptr + lane, cursor, mask=live)


def decode_triton(
    stream: HuffmanStream, device: torch.device | str = "cuda", block: int = 64
) -> torch.Tensor:
    """Decode ``stream`` with the Triton kernel; returns int32 symbols on ``device``.

    Output equals :func:`torchzip.export.huffman.decode`, and malformed or corrupted streams raise
    the same :class:`~torchzip.errors.FormatError`. ``block`` (a power of two) is the number of
    chunks per program; small blocks spread a stream's few hundred or thousand chunks over more
    GPU cores. ``device`` may be ``"cpu"`` under ``TRITON_INTERPRET=1``.
    """
    payload = check_stream(stream)
    # A chunk size beyond the stream means one chunk; clamp it to keep kernel arguments small.
    n, cs = int(stream.n_symbols), min(int(stream.chunk_size), int(stream.n_symbols))
    device = torch.device(device)
    if n >= 1 << 31:
        raise ValueError(f"decode_triton handles under 2**31 symbols, got {n}")
    if n == 0:
        return torch.zeros(0, dtype=torch.int32, device=device)
    syms, sizes, width = decode_table(stream.lengths)
    if sizes[-1] == 0:  # lone symbol: every code is the single bit 0
        if payload.any():
            raise FormatError("Huffman stream of a lone symbol has non-zero bits")
        return torch.full((n,), int(syms[0]), dtype=torch.int32, device=device)

    chunk_bits = np.asarray(stream.chunk_bits).astype(np.int64)
    lanes = chunk_bits.size
    buf = np.zeros(4 * (payload.size // 4 + 2), np.uint8)
    buf[: payload.size] = payload
    words = np.frombuffer(buf, ">u4").astype(np.uint32).view(np.int32)
    table = ((syms << _LEN_BITS) | sizes).astype(np.int32)

    words_d = torch.from_numpy(words).to(device)
    table_d = torch.from_numpy(table).to(device)
    starts_d = torch.from_numpy(chunk_bits).to(device)
    out = torch.empty((cs, lanes), dtype=torch.int32, device=device)
    ends_d = torch.empty(lanes, dtype=torch.int64, device=device)
    grid = (triton.cdiv(lanes, block),)
    _huffman_decode_kernel[grid](
        words_d, words.size, table_d, starts_d, out, ends_d, lanes, n, cs,
        WIDTH=width, BLOCK=block, num_warps=max(1, min(block // 32, 4)),
    )

    check_chunk_ends(ends_d.cpu().numpy(), chunk_bits, payload)
    return out.T.reshape(-1)[:n]
