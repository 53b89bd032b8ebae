"""Bit-packing of small unsigned integers into int32 words along the last dimension.

A word holds ``32 // bits`` fields; field ``j`` of a row sits in word ``j // per_word`` at bit
offset ``(j % per_word) * bits`` (least significant bits first). 3-bit fields therefore waste two
bits per word, a price paid for kernels that never split a field across words.
"""

from __future__ import annotations

import math
import sys

import torch


def fields_per_word(bits: int) -> int:
    """Number of ``bits``-wide fields one int32 word holds."""
    return 32 // bits


def packed_words(k: int, bits: int) -> int:
    """Words needed to hold ``k`` fields of ``bits`` bits."""
    return math.ceil(k / fields_per_word(bits)) if k else 0


def pack_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers in ``[0, 2**bits)`` along the last dim into int32 words (see module doc)."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    per = fields_per_word(bits)
    *lead, k = x.shape
    words = packed_words(k, bits)
    if bits in (1, 2, 4, 8) and sys.byteorder == "little" and x.numel() and words:
        # Fields that tile bytes: each byte is filled in uint8, and four bytes are the int32 word
        # (little-endian), the same layout without int64 temporaries (8 bytes a field).
        fields = 8 // bits
        padded = torch.zeros(*lead, words * per, dtype=torch.uint8, device=x.device)
        padded[..., :k] = x
        parts = padded.view(*lead, words * 4, fields)
        byte = parts[..., 0].clone(memory_format=torch.contiguous_format)
        for j in range(1, fields):
            byte |= parts[..., j] << (j * bits)
        return byte.view(torch.int32)
    padded = torch.zeros(*lead, words * per, dtype=torch.int64, device=x.device)
    padded[..., :k] = x.to(torch.int64)
    shifts = torch.arange(per, device=x.device, dtype=torch.int64) * bits
    word = (padded.view(*lead, words, per) << shifts).sum(-1)
    # int32 has no unsigned form in torch: wrap the top bit into the sign.
    word = torch.where(word >= 2**31, word - 2**32, word)
    return word.to(torch.int32)


def unpack_bits(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: return the first ``k`` fields as int64."""
    per = fields_per_word(bits)
    *lead, words = packed.shape
    shifts = torch.arange(per, device=packed.device, dtype=torch.int64) * bits
    word = packed.to(torch.int64) & 0xFFFFFFFF
    fields = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return fields.reshape(*lead, words * per)[..., :k]


def unpack_fields(packed: torch.Tensor, bits: int, k: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """The first ``k`` fields of each row of :func:`pack_bits` words as a contiguous ``dtype``
    tensor (int32, int16, uint8 or bool), never widened to int64 on the way.

    Fields that tile bytes (1, 2, 4, 8 bits) are looked up a byte at a time in a ``[256, 8 // bits]``
    table; others are shifted out of the int32 words (an arithmetic shift's sign bits land above
    the mask, since no field crosses a word)."""
    per = fields_per_word(bits)
    *lead, words = packed.shape
    if bits in (1, 2, 4, 8) and sys.byteorder == "little" and packed.is_contiguous():
        fields = 8 // bits
        shifts = torch.arange(0, 8, bits, device=packed.device)
        table = ((torch.arange(256, device=packed.device).unsqueeze(1) >> shifts) & ((1 << bits) - 1)).to(dtype)
        index = packed.view(torch.uint8).reshape(-1).to(torch.int32)
        out = table.index_select(0, index).view(*lead, words * 4 * fields)
    else:
        shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
        out = ((packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).to(dtype).view(*lead, words * per)
    return out if out.shape[-1] == k else out[..., :k].contiguous()


def unpack_codes_u8(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """:func:`unpack_fields` of ``packed`` ``[N, words]`` as ``[N, K]`` uint8, a block of rows at a
    time (the temporaries of a block, not of the whole matrix)."""
    n = packed.shape[0]
    out = torch.empty(n, k, dtype=torch.uint8, device=packed.device)
    rows = max(1, (1 << 20) // max(k, 1))
    for r in range(0, n, rows):
        out[r:r + rows] = unpack_fields(packed[r:r + rows], bits, k, torch.uint8)
    return out
