"""Standalone dequantize kernels: packed weight -> dense ``[N, K]`` in a float dtype.

For large M, dequantize + ``F.linear`` (cuBLAS) beats a fused kernel: the dense copy costs one
pass over the weight, amortised over many activation rows. Each kernel writes a
``[BLOCK_N, BLOCK_K]`` output tile per program (CSR: scatters a few rows per program).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from torchzip.kernels import _common as C
from torchzip.kernels.codebook_matmul import codebook_tile
from torchzip.kernels.sparse_matmul import sparse24_tile, value_args

# Streaming writes: 8K outputs a program (16 KiB of bf16) keeps thousands of programs in flight.
BLOCK_N, BLOCK_K, NUM_WARPS = 32, 256, 4
CSR_BLOCK_R, CSR_BLOCK_NZ = 4, 128


def _grid(n: int, k: int) -> tuple[int, int]:
    return triton.cdiv(n, BLOCK_N), triton.cdiv(k, BLOCK_K)


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


@triton.jit
def _codebook_dequant_kernel(p_ptr, book_ptr, out_ptr, N, K, stride_pn, stride_b, BITS: tl.constexpr,
                             PER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    mask = (rn < N) & (rk < K)
    w = codebook_tile(p_ptr, book_ptr, rn, rk, mask, stride_pn, stride_b, BITS, PER)
    tl.store(out_ptr + rn * K + rk, w.to(out_ptr.dtype.element_ty), mask=mask)


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


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Dense ``qweight * scales`` (per channel: ``group_size`` 0) as ``[N, K]`` in ``dtype``."""
    n, k = qweight.shape
    qweight, scales = qweight.contiguous(), scales.contiguous()
    out = torch.empty(n, k, dtype=dtype, device=qweight.device)
    if out.numel():
        _int8_dequant_kernel[_grid(n, k)](qweight, scales, out, n, k, qweight.stride(0), scales.stride(0),
                                          GROUP=group_size, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS)
    return out


def dequantize_codebook(packed: torch.Tensor, codebook: torch.Tensor, bits: int, k: int,
                        dtype: torch.dtype) -> torch.Tensor:
    """Dense ``codebook[n or 0, index[n, j]]`` as ``[N, k]`` in ``dtype``."""
    n = packed.shape[0]
    packed, codebook = packed.contiguous(), codebook.contiguous()
    stride_b = codebook.stride(0) if codebook.shape[0] > 1 else 0
    out = torch.empty(n, k, dtype=dtype, device=packed.device)
    if out.numel():
        _codebook_dequant_kernel[_grid(n, k)](packed, codebook, out, n, k, packed.stride(0), stride_b,
                                              BITS=bits, PER=32 // bits, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                                              num_warps=NUM_WARPS)
    return out


def dequantize_sparse24(values: torch.Tensor, positions: torch.Tensor, scales: torch.Tensor | None,
                        codebook: torch.Tensor | None, group_size: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Dense ``[N, k]`` weight (zeros included) of a 2:4 weight, in ``dtype``."""
    n = values.shape[0]
    values, positions = values.contiguous(), positions.contiguous()
    kind, scales, stride_s, codebook, stride_b = value_args(scales, codebook, n)
    out = torch.empty(n, k, dtype=dtype, device=values.device)
    if out.numel():
        _sparse24_dequant_kernel[_grid(n, k)](
            values, positions, scales, codebook, out, n, k, values.stride(0), positions.stride(0), stride_s, stride_b,
            KIND=kind, GROUP=group_size, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS,
        )
    return out


def dequantize_csr(row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor, scales: torch.Tensor | None,
                   codebook: torch.Tensor | None, group_size: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Dense ``[N, k]`` weight of a CSR weight, in ``dtype`` (zero fill, then one scatter pass)."""
    n = row_ptr.shape[0] - 1
    kind, scales, stride_s, codebook, stride_b = value_args(scales, codebook, n)
    out = torch.zeros(n, k, dtype=dtype, device=values.device)
    if n and values.numel():
        _csr_dequant_kernel[(triton.cdiv(n, CSR_BLOCK_R),)](
            row_ptr.contiguous(), col_idx.contiguous(), values.contiguous(), scales, codebook, out, n, k,
            stride_s, stride_b, KIND=kind, GROUP=group_size, BLOCK_R=CSR_BLOCK_R, BLOCK_NZ=CSR_BLOCK_NZ,
            num_warps=NUM_WARPS,
        )
    return out
