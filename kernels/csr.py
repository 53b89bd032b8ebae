"""CSR sparse matmul (``torchzip.packed.csr``), with float, int8 or codebook values.

Each program owns a few rows and walks their nonzeros in blocks (up to the longest row's
count), gathering ``x[:, col]`` from L1/L2; packed weights pass an aligned, padded copy
(:func:`aligned_segments`) so column and value loads are 128 bits wide. Suits 80-95% sparsity and small M; the
``torchzip::csr_linear`` op turns to the dequantize kernel + cuBLAS for large M.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from torchzip.kernels import _common as C
from torchzip.kernels import dispatch

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
# Dequantize: a few rows per program, scattering their nonzeros.
DQ_BLOCK_R, DQ_BLOCK_NZ = 4, 128
# From this M on, dequantize + cuBLAS beats the fused kernel (see kernels.dispatch).
dispatch.DENSE_MIN_M.setdefault("csr", 32)


def csr_constexprs(config: triton.Config) -> dict:
    """Constexprs of the CSR kernel for a launch config, on aligned segments (what packed weights
    launch; benchmarks/sass_report.py)."""
    return {"ALIGN": ALIGN, **config.kwargs}


def csr_nonzeros_per_iter(constexprs: dict) -> int:
    """Nonzeros one iteration of the CSR kernel's loop consumes."""
    return constexprs["BLOCK_R"] * constexprs["BLOCK_NZ"]


@triton.jit
def _csr_kernel(
    x_ptr, rp_ptr, len_ptr, col_ptr, v_ptr, s_ptr, book_ptr, b_ptr, out_ptr, M, N, stride_xm, stride_sn, stride_b,
    M_BUCKET, KIND: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, ALIGN: tl.constexpr,
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
    if BLOCK_M == 1:  # one activation row: 2-D tiles, so the gather shares the index loads' layout
        acc2 = tl.zeros((BLOCK_R, BLOCK_NZ), tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_R, BLOCK_NZ), tl.float32)
    for i in range(0, tl.max(span, 0), BLOCK_NZ):
        ri = i + tl.arange(0, BLOCK_NZ)
        # Loads are masked by the padded span (whole runs of ALIGN: wide loads). At M = 1 the
        # activation gather is not masked at all (a compare and a zeroing move a nonzero saved):
        # padding and masked slots have weight 0 at a column the row reads anyway (or column 0),
        # so they add exactly 0 for finite x; an inf/NaN activation gives NaN, as it does in the
        # dense path. Codebook padding (index 0) decodes to a real centroid: there the gather
        # stays masked by the true length, and so does every M > 1 gather.
        seg_mask = ri[None, :] < span[:, None]
        nz_mask = ri[None, :] < length[:, None]
        offs = start[:, None] + ri[None, :]
        cols = tl.load(col_ptr + offs, mask=seg_mask, other=0).to(tl.int32)
        v = tl.load(v_ptr + offs, mask=seg_mask, other=0)
        w = C.decode(v, rr[:, None], cols, seg_mask, s_ptr, stride_sn, book_ptr, stride_b, KIND, GROUP)
        if BLOCK_M == 1:
            x_ptrs = x_ptr + tl.program_id(1) * stride_xm + cols
            x = tl.load(x_ptrs, mask=nz_mask, other=0.0) if KIND == 2 else tl.load(x_ptrs)
            acc2 += x.to(tl.float32) * w
        else:
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


_csr_tuned = C.tuned(_csr_kernel, CSR_CONFIGS, key=["M_BUCKET", "N", "KIND", "GROUP", "ALIGN"], prune=prune_csr)


def aligned_segments(row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor) -> list[torch.Tensor] | None:
    """The CSR kernel's aligned copy: ``[seg_ptr, lengths, cols, values]`` with every row's nonzeros
    moved to a start that is a multiple of ``ALIGN`` and padded (value 0, the row's last column)
    to a multiple of it, so the kernel loads whole 16-byte runs; None if that copy would pass
    int32 offsets. Costs ``2 * 2 + bytes(value)`` bytes (int16 columns) per padding slot, at most
    ``ALIGN - 1`` a row, besides the copy itself.

    ``seg_ptr`` int32 ``[N+1]`` (padded offsets), ``lengths`` int32 ``[N]`` (true counts).
    """
    n, nnz = row_ptr.numel() - 1, col_idx.numel()
    lens = (row_ptr[1:] - row_ptr[:-1]).long()
    seg = torch.zeros(n + 1, dtype=torch.long, device=col_idx.device)
    seg[1:] = torch.cumsum((lens + ALIGN - 1) // ALIGN * ALIGN, 0)
    total = int(seg[-1])
    if total > 2**31 - 1:
        return None
    rows = torch.repeat_interleave(torch.arange(n, device=col_idx.device), lens, output_size=nnz)
    dst = seg[:-1][rows] + torch.arange(nnz, device=col_idx.device) - row_ptr[:-1].long()[rows]
    # Padding repeats the row's last column: the kernel gathers x unmasked there (times weight
    # 0), so a padded slot reads no activation the row does not read anyway.
    last = col_idx[(row_ptr[1:].long() - 1).clamp(min=0)] if nnz else torch.zeros(n, dtype=col_idx.dtype)
    cols = torch.repeat_interleave(last.to(col_idx.device), seg[1:] - seg[:-1], output_size=total)
    vals = torch.zeros(total, dtype=values.dtype, device=values.device)
    cols[dst], vals[dst] = col_idx, values
    return [seg.to(torch.int32), lens.to(torch.int32), cols, vals]


def csr_matmul(x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor,
               scales: torch.Tensor | None, codebook: torch.Tensor | None, bias: torch.Tensor | None,
               group_size: int, k: int, config: triton.Config | None = None,
               aligned: list[torch.Tensor] | None = None) -> torch.Tensor:
    """CSR kernel for any M (meant for small M).

    ``row_ptr`` int32 ``[N+1]``, ``col_idx`` int16/int32 ``[nnz]``, ``values`` ``[nnz]`` (floats,
    int8 with ``scales``, or indices into ``codebook``); returns ``[..., N]`` in ``x.dtype``.
    ``aligned``: :func:`aligned_segments` of the same weight, read instead (wide loads).
    """
    if x.shape[-1] != k or col_idx.shape != values.shape or row_ptr.dtype != torch.int32:
        raise ValueError(f"CSR needs x [..., {k}], int32 row_ptr and col_idx/values of one length; got "
                         f"{tuple(x.shape)}, {row_ptr.dtype}, {tuple(col_idx.shape)}, {tuple(values.shape)}")
    x2 = C.as_2d(x)
    m, n = x2.shape[0], row_ptr.shape[0] - 1
    kind, scales, stride_s, codebook, stride_b = C.value_args(scales, codebook, n)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if aligned is not None:
        rp, lens, cols, vals, align = *aligned, ALIGN
    else:
        rp, lens, cols, vals, align = row_ptr, row_ptr, col_idx, values, 1
    if m and n:
        C.launch(
            _csr_kernel, _csr_tuned, lambda meta: (triton.cdiv(n, meta["BLOCK_R"]), triton.cdiv(m, meta["BLOCK_M"])),
            (x2, rp.contiguous(), lens.contiguous(), cols.contiguous(), vals.contiguous(), scales, codebook, bias, out,
             m, n, x2.stride(0), stride_s, stride_b, C.next_pow2(m)),
            config, CSR_INTERP, KIND=kind, GROUP=group_size, HAS_BIAS=bias is not None, ALIGN=align,
        )
    return out.view(*x.shape[:-1], n)


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
