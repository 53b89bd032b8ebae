"""int8 weight-only matmul: ``x @ (qweight * scales).T + bias`` with fp32 accumulation.

Three kernels: GEMVs for one activation row, a tiled ``tl.dot`` GEMM for more rows (weight tile
converted to the activation dtype in registers) and a dequantize kernel that writes the dense
weight for large M (then cuBLAS); the ``torchzip::int8_linear`` op picks among them. The
GEMVs on fp16/bf16 read the weight as int32 words: per channel on tensor cores, each int8 pair
one byte permute into fp16/bf16 subnormals fed to ``mma`` (``_int8_gemv_mma_kernel``); in groups
of a multiple of 4 columns (or x rows only 4-byte aligned) each int8 one byte permute into an
fp32 subnormal and one FMA (``_int8_gemv_words_kernel``); no I2F in either. fp32 activations and
unaligned shapes take the tile GEMV (int8 -> fp32 through fp16 bit patterns,
products kept in a 2-D fp32 accumulator and reduced once at the end). GEMVs and GEMM split K
across programs when the grid is too small to keep every SM loading.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from torchzip.kernels import _common as C
from torchzip.kernels import dispatch

# GEMV (M == 1): BLOCK_N rows x BLOCK_K int8 columns per step. Each thread holds 8 consecutive
# columns of BLOCK_N // 1 rows (8-byte weight loads); BLOCK_K spans 256 columns per warp, so the
# activations' own 16-byte loads land in the same threads as the weights they meet (no shared-memory
# round trip, no barrier) and each converted activation serves all of the thread's rows.
GEMV_CONFIGS = C.configs(("BLOCK_N", "BLOCK_K"), [
    (8, 256, 1, 2), (8, 512, 2, 2), (4, 1024, 4, 2), (8, 1024, 4, 2),
    (4, 2048, 8, 2), (8, 2048, 8, 2), (2, 1024, 4, 3), (4, 512, 2, 2),
])
# The interpreter runs programs one after another in Python: few, mid-sized blocks are fastest
# there, and they still leave ragged edges in the test shapes.
INTERP_GEMV = triton.Config({"BLOCK_N": 16, "BLOCK_K": 64})
# From this M on, dequantize + cuBLAS beats the fused kernel (see kernels.dispatch).
dispatch.DENSE_MIN_M.setdefault("int8", 512)
# int8 q as the fp16 bit pattern 0x6400 | (q ^ 0x80), i.e. 1024 + (q + 128): exact, and no I2F
# (a quarter-rate conversion that would cap an H200 below its HBM bandwidth).
MAGIC_BIAS = 1152.0


def gemv_constexprs(config: triton.Config) -> dict:
    """Constexprs of the GEMV for a launch config (benchmarks/sass_report.py compiles these)."""
    return {"SPLIT_K": 1, "FAST": True, "FOLD": True, **config.kwargs}


def gemv_weights_per_iter(constexprs: dict) -> int:
    """Weights one iteration of the GEMV's loop consumes."""
    return constexprs["BLOCK_N"] * constexprs["BLOCK_K"]


@triton.jit
def int8_as_f32(q, FAST: tl.constexpr, EXACT: tl.constexpr):
    """int8 weights as fp32: ``q`` (EXACT) or ``q + MAGIC_BIAS`` (the caller subtracts the bias
    times the activation sum once per row).

    FAST (a GPU): per 4 weights one XOR, two byte permutes that build fp16 pairs
    ``1024 + (q + 128)``, in EXACT mode two fp16x2 subtracts of 1152, and four fp16 -> fp32
    conversions. The interpreter cannot run inline PTX; it computes the same values directly.
    """
    if FAST:
        if EXACT:
            return tl.inline_asm_elementwise(
                """{ .reg .b32 t, lo, hi, bias; .reg .b16 h0, h1, h2, h3;
                xor.b32 t, $4, 0x80808080;
                prmt.b32 lo, t, 0x64646464, 0x4140;
                prmt.b32 hi, t, 0x64646464, 0x4342;
                mov.b32 bias, 0x64806480;
                sub.rn.f16x2 lo, lo, bias;
                sub.rn.f16x2 hi, hi, bias;
                mov.b32 {h0, h1}, lo;
                mov.b32 {h2, h3}, hi;
                cvt.f32.f16 $0, h0; cvt.f32.f16 $1, h1; cvt.f32.f16 $2, h2; cvt.f32.f16 $3, h3; }""",
                "=r,=r,=r,=r,r", [q], dtype=tl.float32, is_pure=True, pack=4)
        return tl.inline_asm_elementwise(
            """{ .reg .b32 t, lo, hi; .reg .b16 h0, h1, h2, h3;
            xor.b32 t, $4, 0x80808080;
            prmt.b32 lo, t, 0x64646464, 0x4140;
            prmt.b32 hi, t, 0x64646464, 0x4342;
            mov.b32 {h0, h1}, lo;
            mov.b32 {h2, h3}, hi;
            cvt.f32.f16 $0, h0; cvt.f32.f16 $1, h1; cvt.f32.f16 $2, h2; cvt.f32.f16 $3, h3; }""",
            "=r,=r,=r,=r,r", [q], dtype=tl.float32, is_pure=True, pack=4)
    if EXACT:
        return q.to(tl.float32)
    return q.to(tl.float32) + 1152.0  # MAGIC_BIAS


# The per-channel GEMV on 16-bit activations (the M = 1 decode path) reads the weight as int32
# words of 4 int8 and turns each into an fp32 *subnormal*, (q + 128) * 2**-149: one byte permute
# a weight and no conversion instruction, bias-free but for the +128 (taken off once per row as
# 128 * sum(x)). x is scaled by 2**X_SHIFT so every product stays a normal fp32 number; the row
# sum is scaled back at the end. The FMA does not flush subnormals (Triton's fp32 math is IEEE;
# tests/test_sass.py checks there is no FTZ in the loop).
X_SHIFT = 64
# 4 words (16 bytes) of a row a thread, a warp on 128 words of one row; BLOCK_N // num_warps rows
# a thread (8: more would pass 128 registers).
WORD_CONFIGS = C.configs(("BLOCK_N", "BLOCK_W"), [
    (8, 128, 1, 2), (16, 128, 2, 2), (32, 128, 4, 2), (16, 128, 4, 2),
    (8, 256, 2, 2), (16, 256, 4, 2), (4, 128, 1, 2), (8, 128, 2, 2),
])
# Groups keep a scale a word and row: with 8 rows a thread and 2-4 warps Triton 3.6 takes 167-168
# registers (3.8: 128), so groups launch these (8 rows a thread only with 1-2 warps).
WORD_GROUP_CONFIGS = C.configs(("BLOCK_N", "BLOCK_W"), [
    (8, 128, 1, 2), (8, 256, 2, 2), (16, 128, 4, 2), (4, 128, 1, 2), (8, 128, 2, 2),
])
INTERP_WORDS = triton.Config({"BLOCK_N": 16, "BLOCK_W": 8})
XS_BLOCK = 1024  # x elements a step of the sum(x) pass
EVICT = True  # evict_first on weight loads (streamed once)


def words_constexprs(config: triton.Config, group: int = 0) -> dict:
    """Constexprs of the word GEMV for a launch config (bf16 x; benchmarks/sass_report.py)."""
    return {"GROUP": group, "SPLIT_K": 1, "FAST": True, "X_KIND": 0, "XS_BLOCK": XS_BLOCK, "EVICT": EVICT, **config.kwargs}


def words_weights_per_iter(constexprs: dict) -> int:
    """Weights one iteration of the word GEMV's loop consumes."""
    return constexprs["BLOCK_N"] * constexprs["BLOCK_W"] * 4


@triton.jit
def x_pair(x_ptr, col, ok, X_KIND: tl.constexpr, FAST: tl.constexpr, MASKED: tl.constexpr):
    """x at ``col`` and ``col + 1`` as fp32 times 2**X_SHIFT (0 where not ``ok``).

    FAST: one 4-byte load in inline PTX marked pure (so it is laid out with the weights it
    meets); bf16 pairs are scaled by one bf16x2 multiply, fp16 after conversion. X_KIND: 0 bf16, 1 fp16.
    """
    if FAST:
        if MASKED:
            head: tl.constexpr = ".reg .pred p; setp.ne.s32 p, $3, 0; mov.b32 v, 0; @p "
            flag = ok.to(tl.int32)
        else:
            head: tl.constexpr = ""
            flag = col
        if X_KIND == 0:  # 0x5f80 is 2**64 in bf16
            asm: tl.constexpr = ("{ .reg .b32 v, s; " + head + "ld.global.nc.b32 v, [$2]; mov.b32 s, 0x5f805f80; "
                                 "mul.rn.bf16x2 v, v, s; shl.b32 $0, v, 16; and.b32 $1, v, 0xffff0000; }")
        else:
            asm: tl.constexpr = ("{ .reg .b32 v; .reg .b16 h0, h1; .reg .f32 a, b; " + head
                                 + "ld.global.nc.b32 v, [$2]; mov.b32 {h0, h1}, v; cvt.f32.f16 a, h0; "
                                 "cvt.f32.f16 b, h1; mul.rn.f32 $0, a, 0f5F800000; mul.rn.f32 $1, b, 0f5F800000; }")
        return tl.inline_asm_elementwise(asm, "=r,=r,l,r", [(x_ptr + col).to(tl.int64), flag],
                                         dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
    x0 = tl.load(x_ptr + col, mask=ok, other=0.0).to(tl.float32) * 18446744073709551616.0  # 2**X_SHIFT
    x1 = tl.load(x_ptr + col + 1, mask=ok, other=0.0).to(tl.float32) * 18446744073709551616.0
    return x0, x1


@triton.jit
def load_f32(ptr, FAST: tl.constexpr):
    """fp32 at ``ptr`` (in bounds); FAST: a load in inline PTX marked pure, so the identical loads
    of a thread's words merge into one."""
    if FAST:
        return tl.inline_asm_elementwise("ld.global.nc.f32 $0, [$1];", "=f,l", [ptr.to(tl.int64)], dtype=tl.float32,
                                         is_pure=True, pack=1)
    return tl.load(ptr)


@triton.jit
def int8x4_fma(word, x0, x1, x2, x3, acc, FAST: tl.constexpr):
    """``acc + sum_j (q_j + 128) * 2**-149 * x_j`` over the 4 int8 ``q_j`` of an int32 word.

    FAST: one XOR (q + 128 as unsigned bytes) and per weight one byte permute that places the byte
    under a zero exponent (the subnormal u * 2**-149) and one FMA. The interpreter computes the
    same numbers with integer ops.
    """
    if FAST:
        return tl.inline_asm_elementwise(
            """{ .reg .b32 t, w; xor.b32 t, $1, 0x80808080;
            prmt.b32 w, t, 0, 0x4440; fma.rn.f32 $0, w, $2, $6;
            prmt.b32 w, t, 0, 0x4441; fma.rn.f32 $0, w, $3, $0;
            prmt.b32 w, t, 0, 0x4442; fma.rn.f32 $0, w, $4, $0;
            prmt.b32 w, t, 0, 0x4443; fma.rn.f32 $0, w, $5, $0; }""",
            "=f,r,f,f,f,f,f", [word, x0, x1, x2, x3, acc], dtype=tl.float32, is_pure=True, pack=1)
    t = word ^ -2139062144  # 0x80808080 as int32
    # u * 2**-149 as (u * 2**-75) * 2**-74, both exact (a literal below fp32's normal range would
    # be taken as fp64).
    acc += ((t & 0xFF).to(tl.float32) * 2.6469779601696886e-23 * 5.293955920339377e-23) * x0
    acc += (((t >> 8) & 0xFF).to(tl.float32) * 2.6469779601696886e-23 * 5.293955920339377e-23) * x1
    acc += (((t >> 16) & 0xFF).to(tl.float32) * 2.6469779601696886e-23 * 5.293955920339377e-23) * x2
    acc += (((t >> 24) & 0xFF).to(tl.float32) * 2.6469779601696886e-23 * 5.293955920339377e-23) * x3
    return acc


@triton.jit
def _gemv_step(acc, x_ptr, q_ptr, s_ptr, rn, rw, w_mask, stride_qn, stride_sn, K, zero_row, GROUP: tl.constexpr,
               X_KIND: tl.constexpr, FAST: tl.constexpr, MASKED: tl.constexpr, EVICT: tl.constexpr):
    # rn is clamped to real rows, so only the ragged step needs a mask (a masked load also costs
    # the zeroing of its registers).
    if MASKED:
        words = tl.load(q_ptr + rn[:, None] * stride_qn + rw[None, :], mask=w_mask[None, :], other=0,
                        eviction_policy="evict_first")
    elif EVICT:
        words = tl.load(q_ptr + rn[:, None] * stride_qn + rw[None, :], eviction_policy="evict_first")
    else:
        words = tl.load(q_ptr + rn[:, None] * stride_qn + rw[None, :])
    # x as a [1, words] tile: one copy per thread, broadcast over its rows; word w meets columns
    # 4w .. 4w + 3 (K is a multiple of 4, so a word is in range or not as a whole).
    col = rw[None, :] * 4 + zero_row
    ok = w_mask[None, :] & (col < K)
    x0, x1 = x_pair(x_ptr, col, ok, X_KIND, FAST, MASKED)
    x2, x3 = x_pair(x_ptr, col + 2, ok, X_KIND, FAST, MASKED)
    if GROUP == 0:
        return int8x4_fma(words, x0, x1, x2, x3, acc, FAST)
    # Groups: a thread's 4 words (16 columns) lie in one group, so each word's sum is scaled once:
    # (sum (q + 128) x) - 128 sum(x) per word (two FMAs for 4 weights), times its group's scale,
    # loaded once per thread and row. The group index is clamped: past K, x is 0 anyway.
    part = int8x4_fma(words, x0, x1, x2, x3, tl.zeros_like(acc), FAST)
    x_off = ((x0 + x1) + (x2 + x3)) * 6.938893903907228e-18  # 128 * 2**-X_SHIFT
    g = tl.minimum(col // GROUP, K // GROUP - 1)
    scale = load_f32(s_ptr + rn[:, None] * stride_sn + g, FAST)
    return acc + (part * 3.8685626227668134e25 - x_off) * scale  # 2**(149 - X_SHIFT)


@triton.jit
def _int8_gemv_words_kernel(
    x_ptr, q_ptr, s_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_qn, stride_sn,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K, FAST: tl.constexpr, X_KIND: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, XS_BLOCK: tl.constexpr, EVICT: tl.constexpr,
):
    """int8 GEMV on 16-bit x, per channel (GROUP 0) or in groups; ``q_ptr`` the weight as int32
    words, ``stride_qn`` in words."""
    pid_n, m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    KW = K // 4
    w_span = tl.cdiv(KW, SPLIT_K * BLOCK_W) * BLOCK_W
    w_lo = pid_k * w_span
    w_hi = tl.minimum(w_lo + w_span, KW)
    x_row = x_ptr + m * stride_xm
    zero_row = tl.zeros((1, BLOCK_W), tl.int32)
    acc = tl.zeros((BLOCK_N, BLOCK_W), tl.float32)
    rows = tl.minimum(rn, N - 1)  # rows past N repeat the last one; their sums are not stored
    cols = tl.max_contiguous(tl.multiple_of(tl.arange(0, BLOCK_W), 4), 4)
    w_full = w_lo + (w_hi - w_lo) // BLOCK_W * BLOCK_W
    for w0 in range(w_lo, w_full, BLOCK_W):
        acc = _gemv_step(acc, x_row, q_ptr, s_ptr, rows, w0 + cols, w0 + cols < w_hi, stride_qn, stride_sn, K,
                         zero_row, GROUP, X_KIND, FAST, False, EVICT)
    if w_full < w_hi:  # the ragged last step, not a loop: the loop above is the hot one
        acc = _gemv_step(acc, x_row, q_ptr, s_ptr, rows, w_full + cols, w_full + cols < w_hi, stride_qn,
                         stride_sn, K, zero_row, GROUP, X_KIND, FAST, True, EVICT)
    if GROUP == 0:
        # sum(x) over this program's columns, for the +128 of every weight: its own short pass, as
        # a sum inside the loop would be laid out apart from the weights and load x twice.
        xs = tl.zeros((XS_BLOCK,), tl.float32)
        for k0 in range(4 * w_lo, 4 * w_hi, XS_BLOCK):
            rk = k0 + tl.arange(0, XS_BLOCK)
            xs += tl.load(x_row + rk, mask=rk < 4 * w_hi, other=0.0).to(tl.float32)
        # sum (q + 128) x 2**(X_SHIFT - 149) -> sum q x: scale back (an exact power of two), take
        # off 128 sum(x), scale the row.
        out = tl.sum(acc, 1) * 3.8685626227668134e25 - 128.0 * tl.sum(xs, 0)
        out *= tl.load(s_ptr + rn * stride_sn, mask=n_mask, other=0.0)
    else:
        out = tl.sum(acc, 1)
    C.store_tile(out[None, :], m + tl.arange(0, 1), rn, M, N, out_ptr, b_ptr, pid_k, HAS_BIAS, SPLIT_K)


# ---- per-channel GEMV on tensor cores ----------------------------------------------------------
# The M = 1 per-channel path (16-bit x) feeds each thread's int8 words straight into
# mma.m16n8k16: a quad of lanes (lane // 4) shares two weight rows, lane % 4 picks a word of them,
# so the 4 lanes of a quad together hold the 16 k-slots of one A row pair and the matching x (the
# B operand; its 8 columns all equal x, so every C column is the row's dot product). A word of a
# row becomes two 16-bit pairs of *subnormal* weights with one XOR (q + 128 as unsigned bytes) and
# two byte permutes (bits 0x00uu: u * 2**-24 in fp16, u * 2**-133 in bf16, where the first
# normal binade continues the subnormal one), so per 8 weights: 2 XOR, 4 PRMT, 1 HMMA. bf16 x is
# scaled by 2**X_SHIFT (one bf16x2 multiply a pair) so every product is a normal fp32 number;
# fp16 products of a u * 2**-24 weight are normal as they are. The +128 comes off once a row as
# 128 * sum(x). Each lane's C columns both get its quad's sum, so a row's total comes out 8x.
# This assumes the tensor cores take subnormal fp16/bf16 inputs unflushed (no GPU has run it yet:
# benchmarks/gpu_check.py checks it against float64; a flush would zero every weight).
MMA_W = tl.constexpr(16)  # words a step: 4 a lane, 4 lanes a quad -> threadsPerWarp [8, 4] on [rows, words] tiles
# BLOCK_N rows a program; BLOCK_N // (16 * num_warps) row pairs a thread.
MMA_CONFIGS = [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s) for bn, w, s in [
    (32, 2, 2), (64, 2, 2), (64, 4, 2), (128, 4, 2), (32, 1, 2), (128, 8, 2), (256, 8, 2), (64, 1, 2),
]]
INTERP_MMA = triton.Config({"BLOCK_N": 16})


def mma_constexprs(config: triton.Config) -> dict:
    """Constexprs of the tensor-core GEMV for a launch config (bf16 x; benchmarks/sass_report.py)."""
    return {"SPLIT_K": 1, "FAST": True, "X_KIND": 0, "XS_BLOCK": XS_BLOCK, "EVICT": EVICT, **config.kwargs}


def mma_weights_per_iter(constexprs: dict) -> int:
    """Weights one iteration of the tensor-core GEMV's loop consumes."""
    return constexprs["BLOCK_N"] * MMA_W.value * 4


@triton.jit
def x_quad(x_ptr, col, ok, X_KIND: tl.constexpr, MASKED: tl.constexpr):
    """x at ``col .. col + 3`` as two 16-bit pairs (0 where not ``ok``), bf16 ones times 2**X_SHIFT:
    an 8-byte load in inline PTX, marked pure so it is laid out with the weights it meets."""
    if MASKED:
        head: tl.constexpr = ".reg .pred p; setp.ne.s32 p, $3, 0; mov.b32 $0, 0; mov.b32 $1, 0; @p "
        flag = ok.to(tl.int32)
    else:
        head: tl.constexpr = ""
        flag = col
    if X_KIND == 0:  # 0x5f80 is 2**64 in bf16
        asm: tl.constexpr = ("{ .reg .b32 s; " + head + "ld.global.nc.v2.b32 {$0, $1}, [$2]; mov.b32 s, 0x5f805f80; "
                             "mul.rn.bf16x2 $0, $0, s; mul.rn.bf16x2 $1, $1, s; }")
    else:
        asm: tl.constexpr = "{ " + head + "ld.global.nc.v2.b32 {$0, $1}, [$2]; }"
    return tl.inline_asm_elementwise(asm, "=r,=r,l,r", [(x_ptr + col).to(tl.int64), flag],
                                     dtype=(tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def int8_mma(wa, wb, lo, hi, acc, X_KIND: tl.constexpr):
    """``acc`` (4 accumulators: C columns 2c and 2c + 1 of each row) plus, on tensor cores, the
    products of int32 words of two rows (``wa``, ``wb``) with x pairs ``lo``, ``hi`` (see MMA_W);
    each lane's results are its quad's sums."""
    kind: tl.constexpr = "bf16" if X_KIND == 0 else "f16"
    a0, a1, b0, b1 = acc
    return tl.inline_asm_elementwise(
        """{ .reg .b32 ta, tb, a0, a1, a2, a3;
        xor.b32 ta, $4, 0x80808080; xor.b32 tb, $5, 0x80808080;
        prmt.b32 a0, ta, 0, 0x4140; prmt.b32 a1, tb, 0, 0x4140;
        prmt.b32 a2, ta, 0, 0x4342; prmt.b32 a3, tb, 0, 0x4342;
        mma.sync.aligned.m16n8k16.row.col.f32.""" + kind + "." + kind + """.f32
            {$0, $1, $2, $3}, {a0, a1, a2, a3}, {$6, $7}, {$8, $9, $10, $11}; }""",
        "=f,=f,=f,=f,r,r,r,r,f,f,f,f", [wa, wb, lo, hi, a0, a1, b0, b1],
        dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)


@triton.jit
def _sub_weight(t, X_KIND: tl.constexpr):
    """The interpreter's model of a permuted byte ``t`` (0..255): u * 2**-133 (bf16) or u * 2**-24."""
    if X_KIND == 0:  # two normal constants: a literal below fp32's normal range would be fp64
        w = (t.to(tl.float32) * 6.776263578034403e-21) * 1.3552527156068805e-20
    else:
        w = t.to(tl.float32) * 5.960464477539063e-08
    return w


@triton.jit
def _int8x4_sub_dot(word, x_ptr, col, ok, X_KIND: tl.constexpr):
    """The interpreter's model of one row's share of :func:`int8_mma` (without the quad sum)."""
    scale = 18446744073709551616.0 if X_KIND == 0 else 1.0  # 2**X_SHIFT for bf16
    t = word ^ -2139062144  # 0x80808080 as int32
    acc = _sub_weight(t & 0xFF, X_KIND) * (tl.load(x_ptr + col, mask=ok, other=0.0).to(tl.float32) * scale)
    for j in tl.static_range(1, 4):
        xj = tl.load(x_ptr + col + j, mask=ok, other=0.0).to(tl.float32) * scale
        acc += _sub_weight((t >> (8 * j)) & 0xFF, X_KIND) * xj
    return acc


@triton.jit
def _mma_step(acc, x_ptr, q_ptr, rows_a, rows_b, rw, w_mask, stride_qn, K, zero_row,
              X_KIND: tl.constexpr, FAST: tl.constexpr, MASKED: tl.constexpr, EVICT: tl.constexpr):
    if MASKED:
        wa = tl.load(q_ptr + rows_a[:, None] * stride_qn + rw[None, :], mask=w_mask[None, :], other=0)
        wb = tl.load(q_ptr + rows_b[:, None] * stride_qn + rw[None, :], mask=w_mask[None, :], other=0)
    elif EVICT:
        wa = tl.load(q_ptr + rows_a[:, None] * stride_qn + rw[None, :], eviction_policy="evict_first")
        wb = tl.load(q_ptr + rows_b[:, None] * stride_qn + rw[None, :], eviction_policy="evict_first")
    else:
        wa = tl.load(q_ptr + rows_a[:, None] * stride_qn + rw[None, :])
        wb = tl.load(q_ptr + rows_b[:, None] * stride_qn + rw[None, :])
    col = rw[None, :] * 4 + zero_row
    ok = w_mask[None, :] & (col < K)
    if FAST:
        lo, hi = x_quad(x_ptr, col, ok, X_KIND, MASKED)
        acc = int8_mma(wa, wb, lo, hi, acc, X_KIND)
    else:  # the same sums, each element's own (the interpreter has no quads); C columns 2c + 1 stay 0
        a0, a1, b0, b1 = acc
        acc = a0 + _int8x4_sub_dot(wa, x_ptr, col, ok, X_KIND), a1, b0 + _int8x4_sub_dot(wb, x_ptr, col, ok, X_KIND), b1
    return acc


@triton.jit
def _int8_gemv_mma_kernel(
    x_ptr, q_ptr, s_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_qn, stride_sn,
    HAS_BIAS: tl.constexpr, SPLIT_K, FAST: tl.constexpr, X_KIND: tl.constexpr,
    BLOCK_N: tl.constexpr, XS_BLOCK: tl.constexpr, EVICT: tl.constexpr,
):
    """Per-channel int8 GEMV on 16-bit x with tensor cores; ``q_ptr`` the weight as int32 words,
    ``stride_qn`` in words. Rows ``r`` and ``r + BLOCK_N // 2`` of a program share a quad."""
    pid_n, m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    HALF: tl.constexpr = BLOCK_N // 2
    rn_a = pid_n * BLOCK_N + tl.arange(0, HALF)
    rn_b = rn_a + HALF
    KW = K // 4
    w_span = tl.cdiv(KW, SPLIT_K * MMA_W) * MMA_W
    w_lo = pid_k * w_span
    w_hi = tl.minimum(w_lo + w_span, KW)
    x_row = x_ptr + m * stride_xm
    zero_row = tl.zeros((1, MMA_W), tl.int32)
    zero = tl.zeros((HALF, MMA_W), tl.float32)
    acc = zero, zero, zero, zero  # C columns 2c and 2c + 1 of rows a and b (see int8_mma)
    rows_a = tl.minimum(rn_a, N - 1)  # rows past N repeat the last one; their sums are not stored
    rows_b = tl.minimum(rn_b, N - 1)
    cols = tl.max_contiguous(tl.multiple_of(tl.arange(0, MMA_W), 4), 4)
    w_full = w_lo + (w_hi - w_lo) // MMA_W * MMA_W
    for w0 in range(w_lo, w_full, MMA_W):
        acc = _mma_step(acc, x_row, q_ptr, rows_a, rows_b, w0 + cols, w0 + cols < w_hi, stride_qn,
                                 K, zero_row, X_KIND, FAST, False, EVICT)
    if w_full < w_hi:  # the ragged last step
        acc = _mma_step(acc, x_row, q_ptr, rows_a, rows_b, w_full + cols, w_full + cols < w_hi,
                                 stride_qn, K, zero_row, X_KIND, FAST, True, EVICT)
    xs = tl.zeros((XS_BLOCK,), tl.float32)
    for k0 in range(4 * w_lo, 4 * w_hi, XS_BLOCK):
        rk = k0 + tl.arange(0, XS_BLOCK)
        xs += tl.load(x_row + rk, mask=rk < 4 * w_hi, other=0.0).to(tl.float32)
    # Back to sum q x: the weights' and x's powers of two (exact), the quads' 4x on a GPU, less 128 sum(x).
    if X_KIND == 0:
        back = 5.902958103587057e20  # 2**(133 - X_SHIFT)
    else:
        back = 16777216.0  # 2**24
    if FAST:
        back = back * 0.125  # 4 lanes a quad, 2 columns a lane
    x_sum = 128.0 * tl.sum(xs, 0)
    out_a = (tl.sum(acc[0] + acc[1], 1) * back - x_sum) * tl.load(s_ptr + rows_a * stride_sn)
    out_b = (tl.sum(acc[2] + acc[3], 1) * back - x_sum) * tl.load(s_ptr + rows_b * stride_sn)
    C.store_tile(out_a[None, :], m + tl.arange(0, 1), rn_a, M, N, out_ptr, b_ptr, pid_k, HAS_BIAS, SPLIT_K)
    C.store_tile(out_b[None, :], m + tl.arange(0, 1), rn_b, M, N, out_ptr, b_ptr, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def _int8_gemv_kernel(
    x_ptr, q_ptr, s_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_qn, stride_sn,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K, FAST: tl.constexpr, FOLD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n, m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    k_span = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_span
    k_hi = tl.minimum(k_lo + k_span, K)
    # Scales cost nothing per weight unless groups are narrower than a block: per channel they
    # scale the row sum once; a block inside one group takes one scale per row; several whole
    # power-of-two groups per block reduce each group first, then scale it.
    if GROUP > 0 and GROUP < BLOCK_K and BLOCK_K % GROUP == 0:
        acc = tl.zeros((BLOCK_N, BLOCK_K // GROUP), tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    x_sum = tl.zeros((BLOCK_K,), tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        # Runs of 8 columns a thread: 8-byte weight loads whose threads match the x loads'.
        rk = tl.max_contiguous(tl.multiple_of(k0 + tl.arange(0, BLOCK_K), 8), 8)
        k_mask = rk < k_hi
        x = tl.load(x_ptr + m * stride_xm + rk, mask=k_mask, other=0.0).to(tl.float32)
        q = tl.load(q_ptr + rn[:, None] * stride_qn + rk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0)
        if FOLD:  # per channel, 16-bit activations: the bias comes off as MAGIC_BIAS * sum(x)
            x_sum += x
            acc += int8_as_f32(q, FAST, False) * x[None, :]
        else:  # groups keep I2F: the asm's extra unpacking would outweigh it next to their scaling
            prod = int8_as_f32(q, FAST and GROUP == 0, True) * x[None, :]
            if GROUP == 0:
                acc += prod
            elif GROUP % BLOCK_K == 0:
                s = tl.load(s_ptr + rn * stride_sn + k0 // GROUP, mask=n_mask, other=0.0)
                acc += prod * s[:, None]
            elif BLOCK_K % GROUP == 0:
                rg = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
                s = tl.load(s_ptr + rn[:, None] * stride_sn + rg[None, :],
                            mask=n_mask[:, None] & (rg[None, :] * GROUP < K), other=0.0)
                acc += tl.sum(tl.reshape(prod, (BLOCK_N, BLOCK_K // GROUP, GROUP)), 2) * s
            else:  # group size not a power of two: one scale per weight, gathered from L1
                s = tl.load(s_ptr + rn[:, None] * stride_sn + rk[None, :] // GROUP,
                            mask=n_mask[:, None] & k_mask[None, :], other=0.0)
                acc += prod * s
    out = tl.sum(acc, 1)
    if FOLD:
        out -= 1152.0 * tl.sum(x_sum, 0)  # MAGIC_BIAS
    if GROUP == 0:
        out *= tl.load(s_ptr + rn * stride_sn, mask=n_mask, other=0.0)
    C.store_tile(out[None, :], m + tl.arange(0, 1), rn, M, N, out_ptr, b_ptr, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def _int8_gemm_kernel(
    x_ptr, q_ptr, s_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_qn, stride_sn, M_BUCKET,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K,
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
        # Weight tile as [BLOCK_K, BLOCK_N] (the dot's B operand), read along K from [N, K] rows.
        wmask = k_mask[:, None] & n_mask[None, :]
        q = tl.load(q_ptr + rn[None, :] * stride_qn + rk[:, None], mask=wmask, other=0)
        # Via fp32: the interpreter casts int8 -> bf16 to garbage (a GPU goes through fp32 anyway).
        # Per channel the integers (|q| <= 127, exact in fp16/bf16) are scaled after the dot.
        w = q.to(tl.float32)
        if GROUP > 0 and GROUP % BLOCK_K == 0:
            w = w * tl.load(s_ptr + rn * stride_sn + k0 // GROUP, mask=n_mask, other=0.0)[None, :]
        elif GROUP > 0:
            w = w * tl.load(s_ptr + rn[None, :] * stride_sn + rk[:, None] // GROUP, mask=wmask, other=0.0)
        # Round the weight to the activation dtype first (what a GPU dot sees), then to DOT_DTYPE.
        w = w.to(x_ptr.dtype.element_ty).to(DOT_DTYPE)
        acc = tl.dot(x.to(DOT_DTYPE), w, acc, input_precision=PRECISION)
    if GROUP == 0:
        acc *= tl.load(s_ptr + rn * stride_sn, mask=n_mask, other=0.0)[None, :]
    C.store_tile(acc, rm, rn, M, N, out_ptr, b_ptr, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def _int8_dequant_kernel(q_ptr, s_ptr, out_ptr, N, K, stride_qn, stride_sn, GROUP: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    mask = (rn < N) & (rk < K)
    q = tl.load(q_ptr + rn * stride_qn + rk, mask=mask, other=0)
    if GROUP > 0:
        s = tl.load(s_ptr + rn * stride_sn + rk // GROUP, mask=mask, other=0.0)
    else:
        s = tl.load(s_ptr + rn * stride_sn, mask=rn < N, other=0.0)
    tl.store(out_ptr + rn * K + rk, (q.to(tl.float32) * s).to(out_ptr.dtype.element_ty), mask=mask)


_gemv_tuned = C.tuned(_int8_gemv_kernel, GEMV_CONFIGS, key=["N", "K", "GROUP", "SPLIT_K", "FOLD"])
_mma_tuned = C.tuned(_int8_gemv_mma_kernel, MMA_CONFIGS, key=["N", "K", "SPLIT_K", "X_KIND"])
_words_tuned = C.tuned(_int8_gemv_words_kernel, WORD_CONFIGS, key=["N", "K", "GROUP", "SPLIT_K", "X_KIND"])
_group_words_tuned = C.tuned(_int8_gemv_words_kernel, WORD_GROUP_CONFIGS, key=["N", "K", "GROUP", "SPLIT_K", "X_KIND"])
_gemm_tuned = C.tuned(_int8_gemm_kernel, C.GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "GROUP", "SPLIT_K"], prune=C.prune_gemm)


def _check(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int) -> None:
    n, k = qweight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features, weight has {k}")
    g = 1 if group_size == 0 else k // group_size
    if scales.shape != (n, g) or scales.dtype != torch.float32:
        raise ValueError(f"scales must be float32 {(n, g)}, got {scales.dtype} {tuple(scales.shape)}")


def words_path(x2: torch.Tensor, qweight: torch.Tensor, group_size: int) -> bool:
    """Whether the GEMV takes the int32-word kernel: per channel or groups of a multiple of 4
    columns (a word in one group), 16-bit x, K a multiple of 4 and 4-byte aligned weight rows and
    x pairs."""
    k = qweight.shape[1]
    return (group_size % 4 == 0 and x2.dtype in (torch.bfloat16, torch.float16) and k % 4 == 0
            and qweight.data_ptr() % 4 == 0 and x2.stride(0) % 2 == 0 and x2.data_ptr() % 4 == 0)


def mma_path(x2: torch.Tensor, qweight: torch.Tensor, group_size: int) -> bool:
    """Whether the GEMV takes the tensor-core kernel: per channel, the word kernel's conditions and
    x rows 8-byte aligned (x is read 4 columns a load)."""
    return (group_size == 0 and words_path(x2, qweight, 0) and x2.data_ptr() % 8 == 0
            and (x2.stride(0) % 4 == 0 or x2.shape[0] == 1))


def int8_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
              group_size: int, split_k: int | None = None, config: triton.Config | None = None) -> torch.Tensor:
    """GEMV kernel (any M, one program per (row block, activation row); meant for M == 1).

    ``x`` ``[..., K]``; returns ``[..., N]`` in ``x.dtype``. ``split_k``/``config`` override the
    heuristic split and the autotuner (tests use them to reach every branch). On CUDA each kernel
    runs once its self-check passed (:data:`SELF_CHECKS`); else the next one that applies does,
    and dequantize + ``F.linear`` last.
    """
    return _gemv(x, qweight, scales, bias, group_size, split_k, config, _checked)


def _checked(path: str, x2: torch.Tensor) -> bool:
    check, fallback = SELF_CHECKS[path]
    return dispatch.fast_path_ok(path, x2, check, fallback)


def _gemv(x, qweight, scales, bias, group_size, split_k, config, allow) -> torch.Tensor:
    """:func:`int8_gemv`, taking kernel ``path`` only where ``allow(path, x2)``."""
    _check(x, qweight, scales, group_size)
    x2 = C.as_2d(x)
    (m, k), n = x2.shape, qweight.shape[0]
    qweight, scales = qweight.contiguous(), scales.contiguous()
    given = set(config.kwargs) if config is not None else set()
    mma = mma_path(x2, qweight, group_size) and given <= {"BLOCK_N"} and allow("int8.mma", x2)
    words = (not mma and words_path(x2, qweight, group_size) and (config is None or "BLOCK_W" in config.kwargs)
             and allow("int8.words", x2))
    if not (mma or words or allow("int8.gemv", x2)):
        return dispatch.dense(x, dequantize_int8(qweight, scales, group_size, x.dtype), bias)
    split = split_k or C.pick_split_k(x2, triton.cdiv(n, 64 if mma else 8) * m, k, n)
    out, ws = C.new_output(m, n, split, x.dtype, x.device)
    if m and n and mma:
        C.launch(
            _int8_gemv_mma_kernel, _mma_tuned, lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), m, split),
            (x2, qweight.view(torch.int32), scales, bias, ws, m, n, k, x2.stride(0), qweight.stride(0) // 4,
             scales.stride(0)),
            config, INTERP_MMA, HAS_BIAS=bias is not None, SPLIT_K=split, FAST=not C.interpreting(),
            X_KIND=0 if x.dtype == torch.bfloat16 else 1, XS_BLOCK=XS_BLOCK, EVICT=EVICT,
        )
        C.finish_split_k(out, ws, bias, split)
    elif m and n and words:
        C.launch(
            _int8_gemv_words_kernel, _group_words_tuned if group_size else _words_tuned, lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), m, split),
            (x2, qweight.view(torch.int32), scales, bias, ws, m, n, k, x2.stride(0), qweight.stride(0) // 4,
             scales.stride(0)),
            config, INTERP_WORDS, GROUP=group_size, HAS_BIAS=bias is not None, SPLIT_K=split, FAST=not C.interpreting(),
            X_KIND=0 if x.dtype == torch.bfloat16 else 1, XS_BLOCK=XS_BLOCK, EVICT=EVICT,
        )
        C.finish_split_k(out, ws, bias, split)
    elif m and n:
        C.launch(
            _int8_gemv_kernel, _gemv_tuned, lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), m, split),
            (x2, qweight, scales, bias, ws, m, n, k, x2.stride(0), qweight.stride(0), scales.stride(0)),
            config, INTERP_GEMV, GROUP=group_size, HAS_BIAS=bias is not None, SPLIT_K=split,
            FAST=not C.interpreting(), FOLD=group_size == 0 and x.dtype != torch.float32,
        )
        C.finish_split_k(out, ws, bias, split)
    return out.view(*x.shape[:-1], n)


# ---- self-checks of the GEMV's fast paths (see kernels.dispatch.fast_path_ok) -----------------
# A known-answer input: ragged in rows and words for every check's config, weights over the whole
# int8 range (-128 and 127 included), small-integer x and power-of-two scales, signs picked so
# every row's sum stays within 256 in magnitude: each product and partial sum, the kernels' fp32
# arithmetic and the 16-bit output are exact, so a right kernel matches the float64 answer
# bit for bit and a flushed subnormal or a misplaced byte does not.
PROBE_N, PROBE_K = 40, 4 * (128 + 20)


def probe(group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x [1, K] fp32, qweight, scales, want [1, N] float64)`` for the self-checks (on CPU)."""
    n, k = PROBE_N, PROBE_K
    j, r = torch.arange(k), torch.arange(n)[:, None]
    mags = (r * 11 + j * 37) % 129  # 0..128
    if group_size:  # x in -1..1, scales 1 or 2 a group: |x * scale| <= 2
        x = (j * 7) % 3 - 1
        scales = 2.0 ** ((r + torch.arange(k // group_size)) % 2)
        mult = x * scales.repeat_interleave(group_size, dim=1)
    else:  # x in -2..2, scales 0.5, 1 or 2 a row (scaled after the sum)
        x = (j * 7) % 5 - 2
        scales = 2.0 ** (r % 3 - 1.0)
        mult = x.expand(n, k)
    up = dispatch.balanced_signs(mags.clamp(max=127), -mags, mult)
    qweight = torch.where(up, mags.clamp(max=127), -mags).to(torch.int8)
    x = x.float()[None, :]
    return x, qweight, scales.float(), reference(x, qweight, scales.float(), None, group_size)


def _probe_check(path: str, runs: list[tuple[int, triton.Config]]):
    def check(device: torch.device, dtype: torch.dtype) -> bool:
        for group_size, config in runs:
            x, qweight, scales, want = probe(group_size)
            taken = []
            got = _gemv(x.to(device, dtype), qweight.to(device), scales.to(device), None, group_size, 1, config,
                        lambda p, _: p == path and not taken.append(p))
            if taken != [path] or not torch.equal(got.double().cpu(), want):
                return False
        return True
    return check


# path -> (check(device, dtype), what runs instead). Explicit configs: no autotuning on the probe.
SELF_CHECKS = {
    "int8.mma": (_probe_check("int8.mma", [(0, MMA_CONFIGS[0])]), "the int8 word GEMV, else the next that passes"),
    "int8.words": (_probe_check("int8.words", [(0, WORD_CONFIGS[0]), (16, WORD_GROUP_CONFIGS[0])]),
                   "the int8 tile GEMV, else dequantize + F.linear"),
    "int8.gemv": (_probe_check("int8.gemv", [(0, GEMV_CONFIGS[0])]), "int8 dequantize + F.linear"),
}


def int8_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
              group_size: int, split_k: int | None = None, config: triton.Config | None = None) -> torch.Tensor:
    """Tiled ``tl.dot`` kernel for M > 1 (see :func:`int8_gemv` for arguments)."""
    _check(x, qweight, scales, group_size)
    x2 = C.as_2d(x)
    (m, k), n = x2.shape, qweight.shape[0]
    qweight, scales = qweight.contiguous(), scales.contiguous()
    bucket = min(C.next_pow2(m), 256)
    split = split_k or C.pick_split_k(x2, triton.cdiv(n, 64) * triton.cdiv(m, min(max(bucket, 16), 64)), k, n)
    out, ws = C.new_output(m, n, split, x.dtype, x.device)
    if m and n:
        C.launch(
            _int8_gemm_kernel, _gemm_tuned,
            lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), split),
            (x2, qweight, scales, bias, ws, m, n, k, x2.stride(0), qweight.stride(0), scales.stride(0), bucket),
            config, C.INTERP_GEMM, GROUP=group_size, HAS_BIAS=bias is not None, SPLIT_K=split,
            DOT_DTYPE=C.dot_dtype(x.dtype), PRECISION=C.dot_precision(x.dtype),
        )
        C.finish_split_k(out, ws, bias, split)
    return out.view(*x.shape[:-1], n)


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Dense ``qweight * scales`` (per channel: ``group_size`` 0) as ``[N, K]`` in ``dtype``."""
    n, k = qweight.shape
    qweight, scales = qweight.contiguous(), scales.contiguous()
    out = torch.empty(n, k, dtype=dtype, device=qweight.device)
    if out.numel():
        _int8_dequant_kernel[C.dq_grid(n, k)](qweight, scales, out, n, k, qweight.stride(0), scales.stride(0),
                                          GROUP=group_size, BLOCK_N=C.DQ_BLOCK_N, BLOCK_K=C.DQ_BLOCK_K, num_warps=C.DQ_WARPS)
    return out


def reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
              group_size: int) -> torch.Tensor:
    """What the kernels compute, in float64: ``x @ (qweight * scales).T + bias``."""
    n, k = qweight.shape
    g = group_size or k
    w = (qweight.double().view(n, k // g, g) * scales.double().unsqueeze(-1)).view(n, k)
    out = x.double() @ w.T
    return out if bias is None else out + bias.double()


# ---- the op the packed format calls ------------------------------------------------------------
@torch.library.custom_op("torchzip::int8_linear", mutates_args=())
def _int8_linear(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None, group_size: int) -> Tensor:
    dispatch.require_triton()
    return dispatch.by_rows(_int8_impl, qweight.shape[0], qweight.shape[1], x, qweight, scales, bias, group_size)


def _int8_impl(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None, group_size: int) -> Tensor:
    path = dispatch.pick_path("int8", x)
    if path == "dense":
        return dispatch.dense(x, dequantize_int8(qweight, scales, group_size, x.dtype), bias)
    kernel = int8_gemv if path == "gemv" else int8_gemm
    return kernel(x, qweight, scales, bias, group_size)


@_int8_linear.register_fake
def _(x, qweight, scales, bias, group_size):
    return dispatch.out_like(x, qweight.shape[0])


def int8_linear(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None, group_size: int) -> Tensor:
    """``x @ (qweight * scales).T + bias`` in ``x.dtype``.

    ``x`` ``[..., K]`` fp16/bf16/fp32, ``qweight`` int8 ``[N, K]``, ``scales`` fp32 ``[N, G]``
    (``G == 1`` and ``group_size == 0`` per channel, else ``K // group_size``), ``bias`` ``[N]``.
    """
    return torch.ops.torchzip.int8_linear(x, qweight, scales, bias, int(group_size))
