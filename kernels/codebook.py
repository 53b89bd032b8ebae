"""Codebook (LUT) matmul: bit-packed centroid indices, codebook looked up in registers.

``W[n, k] = codebook[n or 0, field k of row n of packed]`` (fields ``bits`` wide, ``32 // bits``
per int32 word, LSB first; see ``torchzip.packed.bits``). The GEMV reads 4 packed words of a row a
thread (16-byte loads, a warp on 128 words of one row) and, for indices of up to 5 bits, holds
the codebook in registers: lane l has centroid ``l % 2**bits`` of each of its rows, and a weight
is one warp shuffle from the lane that holds its centroid plus one FMA (wider indices gather from
the codebook in L1). The GEMM unpacks each ``[words, fields, N]`` tile and reshapes it into the
``[K, N]`` operand of ``tl.dot`` (fields padded to a power of two, so 3-bit rows with 10 fields a
word need no special case). The ``torchzip::codebook_linear`` op picks the GEMV, the GEMM or the
dequantize kernel + cuBLAS by M.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from torchzip.kernels import _common as C
from torchzip.kernels import dispatch

# BLOCK_W words of a row per step, 4 consecutive words a thread (16-byte loads), so a warp spans
# 128 words of one row per register slot: each 2**BITS-lane segment then works on a single row,
# which the register-held codebook's shuffles need. BLOCK_N // num_warps rows a thread.
GEMV_CONFIGS = C.configs(("BLOCK_N", "BLOCK_W"), [
    (8, 256, 2, 2), (16, 128, 4, 2), (8, 128, 2, 2), (16, 256, 4, 2),
    (8, 256, 4, 2), (4, 128, 1, 2), (8, 128, 1, 2), (4, 256, 2, 2),
])
# 4-bit (lane_dot4): 16 rows a thread (BLOCK_N // num_warps) share each converted x, one
# accumulator a row; the wider programs cap registers at 128 (ptxas would take up to 186).
# Triton 3.6's build keeps the 16 rows' pointers in 64-bit registers (208 registers, spills
# under a cap of 128; the staged loop, which has no pointer a row, still spills 80 bytes there),
# so there a thread takes 8 rows.
GEMV_CONFIGS4 = [triton.Config({"BLOCK_N": bn, "BLOCK_W": bw}, num_warps=w, num_stages=2, maxnreg=r)
                 for bn, bw, w, r in ([(32, 128, 2, 128), (16, 128, 1, None), (16, 256, 2, 128), (64, 128, 4, 128),
                                       (32, 256, 4, 128)] if C.V38 else [])
                 + [(8, 128, 1, None), (16, 128, 2, None), (32, 128, 4, None)]]
# x staged in shared memory (stage_x): the 128-word programs, all capped at 128 registers (Triton
# 3.6's one-warp program would take 167). The allocation is static, and ptxas caps static shared
# memory at 48 KiB: up to 11264 columns of fp32 x a program (K = 11008 in 128-word steps, or
# split-K); wider x takes the unstaged loop.
GEMV_STAGED_CONFIGS4 = [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, maxnreg=c.maxnreg or 128)
                        for c in GEMV_CONFIGS4 if c.kwargs["BLOCK_W"] == 128]
STAGE_MAX_BYTES = 44 * 1024  # leaves Triton's own (dynamic) shared memory <= 4 KiB under 48 KiB
INTERP_GEMV = triton.Config({"BLOCK_N": 16, "BLOCK_W": 8})
# Widest index the register-held codebook serves (32 entries, one per lane); wider ones gather
# from the codebook in global memory (L1).
LANE_MAX_BITS = 5
X_KINDS = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}  # load_x_pair's KIND
# The GEMM's tiles: the shared list's BLOCK_K x BLOCK_N >= 16K tiles (and most 4-warp ones) spill
# registers under Triton 3.6 (the unpacked [words, fields, N] index tile is large); these compile
# without spills under 3.6 and 3.8 (benchmarks/sass_report.py).
GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (16, 32, 128, 8, 3), (16, 64, 128, 8, 4), (32, 32, 128, 4, 4), (32, 64, 128, 8, 4),
        (64, 64, 64, 8, 3), (64, 64, 128, 8, 3), (128, 64, 64, 8, 3), (128, 128, 64, 8, 3),
    ]
]
# From this M on, dequantize + cuBLAS beats the fused kernel (see kernels.dispatch).
dispatch.DENSE_MIN_M.setdefault("codebook", 512)


def gemv_constexprs(bits: int, config: triton.Config, lanes: bool = True, staged_k: int = 0) -> dict:
    """Constexprs of the GEMV for ``bits`` and a launch config (benchmarks/sass_report.py).

    ``lanes``: the codebook in registers (a GPU, ``bits <= LANE_MAX_BITS``), else gathered.
    ``staged_k``: x of this many features staged in shared memory (4-bit lanes, unsplit).
    """
    lanes = lanes and bits <= LANE_MAX_BITS and min(32, config.kwargs["BLOCK_W"] // 4) >= 2**bits
    words = triton.cdiv(staged_k, 32 // bits)
    return {"BITS": bits, "PER": 32 // bits, "SPLIT_K": 1, "LANES": lanes, "X_KIND": 0,
            "SEG": shuffle_control(bits) if lanes else 0, **config.kwargs,
            **stage_constexprs(stage_columns(words, 1) if staged_k else 0, words)}


def stage_columns(words: int, split_k: int) -> int:
    """Columns of x a program of the 4-bit GEMV stages in shared memory (its K range rounded up
    to whole steps of every config, zeros past K), or 0 where that passes STAGE_MAX_BYTES. The
    staged kernel also needs N >= BLOCK_N (see _codebook_gemv_kernel)."""
    step = max(c.kwargs["BLOCK_W"] for c in GEMV_STAGED_CONFIGS4)
    columns = triton.cdiv(words, split_k * step) * step * 8
    return columns if columns * 4 <= STAGE_MAX_BYTES else 0


def stage_constexprs(columns: int, words: int) -> dict:
    """The GEMV's ``XS``/``XS_ASM``/``WS`` constexprs for ``columns`` staged columns (0: none) of
    a weight of ``words`` packed words a row (WS: the row stride as a constexpr, so the rows'
    offsets become load immediates; see _codebook_gemv_kernel)."""
    return {"XS": columns, "XS_ASM": stage_asm(columns) if columns else "", "WS": words if columns else 0}


def gemv_configs(bits: int) -> list[triton.Config]:
    """The GEMV's autotune configs for ``bits``-wide indices."""
    return GEMV_CONFIGS4 if bits == 4 else GEMV_CONFIGS


def gemv_weights_per_iter(constexprs: dict) -> int:
    """Weights one iteration of the GEMV's loop consumes."""
    return constexprs["BLOCK_N"] * constexprs["BLOCK_W"] * constexprs["PER"]


@triton.jit
def codebook_tile(p_ptr, book_ptr, rows, cols, mask, stride_pn, stride_b, BITS: tl.constexpr, PER: tl.constexpr):
    """fp32 weights at broadcastable ``rows`` x ``cols`` (the dequantize kernel).

    Each packed word is read by the PER columns it holds; the repeats hit L1.
    """
    words = tl.load(p_ptr + rows * stride_pn + cols // PER, mask=mask, other=0)
    idx = (words >> ((cols % PER) * BITS)) & ((1 << BITS) - 1)
    return tl.load(book_ptr + rows * stride_b + idx, mask=mask, other=0.0)


@triton.jit
def lane_ids(like):
    """This thread's lane in its warp, for every element of ``like`` (a GPU-only register read)."""
    return tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [like], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def lane_lookup_fma(code, table, x, acc, seg):
    """``acc + table_of_lane(code & (2**BITS - 1)) * x``: one warp shuffle reads the centroid from
    the lane of this thread's 2**BITS-lane segment that holds it (``seg``: the shuffle's segment
    control, see :func:`shuffle_control`); shfl ignores the code's bits above the segment width, so
    the caller shifts but need not mask."""
    return tl.inline_asm_elementwise(
        "{ .reg .b32 c; shfl.sync.idx.b32 c, $2, $1, $5, -1; fma.rn.f32 $0, c, $3, $4; }",
        "=f,r,f,f,f,r", [code, table, x, acc, seg], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _gemv_words4(acc, x_row, words, w0, cols, w_mask, K, table, zero, xs, w_lo, X_KIND: tl.constexpr,
                 MASKED: tl.constexpr, XS: tl.constexpr):
    """:func:`_gemv_words` for 4-bit indices in registers: x 8 columns (one word) a load, one
    accumulator a row (:func:`lane_dot4`). MASKED: the last step (x pairs masked to K). XS: x
    staged in shared memory at ``xs`` (word ``w_lo`` first, zeros past K: no masks)."""
    if XS:
        x0, x1, x2, x3, x4, x5, x6, x7 = lds_x32(xs + (w0 - w_lo + cols)[None, :] * 32 + zero)
    elif MASKED:
        col = (w0 + cols)[None, :] * 8 + zero
        ok = w_mask[None, :]
        x0, x1 = load_x_pair((x_row + col).to(tl.int64), ok & (col < K), X_KIND, True)
        x2, x3 = load_x_pair((x_row + col + 2).to(tl.int64), ok & (col + 2 < K), X_KIND, True)
        x4, x5 = load_x_pair((x_row + col + 4).to(tl.int64), ok & (col + 4 < K), X_KIND, True)
        x6, x7 = load_x_pair((x_row + col + 6).to(tl.int64), ok & (col + 6 < K), X_KIND, True)
    else:
        x0, x1, x2, x3, x4, x5, x6, x7 = load_x32((x_row + (w0 + cols)[None, :] * 8 + zero).to(tl.int64), X_KIND)
    return lane_dot4(words, table, x0, x1, x2, x3, x4, x5, x6, x7, acc)


def shuffle_control(bits: int) -> int:
    """``c`` operand of ``shfl.sync.idx`` for segments of ``2**bits`` lanes (segment mask, clamp)."""
    return ((32 - 2**bits) << 8) | 0x1F


def _lane_dot4_asm() -> str:
    """PTX of :func:`lane_dot4`: 4 words of one row (pack=4), 8 fields each, one chain into acc."""
    seg = shuffle_control(4)
    lines = ["{ .reg .b32 t, c; .reg .f32 a; mov.f32 a, $44;"]
    for k in range(4):  # word k: operand 4 + k; its table 8 + k; x_j 12 + 4 j + k
        for j in range(8):
            idx = f"${4 + k}"
            if j:
                lines.append(f"shr.u32 t, ${4 + k}, {4 * j};")  # shfl reads the low 4 bits only: no mask
                idx = "t"
            lines.append(f"shfl.sync.idx.b32 c, ${8 + k}, {idx}, {seg:#x}, -1; fma.rn.f32 a, c, ${12 + 4 * j + k}, a;")
    # Elements 1..3 of acc come out 0: a row's 32 weights of a thread share one accumulator, so a
    # thread holds one per row, not one per word.
    lines.append("mov.f32 $0, a; mov.b32 $1, 0; mov.b32 $2, 0; mov.b32 $3, 0; }")
    return " ".join(lines)


LANE_DOT4 = tl.constexpr(_lane_dot4_asm())
LANE_DOT4_CONSTRAINTS = tl.constexpr(",".join(["=f"] * 4 + ["r"] * 8 + ["f"] * 36))


@triton.jit
def lane_dot4(words, table, x0, x1, x2, x3, x4, x5, x6, x7, acc):
    """4-bit GEMV step: ``acc`` plus the products of a thread's 4 words of a row (32 weights, the
    centroids read by shuffles as in :func:`lane_lookup_fma`) with x; ``x<j>``: x at field j of
    each word. Four consecutive elements (one 128-bit load of a row) per call: the sum goes to
    the first one, the others pass through."""
    return tl.inline_asm_elementwise(
        LANE_DOT4, LANE_DOT4_CONSTRAINTS, [words, table, x0, x1, x2, x3, x4, x5, x6, x7, acc],
        dtype=tl.float32, is_pure=True, pack=4)


def _load_x32_asm(kind: int) -> str:
    """PTX of :func:`load_x32` for x of KIND (0 bf16, 1 fp16, 2 fp32)."""
    out = []
    for q in range(4):  # word q: field j's x is operand 4 j + q; the address is operand 32 (word 0's)
        if kind == 2:
            for h in range(2):
                regs = ", ".join(f"${4 * j + q}" for j in range(4 * h, 4 * h + 4))
                out.append(f"ld.global.nc.v4.b32 {{{regs}}}, [$32+{32 * q + 16 * h}];")
            continue
        out.append(f"ld.global.nc.v4.b32 {{v0, v1, v2, v3}}, [$32+{16 * q}];")
        for i in range(4):  # v<i>: fields 2i (low half), 2i + 1
            lo, hi = f"${4 * (2 * i) + q}", f"${4 * (2 * i + 1) + q}"
            if kind == 0:  # bf16 -> fp32: the bits move to the top half
                out.append(f"shl.b32 {lo}, v{i}, 16; and.b32 {hi}, v{i}, 0xffff0000;")
            else:
                out.append(f"mov.b32 {{h0, h1}}, v{i}; cvt.f32.f16 {lo}, h0; cvt.f32.f16 {hi}, h1;")
    return "{ .reg .b32 v<4>; .reg .b16 h<2>; " + " ".join(out) + " }"


LOAD_X32 = [tl.constexpr(_load_x32_asm(k)) for k in range(3)]
LOAD_X32_BF16, LOAD_X32_F16, LOAD_X32_F32 = LOAD_X32
LOAD_X32_CONSTRAINTS = tl.constexpr(",".join(["=r"] * 32 + ["l"] * 4))


@triton.jit
def load_x32(addr, KIND: tl.constexpr):
    """``(x0, .., x7)``: fp32 x at field j of a thread's 4 consecutive words (pack=4: 32 columns
    from ``addr`` of the first word, 16-byte aligned; one 128-bit load a word of 16-bit x, two of
    fp32). Pure, so the identical loads of a thread's rows merge into one (see load_x_pair)."""
    if KIND == 0:
        asm: tl.constexpr = LOAD_X32_BF16
    elif KIND == 1:
        asm: tl.constexpr = LOAD_X32_F16
    else:
        asm: tl.constexpr = LOAD_X32_F32
    f = tl.float32
    return tl.inline_asm_elementwise(asm, LOAD_X32_CONSTRAINTS, [addr], dtype=(f, f, f, f, f, f, f, f),
                                     is_pure=True, pack=4)


def _lds_x32_asm() -> str:
    """PTX of :func:`lds_x32`: 32 fp32 columns from shared memory, word q's 8 at ``$32 + 32 q``."""
    out = []
    for q in range(4):
        for h in range(2):
            regs = ", ".join(f"${4 * j + q}" for j in range(4 * h, 4 * h + 4))
            out.append(f"ld.shared.v4.f32 {{{regs}}}, [$32+{32 * q + 16 * h}];")
    return "{ " + " ".join(out) + " }"


LDS_X32 = tl.constexpr(_lds_x32_asm())
LDS_X32_CONSTRAINTS = tl.constexpr(",".join(["=r"] * 32 + ["r"] * 4))


@triton.jit
def lds_x32(saddr):
    """:func:`load_x32` from the fp32 x staged in shared memory (``saddr``: 32-bit shared address
    of the first word's 8 columns, 16-byte aligned): 8 128-bit loads, no conversion. Pure: the
    identical loads of a thread's rows merge into one."""
    f = tl.float32
    return tl.inline_asm_elementwise(LDS_X32, LDS_X32_CONSTRAINTS, [saddr], dtype=(f, f, f, f, f, f, f, f),
                                     is_pure=True, pack=4)


def stage_asm(columns: int) -> str:
    """PTX that allocates ``columns`` fp32 of shared memory and returns its address (a static
    allocation in a block of its own: one per kernel, ptxas sizes it at compile time)."""
    return f"{{ .shared .align 16 .b8 cbk_xs[{4 * columns}]; mov.u32 $0, cbk_xs; }}"


@triton.jit
def stage_x(x_row, c_lo, c_hi, XS: tl.constexpr, XS_ASM: tl.constexpr):
    """Shared-memory address of x's columns ``c_lo ..`` as fp32: the program's threads convert
    ``XS`` columns once (zeros from ``c_hi`` on, so masked words and padding fields meet x = 0)
    and wait at one barrier, before the hot loop."""
    base = tl.inline_asm_elementwise(XS_ASM, "=r,r", [c_lo], dtype=tl.int32, is_pure=False, pack=1)
    for c0 in tl.range(0, XS, 1024, num_stages=1):  # not pipelined: no shared-memory buffers of its own
        c = c0 + tl.arange(0, 1024)
        v = tl.load(x_row + c_lo + c, mask=c_lo + c < c_hi, other=0.0).to(tl.float32)
        tl.inline_asm_elementwise("st.shared.f32 [$1], $2; mov.b32 $0, 0;", "=r,r,f", [base + c * 4, v],
                                  dtype=tl.int32, is_pure=False, pack=1)
    # Every column is written before any thread reads: the loop's loads take the barrier's output.
    return tl.inline_asm_elementwise("bar.sync 0; mov.b32 $0, $1;", "=r,r", [base], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def load_x_pair(addr, ok, KIND: tl.constexpr, MASKED: tl.constexpr):
    """Activations at ``addr`` and the next element as fp32, 0 where not ``ok`` (if MASKED).

    A load in inline PTX marked pure, so the identical loads of a thread's rows merge into one
    (Triton's own loads of a row-broadcast tensor repeat per row, and a 1-D tensor would be laid
    out apart from the weights and reach them through shared memory). KIND: 0 bf16, 1 fp16, 2 fp32.
    """
    if MASKED:
        head: tl.constexpr = ".reg .pred p; setp.ne.s32 p, $3, 0; mov.b32 v, 0; @p "
        ok = ok.to(tl.int32)
    else:
        head: tl.constexpr = ""
        ok = addr.to(tl.int32)  # unused
    if KIND == 0:
        asm: tl.constexpr = ("{ .reg .b32 v; " + head + "ld.global.nc.b32 v, [$2]; "
                             "shl.b32 $0, v, 16; and.b32 $1, v, 0xffff0000; }")
    elif KIND == 1:
        asm: tl.constexpr = ("{ .reg .b32 v; .reg .b16 h0, h1; " + head + "ld.global.nc.b32 v, [$2]; "
                             "mov.b32 {h0, h1}, v; cvt.f32.f16 $0, h0; cvt.f32.f16 $1, h1; }")
    elif MASKED:
        asm: tl.constexpr = ("{ .reg .pred p; setp.ne.s32 p, $3, 0; mov.b32 $0, 0; mov.b32 $1, 0; "
                             "@p ld.global.nc.b32 $0, [$2]; @p ld.global.nc.b32 $1, [$2+4]; }")
    else:
        asm: tl.constexpr = "{ ld.global.nc.b32 $0, [$2]; ld.global.nc.b32 $1, [$2+4]; }"
    return tl.inline_asm_elementwise(asm, "=r,=r,l,r", [addr, ok], dtype=(tl.float32, tl.float32),
                                     is_pure=True, pack=1)


@triton.jit
def _gemv_words(acc, x_row, words, rw, w_mask, K, table, book_rows, zero, BITS: tl.constexpr,
                PER: tl.constexpr, LANES: tl.constexpr, SEG: tl.constexpr, X_KIND: tl.constexpr,
                MASKED: tl.constexpr):
    """``acc`` plus the products of one step's words (a ``[rows, words]`` tile) with x."""
    if LANES:
        for j in tl.static_range(0, PER, 2):
            # Fields j, j + 1 of every word meet columns w * PER + j, + 1 (PER is even and so is
            # K here, so a pair is in range or not as a whole); loaded and converted once per
            # thread, for all of its rows.
            col = rw[None, :] * PER + j + zero
            x0, x1 = load_x_pair((x_row + col).to(tl.int64), w_mask[None, :] & (col < K), X_KIND, MASKED)
            acc = lane_lookup_fma(words >> (j * BITS), table, x0, acc, zero + SEG)
            acc = lane_lookup_fma(words >> ((j + 1) * BITS), table, x1, acc, zero + SEG)
    else:
        for j in tl.static_range(PER):
            col = rw * PER + j
            x = tl.load(x_row + col, mask=w_mask & (col < K), other=0.0).to(tl.float32)
            idx = (words >> (j * BITS)) & ((1 << BITS) - 1)
            acc += tl.load(book_rows + idx) * x[None, :]
    return acc


@triton.jit
def _codebook_gemv_kernel(
    x_ptr, p_ptr, book_ptr, b_ptr, out_ptr, M, N, K, W, stride_xm, stride_pn, stride_b,
    BITS: tl.constexpr, PER: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K,
    LANES: tl.constexpr, SEG: tl.constexpr, X_KIND: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
    XS: tl.constexpr = 0, XS_ASM: tl.constexpr = "", WS: tl.constexpr = 0,
):
    pid_n, m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if WS:
        # WS (staged x): the rows are contiguous (the last program starts at N - BLOCK_N, the
        # dispatcher keeps N >= BLOCK_N; rows two programs share get the same sums twice) and
        # their stride is the constexpr WS (= W), so a row's load address is the first row's plus
        # an immediate: no address arithmetic a row in the loop.
        row0 = tl.minimum(pid_n * BLOCK_N, N - BLOCK_N)
        rn = row0 + tl.arange(0, BLOCK_N)
        rows = rn
        W = WS
        stride_pn = WS
    else:
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # Rows past N repeat the last one (their sums are not stored), so no load needs a row mask
        # (a masked load also costs the zeroing of its registers).
        rows = tl.minimum(rn, N - 1)
    w_span = tl.cdiv(W, SPLIT_K * BLOCK_W) * BLOCK_W
    w_lo = pid_k * w_span
    w_hi = tl.minimum(w_lo + w_span, W)
    zero = tl.zeros((BLOCK_N, BLOCK_W), tl.int32)
    if XS:  # 4-bit lanes only: the program's x as fp32 in shared memory (see stage_x)
        xs = stage_x(x_ptr + m * stride_xm, w_lo * PER, tl.minimum(w_hi * PER, K), XS, XS_ASM)
    else:
        xs = 0
    if LANES:
        # The codebook lives in registers: lane l of each 2**BITS-lane segment holds centroid
        # l % 2**BITS of every row it works on (the [1, 32]-threads-per-warp layout puts one row
        # per register slot across the warp), and lookups are shuffles, not global gathers.
        table = tl.load(book_ptr + rows[:, None] * stride_b + (lane_ids(zero) & ((1 << BITS) - 1)))
    else:
        table = 0.0
    acc = tl.zeros((BLOCK_N, BLOCK_W), tl.float32)
    x_row = x_ptr + m * stride_xm
    book_rows = book_ptr + rows[:, None] * stride_b
    # Whole steps whose words all lie inside K need no masks along K; the rest (at most one step)
    # does.
    w_full = w_lo + tl.maximum(tl.minimum(w_hi, K // PER) - w_lo, 0) // BLOCK_W * BLOCK_W
    cols = tl.max_contiguous(tl.multiple_of(tl.arange(0, BLOCK_W), 4), 4)
    if WS:  # (4-bit lanes, x staged)
        # One scalar pointer and one shared-memory address step through K, every load's address a
        # compile-time offset from them: no address arithmetic a row and a 32-bit loop counter
        # (offsets recomputed from the counter, as below, cost Triton 3.6's build a multiply-add a
        # row and a 64-bit counter). The row offsets are added last: summed with the columns'
        # first, Triton 3.6 keeps a register a row in programs of more than one warp.
        p_at = p_ptr + row0.to(tl.int64) * WS + w_lo
        row_offs = tl.arange(0, BLOCK_N)[:, None] * WS
        x_at = xs + cols[None, :] * 32 + zero
        for _ in range(w_lo, w_full, BLOCK_W):
            words = tl.load((p_at + cols[None, :]) + row_offs, cache_modifier=C.STREAM_CACHE,
                            eviction_policy=C.STREAM_EVICT)
            x0, x1, x2, x3, x4, x5, x6, x7 = lds_x32(x_at)
            acc = lane_dot4(words, table, x0, x1, x2, x3, x4, x5, x6, x7, acc)
            p_at += BLOCK_W
            x_at += BLOCK_W * 32
    else:
        for w0 in range(w_lo, w_full, BLOCK_W):
            rw = w0 + cols
            words = tl.load(p_ptr + rows[:, None] * stride_pn + rw[None, :], cache_modifier=C.STREAM_CACHE,
                            eviction_policy=C.STREAM_EVICT)
            if LANES and BITS == 4:
                acc = _gemv_words4(acc, x_row, words, w0, cols, rw < w_hi, K, table, zero, xs, w_lo, X_KIND, False,
                                   XS)
            else:
                acc = _gemv_words(acc, x_row, words, rw, rw < w_hi, K, table, book_rows, zero, BITS, PER, LANES,
                                  SEG, X_KIND, False)
    if w_full < w_hi:  # one step, not a loop: the steady-state loop above is the hot one
        rw = w_full + cols
        w_mask = rw < w_hi
        words = tl.load(p_ptr + rows[:, None] * stride_pn + rw[None, :], mask=w_mask[None, :], other=0,
                        cache_modifier=C.STREAM_CACHE, eviction_policy=C.STREAM_EVICT)
        if LANES and BITS == 4:
            acc = _gemv_words4(acc, x_row, words, w_full, cols, w_mask, K, table, zero, xs, w_lo, X_KIND, True, XS)
        else:
            acc = _gemv_words(acc, x_row, words, rw, w_mask, K, table, book_rows, zero, BITS, PER, LANES,
                              SEG, X_KIND, True)
    out = tl.sum(acc, 1)
    C.store_tile(out[None, :], m + tl.arange(0, 1), rn, M, N, out_ptr, b_ptr, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def _codebook_gemm_kernel(
    x_ptr, p_ptr, book_ptr, b_ptr, out_ptr, M, N, K, W, stride_xm, stride_pn, stride_b, M_BUCKET,
    BITS: tl.constexpr, PER: tl.constexpr, PER_P2: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    rm, rn = C.gemm_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    m_mask, n_mask = rm < M, rn < N
    # A step covers BLOCK_W whole words: each word is loaded once and unpacked into PER_P2 rows
    # of the [BLOCK_K, BLOCK_N] weight tile (padding rows of 3/5/6/7-bit words meet x = 0).
    BLOCK_W: tl.constexpr = BLOCK_K // PER_P2
    w_span = tl.cdiv(W, SPLIT_K * BLOCK_W) * BLOCK_W
    w_lo = pid_k * w_span
    w_hi = tl.minimum(w_lo + w_span, W)
    rf = tl.arange(0, PER_P2)
    shifts = tl.where(rf < PER, rf * BITS, 0)  # no shift by >= 32 (undefined on the GPU)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for w0 in range(w_lo, w_hi, BLOCK_W):
        rw = w0 + tl.arange(0, BLOCK_W)
        w_mask = rw < w_hi
        words = tl.load(p_ptr + rn[None, :] * stride_pn + rw[:, None], mask=w_mask[:, None] & n_mask[None, :], other=0)
        idx = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
        w = tl.load(book_ptr + rn[None, None, :] * stride_b + idx, mask=n_mask[None, None, :], other=0.0)
        w = tl.reshape(w, (BLOCK_K, BLOCK_N)).to(x_ptr.dtype.element_ty).to(DOT_DTYPE)
        if PER == PER_P2:  # no padding fields: the tile's columns are contiguous
            rk = w0 * PER + tl.arange(0, BLOCK_K)
            k_mask = rk < tl.minimum(w_hi * PER, K)
        else:
            cols = rw[:, None] * PER + rf[None, :]
            rk = tl.reshape(cols, (BLOCK_K,))
            k_mask = tl.reshape((rf[None, :] < PER) & w_mask[:, None], (BLOCK_K,)) & (rk < K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(x.to(DOT_DTYPE), w, acc, input_precision=PRECISION)
    C.store_tile(acc, rm, rn, M, N, out_ptr, b_ptr, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def _codebook_dequant_kernel(p_ptr, book_ptr, out_ptr, N, K, stride_pn, stride_b, BITS: tl.constexpr,
                             PER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    mask = (rn < N) & (rk < K)
    w = codebook_tile(p_ptr, book_ptr, rn, rk, mask, stride_pn, stride_b, BITS, PER)
    tl.store(out_ptr + rn * K + rk, w.to(out_ptr.dtype.element_ty), mask=mask)


_gemv_tuned = C.tuned(_codebook_gemv_kernel, GEMV_CONFIGS, key=["N", "K", "BITS", "SPLIT_K"])
_gemv4_tuned = C.tuned(_codebook_gemv_kernel, GEMV_CONFIGS4, key=["N", "K", "BITS", "SPLIT_K"])
_gemv4s_tuned = C.tuned(_codebook_gemv_kernel, GEMV_STAGED_CONFIGS4, key=["N", "K", "BITS", "SPLIT_K"])
_gemm_tuned = C.tuned(_codebook_gemm_kernel, GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "BITS", "SPLIT_K"],
                      prune=C.prune_gemm)


def _prepare(x: torch.Tensor, packed: torch.Tensor, codebook: torch.Tensor, bits: int, k: int):
    n, words = packed.shape
    if not 1 <= bits <= 16:
        raise ValueError(f"codebook kernels take 1..16-bit indices (like torchzip.packed.bits), got {bits}")
    if x.shape[-1] != k or words != triton.cdiv(k, 32 // bits):
        raise ValueError(f"x has {x.shape[-1]} features, packed weight {tuple(packed.shape)} holds {k} at {bits} bits")
    if codebook.shape[0] not in (1, n) or codebook.dtype != torch.float32:
        raise ValueError(f"codebook must be float32 [1 or {n}, entries], got {codebook.dtype} {tuple(codebook.shape)}")
    codebook = codebook.contiguous()
    stride_b = codebook.stride(0) if codebook.shape[0] > 1 else 0  # per layer: every row reads row 0
    return C.as_2d(x), packed.contiguous(), codebook, stride_b


def codebook_gemv(x: torch.Tensor, packed: torch.Tensor, codebook: torch.Tensor, bias: torch.Tensor | None,
                  bits: int, k: int, split_k: int | None = None, config: triton.Config | None = None) -> torch.Tensor:
    """GEMV kernel (one program per (row block, activation row); meant for M == 1).

    ``x`` ``[..., k]``, ``packed`` int32 ``[N, W]``, ``codebook`` fp32 ``[N or 1, entries]``;
    returns ``[..., N]`` in ``x.dtype``. On CUDA the register-held codebook (shuffles) runs once
    its self-check passed (:data:`SELF_CHECKS`), else the codebook is gathered from L1.
    """
    return _gemv(x, packed, codebook, bias, bits, k, split_k, config, _checked, True)


def _checked(path: str, x2: torch.Tensor) -> bool:
    check, fallback = SELF_CHECKS[path]
    return dispatch.fast_path_ok(path, x2, check, fallback)


def _gemv(x, packed, codebook, bias, bits, k, split_k, config, allow, stage) -> torch.Tensor:
    """:func:`codebook_gemv`, taking the shuffle path ``codebook.lanes<bits>`` only where ``allow``;
    ``stage``: 4-bit x staged in shared memory where it fits (:func:`stage_columns`)."""
    x2, packed, codebook, stride_b = _prepare(x, packed, codebook, bits, k)
    m, (n, words) = x2.shape[0], packed.shape
    # The shuffles need a warp's 2**bits-lane segments on one row: every gemv_configs entry does that.
    # Pair loads of x need an even K and (16-bit x) 4-byte aligned pairs.
    lanes = (bits <= LANE_MAX_BITS and not C.interpreting()
             and (config is None or min(32, config.kwargs["BLOCK_W"] // 4) >= 2**bits)
             and k % 2 == 0 and (x2.element_size() == 4 or (x2.stride(0) % 2 == 0 and x2.data_ptr() % 4 == 0))
             and allow(f"codebook.lanes{bits}", x2))
    if lanes and bits == 4 and (x2.data_ptr() % 16 or x2.stride(0) % (16 // x2.element_size())):
        # The 4-bit kernel reads x a word's 8 columns (16 or 32 bytes) at a time, aligned: a copy
        # whose rows start at multiples of 16 bytes.
        xp = x2.new_zeros(m, triton.cdiv(k, 8) * 8)
        xp[:, :k] = x2
        x2 = xp[:, :k]
    split = split_k or C.pick_split_k(x2, triton.cdiv(n, 16) * m, k, n)
    rows_needed = max(c.kwargs["BLOCK_N"] for c in GEMV_STAGED_CONFIGS4) if config is None else config.kwargs["BLOCK_N"]
    staged = stage_columns(words, split) if stage and lanes and bits == 4 and n >= rows_needed else 0
    out, ws = C.new_output(m, n, split, x.dtype, x.device)
    if m and n:
        C.launch(
            _codebook_gemv_kernel,
            _gemv4s_tuned if staged else _gemv4_tuned if bits == 4 and lanes else _gemv_tuned,
            lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), m, split),
            (x2, packed, codebook, bias, ws, m, n, k, words, x2.stride(0), packed.stride(0), stride_b),
            config, INTERP_GEMV, BITS=bits, PER=32 // bits, HAS_BIAS=bias is not None, SPLIT_K=split,
            LANES=lanes, SEG=shuffle_control(bits) if lanes else 0, X_KIND=X_KINDS[x.dtype],
            **stage_constexprs(staged, words),
        )
        C.finish_split_k(out, ws, bias, split)
    return out.view(*x.shape[:-1], n)


# ---- self-checks of the shuffle GEMV (see kernels.dispatch.fast_path_ok) -----------------------
# Odd-integer centroids mirrored about 0 (code 2**bits - 1 - c holds minus code c's), per-row books
# scaled by 0.5, 1 or 2, x in -1..1, each code or its mirror picked so every row's sum lands within
# 62 of its own target (-12..12): |sum| <= 74 in halves, exact in fp32 and in a 16-bit output.
# Ragged in rows, words and fields; per-row and per-layer books.
PROBE_N = 40


def probe(bits: int, per_row: bool = True):
    """``(x [1, k] fp32, packed, codebook, k, want [1, N] float64)`` for the self-check (on CPU)."""
    from torchzip.packed.bits import pack_bits

    per = 32 // bits
    n, k = PROBE_N, per * (gemv_configs(bits)[0].kwargs["BLOCK_W"] + 20) - 2
    j, r = torch.arange(k), torch.arange(n)[:, None]
    x = (j * 7) % 3 - 1
    entries = 2 * torch.arange(2**bits) - (2**bits - 1)
    book = entries.double()[None, :] * (2.0 ** (torch.arange(n)[:, None] % 3 - 1.0) if per_row else 1.0)
    code = (r * 5 + j * 3) % 2**bits
    mirror = 2**bits - 1 - code
    rows = book.expand(n, -1)
    val, val_m = rows.gather(1, code), rows.gather(1, mirror)
    target = 4.0 * (torch.arange(n) % 7 - 3)
    take = dispatch.balanced_signs(torch.maximum(val, val_m), torch.minimum(val, val_m), x.expand(n, k), target)
    idx = torch.where(take == (val >= val_m), code, mirror)
    packed = pack_bits(idx, bits)
    x = x.float()[None, :]
    book = book.float()
    return x, packed, book, k, reference(x, packed, book, None, bits, k)


def _probe_check(bits: int):
    path = f"codebook.lanes{bits}"

    def check(device: torch.device, dtype: torch.dtype) -> bool:
        # 4-bit: with x staged in shared memory (the probe's K fits) and without (wider K).
        for per_row, stage in ((True, True), (False, True), (True, False))[:3 if bits == 4 else 2]:
            x, packed, book, k, want = probe(bits, per_row)
            taken = []
            config = (GEMV_STAGED_CONFIGS4 if stage and bits == 4 else gemv_configs(bits))[0]
            got = _gemv(x.to(device, dtype), packed.to(device), book.to(device), None, bits, k, 1, config,
                        lambda p, _: p == path and not taken.append(p), stage)
            if taken != [path] or not torch.equal(got.double().cpu(), want):
                return False
        return True
    return check


# path -> (check(device, dtype), what runs instead).
SELF_CHECKS = {f"codebook.lanes{b}": (_probe_check(b), "the codebook GEMV gathering from L1")
               for b in range(1, LANE_MAX_BITS + 1)}


def codebook_gemm(x: torch.Tensor, packed: torch.Tensor, codebook: torch.Tensor, bias: torch.Tensor | None,
                  bits: int, k: int, split_k: int | None = None, config: triton.Config | None = None) -> torch.Tensor:
    """Tiled ``tl.dot`` kernel for M > 1 (see :func:`codebook_gemv` for arguments)."""
    x2, packed, codebook, stride_b = _prepare(x, packed, codebook, bits, k)
    m, n = x2.shape[0], packed.shape[0]
    bucket = min(C.next_pow2(m), 256)
    split = split_k or C.pick_split_k(x2, triton.cdiv(n, 64) * triton.cdiv(m, min(max(bucket, 16), 64)), k, n)
    out, ws = C.new_output(m, n, split, x.dtype, x.device)
    if m and n:
        C.launch(
            _codebook_gemm_kernel, _gemm_tuned,
            lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), split),
            (x2, packed, codebook, bias, ws, m, n, k, packed.shape[1], x2.stride(0), packed.stride(0), stride_b, bucket),
            config, C.INTERP_GEMM, BITS=bits, PER=32 // bits, PER_P2=C.next_pow2(32 // bits), HAS_BIAS=bias is not None,
            SPLIT_K=split,
            DOT_DTYPE=C.dot_dtype(x.dtype), PRECISION=C.dot_precision(x.dtype),
        )
        C.finish_split_k(out, ws, bias, split)
    return out.view(*x.shape[:-1], n)


def dequantize_codebook(packed: torch.Tensor, codebook: torch.Tensor, bits: int, k: int,
                        dtype: torch.dtype) -> torch.Tensor:
    """Dense ``codebook[n or 0, index[n, j]]`` as ``[N, k]`` in ``dtype``."""
    n = packed.shape[0]
    packed, codebook = packed.contiguous(), codebook.contiguous()
    stride_b = codebook.stride(0) if codebook.shape[0] > 1 else 0
    out = torch.empty(n, k, dtype=dtype, device=packed.device)
    if out.numel():
        _codebook_dequant_kernel[C.dq_grid(n, k)](packed, codebook, out, n, k, packed.stride(0), stride_b,
                                              BITS=bits, PER=32 // bits, BLOCK_N=C.DQ_BLOCK_N, BLOCK_K=C.DQ_BLOCK_K,
                                              num_warps=C.DQ_WARPS)
    return out


def reference(x: torch.Tensor, packed: torch.Tensor, codebook: torch.Tensor, bias: torch.Tensor | None,
              bits: int, k: int) -> torch.Tensor:
    """What the kernels compute, in float64 (indices unpacked with ``torchzip.packed.bits``)."""
    from torchzip.packed.bits import unpack_bits

    idx = unpack_bits(packed, bits, k)
    book = codebook.double().expand(packed.shape[0], -1) if codebook.shape[0] == 1 else codebook.double()
    out = x.double() @ torch.gather(book, 1, idx).T
    return out if bias is None else out + bias.double()


# ---- the op the packed format calls ------------------------------------------------------------
@torch.library.custom_op("torchzip::codebook_linear", mutates_args=())
def _codebook_linear(x: Tensor, packed: Tensor, codebook: Tensor, bias: Tensor | None, bits: int, k: int) -> Tensor:
    dispatch.require_triton()
    return dispatch.by_rows(_codebook_impl, packed.shape[0], k, x, packed, codebook, bias, bits, k)


def _codebook_impl(x: Tensor, packed: Tensor, codebook: Tensor, bias: Tensor | None, bits: int, k: int) -> Tensor:
    path = dispatch.pick_path("codebook", x)
    if path == "dense":
        return dispatch.dense(x, dequantize_codebook(packed, codebook, bits, k, x.dtype), bias)
    kernel = codebook_gemv if path == "gemv" else codebook_gemm
    return kernel(x, packed, codebook, bias, bits, k)


@_codebook_linear.register_fake
def _(x, packed, codebook, bias, bits, k):
    return dispatch.out_like(x, packed.shape[0])


def codebook_linear(x: Tensor, packed: Tensor, codebook: Tensor, bias: Tensor | None, bits: int, k: int) -> Tensor:
    """``x @ W.T + bias`` with ``W[n, j] = codebook[n or 0, index[n, j]]``.

    ``packed`` int32 ``[N, ceil(k / (32 // bits))]`` holds the ``bits``-wide indices (see
    ``torchzip.packed.bits``), ``codebook`` fp32 ``[N or 1, 2**bits]``; ``bits`` in 1..16.
    """
    return torch.ops.torchzip.codebook_linear(x, packed, codebook, bias, int(bits), int(k))
