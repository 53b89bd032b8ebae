"""Sparse matmul: 2:4 semi-structured and CSR unstructured weights, with float, int8 or codebook values.

2:4 (``torchzip.packed.sparse24``): kept value ``j`` of row ``n`` sits at column
``4 * (j // 2) + pos``, the 2-bit ``pos`` packed 16 to an int32 word. The GEMV walks the kept
values (half the columns) and gathers the activations they need; the GEMM rebuilds a dense
``[K, N]`` weight tile in registers for ``tl.dot`` (each column picks the kept value of its
group whose position matches, or 0).

CSR (``torchzip.packed.csr``): each program owns a few rows and walks their nonzeros in blocks
(up to the longest row's count), gathering ``x[:, col]`` from L1/L2. Suits 80-95% sparsity and
small M; the dispatcher turns to dequantize + cuBLAS for large M.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from torchzip.kernels import _common as C
from torchzip.kernels.int8_matmul import GEMM_CONFIGS, INTERP_GEMM, prune_gemm

# BLOCK_W position words (16 kept values, 32 dense columns each) of BLOCK_N rows per step.
S24_GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_W": bw}, num_warps=w, num_stages=s)
    for bn, bw, w, s in [
        (4, 16, 4, 2), (8, 16, 4, 2), (8, 8, 4, 3), (16, 8, 4, 2),
        (4, 32, 4, 2), (8, 32, 8, 2), (16, 16, 8, 2), (2, 32, 4, 2),
    ]
]
S24_INTERP_GEMV = triton.Config({"BLOCK_N": 16, "BLOCK_W": 4})

# CSR: [BLOCK_M activations, BLOCK_R rows, BLOCK_NZ nonzeros] per step. One activation row wants
# several weight rows per program (a row at 90% sparsity of K=4096 has ~400 nonzeros); more
# activation rows share each decoded nonzero across BLOCK_M gathers instead.
CSR_CONFIGS = [
    triton.Config({"BLOCK_M": 1, "BLOCK_R": br, "BLOCK_NZ": bz}, num_warps=w, num_stages=2)
    for br, bz, w in [(1, 512, 4), (2, 256, 4), (4, 128, 4), (4, 256, 8), (8, 64, 4), (8, 128, 8), (16, 64, 8)]
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


@triton.jit
def sparse24_tile(v_ptr, p_ptr, s_ptr, book_ptr, rows, cols, mask, stride_vn, stride_pn, stride_sn, stride_b,
                  KIND: tl.constexpr, GROUP: tl.constexpr):
    """Dense fp32 weights at broadcastable ``rows`` x ``cols`` (GEMM and dequantizer).

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
def _sparse24_gemv_kernel(
    x_ptr, v_ptr, p_ptr, s_ptr, book_ptr, b_ptr, out_ptr, M, N, J, PW,
    stride_xm, stride_vn, stride_pn, stride_sn, stride_b,
    KIND: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):
    pid_n, m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    w_span = tl.cdiv(PW, SPLIT_K * BLOCK_W) * BLOCK_W
    w_lo = pid_k * w_span
    w_hi = tl.minimum(w_lo + w_span, PW)
    rf = tl.arange(0, 16)
    acc = tl.zeros((BLOCK_N, BLOCK_W, 16), tl.float32)
    for w0 in range(w_lo, w_hi, BLOCK_W):
        rw = w0 + tl.arange(0, BLOCK_W)
        w_mask = rw < w_hi
        words = tl.load(p_ptr + rn[:, None] * stride_pn + rw[None, :], mask=n_mask[:, None] & w_mask[None, :], other=0)
        pos = (words[:, :, None] >> (rf * 2)[None, None, :]) & 3
        j = rw[:, None] * 16 + rf[None, :]  # kept-value index, [BLOCK_W, 16]
        mask = n_mask[:, None, None] & ((j < J) & w_mask[:, None])[None, :, :]
        v = tl.load(v_ptr + rn[:, None, None] * stride_vn + j[None, :, :], mask=mask, other=0)
        cols = (4 * (j // 2))[None, :, :] + pos
        x = tl.load(x_ptr + m * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
        w = C.decode(v, rn[:, None, None], cols, mask, s_ptr, stride_sn, book_ptr, stride_b, KIND, GROUP)
        acc += w * x
    out = tl.sum(tl.sum(acc, 2), 1)
    if KIND == 1 and GROUP == 0:
        out *= tl.load(s_ptr + rn * stride_sn, mask=n_mask, other=0.0)
    C.store_tile(out[None, :], m + tl.arange(0, 1), rn, M, N, out_ptr, b_ptr, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def _sparse24_gemm_kernel(
    x_ptr, v_ptr, p_ptr, s_ptr, book_ptr, b_ptr, out_ptr, M, N, K,
    stride_xm, stride_vn, stride_pn, stride_sn, stride_b, M_BUCKET,
    KIND: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = C.grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = rm < M, rn < N
    k_lo, k_hi = C.k_range(K, SPLIT_K, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < k_hi
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        wmask = k_mask[:, None] & n_mask[None, :]
        w = sparse24_tile(v_ptr, p_ptr, s_ptr, book_ptr, rn[None, :], rk[:, None], wmask,
                          stride_vn, stride_pn, stride_sn, stride_b, KIND, GROUP)
        w = w.to(x_ptr.dtype.element_ty).to(DOT_DTYPE)
        acc = tl.dot(x.to(DOT_DTYPE), w, acc, input_precision=PRECISION)
    if KIND == 1 and GROUP == 0:
        acc *= tl.load(s_ptr + rn * stride_sn, mask=n_mask, other=0.0)[None, :]
    C.store_tile(acc, rm, rn, M, N, out_ptr, b_ptr, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def _csr_kernel(
    x_ptr, rp_ptr, col_ptr, v_ptr, s_ptr, book_ptr, b_ptr, out_ptr, M, N, stride_xm, stride_sn, stride_b, M_BUCKET,
    KIND: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_NZ: tl.constexpr,
):
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_mask, m_mask = rr < N, rm < M
    start = tl.load(rp_ptr + rr, mask=r_mask, other=0)
    length = tl.load(rp_ptr + rr + 1, mask=r_mask, other=0) - start
    acc = tl.zeros((BLOCK_M, BLOCK_R, BLOCK_NZ), tl.float32)
    for i in range(0, tl.max(length, 0), BLOCK_NZ):
        ri = i + tl.arange(0, BLOCK_NZ)
        nz_mask = ri[None, :] < length[:, None]
        offs = start[:, None] + ri[None, :]
        cols = tl.load(col_ptr + offs, mask=nz_mask, other=0).to(tl.int32)
        v = tl.load(v_ptr + offs, mask=nz_mask, other=0)
        w = C.decode(v, rr[:, None], cols, nz_mask, s_ptr, stride_sn, book_ptr, stride_b, KIND, GROUP)
        x = tl.load(x_ptr + rm[:, None, None] * stride_xm + cols[None, :, :],
                    mask=m_mask[:, None, None] & nz_mask[None, :, :], other=0.0)
        acc += x.to(tl.float32) * w[None, :, :]
    out = tl.sum(acc, 2)
    if KIND == 1 and GROUP == 0:
        out *= tl.load(s_ptr + rr * stride_sn, mask=r_mask, other=0.0)[None, :]
    C.store_tile(out, rm, rr, M, N, out_ptr, b_ptr, 0, HAS_BIAS, 1)


_s24_gemv_tuned = C.tuned(_sparse24_gemv_kernel, S24_GEMV_CONFIGS, key=["N", "J", "KIND", "GROUP", "SPLIT_K"])
_s24_gemm_tuned = C.tuned(_sparse24_gemm_kernel, GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "KIND", "GROUP", "SPLIT_K"],
                          prune=prune_gemm)
_csr_tuned = C.tuned(_csr_kernel, CSR_CONFIGS, key=["M_BUCKET", "N", "KIND", "GROUP"], prune=prune_csr)


def value_args(scales: torch.Tensor | None, codebook: torch.Tensor | None, n: int):
    """Kernel arguments for the value side tensors: (kind, scales, stride, codebook, stride)."""
    kind = C.value_kind(scales, codebook)
    if scales is not None:
        if scales.dtype != torch.float32 or scales.dim() != 2 or scales.shape[0] != n:
            raise ValueError(f"scales must be float32 [{n}, G], got {scales.dtype} {tuple(scales.shape)}")
        scales = scales.contiguous()
    if codebook is not None:
        if codebook.dtype != torch.float32 or codebook.shape[0] not in (1, n):
            raise ValueError(f"codebook must be float32 [1 or {n}, E], got {codebook.dtype} {tuple(codebook.shape)}")
        codebook = codebook.contiguous()
    stride_s = scales.stride(0) if scales is not None else 0
    stride_b = codebook.stride(0) if codebook is not None and codebook.shape[0] > 1 else 0
    return kind, scales, stride_s, codebook, stride_b


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
                  split_k: int | None = None, config: triton.Config | None = None) -> torch.Tensor:
    """2:4 GEMV (one program per (row block, activation row); meant for M == 1).

    ``values`` ``[N, k/2]`` (floats, int8 with ``scales``, or indices into ``codebook``),
    ``positions`` int32 ``[N, ceil(k/32)]``; returns ``[..., N]`` in ``x.dtype``.
    """
    x2, values, positions = _prepare24(x, values, positions, k)
    m, n = x2.shape[0], values.shape[0]
    kind, scales, stride_s, codebook, stride_b = value_args(scales, codebook, n)
    pw = positions.shape[1]
    split = split_k or C.pick_split_k(x2, triton.cdiv(n, 8) * m, k)
    out, ws = C.new_output(m, n, split, x.dtype, x.device)
    if m and n:
        C.launch(
            _sparse24_gemv_kernel, _s24_gemv_tuned, lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), m, split),
            (x2, values, positions, scales, codebook, bias, ws, m, n, k // 2, pw,
             x2.stride(0), values.stride(0), positions.stride(0), stride_s, stride_b),
            config, S24_INTERP_GEMV, KIND=kind, GROUP=group_size, HAS_BIAS=bias is not None, SPLIT_K=split,
        )
        C.finish_split_k(out, ws, bias, split)
    return out.view(*x.shape[:-1], n)


def sparse24_gemm(x: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, scales: torch.Tensor | None,
                  codebook: torch.Tensor | None, bias: torch.Tensor | None, group_size: int, k: int,
                  split_k: int | None = None, config: triton.Config | None = None) -> torch.Tensor:
    """2:4 tiled ``tl.dot`` kernel for M > 1 (see :func:`sparse24_gemv` for arguments)."""
    x2, values, positions = _prepare24(x, values, positions, k)
    m, n = x2.shape[0], values.shape[0]
    kind, scales, stride_s, codebook, stride_b = value_args(scales, codebook, n)
    bucket = min(C.next_pow2(m), 256)
    split = split_k or C.pick_split_k(x2, triton.cdiv(n, 64) * triton.cdiv(m, min(max(bucket, 16), 64)), k)
    out, ws = C.new_output(m, n, split, x.dtype, x.device)
    if m and n:
        C.launch(
            _sparse24_gemm_kernel, _s24_gemm_tuned,
            lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), split),
            (x2, values, positions, scales, codebook, bias, ws, m, n, k,
             x2.stride(0), values.stride(0), positions.stride(0), stride_s, stride_b, bucket),
            config, INTERP_GEMM, KIND=kind, GROUP=group_size, HAS_BIAS=bias is not None, SPLIT_K=split,
            DOT_DTYPE=C.dot_dtype(x.dtype), PRECISION=C.dot_precision(x.dtype),
        )
        C.finish_split_k(out, ws, bias, split)
    return out.view(*x.shape[:-1], n)


def csr_matmul(x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor,
               scales: torch.Tensor | None, codebook: torch.Tensor | None, bias: torch.Tensor | None,
               group_size: int, k: int, config: triton.Config | None = None) -> torch.Tensor:
    """CSR kernel for any M (meant for small M).

    ``row_ptr`` int32 ``[N+1]``, ``col_idx`` int16/int32 ``[nnz]``, ``values`` ``[nnz]`` (floats,
    int8 with ``scales``, or indices into ``codebook``); returns ``[..., N]`` in ``x.dtype``.
    """
    if x.shape[-1] != k or col_idx.shape != values.shape or row_ptr.dtype != torch.int32:
        raise ValueError(f"CSR needs x [..., {k}], int32 row_ptr and col_idx/values of one length; got "
                         f"{tuple(x.shape)}, {row_ptr.dtype}, {tuple(col_idx.shape)}, {tuple(values.shape)}")
    x2 = C.as_2d(x)
    m, n = x2.shape[0], row_ptr.shape[0] - 1
    kind, scales, stride_s, codebook, stride_b = value_args(scales, codebook, n)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m and n:
        C.launch(
            _csr_kernel, _csr_tuned, lambda meta: (triton.cdiv(n, meta["BLOCK_R"]), triton.cdiv(m, meta["BLOCK_M"])),
            (x2, row_ptr.contiguous(), col_idx.contiguous(), values.contiguous(), scales, codebook, bias, out,
             m, n, x2.stride(0), stride_s, stride_b, C.next_pow2(m)),
            config, CSR_INTERP, KIND=kind, GROUP=group_size, HAS_BIAS=bias is not None,
        )
    return out.view(*x.shape[:-1], n)


def _decode64(values, rows, cols, scales, codebook, group_size):
    from torchzip.packed.values import decode_values

    return decode_values(values, rows, cols, None if scales is None else scales.double(),
                         None if codebook is None else codebook.double(), group_size).double()


def sparse24_reference(x, values, positions, scales, codebook, bias, group_size, k) -> torch.Tensor:
    """What the 2:4 kernels compute, in float64."""
    from torchzip.packed.bits import unpack_bits

    n = values.shape[0]
    cols = unpack_bits(positions, 2, k // 2) + 4 * (torch.arange(k // 2, device=x.device) // 2)
    rows = torch.arange(n, device=x.device).unsqueeze(1).expand_as(cols)
    w = torch.zeros(n, k, dtype=torch.float64, device=x.device).scatter_(1, cols, _decode64(values, rows, cols, scales, codebook, group_size))
    out = x.double() @ w.T
    return out if bias is None else out + bias.double()


def csr_reference(x, row_ptr, col_idx, values, scales, codebook, bias, group_size, k) -> torch.Tensor:
    """What the CSR kernel computes, in float64."""
    n = row_ptr.shape[0] - 1
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    rows, cols = torch.repeat_interleave(torch.arange(n, device=x.device), counts), col_idx.long()
    w = torch.zeros(n, k, dtype=torch.float64, device=x.device)
    w[rows, cols] = _decode64(values, rows, cols, scales, codebook, group_size)
    out = x.double() @ w.T
    return out if bias is None else out + bias.double()
