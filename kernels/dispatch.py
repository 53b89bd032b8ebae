"""Which kernel computes a packed linear, behind ``torch.library`` ops that ``torch.compile`` sees whole.

``torchzip.packed`` asks :func:`use_kernels` and then calls :func:`int8_linear`,
:func:`codebook_linear`, :func:`sparse24_linear` or :func:`csr_linear`. Each is one custom op
(``torch.ops.torchzip.*``, with a fake implementation for tracing), so a compiled model holds a
single opaque node per layer and no graph break. Inside the op the activation row count M
(all leading dims flattened) picks the path:

- ``M <= GEMV_MAX_M``: the GEMV kernel (weight streamed once, reduction in registers);
- ``M < DENSE_MIN_M[format]``: the fused tiled kernel (``tl.dot``; CSR: its gather kernel);
- otherwise: the format's Triton dequantize kernel + ``F.linear`` (cuBLAS), which wins once the
  one pass that writes the dense weight is amortised over many rows.

Kernels run when the input is on CUDA and Triton imports (Linux), for fp16/bf16/fp32 inputs that
need no gradient (the ops have no backward). ``TORCHZIP_KERNELS=0`` turns them off;
``TORCHZIP_KERNELS=1`` or :func:`force_kernels` also runs them on CPU tensors, which only works
under Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton is imported). Weights of
2**31 or more elements run in row chunks (the kernels use int32 offsets).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton  # noqa: F401

    HAS_TRITON = sys.platform.startswith("linux")
except ImportError:  # pragma: no cover - depends on the platform
    HAS_TRITON = False

if HAS_TRITON:
    from torchzip.kernels import _common, codebook_matmul, dequantize, int8_matmul, sparse_matmul

    _INTERPRET = _common.interpreting()
else:  # pragma: no cover
    _INTERPRET = False

# Largest M that takes the GEMV kernel. From M = 2 on, one tl.dot tile (BLOCK_M >= 16) reads the
# weight once for all rows, where the GEMV would read it once per row.
GEMV_MAX_M = 1
# M from which dequantize + cuBLAS replaces the fused kernel, per format. First guesses for H100
# (int8 and codebook GEMMs convert in registers and stay ahead of a dequantize pass longer than
# 2:4, which has no FLOP saving, or CSR, whose gathers scale with M); `benchmarks/kernels.py`
# prints the measured crossover to set them from.
DENSE_MIN_M = {"int8": 512, "codebook": 512, "sparse24": 256, "csr": 32}

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _env_setting() -> bool | None:
    value = os.environ.get("TORCHZIP_KERNELS", "").strip().lower()
    if value in ("1", "true", "on", "yes"):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    return None


# None: kernels on CUDA only. True: also on CPU under the interpreter. False: never.
_forced: bool | None = _env_setting()


def use_kernels(x: Tensor) -> bool:
    """Whether a packed linear on ``x`` should run the Triton kernels (see module doc)."""
    if not HAS_TRITON or _forced is False or x.dtype not in _KERNEL_DTYPES:
        return False
    if x.requires_grad and torch.is_grad_enabled():
        return False  # the ops have no backward; the torch path differentiates through dequantize
    if x.is_cuda:
        return True
    return bool(_forced) and _INTERPRET and x.device.type == "cpu"


@contextlib.contextmanager
def force_kernels(enabled: bool = True) -> Iterator[None]:
    """Within the block, force the kernels on (``True``: also for CPU tensors under the
    interpreter) or off (``False``), whatever ``TORCHZIP_KERNELS`` says."""
    global _forced
    before, _forced = _forced, enabled
    try:
        yield
    finally:
        _forced = before


# Kernels index weights with int32 offsets: weights of 2**31 or more elements (a 256k-vocab x 8192
# LM head) are run in row chunks below that size.
MAX_KERNEL_ELEMENTS = 2**31 - 1


def _row_chunks(n: int, k: int) -> list[slice]:
    step = max(1, MAX_KERNEL_ELEMENTS // max(k, 1))
    return [slice(start, min(start + step, n)) for start in range(0, n, step)]


def _part(a, n: int, rows: slice):
    """Rows ``rows`` of a tensor with ``n`` rows (weight parts, bias, per-channel scales or
    codebooks); anything else (a per-layer codebook, ints, None) whole."""
    return a[rows] if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == n else a


def _by_rows(impl, n: int, k: int, x: Tensor, *args):
    """``impl(x, *args)``, concatenated over row chunks when the weight is too big for int32 offsets."""
    chunks = _row_chunks(n, k)
    if len(chunks) == 1:
        return impl(x, *args)
    return torch.cat([impl(x, *(_part(a, n, rows) for a in args)) for rows in chunks], dim=-1)


def _rows(x: Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("torchzip kernels need Triton on Linux; use the torch path (PackedWeight.linear)")


def _dense(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def _out_like(x: Tensor, n) -> Tensor:
    return x.new_empty((*x.shape[:-1], n))


# ---- int8 --------------------------------------------------------------------------------------

@torch.library.custom_op("torchzip::int8_linear", mutates_args=())
def _int8_linear(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None, group_size: int) -> Tensor:
    _require_triton()
    return _by_rows(_int8_impl, qweight.shape[0], qweight.shape[1], x, qweight, scales, bias, group_size)


def _int8_impl(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None, group_size: int) -> Tensor:
    m = _rows(x)
    if m >= DENSE_MIN_M["int8"]:
        return _dense(x, dequantize.dequantize_int8(qweight, scales, group_size, x.dtype), bias)
    kernel = int8_matmul.int8_gemv if m <= GEMV_MAX_M else int8_matmul.int8_gemm
    return kernel(x, qweight, scales, bias, group_size)


@_int8_linear.register_fake
def _(x, qweight, scales, bias, group_size):
    return _out_like(x, qweight.shape[0])


def int8_linear(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None, group_size: int) -> Tensor:
    """``x @ (qweight * scales).T + bias`` in ``x.dtype``.

    ``x`` ``[..., K]`` fp16/bf16/fp32, ``qweight`` int8 ``[N, K]``, ``scales`` fp32 ``[N, G]``
    (``G == 1`` and ``group_size == 0`` per channel, else ``K // group_size``), ``bias`` ``[N]``.
    """
    return torch.ops.torchzip.int8_linear(x, qweight, scales, bias, int(group_size))


# ---- codebook ----------------------------------------------------------------------------------

@torch.library.custom_op("torchzip::codebook_linear", mutates_args=())
def _codebook_linear(x: Tensor, packed: Tensor, codebook: Tensor, bias: Tensor | None, bits: int, k: int) -> Tensor:
    _require_triton()
    return _by_rows(_codebook_impl, packed.shape[0], k, x, packed, codebook, bias, bits, k)


def _codebook_impl(x: Tensor, packed: Tensor, codebook: Tensor, bias: Tensor | None, bits: int, k: int) -> Tensor:
    m = _rows(x)
    if m >= DENSE_MIN_M["codebook"]:
        return _dense(x, dequantize.dequantize_codebook(packed, codebook, bits, k, x.dtype), bias)
    kernel = codebook_matmul.codebook_gemv if m <= GEMV_MAX_M else codebook_matmul.codebook_gemm
    return kernel(x, packed, codebook, bias, bits, k)


@_codebook_linear.register_fake
def _(x, packed, codebook, bias, bits, k):
    return _out_like(x, packed.shape[0])


def codebook_linear(x: Tensor, packed: Tensor, codebook: Tensor, bias: Tensor | None, bits: int, k: int) -> Tensor:
    """``x @ W.T + bias`` with ``W[n, j] = codebook[n or 0, index[n, j]]``.

    ``packed`` int32 ``[N, ceil(k / (32 // bits))]`` holds the ``bits``-wide indices (see
    ``torchzip.packed.bits``), ``codebook`` fp32 ``[N or 1, 2**bits]``; ``bits`` in 1..16.
    """
    return torch.ops.torchzip.codebook_linear(x, packed, codebook, bias, int(bits), int(k))


# ---- 2:4 sparse --------------------------------------------------------------------------------

@torch.library.custom_op("torchzip::sparse24_linear", mutates_args=())
def _sparse24_linear(x: Tensor, values: Tensor, positions: Tensor, scales: Tensor | None, codebook: Tensor | None,
                     bias: Tensor | None, group_size: int, k: int) -> Tensor:
    _require_triton()
    return _by_rows(_sparse24_impl, values.shape[0], k, x, values, positions, scales, codebook, bias, group_size, k)


def _sparse24_impl(x: Tensor, values: Tensor, positions: Tensor, scales: Tensor | None, codebook: Tensor | None,
                   bias: Tensor | None, group_size: int, k: int) -> Tensor:
    m = _rows(x)
    if m >= DENSE_MIN_M["sparse24"]:
        w = dequantize.dequantize_sparse24(values, positions, scales, codebook, group_size, k, x.dtype)
        return _dense(x, w, bias)
    kernel = sparse_matmul.sparse24_gemv if m <= GEMV_MAX_M else sparse_matmul.sparse24_gemm
    return kernel(x, values, positions, scales, codebook, bias, group_size, k)


@_sparse24_linear.register_fake
def _(x, values, positions, scales, codebook, bias, group_size, k):
    return _out_like(x, values.shape[0])


def sparse24_linear(x: Tensor, values: Tensor, positions: Tensor, scales: Tensor | None, codebook: Tensor | None,
                    bias: Tensor | None, group_size: int, k: int) -> Tensor:
    """``x @ W.T + bias`` for a 2:4 weight (``torchzip.packed.sparse24`` layout).

    ``values`` ``[N, k/2]``: floats, int8 (with ``scales`` ``[N, G]``) or codebook indices (with
    ``codebook`` ``[N or 1, E]``); ``positions`` int32 ``[N, ceil(k/32)]``, 2-bit packed.
    """
    return torch.ops.torchzip.sparse24_linear(x, values, positions, scales, codebook, bias, int(group_size), int(k))


# ---- CSR ---------------------------------------------------------------------------------------

@torch.library.custom_op("torchzip::csr_linear", mutates_args=())
def _csr_linear(x: Tensor, row_ptr: Tensor, col_idx: Tensor, values: Tensor, scales: Tensor | None,
                codebook: Tensor | None, bias: Tensor | None, group_size: int, k: int) -> Tensor:
    _require_triton()
    if _rows(x) < DENSE_MIN_M["csr"]:
        return sparse_matmul.csr_matmul(x, row_ptr, col_idx, values, scales, codebook, bias, group_size, k)
    n, outs = row_ptr.shape[0] - 1, []
    for rows in _row_chunks(n, k):  # row_ptr holds absolute offsets: a slice of it is a CSR of those rows
        part = [_part(a, n, rows) for a in (scales, codebook, bias)]
        w = dequantize.dequantize_csr(row_ptr[rows.start: rows.stop + 1], col_idx, values, *part[:2], group_size, k,
                                      x.dtype)
        outs.append(_dense(x, w, part[2]))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


@_csr_linear.register_fake
def _(x, row_ptr, col_idx, values, scales, codebook, bias, group_size, k):
    return _out_like(x, row_ptr.shape[0] - 1)


def csr_linear(x: Tensor, row_ptr: Tensor, col_idx: Tensor, values: Tensor, scales: Tensor | None,
               codebook: Tensor | None, bias: Tensor | None, group_size: int, k: int) -> Tensor:
    """``x @ W.T + bias`` for a CSR weight (``torchzip.packed.csr`` layout).

    ``row_ptr`` int32 ``[N+1]``, ``col_idx`` int16/int32 ``[nnz]``, ``values`` ``[nnz]``: floats,
    int8 (with ``scales`` ``[N, G]``) or codebook indices (with ``codebook`` ``[N or 1, E]``).
    """
    return torch.ops.torchzip.csr_linear(x, row_ptr, col_idx, values, scales, codebook, bias, int(group_size), int(k))


# ---- dequantize --------------------------------------------------------------------------------

@torch.library.custom_op("torchzip::dequantize_int8", mutates_args=())
def _dequantize_int8(qweight: Tensor, scales: Tensor, group_size: int, dtype: torch.dtype) -> Tensor:
    _require_triton()
    return dequantize.dequantize_int8(qweight, scales, group_size, dtype)


@_dequantize_int8.register_fake
def _(qweight, scales, group_size, dtype):
    return qweight.new_empty(qweight.shape, dtype=dtype)


def dequantize_int8(qweight: Tensor, scales: Tensor, group_size: int, dtype: torch.dtype) -> Tensor:
    """Dense ``[N, K]`` weight ``qweight * scales`` in ``dtype`` (Triton kernel)."""
    return torch.ops.torchzip.dequantize_int8(qweight, scales, int(group_size), dtype)


@torch.library.custom_op("torchzip::dequantize_codebook", mutates_args=())
def _dequantize_codebook(packed: Tensor, codebook: Tensor, bits: int, k: int, dtype: torch.dtype) -> Tensor:
    _require_triton()
    return dequantize.dequantize_codebook(packed, codebook, bits, k, dtype)


@_dequantize_codebook.register_fake
def _(packed, codebook, bits, k, dtype):
    return packed.new_empty((packed.shape[0], k), dtype=dtype)


def dequantize_codebook(packed: Tensor, codebook: Tensor, bits: int, k: int, dtype: torch.dtype) -> Tensor:
    """Dense ``[N, k]`` codebook weight in ``dtype`` (Triton kernel)."""
    return torch.ops.torchzip.dequantize_codebook(packed, codebook, int(bits), int(k), dtype)


def dequantize_sparse24(values: Tensor, positions: Tensor, scales: Tensor | None, codebook: Tensor | None,
                        group_size: int, k: int, dtype: torch.dtype) -> Tensor:
    """Dense ``[N, k]`` weight of a 2:4 weight in ``dtype`` (Triton kernel)."""
    _require_triton()
    return dequantize.dequantize_sparse24(values, positions, scales, codebook, int(group_size), int(k), dtype)


def dequantize_csr(row_ptr: Tensor, col_idx: Tensor, values: Tensor, scales: Tensor | None, codebook: Tensor | None,
                   group_size: int, k: int, dtype: torch.dtype) -> Tensor:
    """Dense ``[N, k]`` weight of a CSR weight in ``dtype`` (Triton kernel)."""
    _require_triton()
    return dequantize.dequantize_csr(row_ptr, col_idx, values, scales, codebook, int(group_size), int(k), dtype)
