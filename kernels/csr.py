"""CSR sparse matmul (``torchzip.packed.csr``), with float, int8 or codebook values.

Each program owns a few rows and walks their nonzeros in blocks (up to the longest row's
count), gathering ``x[:, col]`` from L1/L2; packed weights pass an aligned, padded copy
(:func:`aligned_segments`) so column and value loads are 128 bits wide. At M = 1 on a GPU the
gather is inline PTX and codebooks of up to 32 entries sit in registers (a warp shuffle a
nonzero). Suits 80-95% sparsity and small M; the ``torchzip::csr_linear`` op turns to the
dequantize kernel + cuBLAS for large M.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from torchzip.kernels import _common as C
from torchzip.kernels import dispatch
from torchzip.kernels.codebook import lane_ids

# CSR: [BLOCK_M activations, BLOCK_R rows, BLOCK_NZ nonzeros] per step. One activation row wants
# several weight rows per program (a row at 90% sparsity of K=4096 has ~400 nonzeros); more
# activation rows share each decoded nonzero across BLOCK_M gathers instead.
CSR_CONFIGS = [
    triton.Config({"BLOCK_M": 1, "BLOCK_R": br, "BLOCK_NZ": bz}, num_warps=w, num_stages=2)
    for br, bz, w in [(1, 1024, 4), (2, 512, 4), (4, 256, 4), (8, 256, 8), (1, 512, 2), (2, 256, 2), (4, 512, 8)]
] + [
    triton.Config({"BLOCK_M": bm, "BLOCK_R": br, "BLOCK_NZ": bz}, num_warps=w, num_stages=2)
    for bm in (2, 4, 8, 16)
    for br, bz, w in [(1, 64, 4), (1, 128, 4), (2, 64, 4), (1, 256, 8)]
]
CSR_INTERP = triton.Config({"BLOCK_M": 4, "BLOCK_R": 4, "BLOCK_NZ": 32})


def prune_csr(configs, named_args, **kwargs):
    """Keep configs whose BLOCK_M is the M bucket (capped at 16)."""
    bm = min(named_args["M_BUCKET"], 16)
    return [c for c in configs if c.kwargs["BLOCK_M"] == bm] or configs[:1]


# Nonzeros per aligned run of aligned_segments: 16-byte int16 column loads.
ALIGN = 8
# Value of codebook-index padding in aligned_segments (and of masked index loads): no centroid.
# Its low 5 bits pick lane 31, which holds 0 in the register-held codebook of up to LANE_ENTRIES
# entries; with 32 its top bit (no real code's) skips the FMA; the gathered codebook masks it
# by the row's true length.
PAD_CODE = tl.constexpr(255)
LANE_ENTRIES = 31
# Dequantize: a few rows per program, scattering their nonzeros.
DQ_BLOCK_R, DQ_BLOCK_NZ = 4, 128
# From this M on, dequantize + cuBLAS beats the fused kernel (see kernels.dispatch).
dispatch.DENSE_MIN_M.setdefault("csr", 32)


def csr_constexprs(config: triton.Config, kind: int, entries: int = 16) -> dict:
    """Constexprs of the CSR kernel on a GPU for a launch config and value kind, on aligned segments
    and bf16 x (what packed weights launch; benchmarks/sass_report.py); codebooks of ``entries``
    (up to 32) in registers."""
    lanes = (1 if entries <= LANE_ENTRIES else 2) if kind == C.KIND_CODEBOOK else 0
    return {"ALIGN": ALIGN, "ASM": True, "LANES": lanes, "X_KIND": 0, **config.kwargs}


def csr_nonzeros_per_iter(constexprs: dict) -> int:
    """Nonzeros one iteration of the CSR kernel's loop consumes."""
    return constexprs["BLOCK_R"] * constexprs["BLOCK_NZ"]


@triton.jit
def gather_x(row, cols, X_KIND: tl.constexpr):
    """``x[cols]`` as fp32, ``row`` the int64 address of the activation row and ``cols`` int16 or
    int32 (never negative): per nonzero an extract (16-bit columns), the address (an unsigned
    ``mul.wide`` and add, which ptxas makes one IMAD.WIDE.U32; a signed index or ``mad.wide``
    come out as two instructions), one load and one conversion. Inline PTX, so the result keeps
    the columns' layout (a ``tl.load`` gather gets a layout of its own on Triton 3.6, and the
    columns and values then reach it through shared memory). KIND: 0 bf16, 1 fp16, 2 fp32."""
    if cols.dtype == tl.int16:
        head: tl.constexpr = "{ .reg .b64 a; .reg .b32 c, t; .reg .b16 h; cvt.u32.u16 c, $1; "
        cons: tl.constexpr = "=r,h,l"
    else:
        head: tl.constexpr = "{ .reg .b64 a; .reg .b32 c, t; .reg .b16 h; mov.b32 c, $1; "
        cons: tl.constexpr = "=r,r,l"
    if X_KIND == 0:
        body: tl.constexpr = "mul.wide.u32 a, c, 2; add.s64 a, a, $2; ld.global.nc.u16 t, [a]; shl.b32 $0, t, 16; }"
    elif X_KIND == 1:
        body: tl.constexpr = "mul.wide.u32 a, c, 2; add.s64 a, a, $2; ld.global.nc.b16 h, [a]; cvt.f32.f16 $0, h; }"
    else:
        body: tl.constexpr = "mul.wide.u32 a, c, 4; add.s64 a, a, $2; ld.global.nc.b32 $0, [a]; }"
    return tl.inline_asm_elementwise(head + body, cons, [cols, row], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def widen(v):
    """Stored float values as fp32; bf16 pairs in inline PTX, a shift or a mask each (Triton's
    conversion of the high half costs a permute and a shift)."""
    if v.dtype == tl.bfloat16:
        return tl.inline_asm_elementwise("{ shl.b32 $0, $2, 16; and.b32 $1, $2, 0xffff0000; }", "=r,=r,r", [v],
                                         dtype=tl.float32, is_pure=True, pack=2)
    return v.to(tl.float32)


@triton.jit
def load_table(addr, ok):
    """fp32 at ``addr`` where ``ok``, else 0: a load in inline PTX marked pure, so the identical
    loads of a thread's slots (one row, one lane) merge into one register."""
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.s32 p, $2, 0; mov.b32 $0, 0; @p ld.global.nc.b32 $0, [$1]; }",
        "=r,l,r", [addr, ok.to(tl.int32)], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def lane_lookup_fma(codes, table, x, acc, GUARD: tl.constexpr):
    """``acc + centroid[code] * x`` for 4 uint8 codes a register: each centroid is one warp
    shuffle from lane ``code`` (the whole warp works on one row; lane l holds centroid l of it,
    0 past the codebook). shfl reads only the lane index's low 5 bits, so byte j needs a shift
    (none for byte 0) but no mask. GUARD (a 32-entry codebook, no lane left for a 0): the FMA
    is skipped for PAD_CODE, whose top bit no real code has (one bit test a code)."""
    if GUARD:
        asm: tl.constexpr = """{ .reg .b32 c, t; .reg .pred p0, p1, p2, p3;
        and.b32 t, $4, 0x80; setp.eq.u32 p0, t, 0; and.b32 t, $4, 0x8000; setp.eq.u32 p1, t, 0;
        and.b32 t, $4, 0x800000; setp.eq.u32 p2, t, 0; and.b32 t, $4, 0x80000000; setp.eq.u32 p3, t, 0;
        mov.b32 $0, $13; mov.b32 $1, $14; mov.b32 $2, $15; mov.b32 $3, $16;
        shfl.sync.idx.b32 c, $5, $4, 0x1f, -1; @p0 fma.rn.f32 $0, c, $9, $13;
        shr.b32 t, $4, 8; shfl.sync.idx.b32 c, $6, t, 0x1f, -1; @p1 fma.rn.f32 $1, c, $10, $14;
        shr.b32 t, $4, 16; shfl.sync.idx.b32 c, $7, t, 0x1f, -1; @p2 fma.rn.f32 $2, c, $11, $15;
        shr.b32 t, $4, 24; shfl.sync.idx.b32 c, $8, t, 0x1f, -1; @p3 fma.rn.f32 $3, c, $12, $16; }"""
    else:
        asm: tl.constexpr = """{ .reg .b32 c, t;
        shfl.sync.idx.b32 c, $5, $4, 0x1f, -1; fma.rn.f32 $0, c, $9, $13;
        shr.b32 t, $4, 8; shfl.sync.idx.b32 c, $6, t, 0x1f, -1; fma.rn.f32 $1, c, $10, $14;
        shr.b32 t, $4, 16; shfl.sync.idx.b32 c, $7, t, 0x1f, -1; fma.rn.f32 $2, c, $11, $15;
        shr.b32 t, $4, 24; shfl.sync.idx.b32 c, $8, t, 0x1f, -1; fma.rn.f32 $3, c, $12, $16; }"""
    return tl.inline_asm_elementwise(asm, "=f,=f,=f,=f,r,f,f,f,f,f,f,f,f,f,f,f,f", [codes, table, x, acc],
                                     dtype=tl.float32, is_pure=True, pack=4)


@triton.jit
def _csr_kernel(
    x_ptr, rp_ptr, len_ptr, col_ptr, v_ptr, s_ptr, book_ptr, b_ptr, out_ptr, M, N, stride_xm, stride_sn, stride_b,
    M_BUCKET, E, KIND: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, ALIGN: tl.constexpr,
    ASM: tl.constexpr, LANES: tl.constexpr, X_KIND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_NZ: tl.constexpr,
):
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_mask, m_mask = rr < N, rm < M
    start = tl.load(rp_ptr + rr, mask=r_mask, other=0)
    span = tl.load(rp_ptr + rr + 1, mask=r_mask, other=0) - start
    if ALIGN > 1:  # aligned segments (aligned_segments): starts and spans are multiples of ALIGN
        start, span = tl.multiple_of(start, ALIGN), tl.multiple_of(span, ALIGN)
        length = tl.load(len_ptr + rr, mask=r_mask, other=0)
    else:
        length = span
    # Masked slots read value 0, codebook indices PAD_CODE (see aligned_segments).
    if KIND == 2:
        PAD: tl.constexpr = PAD_CODE
    else:
        PAD: tl.constexpr = 0
    if BLOCK_M == 1:  # one activation row: 2-D tiles, so the gather shares the index loads' layout
        acc2 = tl.zeros((BLOCK_R, BLOCK_NZ), tl.float32)
        x_row = x_ptr + tl.program_id(1) * stride_xm
        if LANES:
            # The codebook in registers: every warp works on one row per register slot (the
            # [1, 32] threads-per-warp tile of BLOCK_NZ >= 256), lane l holds centroid l of it
            # (0 from E on, which PAD_CODE's low 5 bits pick if E < 32), and a lookup is one shuffle.
            lane = lane_ids(tl.zeros((BLOCK_R, BLOCK_NZ), tl.int32))
            table = load_table((book_ptr + rr[:, None] * stride_b + lane).to(tl.int64), r_mask[:, None] & (lane < E))
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_R, BLOCK_NZ), tl.float32)
    # Row pointers hoisted: a step adds only its scalar offset.
    col_row = col_ptr + (start[:, None] + tl.arange(0, BLOCK_NZ)[None, :])
    v_row = v_ptr + (start[:, None] + tl.arange(0, BLOCK_NZ)[None, :])
    for i in range(0, tl.max(span, 0), BLOCK_NZ):
        ri = i + tl.arange(0, BLOCK_NZ)
        # Loads are masked by the padded span (whole runs of ALIGN: wide loads). At M = 1 the
        # activation gather is not masked at all (a compare and a zeroing move a nonzero saved):
        # padding and masked slots have weight 0 at a column the row reads anyway (or column 0),
        # so they add exactly 0 for finite x; an inf/NaN activation gives NaN, as it does in the
        # dense path. Codebook padding (PAD_CODE) is no centroid: the register-held codebook
        # decodes it to 0, the gathered one masks it by the true length, and so does every
        # M > 1 gather.
        seg_mask = ri[None, :] < span[:, None]
        nz_mask = ri[None, :] < length[:, None]
        # No eviction hint: Triton's evict_first sets up a cache policy (uniform-register
        # instructions) that lands in the loop for some configs, and 3.6 has no ".cs" loads.
        if ALIGN > 1:  # unmasked: the copy's columns run on past every step (aligned_segments)
            cols = tl.load(col_row + i)
        else:
            cols = tl.load(col_row + i, mask=seg_mask, other=0)
        v = tl.load(v_row + i, mask=seg_mask, other=PAD)
        if BLOCK_M == 1:
            if ASM:
                x = gather_x(x_row.to(tl.int64), cols, X_KIND)
            else:
                x = tl.load(x_row + cols).to(tl.float32)
            if LANES:
                acc2 = lane_lookup_fma(v, table, x, acc2, LANES == 2)
            else:
                if KIND == 0 and ASM:
                    w = widen(v)
                else:
                    w = C.decode(v, rr[:, None], cols.to(tl.int32), nz_mask if KIND == 2 else seg_mask, s_ptr,
                                 stride_sn, book_ptr, stride_b, KIND, GROUP)
                acc2 += x * w
        else:
            cols = cols.to(tl.int32)
            w = C.decode(v, rr[:, None], cols, nz_mask if KIND == 2 else seg_mask, s_ptr, stride_sn, book_ptr,
                         stride_b, KIND, GROUP)
            x = tl.load(x_ptr + rm[:, None, None] * stride_xm + cols[None, :, :],
                        mask=m_mask[:, None, None] & nz_mask[None, :, :], other=0.0)
            acc += x.to(tl.float32) * w[None, :, :]
    if BLOCK_M == 1:
        out = tl.sum(acc2, 1)[None, :]
    else:
        out = tl.sum(acc, 2)
    if KIND == 1 and GROUP == 0:
        out *= tl.load(s_ptr + rr * stride_sn, mask=r_mask, other=0.0)[None, :]
    C.store_tile(out, rm, rr, M, N, out_ptr, b_ptr, 0, HAS_BIAS, 1)


@triton.jit
def _csr_dequant_kernel(rp_ptr, col_ptr, v_ptr, s_ptr, book_ptr, out_ptr, N, K, stride_sn, stride_b,
                        KIND: tl.constexpr, GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_NZ: tl.constexpr):
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = rr < N
    start = tl.load(rp_ptr + rr, mask=r_mask, other=0)
    length = tl.load(rp_ptr + rr + 1, mask=r_mask, other=0) - start
    if KIND == 1 and GROUP == 0:
        row_scale = tl.load(s_ptr + rr * stride_sn, mask=r_mask, other=0.0)[:, None]
    for i in range(0, tl.max(length, 0), BLOCK_NZ):
        ri = i + tl.arange(0, BLOCK_NZ)
        nz_mask = ri[None, :] < length[:, None]
        offs = start[:, None] + ri[None, :]
        cols = tl.load(col_ptr + offs, mask=nz_mask, other=0).to(tl.int32)
        v = tl.load(v_ptr + offs, mask=nz_mask, other=0)
        w = C.decode(v, rr[:, None], cols, nz_mask, s_ptr, stride_sn, book_ptr, stride_b, KIND, GROUP)
        if KIND == 1 and GROUP == 0:
            w *= row_scale
        tl.store(out_ptr + rr[:, None] * K + cols, w.to(out_ptr.dtype.element_ty), mask=nz_mask)


_csr_tuned = C.tuned(_csr_kernel, CSR_CONFIGS, key=["M_BUCKET", "N", "KIND", "GROUP", "ALIGN", "LANES"], prune=prune_csr)
X_KINDS = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}  # gather_x's X_KIND


def aligned_segments(row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor) -> list[torch.Tensor] | None:
    """The CSR kernel's aligned copy: ``[seg_ptr, lengths, cols, values]`` with every row's nonzeros
    moved to a start that is a multiple of ``ALIGN`` and padded (the row's last column, value 0,
    or :data:`PAD_CODE` for uint8 codebook indices) to a multiple of it, so the kernel loads whole
    16-byte runs; None if that copy would pass int32 offsets. Costs ``2 * 2 + bytes(value)`` bytes
    (int16 columns) per padding slot, at most ``ALIGN - 1`` a row, besides the copy itself. The
    columns go on for the longest row plus the largest BLOCK_NZ (column 0): the kernel loads them
    unmasked, and a step past a row's end reads, within the copy, columns whose values it masks.

    ``seg_ptr`` int32 ``[N+1]`` (padded offsets), ``lengths`` int32 ``[N]`` (true counts).
    """
    n, nnz = row_ptr.numel() - 1, col_idx.numel()
    lens = (row_ptr[1:] - row_ptr[:-1]).long()
    seg = torch.zeros(n + 1, dtype=torch.long, device=col_idx.device)
    seg[1:] = torch.cumsum((lens + ALIGN - 1) // ALIGN * ALIGN, 0)
    total = int(seg[-1])
    tail = (int((seg[1:] - seg[:-1]).max()) if n else 0) + max(c.kwargs["BLOCK_NZ"] for c in CSR_CONFIGS + [CSR_INTERP])
    if total + tail > 2**31 - 1:
        return None
    rows = torch.repeat_interleave(torch.arange(n, device=col_idx.device), lens, output_size=nnz)
    dst = seg[:-1][rows] + torch.arange(nnz, device=col_idx.device) - row_ptr[:-1].long()[rows]
    # Padding repeats the row's last column: the kernel gathers x unmasked there (times weight
    # 0), so a padded slot reads no activation the row does not read anyway.
    last = col_idx[(row_ptr[1:].long() - 1).clamp(min=0)] if nnz else torch.zeros(n, dtype=col_idx.dtype)
    cols = torch.zeros(total + tail, dtype=col_idx.dtype, device=col_idx.device)
    cols[:total] = torch.repeat_interleave(last.to(col_idx.device), seg[1:] - seg[:-1], output_size=total)
    pad = PAD_CODE.value if values.dtype == torch.uint8 else 0
    vals = torch.full((total,), pad, dtype=values.dtype, device=values.device)
    cols[dst], vals[dst] = col_idx, values
    return [seg.to(torch.int32), lens.to(torch.int32), cols, vals]


def csr_matmul(x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor,
               scales: torch.Tensor | None, codebook: torch.Tensor | None, bias: torch.Tensor | None,
               group_size: int, k: int, config: triton.Config | None = None,
               aligned: list[torch.Tensor] | None = None) -> torch.Tensor:
    """CSR kernel for any M (meant for small M).

    ``row_ptr`` int32 ``[N+1]``, ``col_idx`` int16/int32 ``[nnz]``, ``values`` ``[nnz]`` (floats,
    int8 with ``scales``, or indices into ``codebook``); returns ``[..., N]`` in ``x.dtype``.
    ``aligned``: :func:`aligned_segments` of the same weight, read instead (wide loads). At M = 1
    on CUDA the one-row loop's inline PTX (activation gather, bf16 widening, a codebook of up to 32
    entries held in registers) runs once its self-check passed (:func:`_asm_check`), else the
    kernel's plain Triton loads and an L1 gather of centroids.
    """
    return _matmul(x, row_ptr, col_idx, values, scales, codebook, bias, group_size, k, config, aligned,
                   lambda x2: dispatch.fast_path_ok("csr.asm", x2, _asm_check, "the CSR kernel with Triton "
                                                    "loads, centroids gathered from L1"))


def _matmul(x, row_ptr, col_idx, values, scales, codebook, bias, group_size, k, config, aligned, allow):
    """:func:`csr_matmul`, with the inline PTX (and the codebook in registers) only where ``allow(x2)``."""
    if x.shape[-1] != k or col_idx.shape != values.shape or row_ptr.dtype != torch.int32:
        raise ValueError(f"CSR needs x [..., {k}], int32 row_ptr and col_idx/values of one length; got "
                         f"{tuple(x.shape)}, {row_ptr.dtype}, {tuple(col_idx.shape)}, {tuple(values.shape)}")
    if x.dtype not in X_KINDS:
        raise ValueError(f"CSR kernels take bf16, fp16 or fp32 activations, got {x.dtype}")
    x2 = C.as_2d(x)
    m, n = x2.shape[0], row_ptr.shape[0] - 1
    kind, scales, stride_s, codebook, stride_b = C.value_args(scales, codebook, n)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if aligned is not None:
        rp, lens, cols, vals, align = *aligned, ALIGN
    else:
        rp, lens, cols, vals, align = row_ptr, row_ptr, col_idx, values, 1
    # Asked on every GPU call: any M may get a BLOCK_M = 1 config, whose loop is the inline PTX.
    asm = not C.interpreting() and allow(x2)
    entries = codebook.shape[1] if codebook is not None else 0
    # The register-held codebook needs a warp on one row (the M = 1 configs' BLOCK_NZ >= 256): with
    # a spare lane for the 0 that padding and masked slots (PAD_CODE) decode to (LANES 1), or, for
    # 32 entries, a bit test that skips them (LANES 2).
    lanes = 0
    if (asm and m == 1 and kind == C.KIND_CODEBOOK and entries <= 32
            and (config is None or config.kwargs["BLOCK_M"] == 1 and config.kwargs["BLOCK_NZ"] >= 256)):
        lanes = 1 if entries <= LANE_ENTRIES else 2
    if m and n:
        C.launch(
            _csr_kernel, _csr_tuned, lambda meta: (triton.cdiv(n, meta["BLOCK_R"]), triton.cdiv(m, meta["BLOCK_M"])),
            (x2, rp.contiguous(), lens.contiguous(), cols.contiguous(), vals.contiguous(), scales, codebook, bias, out,
             m, n, x2.stride(0), stride_s, stride_b, C.next_pow2(m), entries),
            config, CSR_INTERP, KIND=kind, GROUP=group_size, HAS_BIAS=bias is not None, ALIGN=align,
            ASM=asm, LANES=lanes, X_KIND=X_KINDS[x.dtype],
        )
    return out.view(*x.shape[:-1], n)


def lanes_probe(per_row: bool, entries: int):
    """``(x [1, k] fp32, row_ptr, cols, codes, codebook, k, want [1, N] float64)``: the register-held
    codebook's self-check input (on CPU). ``entries`` integer centroids from -16 or -15 to 15
    (per-row books negated on odd rows), x in -1..1, rows of 0..16 nonzeros (most padded): every
    sum is an integer of at most 256, exact in fp32 and in a 16-bit output. N is odd, so the last
    program has rows past N."""
    n, k = 37, 300
    g = torch.Generator().manual_seed(entries)
    counts = torch.arange(n) % 17
    cols = torch.cat([torch.randperm(k, generator=g)[:c].sort().values for c in counts.tolist()]).to(torch.int16)
    codes = torch.randint(0, entries, (cols.numel(),), generator=g).to(torch.uint8)
    row_ptr = torch.zeros(n + 1, dtype=torch.int32)
    row_ptr[1:] = torch.cumsum(counts, 0)
    centroids = torch.arange(entries, dtype=torch.float32) - entries // 2
    book = centroids[None, :] * (1 - 2 * (torch.arange(n)[:, None] % 2)) if per_row else centroids[None, :]
    x = torch.randint(-1, 2, (1, k), generator=g).float()
    want = csr_reference(x, row_ptr, cols, codes, None, book, None, 0, k)
    return x, row_ptr, cols, codes, book, k, want


def asm_cases(per_row: bool, entries: int, dtype: torch.dtype):
    """``(x, row_ptr, cols, [(values, scales, codebook, want)], k)``: :func:`lanes_probe`'s weight
    as codebook indices and, for the 31-entry per-row probe, also as float values (bf16 and
    ``dtype``: the bf16 widening) and as int8 values with unit scales; ``want`` in float64."""
    x, row_ptr, cols, codes, book, k, want = lanes_probe(per_row, entries)
    cases = [(codes, None, book, want)]
    if per_row and entries == LANE_ENTRIES:
        rows = torch.repeat_interleave(torch.arange(book.shape[0]), (row_ptr[1:] - row_ptr[:-1]).long())
        floats = book[rows, codes.long()]
        for values, scales in ((floats.bfloat16(), None), (floats.to(dtype), None),
                               (floats.to(torch.int8), torch.ones(book.shape[0], 1))):
            cases.append((values, scales, None, csr_reference(x, row_ptr, cols, values, scales, None, None, 0, k)))
    return x, row_ptr, cols, cases, k


def _asm_check(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the one-row loop's inline PTX gives the exact answers of :func:`asm_cases` on
    ``device`` for ``dtype`` activations: codebook, float and int8 values, aligned copies and
    plain CSR, both register-held codebook variants (31 entries and a zero lane, 32 and the bit
    test)."""
    for entries in (LANE_ENTRIES, 32):
        for per_row in (True, False):
            x, row_ptr, cols, cases, k = asm_cases(per_row, entries, dtype)
            for values, scales, book, want in cases:
                args = [t.to(device) for t in (row_ptr, cols, values)]
                side = [None if t is None else t.to(device) for t in (scales, book)]
                for aligned in (aligned_segments(*args), None):
                    got = _matmul(x.to(device, dtype), *args, *side, None, 0, k, CSR_CONFIGS[2], aligned,
                                  lambda _: True)
                    if not torch.equal(got.double().cpu(), want):
                        return False
    return True


def dequantize_csr(row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor, scales: torch.Tensor | None,
                   codebook: torch.Tensor | None, group_size: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Dense ``[N, k]`` weight of a CSR weight, in ``dtype`` (zero fill, then one scatter pass)."""
    n = row_ptr.shape[0] - 1
    kind, scales, stride_s, codebook, stride_b = C.value_args(scales, codebook, n)
    out = torch.zeros(n, k, dtype=dtype, device=values.device)
    if n and values.numel():
        _csr_dequant_kernel[(triton.cdiv(n, DQ_BLOCK_R),)](
            row_ptr.contiguous(), col_idx.contiguous(), values.contiguous(), scales, codebook, out, n, k,
            stride_s, stride_b, KIND=kind, GROUP=group_size, BLOCK_R=DQ_BLOCK_R, BLOCK_NZ=DQ_BLOCK_NZ,
            num_warps=C.DQ_WARPS,
        )
    return out


def csr_reference(x, row_ptr, col_idx, values, scales, codebook, bias, group_size, k) -> torch.Tensor:
    """What the CSR kernel computes, in float64."""
    n = row_ptr.shape[0] - 1
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    rows, cols = torch.repeat_interleave(torch.arange(n, device=x.device), counts), col_idx.long()
    w = torch.zeros(n, k, dtype=torch.float64, device=x.device)
    w[rows, cols] = C.decode_values64(values, rows, cols, scales, codebook, group_size)
    out = x.double() @ w.T
    return out if bias is None else out + bias.double()


# ---- the op the packed format calls ------------------------------------------------------------
@torch.library.custom_op("torchzip::csr_linear", mutates_args=())
def _csr_linear(x: Tensor, row_ptr: Tensor, col_idx: Tensor, values: Tensor, scales: Tensor | None,
                codebook: Tensor | None, bias: Tensor | None, group_size: int, k: int,
                seg_ptr: Tensor | None = None, seg_len: Tensor | None = None, seg_cols: Tensor | None = None,
                seg_vals: Tensor | None = None) -> Tensor:
    dispatch.require_triton()
    aligned = None if seg_ptr is None else [seg_ptr, seg_len, seg_cols, seg_vals]
    with dispatch.on_device(x):
        return _csr_impl(x, row_ptr, col_idx, values, scales, codebook, bias, group_size, k, aligned)


def _csr_impl(x, row_ptr, col_idx, values, scales, codebook, bias, group_size, k, aligned=None):
    if dispatch.rows_of(x) < dispatch.DENSE_MIN_M["csr"]:
        return csr_matmul(x, row_ptr, col_idx, values, scales, codebook, bias, group_size, k, aligned=aligned)
    n, outs = row_ptr.shape[0] - 1, []
    for rows in dispatch.row_chunks(n, k):  # row_ptr holds absolute offsets: a slice of it is a CSR of those rows
        part = [dispatch.part(a, n, rows) for a in (scales, codebook, bias)]
        w = dequantize_csr(row_ptr[rows.start: rows.stop + 1], col_idx, values, *part[:2], group_size, k,
                                      x.dtype)
        outs.append(dispatch.dense(x, w, part[2]))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


@_csr_linear.register_fake
def _(x, row_ptr, col_idx, values, scales, codebook, bias, group_size, k, seg_ptr=None, seg_len=None, seg_cols=None,
      seg_vals=None):
    return dispatch.out_like(x, row_ptr.shape[0] - 1)


def csr_linear(x: Tensor, row_ptr: Tensor, col_idx: Tensor, values: Tensor, scales: Tensor | None,
               codebook: Tensor | None, bias: Tensor | None, group_size: int, k: int,
               aligned: list[Tensor] | None = None) -> Tensor:
    """``x @ W.T + bias`` for a CSR weight (``torchzip.packed.csr`` layout).

    ``row_ptr`` int32 ``[N+1]``, ``col_idx`` int16/int32 ``[nnz]``, ``values`` ``[nnz]``: floats,
    int8 (with ``scales`` ``[N, G]``) or codebook indices (with ``codebook`` ``[N or 1, E]``).
    ``aligned``: the weight's :func:`aligned_segments` (``CsrWeight`` caches it), which the small-M
    kernel then reads instead of the plain CSR.
    """
    return torch.ops.torchzip.csr_linear(x, row_ptr, col_idx, values, scales, codebook, bias, int(group_size), int(k),
                                         *(aligned or ()))
