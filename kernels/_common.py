"""Pieces every kernel family shares: interpreter detection, dot dtypes, value decoding, split-K."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from torchzip.kernels import _interpret  # noqa: F401  (Triton 3.6 interpreter fix, see there)

# Value kinds of torchzip.packed.values, as kernel constexprs.
KIND_FLOAT, KIND_INT8, KIND_CODEBOOK = 0, 1, 2


# Weights are read once: streaming loads (``.cs``, evict first), which need no L2 policy register
# (ptxas rebuilds eviction_policy="evict_first"'s every iteration). Triton 3.6 has no ``.cs``
# loads: there the policy is used.
V38 = tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 8)
STREAM_CACHE = tl.constexpr(".cs" if V38 else "")
STREAM_EVICT = tl.constexpr("" if V38 else "evict_first")


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def value_kind(scales: torch.Tensor | None, codebook: torch.Tensor | None) -> int:
    """Kernel constexpr for the value kind (same rule as ``torchzip.packed.values.value_kind``)."""
    if codebook is not None:
        return KIND_CODEBOOK
    return KIND_INT8 if scales is not None else KIND_FLOAT


def dot_dtype(dtype: torch.dtype):
    """Triton dtype of ``tl.dot`` operands for activations of ``dtype``.

    The interpreter (triton 3.9) multiplies bf16 tiles as raw uint16 bit patterns, so there the
    dot runs in fp32 after the weight tile has been rounded to bf16; on a GPU it is bf16 as is.
    """
    if dtype == torch.float32:
        return tl.float32
    if dtype == torch.bfloat16:
        return tl.float32 if interpreting() else tl.bfloat16
    return tl.float16


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision: fp32 activations get 3xTF32 (about fp32 accuracy on tensor cores,
    like ``F.linear`` with TF32 off, the default; a plain-fp32 dot spills registers)."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (split-K aims to fill them)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def pick_split_k(x: torch.Tensor, programs: int, k: int, n: int, min_k_per_split: int = 512) -> int:
    """Split K when the grid would leave SMs idle: memory-bound kernels need every SM pulling.

    ``programs`` is the grid size without splitting, ``n`` the output width. Never split on the
    interpreter (nothing to fill), so far that a split gets fewer than ``min_k_per_split``
    columns, or so far that the ``[split, M, n]`` fp32 workspace needs 64-bit offsets.
    """
    if not x.is_cuda:
        return 1
    sms = num_sms(x.device.index if x.device.index is not None else torch.cuda.current_device())
    out_elems = x.shape[0] * n
    split = 1
    while (programs * split < 2 * sms and k // (2 * split) >= min_k_per_split and split < 16
           and 2 * split * out_elems < 2**31):
        split *= 2
    return split


def new_output(m: int, n: int, split_k: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, workspace)``: split-K kernels write fp32 partials to the workspace, others to out."""
    out = torch.empty(m, n, dtype=dtype, device=device)
    ws = torch.empty(split_k, m, n, dtype=torch.float32, device=device) if split_k > 1 else out
    return out, ws


def finish_split_k(out: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None, split_k: int) -> torch.Tensor:
    """Sum the split-K partials, add bias and cast, in one small kernel (deterministic, no atomics)."""
    if split_k == 1:
        return out
    m, n = out.shape
    block = 1024
    _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](
        ws, bias if bias is not None else out, out, m * n, n,
        SPLIT_K=split_k, HAS_BIAS=bias is not None, BLOCK=block,
    )
    return out


@triton.jit
def _splitk_reduce_kernel(ws_ptr, b_ptr, out_ptr, MN, N, SPLIT_K, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), tl.float32)
    for s in range(SPLIT_K):  # a runtime count: one compiled reducer serves every split
        acc += tl.load(ws_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def configs(names: tuple[str, str], rows: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """Autotune configs from ``(block_a, block_b, num_warps, num_stages)`` rows."""
    return [triton.Config(dict(zip(names, (a, b))), num_warps=w, num_stages=s) for a, b, w, s in rows]


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of this program in grouped order: neighbouring programs share weight
    columns, so those stay in L2."""
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(grid_m - first_m, GROUP_M)
    return first_m + (pid % width) % rows, (pid % width) // rows


@triton.jit
def gemm_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``(rm, rn)``: the output rows and columns of this GEMM program (grouped order)."""
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def k_range(K, SPLIT_K, BLOCK_K: tl.constexpr):
    """``[k_lo, k_hi)``: this program's share of the reduction when it is split ``SPLIT_K`` ways."""
    span = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_lo = tl.program_id(1) * span
    return k_lo, tl.minimum(k_lo + span, K)


@triton.jit
def store_tile(acc, rm, rn, M, N, out_ptr, b_ptr, pid_k, HAS_BIAS: tl.constexpr, SPLIT_K):
    """Write an fp32 ``[BLOCK_M, BLOCK_N]`` tile of a contiguous ``[M, N]`` output.

    Unsplit: add bias, cast to the output dtype. Split-K: store fp32 partials at slice ``pid_k``
    of the ``[SPLIT_K, M, N]`` workspace (``out_ptr``); :func:`finish_split_k` adds bias.
    """
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    offs = rm[:, None] * N + rn[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + pid_k * M * N + offs, acc, mask=mask)


@triton.jit
def decode(v, rows, cols, mask, s_ptr, stride_s, book_ptr, stride_b, KIND: tl.constexpr, GROUP: tl.constexpr):
    """Stored values -> fp32 weights (rules of ``torchzip.packed.values.decode_values``).

    Per-channel int8 scales (``GROUP == 0``) are left out: the caller applies them once per row
    to the accumulator, which saves a multiply and a load per weight. A per-layer codebook has
    ``stride_b == 0``.
    """
    if KIND == 2:
        w = tl.load(book_ptr + rows * stride_b + v.to(tl.int32), mask=mask, other=0.0)
    elif KIND == 1 and GROUP > 0:
        w = v.to(tl.float32) * tl.load(s_ptr + rows * stride_s + cols // GROUP, mask=mask, other=0.0)
    else:
        w = v.to(tl.float32)
    return w


def as_2d(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[M, K]`` with unit stride along K (kernels index rows by ``stride(0)``)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def config_kwargs(config: triton.Config) -> dict:
    """Launch keyword arguments (meta-parameters, num_warps, num_stages, maxnreg if set) of a ``triton.Config``."""
    cap = {"maxnreg": config.maxnreg} if getattr(config, "maxnreg", None) else {}
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages, **cap}


def tuned(kernel, configs: list[triton.Config], key: list[str], prune=None):
    """``triton.autotune`` over ``configs`` on a GPU; None on the interpreter (it cannot time).

    Results are cached on disk (Triton's cache directory, keyed by kernel source, key values and
    device), so a new process reuses them instead of timing every config again.
    """
    if interpreting():
        return None
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune} if prune else None,
                           cache_results=True)(kernel)


def launch(kernel, autotuned, grid, args: tuple, config: triton.Config | None, default: triton.Config, **constexprs):
    """Run ``kernel`` with an explicit config, else its autotuner (GPU), else ``default``.

    ``grid`` takes the meta-parameter dict, as Triton grids do.
    """
    if config is None and autotuned is not None:
        return autotuned[grid](*args, **constexprs)
    cfg = config or default
    return kernel[grid(cfg.kwargs)](*args, **constexprs, **config_kwargs(cfg))


# ---- launch configurations every tl.dot kernel shares ------------------------------------------

# GEMM: small tiles along M for skinny activations, large square tiles for prefill-sized M.
GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (16, 64, 256, 4, 3), (16, 128, 128, 4, 4),
        (32, 64, 128, 4, 4), (32, 128, 128, 4, 3),
        (64, 64, 128, 4, 4), (64, 128, 64, 4, 4), (64, 128, 128, 8, 3),
        (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
    ]
]
# The interpreter runs programs one after another in Python: few, mid-sized blocks are fastest
# there, and they still leave ragged edges in the test shapes.
INTERP_GEMM = triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 4})


def prune_gemm(configs, named_args, **kwargs):
    """Keep tiles whose BLOCK_M fits the M bucket, so tuning only tries sensible shapes."""
    bucket = named_args["M_BUCKET"]
    if bucket <= 64:
        keep = [c for c in configs if c.kwargs["BLOCK_M"] == max(16, bucket)]
    else:
        keep = [c for c in configs if c.kwargs["BLOCK_M"] >= 64]
    return keep or configs[:1]

def value_args(scales: torch.Tensor | None, codebook: torch.Tensor | None, n: int):
    """Kernel arguments for the value side tensors: (kind, scales, stride, codebook, stride)."""
    kind = value_kind(scales, codebook)
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


# Dequantize kernels write streaming [DQ_BLOCK_N, DQ_BLOCK_K] tiles: 8K outputs a program (16 KiB
# of bf16) keeps thousands of programs in flight.
DQ_BLOCK_N, DQ_BLOCK_K, DQ_WARPS = 32, 256, 4


def dq_grid(n: int, k: int) -> tuple[int, int]:
    """Grid of a dequantize kernel over an ``[n, k]`` output."""
    return triton.cdiv(n, DQ_BLOCK_N), triton.cdiv(k, DQ_BLOCK_K)


def decode_values64(values, rows, cols, scales, codebook, group_size):
    """Stored values as float64 weights (the references' ``torchzip.packed.values.decode_values``)."""
    from torchzip.packed.values import decode_values

    return decode_values(values, rows, cols, None if scales is None else scales.double(),
                         None if codebook is None else codebook.double(), group_size).double()
