"""Decode canonical Huffman streams (``torchzip.export.huffman``) on the GPU with Triton.

Every lane of a :class:`~torchzip.export.huffman.HuffmanStream` starts at a known bit offset, so
lanes decode independently. One kernel program takes ``BLOCK`` lanes as a vector and steps
through their codes: each step reads a 64-bit window of the payload at the lane's bit cursor (two
32-bit words), looks the leading ``width`` bits up in a table built on the host from the code
lengths, writes the code value and advances the cursor by the code length. Lanes hold every
``L``-th code, so step ``t`` of lane ``j`` is code ``t * L + j``: neighbouring lanes store to
neighbouring addresses and the output is already in stream order. Codes that stand for several
symbols are expanded with one gather afterwards. Each lane also reports where it ended, and the
launcher checks those against the chunk table exactly as the CPU decoder does.

Runs on CPU under ``TRITON_INTERPRET=1`` (set before importing triton), which the tests use.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import triton
import triton.language as tl

from torchzip.errors import FormatError
from torchzip.export.huffman import (
    HuffmanStream,
    check_chunk_ends,
    check_group_padding,
    check_stream,
    decode_table,
    expand_table,
)
from torchzip.kernels import _interpret  # noqa: F401  (Triton 3.6 interpreter fix: this loop's bound)

# Table entries pack the symbol above a 5-bit code length (lengths are at most 20).
_LEN_BITS = 5


@triton.jit
def _huffman_decode_kernel(
    words_ptr,  # int32: the payload as big-endian 32-bit words, zero-padded
    n_words,
    table_ptr,  # int32 per `WIDTH`-bit window: code value << 5 | code length
    starts_ptr,  # int64 bit offset of each lane
    out_ptr,  # int32 code values, stream order
    ends_ptr,  # int64: bit offset where each lane's last code ends
    n_lanes,
    n_codes,
    steps,  # codes of the longest lane
    WIDTH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    lane = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = lane < n_lanes
    cursor = tl.load(starts_ptr + lane, mask=live, other=0)
    first = lane.to(tl.int64)
    for t in range(0, steps):
        code = first + t * n_lanes  # t * n_lanes < n_codes < 2**31 wherever it is stored
        on = live & (code < n_codes)  # only the last step is partial
        word = cursor >> 5
        # Out-of-range reads (only a corrupted stream gets there) load zeros; the end check fails.
        hi = tl.load(words_ptr + word, mask=on & (word < n_words), other=0)
        lo = tl.load(words_ptr + word + 1, mask=on & (word + 1 < n_words), other=0)
        hi = hi.to(tl.uint32, bitcast=True).to(tl.uint64)
        lo = lo.to(tl.uint32, bitcast=True).to(tl.uint64)
        window = ((hi << 32) | lo) << (cursor & 31).to(tl.uint64)
        index = (window >> (64 - WIDTH)).to(tl.int32)
        entry = tl.load(table_ptr + index, mask=on, other=0)
        tl.store(out_ptr + code, entry >> 5, mask=on)  # 5 = _LEN_BITS
        cursor += (entry & 31).to(tl.int64)  # masked lanes loaded 0: they stay put
    tl.store(ends_ptr + lane, cursor, mask=live)


def decode_triton(
    stream: HuffmanStream, device: torch.device | str = "cuda", block: int = 64
) -> torch.Tensor:
    """Decode ``stream`` with the Triton kernel; returns int32 symbols on ``device``.

    Its values equal :func:`torchzip.export.huffman.decode`'s (as int32), and malformed or
    corrupted streams raise the same :class:`~torchzip.errors.FormatError`. ``block`` (a power
    of two) is the number of lanes per program; small blocks spread a stream's few hundred or
    thousand lanes over more GPU cores. ``device`` may be ``"cpu"`` under ``TRITON_INTERPRET=1``.
    """
    job = prepare_decode(stream, device, block)
    if isinstance(job, torch.Tensor):
        return job
    job.launch()
    return job.finish()


class DecodeJob:
    """A stream's decode with its buffers already on the device: :meth:`launch` runs only the
    kernel (what ``benchmarks/gpu_check.py`` times), :meth:`finish` checks and expands the codes."""

    def __init__(self, launch, finish) -> None:
        self.launch, self.finish = launch, finish


def prepare_decode(stream: HuffmanStream, device: torch.device | str = "cuda", block: int = 64) -> "DecodeJob | torch.Tensor":
    """Check ``stream``, copy its words and table to ``device``: a :class:`DecodeJob`, or the
    symbols themselves when no kernel is needed (empty or single-symbol streams)."""
    payload = check_stream(stream)
    n, g = int(stream.n_symbols), int(stream.group)
    m = -(-n // g)
    device = torch.device(device)
    if m >= 1 << 31:
        raise ValueError(f"decode_triton handles under 2**31 codes, got {m}")
    if n == 0:
        return torch.zeros(0, dtype=torch.int32, device=device)
    syms, sizes, width = decode_table(stream.lengths)
    expand = None  # each code value's `g` symbols, one row per value, when codes stand for several
    if g > 1:
        expand = torch.from_numpy(expand_table(stream.symbol_alphabet, g).view(np.uint8).reshape(-1, g).astype(np.int32))
    if sizes[-1] == 0:  # lone code value: every code is the single bit 0
        if payload.any():
            raise FormatError("Huffman stream of a lone symbol has non-zero bits")
        if expand is None:
            return torch.full((n,), int(syms[0]), dtype=torch.int32, device=device)
        symbols = expand[int(syms[0])].repeat(m)
        check_group_padding(symbols[n:].numpy(), n)
        return symbols[:n].to(device)

    chunk_bits = np.asarray(stream.chunk_bits).astype(np.int64)
    lanes = chunk_bits.size
    buf = np.zeros(4 * (payload.size // 4 + 2), np.uint8)
    buf[: payload.size] = payload
    words = np.frombuffer(buf, ">u4").astype(np.uint32).view(np.int32)
    table = ((syms << _LEN_BITS) | sizes).astype(np.int32)

    words_d = torch.from_numpy(words).to(device)
    table_d = torch.from_numpy(table).to(device)
    starts_d = torch.from_numpy(chunk_bits).to(device)
    codes = torch.empty(m, dtype=torch.int32, device=device)
    ends_d = torch.empty(lanes, dtype=torch.int64, device=device)
    grid = (triton.cdiv(lanes, block),)

    def launch() -> None:
        # Triton launches on the current CUDA device: make it the one the buffers are on.
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            _huffman_decode_kernel[grid](
                words_d, words.size, table_d, starts_d, codes, ends_d, lanes, m, -(-m // lanes),
                WIDTH=width, BLOCK=block, num_warps=max(1, min(block // 32, 4)),
            )

    def finish() -> torch.Tensor:
        check_chunk_ends(ends_d.cpu().numpy(), chunk_bits, payload)
        if expand is None:
            return codes
        symbols = expand.to(device)[codes.long()].reshape(-1)
        check_group_padding(symbols[n:].cpu().numpy(), n)
        return symbols[:n]

    return DecodeJob(launch, finish)
