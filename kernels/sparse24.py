"""2:4 sparse matmul (``torchzip.packed.sparse24``), with float, int8 or codebook values.

Kept value ``j`` of row ``n`` sits at column ``4 * (j // 2) + pos``, the 2-bit ``pos`` packed 16
to an int32 word. The GEMV works a group of 4 columns at a time: the group's two kept values
(one int32 for 16-bit values), its 4 activations (one 64-bit load) and one byte permute that
picks the two activations the positions name, from a copy of the position words with their bits
rearranged (:func:`gemv_words`, same size; ``Sparse24Weight`` caches it). The GEMM rebuilds a dense ``[K, N]`` weight tile in registers for ``tl.dot`` from the
kept values, each loaded and decoded once (each column picks the kept value of its group whose
position matches, or 0); a dequantize kernel
writes the dense weight for cuBLAS at large M. The ``torchzip::sparse24_linear`` op picks.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl
from torch import Tensor

from torchzip.kernels import _common as C
from torchzip.kernels import dispatch
from torchzip.kernels.codebook import lane_ids, lane_lookup_fma

# BLOCK_W position words (16 kept values, 32 dense columns each) of BLOCK_N rows per step.
# Each thread holds 4 groups (2 x 64-bit x loads, one 128-bit load of 16-bit values) of one word,
# or, in the last two, 8 groups (a whole word; 8-bit values in one 128-bit load): the codebook
# GEMV's per-word work (address math, the word's load and shifts, the loop) spread over twice the
# kept values. The x tile (8 * BLOCK_W groups) stays smaller than the program, or Triton routes it
# through shared memory.
S24_GEMV_CONFIGS = C.configs(("BLOCK_N", "BLOCK_W"), [
    (8, 8, 4, 2), (16, 4, 4, 2), (32, 2, 4, 2), (8, 4, 2, 2),
    (16, 8, 8, 2), (8, 16, 8, 2), (32, 4, 8, 2), (8, 8, 4, 3),
    (16, 16, 8, 2), (32, 16, 16, 2),
])
S24_INTERP_GEMV = triton.Config({"BLOCK_N": 16, "BLOCK_W": 4})
# From this M on, dequantize + cuBLAS beats the fused kernel (see kernels.dispatch).
dispatch.DENSE_MIN_M.setdefault("sparse24", 256)


def groups_per_thread(config: triton.Config) -> int:
    """Groups of 4 columns a thread holds of the GEMV's ``[BLOCK_N, BLOCK_W, 8]`` tile of 8-bit
    values: Triton's coalescing gives each thread up to 8 (one 128-bit load), at most its share."""
    k = config.kwargs
    return max(1, min(8, k["BLOCK_N"] * k["BLOCK_W"] * 8 // (32 * config.num_warps)))


def book_lanes(config: triton.Config, entries: int) -> int:
    """LANES of the GEMV for a codebook of ``entries`` under ``config``: the entries (a power of
    two) if a row's consecutive lanes (its ``8 * BLOCK_W`` groups over :func:`groups_per_thread`,
    at most 32) can hold them, else 0 (gather)."""
    row_lanes = min(32, 8 * config.kwargs["BLOCK_W"] // groups_per_thread(config))
    fits = entries & (entries - 1) == 0 and entries <= row_lanes
    return entries if fits else 0


def gemv_constexprs(config: triton.Config, kind: int, entries: int = 16) -> dict:
    """Constexprs of the GEMV for a launch config with 16-bit activations (and, ``kind`` 0,
    16-bit values; ``kind`` 2, a codebook of ``entries`` in registers where it fits) on a GPU
    (benchmarks/sass_report.py compiles these)."""
    return {"SPLIT_K": 1, "X16": True, "V16": kind == 0, "FAST": True,
            "LANES": book_lanes(config, entries) if kind == 2 else 0, **config.kwargs}


def gemv_values_per_iter(constexprs: dict) -> int:
    """Kept values one iteration of the GEMV's main loop consumes (two steps)."""
    return 2 * constexprs["BLOCK_N"] * constexprs["BLOCK_W"] * 16


@triton.jit
def sparse24_tile(v_ptr, p_ptr, s_ptr, book_ptr, rows, cols, mask, stride_vn, stride_pn, stride_sn, stride_b,
                  KIND: tl.constexpr, GROUP: tl.constexpr):
    """Dense fp32 weights at broadcastable ``rows`` x ``cols`` (the dequantizer).

    Column c belongs to group c // 4, whose kept values are j0 = 2 * (c // 4) and j0 + 1; both
    positions sit in one word (j0 is even). The column takes the kept value whose position is
    c % 4, else 0. Per-channel int8 scales are left to the caller, as in ``decode``.
    """
    j0 = (cols // 4) * 2
    word = tl.load(p_ptr + rows * stride_pn + j0 // 16, mask=mask, other=0)
    shift = (j0 % 16) * 2
    slot = cols % 4
    first = ((word >> shift) & 3) == slot
    keep = mask & (first | (((word >> (shift + 2)) & 3) == slot))
    v = tl.load(v_ptr + rows * stride_vn + tl.where(first, j0, j0 + 1), mask=keep, other=0)
    w = C.decode(v, rows, cols, keep, s_ptr, stride_sn, book_ptr, stride_b, KIND, GROUP)
    return tl.where(keep, w, 0.0)


@triton.jit
def dense24_tile(v_ptr, p_ptr, s_ptr, book_ptr, rn, n_mask, k0, k_hi, stride_vn, stride_pn, stride_sn, stride_b,
                 KIND: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """The dense fp32 ``[BLOCK_K, len(rn)]`` weight tile at columns ``k0 + arange(BLOCK_K)`` (the GEMM).

    Built from the kept values rather than per dense column: each kept value and position word is
    loaded once (wide loads along K, one word per 16 values) and decoded once; then each dense
    column of a group of 4 picks, by comparing positions, its kept value or 0.
    """
    tl.static_assert(BLOCK_K % 32 == 0)  # whole position words
    BLOCK_J: tl.constexpr = BLOCK_K // 2
    BN: tl.constexpr = rn.shape[0]
    rj = k0 // 2 + tl.arange(0, BLOCK_J)
    mask = (rj[:, None] < k_hi // 2) & n_mask[None, :]  # k_hi // 2: runs of 8 share a mask bit, so loads stay wide
    v = tl.load(v_ptr + rn[None, :] * stride_vn + rj[:, None], mask=mask, other=0)
    rw = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    words = tl.load(p_ptr + rn[None, :] * stride_pn + rw[:, None], mask=(rw[:, None] * 32 < k_hi) & n_mask[None, :],
                    other=0)
    pos = tl.reshape((words[:, None, :] >> (tl.arange(0, 16) * 2)[None, :, None]) & 3, (BLOCK_J, BN))
    w = C.decode(v, rn[None, :], (rj[:, None] // 2) * 4 + pos, mask, s_ptr, stride_sn, book_ptr, stride_b, KIND, GROUP)
    w = tl.where(mask, w, 0.0)
    # [groups, 2 kept, N] -> [groups, 4 columns, N]: a column takes the kept value whose position it is.
    slot = tl.arange(0, 4)[None, None, :, None]
    w3, p3 = tl.reshape(w, (BLOCK_K // 4, 2, BN)), tl.reshape(pos, (BLOCK_K // 4, 2, BN))
    dense = tl.sum(tl.where(p3[:, :, None, :] == slot, w3[:, :, None, :], 0.0), axis=1)
    return tl.reshape(dense, (BLOCK_K, BN))


def gemv_words(positions: torch.Tensor) -> torch.Tensor:
    """The GEMV's copy of the 2:4 positions: each int32 word's 16 two-bit fields moved so the
    kernel turns them into byte-permute selectors with four instructions per pair of groups
    (shift, mask, multiply-add; a shift for the second group) instead of about eight.

    Word ``w`` still covers groups ``8w .. 8w+7``; group ``2q + h``'s first position goes to bits
    ``16h + 2q``, its second to ``16h + 8 + 2q``. Then ``(word >> 2q) & 0x03030303`` holds pair
    ``q``'s four positions one per byte, and times 0x22 plus 0x10101010 it is the ``prmt``
    selector (bytes ``2p, 2p + 1`` per position) of group ``2q`` in its low half and of group
    ``2q + 1`` in its high half. Same size as ``positions``.
    """
    w = positions.to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros_like(w)
    for g in range(8):
        for which in range(2):
            field = (w >> (4 * g + 2 * which)) & 3
            out |= field << (8 * (2 * (g % 2) + which) + 2 * (g // 2))
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


@triton.jit
def prmt(a, b, sel, FAST: tl.constexpr):
    """PTX ``prmt.b32`` (default mode): byte i of the result is byte ``sel[4i:4i+3]`` of ``b:a``
    (selectors here never set the sign-replicate bit). The interpreter computes the same bytes."""
    if FAST:
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, sel], dtype=tl.int32,
                                         is_pure=True, pack=1)
    a, b, sel = a.to(tl.uint32, bitcast=True), b.to(tl.uint32, bitcast=True), sel.to(tl.uint32, bitcast=True)
    out = tl.zeros(sel.shape, tl.uint32)
    for i in tl.static_range(4):
        nib = (sel >> (4 * i)) & 7
        byte = tl.where(nib < 4, a >> ((nib & 3) * 8), b >> ((nib & 3) * 8)) & 0xFF
        out |= byte << (8 * i)
    return out.to(tl.int32, bitcast=True)


# book_pairs_fma's PTX, pack=2: out $0, $1; codes $2 (two int16s: bytes a0 b0 a1 b1); table $3, $4;
# xa $5, $6; xb $7, $8; acc $9, $10; seg $11, $12.
BOOK_PAIRS_FMA = tl.constexpr(
    "{ .reg .b32 t, c; shfl.sync.idx.b32 c, $3, $2, $11, -1; fma.rn.f32 $0, c, $5, $9; "
    "shr.u32 t, $2, 8; shfl.sync.idx.b32 c, $3, t, $11, -1; fma.rn.f32 $0, c, $7, $0; "
    "shr.u32 t, $2, 16; shfl.sync.idx.b32 c, $4, t, $11, -1; fma.rn.f32 $1, c, $6, $10; "
    "shr.u32 t, $2, 24; shfl.sync.idx.b32 c, $4, t, $11, -1; fma.rn.f32 $1, c, $8, $1; }")


@triton.jit
def book_pairs_fma(codes, table, xa, xb, acc, seg):
    """``acc + book[a] * xa + book[b] * xb`` for each group's pair of 8-bit codes (``codes``: int16,
    code a in the low byte), the centroids read by warp shuffles from the lanes of this thread's
    segment that hold them (``table``, ``seg``: as in ``codebook.lane_lookup_fma``). Two groups a
    call: their four codes arrive in one register, and a code needs at most one shift (shfl reads
    only its low bits)."""
    return tl.inline_asm_elementwise(BOOK_PAIRS_FMA, "=f,=f,r,f,f,f,f,f,f,f,f,r,r", [codes, table, xa, xb, acc, seg],
                                     dtype=tl.float32, is_pure=True, pack=2)


@triton.jit
def halves_as_f32(h, dtype: tl.constexpr):
    """The two 16-bit floats (``dtype``) packed in int32 ``h`` as fp32, low half first (bf16: one
    integer op each)."""
    if dtype == tl.bfloat16:
        return (h << 16).to(tl.float32, bitcast=True), (h & -65536).to(tl.float32, bitcast=True)
    return (h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32),
            (h >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32))


# Weights are read once: streaming loads (``.cs``, evict first). Unlike
# eviction_policy="evict_first" they need no L2 policy register, which ptxas rebuilt every
# iteration (7 instructions, 0.44 a kept value: over the target). Triton 3.6 has no ``.cs``
# loads, so there the weights load without a hint.
TRITON_38 = tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 8)
STREAM_CACHE = tl.constexpr(".cs" if TRITON_38 else "")
# Triton orders a tile's threads by its pointers' contiguity; the rows and words axes tie (1),
# and 3.8 breaks the tie words-first, 3.6 rows-first (order [2, 0, 1] in its TTGIR): 3.6 lays the
# 8-bit values' [rows, words, groups] tile out rows first, so a row's lanes are not consecutive
# (the register-held codebook's shuffle segments then mix rows, and the lanes self-check fails)
# and 8-group tiles route x through shared memory. Declaring the words axis 2-contiguous there
# breaks the tie as 3.8 does; loads vectorize along the groups axis only (a thread's groups are
# consecutive), so none reads the hint as a promise.
WORDS_ORDER_HINT = tl.constexpr(not TRITON_38)


@triton.jit
def _load(ptrs, mask, MASKED: tl.constexpr, STREAM: tl.constexpr = False):
    """``tl.load`` with ``mask`` (0 elsewhere) on a masked step, without one on the others;
    STREAM: a weight load (streaming, see STREAM_CACHE)."""
    cache: tl.constexpr = STREAM_CACHE if STREAM else ""
    if MASKED:
        return tl.load(ptrs, mask=mask, other=0, cache_modifier=cache)
    return tl.load(ptrs, cache_modifier=cache)


@triton.jit
def _gemv_step(acc, x_row, v_ptr, p_ptr, s_ptr, book_ptr, rn, w0, w_hi, J, stride_vn, stride_pn, stride_sn, stride_b,
               table, KIND: tl.constexpr, GROUP: tl.constexpr, X16: tl.constexpr, V16: tl.constexpr,
               FAST: tl.constexpr, LANES: tl.constexpr, MASKED: tl.constexpr, BLOCK_W: tl.constexpr):
    """One step of the 2:4 GEMV: ``acc`` ``[rows, BLOCK_W words, 8 groups]`` plus the products of
    words ``w0 ..`` (each element one group of 4 columns, its 2 kept values). MASKED: the last,
    partial step; the others need no masks (rows past N were clamped by the caller)."""
    rw = w0 + tl.arange(0, BLOCK_W)
    rg = tl.arange(0, 8)
    g = rw[:, None] * 8 + rg[None, :]  # group index, [BLOCK_W, 8]
    # The words and x address the step's first word or group (a scalar) plus loop-invariant
    # offsets (fewer address instructions; the values' loads are shorter as they were).
    g_in = tl.arange(0, BLOCK_W)[:, None] * 8 + rg[None, :]
    rows = rn[:, None, None]
    if MASKED:
        g_mask = (g < J // 2) & (rw < w_hi)[:, None]
        mask = g_mask[None, :, :] & (rows >= 0)
    else:
        g_mask = None
        mask = None
    words = _load((p_ptr + w0) + (rows * stride_pn + tl.arange(0, BLOCK_W)[None, :, None]),
                  (rw < w_hi)[None, :, None] & (rows >= 0), MASKED, True)
    shift = (rg // 2) * 2  # pair q = g // 2 sits at bit 2q of every byte
    half = (rg % 2) * 16  # group 2q + 1's selector is the high half
    if V16:  # 16-bit float values: a group's pair is one int32, 4 groups a 128-bit load
        vw = _load(v_ptr.to(tl.pointer_type(tl.int32)) + rows * (stride_vn // 2) + g[None, :, :], mask, MASKED,
                   True)
        wa, wb = halves_as_f32(vw, v_ptr.dtype.element_ty)
    elif v_ptr.dtype.element_ty == tl.float32:  # a group's pair is one 64-bit load
        j = g[:, :, None] * 2 + tl.arange(0, 2)[None, None, :]
        jmask = None if mask is None else mask[:, :, :, None]
        va, vb = tl.split(_load(v_ptr + rows[:, :, :, None] * stride_vn + j[None, :, :, :], jmask, MASKED, True))
    else:  # 8-bit values (int8, codebook indices): a group's pair is one int16, split in registers
        ptrs = v_ptr.to(tl.pointer_type(tl.int16)) + rows * (stride_vn // 2) + g[None, :, :]
        if WORDS_ORDER_HINT:
            ptrs = tl.max_contiguous(ptrs, [1, 2, 8])
        vv = _load(ptrs, mask, MASKED, True)
        va, vb = vv.to(v_ptr.dtype.element_ty), (vv >> 8).to(v_ptr.dtype.element_ty)  # truncations: bytes 0, 1
    if X16:
        # x of a group: 4 16-bit values, one 64-bit load (two groups a 128-bit load); the kept
        # pair comes out of one byte permute whose selector costs two integer ops a group.
        xg = _load((x_row.to(tl.pointer_type(tl.int64)) + w0 * 8) + g_in, g_mask, MASKED)
        sel = (((words >> shift) & 0x03030303) * 0x22 + 0x10101010) >> half
        pair = prmt(xg.to(tl.int32)[None, :, :], (xg >> 32).to(tl.int32)[None, :, :], sel, FAST)
        xa, xb = halves_as_f32(pair, x_row.dtype.element_ty)
    if (KIND == 1 and GROUP % 4 != 0) or not X16:  # the kept values' own columns
        cols_a = 4 * g[None, :, :] + ((words >> (shift + half)) & 3)
        cols_b = 4 * g[None, :, :] + ((words >> (shift + half + 8)) & 3)
    else:  # a scale group holds whole groups of 4: the group's first column will do
        cols_a = 4 * g[None, :, :] + 0 * rows
        cols_b = cols_a
    if not X16:  # fp32 activations: gathered
        xa = _load(x_row + cols_a, mask, MASKED)
        xb = _load(x_row + cols_b, mask, MASKED)
    if LANES:  # codebook values: shuffles from the register-held table (see _sparse24_gemv_kernel)
        return book_pairs_fma(vv, table, xa, xb, acc, tl.full(acc.shape, ((32 - LANES) << 8) | 0x1F, tl.int32))
    if not V16:
        dmask = cols_a >= 0 if mask is None else mask
        wa = C.decode(va, rows, cols_a, dmask, s_ptr, stride_sn, book_ptr, stride_b, KIND, GROUP)
        wb = C.decode(vb, rows, cols_b, dmask, s_ptr, stride_sn, book_ptr, stride_b, KIND, GROUP)
    acc += wa * xa  # two FFMAs (not FMUL + FFMA + FADD)
    acc += wb * xb
    return acc


@triton.jit
def _sparse24_gemv_kernel(
    x_ptr, v_ptr, p_ptr, s_ptr, book_ptr, b_ptr, out_ptr, M, N, J, PW,
    stride_xm, stride_vn, stride_pn, stride_sn, stride_b,
    KIND: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K, X16: tl.constexpr,
    V16: tl.constexpr, FAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, LANES: tl.constexpr = 0,
):
    # p_ptr: gemv_words. A step covers BLOCK_W words = 8 * BLOCK_W groups of 4 columns of
    # BLOCK_N rows; X16: 16-bit activations, V16: 16-bit float values (see _gemv_step).
    pid_n, m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    w_span = tl.cdiv(PW, SPLIT_K * BLOCK_W) * BLOCK_W
    w_lo = pid_k * w_span
    w_hi = tl.minimum(w_lo + w_span, PW)
    # Pairs of whole steps of whole words (16 kept values each) run unmasked, two steps an
    # iteration (the loop's own instructions, and the tiles a thread holds, stay small: bigger
    # tiles make Triton move x and the words through shared memory); the rest runs masked.
    w_full = w_lo + (tl.maximum(tl.minimum(w_hi, J // 16) - w_lo, 0) // (2 * BLOCK_W)) * (2 * BLOCK_W)
    rn_in = tl.minimum(rn, N - 1)  # rows past N read row N - 1; their sums are not stored
    x_row = x_ptr + m * stride_xm
    acc = tl.zeros((BLOCK_N, BLOCK_W, 8), tl.float32)
    if LANES:
        # LANES (codebook values, entries a power of two <= the lanes of a row): lane l holds
        # centroid l % LANES of its row (each row spans consecutive lanes of the [rows, words,
        # groups] layout, see book_lanes), and a lookup is a warp shuffle, as in the codebook GEMV.
        lane = lane_ids(acc.to(tl.int32)) % LANES
        table = tl.load(book_ptr + rn_in[:, None, None] * stride_b + lane)
    else:
        table = 0.0
    for w0 in range(w_lo, w_full, 2 * BLOCK_W):
        acc = _gemv_step(acc, x_row, v_ptr, p_ptr, s_ptr, book_ptr, rn_in, w0, w_hi, J, stride_vn, stride_pn,
                         stride_sn, stride_b, table, KIND, GROUP, X16, V16, FAST, LANES, False, BLOCK_W)
        acc = _gemv_step(acc, x_row, v_ptr, p_ptr, s_ptr, book_ptr, rn_in, w0 + BLOCK_W, w_hi, J, stride_vn,
                         stride_pn, stride_sn, stride_b, table, KIND, GROUP, X16, V16, FAST, LANES, False, BLOCK_W)
    for w0 in range(w_full, w_hi, BLOCK_W):
        acc = _gemv_step(acc, x_row, v_ptr, p_ptr, s_ptr, book_ptr, rn_in, w0, w_hi, J, stride_vn, stride_pn,
                         stride_sn, stride_b, table, KIND, GROUP, X16, V16, FAST, LANES, True, BLOCK_W)
    out = tl.sum(tl.sum(acc, 2), 1)
    if KIND == 1 and GROUP == 0:
        out *= tl.load(s_ptr + rn * stride_sn, mask=n_mask, other=0.0)
    C.store_tile(out[None, :], m + tl.arange(0, 1), rn, M, N, out_ptr, b_ptr, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def _sparse24_gemm_kernel(
    x_ptr, v_ptr, p_ptr, s_ptr, book_ptr, b_ptr, out_ptr, M, N, K,
    stride_xm, stride_vn, stride_pn, stride_sn, stride_b, M_BUCKET,
    KIND: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    rm, rn = C.gemm_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    m_mask, n_mask = rm < M, rn < N
    k_lo, k_hi = C.k_range(K, SPLIT_K, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < k_hi
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = dense24_tile(v_ptr, p_ptr, s_ptr, book_ptr, rn, n_mask, k0, k_hi, stride_vn, stride_pn, stride_sn,
                         stride_b, KIND, GROUP, BLOCK_K)
        w = w.to(x_ptr.dtype.element_ty).to(DOT_DTYPE)
        acc = tl.dot(x.to(DOT_DTYPE), w, acc, input_precision=PRECISION)
    if KIND == 1 and GROUP == 0:
        acc *= tl.load(s_ptr + rn * stride_sn, mask=n_mask, other=0.0)[None, :]
    C.store_tile(acc, rm, rn, M, N, out_ptr, b_ptr, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def _sparse24_dequant_kernel(v_ptr, p_ptr, s_ptr, book_ptr, out_ptr, N, K, stride_vn, stride_pn, stride_sn, stride_b,
                             KIND: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    mask = (rn < N) & (rk < K)
    w = sparse24_tile(v_ptr, p_ptr, s_ptr, book_ptr, rn, rk, mask, stride_vn, stride_pn, stride_sn, stride_b,
                      KIND, GROUP)
    if KIND == 1 and GROUP == 0:
        w *= tl.load(s_ptr + rn * stride_sn, mask=rn < N, other=0.0)
    tl.store(out_ptr + rn * K + rk, w.to(out_ptr.dtype.element_ty), mask=mask)


def gemv_config_ok(config: triton.Config, value_bytes: int, lanes: int) -> bool:
    """Whether the GEMV runs ``config``: rows spanning enough lanes for a register-held codebook
    (``lanes``), and 8 groups a thread only for 8-bit values (16- and 32-bit ones would be two or
    four 128-bit loads a thread, which Triton routes through shared memory)."""
    return (not lanes or book_lanes(config, lanes) > 0) and (value_bytes == 1 or groups_per_thread(config) <= 4)


def _prune_lanes(configs, named_args, **kwargs):
    """Keep the configs the launch can run (:func:`gemv_config_ok`)."""
    value_bytes = named_args["v_ptr"].element_size()
    return [c for c in configs if gemv_config_ok(c, value_bytes, kwargs.get("LANES", 0))]


_s24_gemv_tuned = C.tuned(_sparse24_gemv_kernel, S24_GEMV_CONFIGS, key=["N", "J", "KIND", "GROUP", "SPLIT_K", "LANES"],
                          prune=_prune_lanes)
_s24_gemm_tuned = C.tuned(_sparse24_gemm_kernel, C.GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "KIND", "GROUP", "SPLIT_K"],
                          prune=C.prune_gemm)


def _prepare24(x, values, positions, k):
    n = values.shape[0]
    if k % 4 or x.shape[-1] != k or values.shape != (n, k // 2) or positions.shape != (n, triton.cdiv(k // 2, 16)):
        raise ValueError(
            f"2:4 weight of {k} columns needs values [{n}, {k // 2}] and positions [{n}, {triton.cdiv(k // 2, 16)}] "
            f"and x [..., {k}]; got {tuple(values.shape)}, {tuple(positions.shape)}, {tuple(x.shape)}"
        )
    return C.as_2d(x), values.contiguous(), positions.contiguous()


def sparse24_gemv(x: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, scales: torch.Tensor | None,
                  codebook: torch.Tensor | None, bias: torch.Tensor | None, group_size: int, k: int,
                  split_k: int | None = None, config: triton.Config | None = None,
                  words: torch.Tensor | None = None) -> torch.Tensor:
    """2:4 GEMV (one program per (row block, activation row); meant for M == 1).

    ``values`` ``[N, k/2]`` (floats, int8 with ``scales``, or indices into ``codebook``),
    ``positions`` int32 ``[N, ceil(k/32)]``; returns ``[..., N]`` in ``x.dtype``. ``words``:
    :func:`gemv_words` of ``positions`` (``Sparse24Weight`` caches it), else built here. On CUDA
    the byte permute of 16-bit x runs in PTX once its self-check passed (:data:`SELF_CHECKS`),
    else in integer ops.
    """
    return _gemv(x, values, positions, scales, codebook, bias, group_size, k, split_k, config, words, _checked)


def _checked(path: str, x2: torch.Tensor) -> bool:
    check, fallback = SELF_CHECKS[path]
    return dispatch.fast_path_ok(path, x2, check, fallback)


def _gemv(x, values, positions, scales, codebook, bias, group_size, k, split_k, config, words, allow):
    """:func:`sparse24_gemv`, taking the PTX byte permute (``sparse24.prmt``) only where ``allow``."""
    x2, values, positions = _prepare24(x, values, positions, k)
    words = gemv_words(positions) if words is None else words.contiguous()
    if words.shape != positions.shape or words.dtype != torch.int32:
        raise ValueError(f"words must be int32 {tuple(positions.shape)}, got {words.dtype} {tuple(words.shape)}")
    x16 = x2.dtype in (torch.float16, torch.bfloat16)
    if x16 and (x2.data_ptr() % 8 or x2.stride(0) % 4):  # the kernel reads x 8 bytes (a group) at a time
        x2 = x2.clone(memory_format=torch.contiguous_format)  # fresh: aligned, stride k (k % 4 == 0)
    v16 = values.dtype in (torch.float16, torch.bfloat16)
    if values.element_size() < 4 and values.data_ptr() % (2 * values.element_size()):
        values = values.clone()  # it reads a group's two values as one int32 (16-bit) or int16 (8-bit)
    m, n = x2.shape[0], values.shape[0]
    kind, scales, stride_s, codebook, stride_b = C.value_args(scales, codebook, n)
    # A codebook of up to 32 entries (a power of two) lives in registers, looked up by shuffles
    # (GPU only, once its self-check passed), on the configs whose rows span enough lanes.
    lanes = 0
    if kind == C.KIND_CODEBOOK and x16 and not C.interpreting():
        e = codebook.shape[1]
        fits = book_lanes(config, e) if config else max(book_lanes(c, e) for c in S24_GEMV_CONFIGS)
        lanes = e if fits and allow("sparse24.lanes", x2) else 0
    pw = positions.shape[1]
    split = split_k or C.pick_split_k(x2, triton.cdiv(n, 8) * m, k, n)
    out, ws = C.new_output(m, n, split, x.dtype, x.device)
    if m and n:
        C.launch(
            _sparse24_gemv_kernel, _s24_gemv_tuned, lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), m, split),
            (x2, values, words, scales, codebook, bias, ws, m, n, k // 2, pw,
             x2.stride(0), values.stride(0), words.stride(0), stride_s, stride_b),
            config, S24_INTERP_GEMV, KIND=kind, GROUP=group_size, HAS_BIAS=bias is not None, SPLIT_K=split,
            X16=x16, V16=v16, FAST=not C.interpreting() and (not x16 or allow("sparse24.prmt", x2)), LANES=lanes,
        )
        C.finish_split_k(out, ws, bias, split)
    return out.view(*x.shape[:-1], n)


# ---- self-check of the PTX byte permute (see kernels.dispatch.fast_path_ok) --------------------
# Every pair of positions in turn, small-integer values (in x's dtype) and x, values' signs picked
# so each row's sum lands within 16 of its own target (-12..12): exact in fp32 and 16 bits. Both
# the unmasked two-step loop and the masked tail run.
# The lanes check runs both thread layouts: 4 groups a thread (the first config) and 8 (the first
# such config), each through its unmasked loop and its masked tail.
LANES_PROBE_CONFIGS = (S24_GEMV_CONFIGS[0], next(c for c in S24_GEMV_CONFIGS if groups_per_thread(c) == 8))
PROBE_N, PROBE_J = 40, 16 * (2 * max(c.kwargs["BLOCK_W"] for c in LANES_PROBE_CONFIGS) + 3) + 6
_PAIRS = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])


def probe():
    """``(x [1, k] fp32, values fp32 [N, k/2], positions, k, want [1, N] float64)`` (on CPU)."""
    from torchzip.packed.bits import pack_bits

    n, j = PROBE_N, PROBE_J
    k = 2 * j
    r, g = torch.arange(n)[:, None], torch.arange(j // 2)[None, :]
    pos = _PAIRS[(r * 5 + g) % 6].reshape(n, j)  # [n, groups, 2] -> kept values' positions
    cols = pos + 4 * (torch.arange(j) // 2)
    x = (torch.arange(k) * 7) % 5 - 2
    mags = (r * 3 + torch.arange(j) * 5) % 9
    target = 4.0 * (torch.arange(n) % 7 - 3)
    up = dispatch.balanced_signs(mags, -mags, x[cols], target)
    values = torch.where(up, mags, -mags).float()
    positions = pack_bits(pos, 2)
    x = x.float()[None, :]
    return x, values, positions, k, sparse24_reference(x, values, positions, None, None, None, 0, k)


def _probe_check(device: torch.device, dtype: torch.dtype) -> bool:
    x, values, positions, k, want = probe()
    taken = []
    got = _gemv(x.to(device, dtype), values.to(device, dtype), positions.to(device), None, None, None, 0, k, 1,
                S24_GEMV_CONFIGS[0], None, lambda p, _: p == "sparse24.prmt" and not taken.append(p))
    return taken == ["sparse24.prmt"] and torch.equal(got.double().cpu(), want)


def probe_codebook(per_row: bool):
    """:func:`probe` with 8-bit codes into a 16-entry codebook of the integers -8..7 (per row:
    times 1 or 2): ``(x, codes uint8, positions, codebook, k, want)``; the 8s of the probe's
    values become 7s, which keeps every sum a small integer (exact in 16 bits)."""
    x, values, positions, k, _ = probe()
    codes = (values + 8).clamp(max=15).to(torch.uint8)
    book = (torch.arange(16) - 8.0)[None, :]
    if per_row:
        book = book * (torch.arange(PROBE_N)[:, None] % 2 + 1.0)
    return x, codes, positions, book, k, sparse24_reference(x, codes, positions, None, book, None, 0, k)


def _lanes_probe_check(device: torch.device, dtype: torch.dtype) -> bool:
    for per_row, config in itertools.product((True, False), LANES_PROBE_CONFIGS):
        x, codes, positions, book, k, want = probe_codebook(per_row)
        taken = []
        got = _gemv(x.to(device, dtype), codes.to(device), positions.to(device), None, book.to(device), None, 0, k,
                    1, config, None, lambda p, _: p == "sparse24.lanes" and not taken.append(p))
        if taken != ["sparse24.lanes"] or not torch.equal(got.double().cpu(), want):
            return False
    return True


# path -> (check(device, dtype), what runs instead).
SELF_CHECKS = {"sparse24.prmt": (_probe_check, "the 2:4 GEMV permuting bytes with integer ops"),
               "sparse24.lanes": (_lanes_probe_check, "the 2:4 GEMV gathering codebook values from L1")}


def sparse24_gemm(x: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, scales: torch.Tensor | None,
                  codebook: torch.Tensor | None, bias: torch.Tensor | None, group_size: int, k: int,
                  split_k: int | None = None, config: triton.Config | None = None) -> torch.Tensor:
    """2:4 tiled ``tl.dot`` kernel for M > 1 (see :func:`sparse24_gemv` for arguments)."""
    x2, values, positions = _prepare24(x, values, positions, k)
    m, n = x2.shape[0], values.shape[0]
    kind, scales, stride_s, codebook, stride_b = C.value_args(scales, codebook, n)
    bucket = min(C.next_pow2(m), 256)
    split = split_k or C.pick_split_k(x2, triton.cdiv(n, 64) * triton.cdiv(m, min(max(bucket, 16), 64)), k, n)
    out, ws = C.new_output(m, n, split, x.dtype, x.device)
    if m and n:
        C.launch(
            _sparse24_gemm_kernel, _s24_gemm_tuned,
            lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), split),
            (x2, values, positions, scales, codebook, bias, ws, m, n, k,
             x2.stride(0), values.stride(0), positions.stride(0), stride_s, stride_b, bucket),
            config, C.INTERP_GEMM, KIND=kind, GROUP=group_size, HAS_BIAS=bias is not None, SPLIT_K=split,
            DOT_DTYPE=C.dot_dtype(x.dtype), PRECISION=C.dot_precision(x.dtype),
        )
        C.finish_split_k(out, ws, bias, split)
    return out.view(*x.shape[:-1], n)


def dequantize_sparse24(values: torch.Tensor, positions: torch.Tensor, scales: torch.Tensor | None,
                        codebook: torch.Tensor | None, group_size: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Dense ``[N, k]`` weight (zeros included) of a 2:4 weight, in ``dtype``."""
    n = values.shape[0]
    values, positions = values.contiguous(), positions.contiguous()
    kind, scales, stride_s, codebook, stride_b = C.value_args(scales, codebook, n)
    out = torch.empty(n, k, dtype=dtype, device=values.device)
    if out.numel():
        _sparse24_dequant_kernel[C.dq_grid(n, k)](
            values, positions, scales, codebook, out, n, k, values.stride(0), positions.stride(0), stride_s, stride_b,
            KIND=kind, GROUP=group_size, BLOCK_N=C.DQ_BLOCK_N, BLOCK_K=C.DQ_BLOCK_K, num_warps=C.DQ_WARPS,
        )
    return out


def sparse24_reference(x, values, positions, scales, codebook, bias, group_size, k) -> torch.Tensor:
    """What the 2:4 kernels compute, in float64."""
    from torchzip.packed.bits import unpack_bits

    n = values.shape[0]
    cols = unpack_bits(positions, 2, k // 2) + 4 * (torch.arange(k // 2, device=x.device) // 2)
    rows = torch.arange(n, device=x.device).unsqueeze(1).expand_as(cols)
    w = torch.zeros(n, k, dtype=torch.float64, device=x.device).scatter_(1, cols, C.decode_values64(values, rows, cols, scales, codebook, group_size))
    out = x.double() @ w.T
    return out if bias is None else out + bias.double()


# ---- the op the packed format calls ------------------------------------------------------------
@torch.library.custom_op("torchzip::sparse24_linear", mutates_args=())
def _sparse24_linear(x: Tensor, values: Tensor, positions: Tensor, scales: Tensor | None, codebook: Tensor | None,
                     bias: Tensor | None, group_size: int, k: int, words: Tensor | None = None) -> Tensor:
    dispatch.require_triton()
    return dispatch.by_rows(_sparse24_impl, values.shape[0], k, x, values, positions, scales, codebook, bias, group_size, k,
                            words)


def _sparse24_impl(x: Tensor, values: Tensor, positions: Tensor, scales: Tensor | None, codebook: Tensor | None,
                   bias: Tensor | None, group_size: int, k: int, words: Tensor | None = None) -> Tensor:
    path = dispatch.pick_path("sparse24", x)
    if path == "dense":
        w = dequantize_sparse24(values, positions, scales, codebook, group_size, k, x.dtype)
        return dispatch.dense(x, w, bias)
    if path == "gemv":
        return sparse24_gemv(x, values, positions, scales, codebook, bias, group_size, k, words=words)
    return sparse24_gemm(x, values, positions, scales, codebook, bias, group_size, k)


@_sparse24_linear.register_fake
def _(x, values, positions, scales, codebook, bias, group_size, k, words=None):
    return dispatch.out_like(x, values.shape[0])


def sparse24_linear(x: Tensor, values: Tensor, positions: Tensor, scales: Tensor | None, codebook: Tensor | None,
                    bias: Tensor | None, group_size: int, k: int, words: Tensor | None = None) -> Tensor:
    """``x @ W.T + bias`` for a 2:4 weight (``torchzip.packed.sparse24`` layout).

    ``values`` ``[N, k/2]``: floats, int8 (with ``scales`` ``[N, G]``) or codebook indices (with
    ``codebook`` ``[N or 1, E]``); ``positions`` int32 ``[N, ceil(k/32)]``, 2-bit packed.
    ``words``: :func:`gemv_words` of ``positions`` (``Sparse24Weight`` caches it) for the GEMV.
    """
    return torch.ops.torchzip.sparse24_linear(x, values, positions, scales, codebook, bias, int(group_size), int(k),
                                              words)
