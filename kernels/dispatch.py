"""When the Triton kernels run, and the dispatch rules every format's kernel file follows.

A packed format asks :func:`use_kernels` and then calls its kernel file's linear (e.g.
``torchzip.kernels.int8.int8_linear``). Each is one custom op (``torch.ops.torchzip.*``, with a
fake implementation for tracing), so a compiled model holds a single opaque node per layer and no
graph break. Inside the op the activation row count M (all leading dims flattened) picks the path:

- ``M <= GEMV_MAX_M``: the GEMV kernel (weight streamed once, reduction in registers);
- ``M < DENSE_MIN_M[format]``: the fused tiled kernel (``tl.dot``; CSR: its gather kernel);
- otherwise: the format's Triton dequantize kernel + ``F.linear`` (cuBLAS), which wins once the
  one pass that writes the dense weight is amortised over many rows.

Kernels run when the input is on CUDA and Triton imports (Linux), for fp16/bf16/fp32 inputs that
need no gradient (the ops have no backward). ``TORCHZIP_KERNELS=0`` turns them off;
``TORCHZIP_KERNELS=1`` or :func:`force_kernels` also runs them on CPU tensors, which only works
under Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton is imported). Weights of
2**31 or more elements run in row chunks (the kernels use int32 offsets).

Fast paths that rest on hardware assumptions no interpreter can confirm (fp16/bf16 subnormals
fed unflushed to tensor cores, fp32 subnormal FMAs, byte permutes and warp shuffles in inline
PTX) each check themselves once per (CUDA device, path, dtype), see :func:`fast_path_ok`: the
first launch runs the kernel on a tiny input with an exact answer; if it disagrees, a
:class:`FastPathFallbackWarning` is issued once and that path hands over to its exact fallback
for the rest of the process. ``TORCHZIP_GPU_FAST_PATHS=0`` takes the fallbacks without checking.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton  # noqa: F401

    HAS_TRITON = sys.platform.startswith("linux")
except ImportError:  # pragma: no cover - depends on the platform
    HAS_TRITON = False

if HAS_TRITON:
    from torchzip.kernels import _common

    _INTERPRET = _common.interpreting()
else:  # pragma: no cover
    _INTERPRET = False

# Largest M that takes the GEMV kernel. From M = 2 on, one tl.dot tile (BLOCK_M >= 16) reads the
# weight once for all rows, where the GEMV would read it once per row.
GEMV_MAX_M = 1
# M from which dequantize + cuBLAS replaces the fused kernel, per format: each kernel file adds its
# own entry (first guesses for H100: int8 and codebook GEMMs convert in registers and stay ahead of
# a dequantize pass longer than 2:4, which has no FLOP saving, or CSR, whose gathers scale with M);
# `benchmarks/gpu_check.py` prints the measured crossover to set them from.
DENSE_MIN_M: dict[str, int] = {}

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


# Kernels index weights, activations, outputs and split-K workspaces with int32 offsets: weights of
# 2**31 or more elements (a 256k-vocab x 8192 LM head) run in row chunks below that size, and so do
# activations whose [M, K] input or [M, N] output would pass it (split-K workspaces are kept under
# it by _common.pick_split_k).
MAX_KERNEL_ELEMENTS = 2**31 - 1


def row_chunks(n: int, k: int) -> list[slice]:
    step = max(1, MAX_KERNEL_ELEMENTS // max(k, 1))
    return [slice(start, min(start + step, n)) for start in range(0, n, step)]


def activation_chunks(m: int, n: int, k: int) -> list[slice]:
    """Row ranges of a ``[m, k]`` activation whose input and ``[m, n]`` output stay int32-indexable."""
    step = max(1, MAX_KERNEL_ELEMENTS // max(k, n, 1))
    return [slice(start, min(start + step, m)) for start in range(0, max(m, 1), step)]


@contextlib.contextmanager
def on_device(x: Tensor) -> Iterator[None]:
    """Launch on ``x``'s GPU (Triton launches on the current device, which may be another one)."""
    if x.is_cuda:
        with torch.cuda.device(x.device):
            yield
    else:
        yield


def part(a, n: int, rows: slice):
    """Rows ``rows`` of a tensor with ``n`` rows (weight parts, bias, per-channel scales or
    codebooks); anything else (a per-layer codebook, ints, None) whole."""
    return a[rows] if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == n else a


def by_rows(impl, n: int, k: int, x: Tensor, *args):
    """``impl(x, *args)`` on ``x``'s device, in weight-row and activation-row chunks where the
    weight, the activations or the output are too big for int32 offsets."""
    with on_device(x):
        x2 = x.reshape(-1, x.shape[-1])
        pieces = activation_chunks(x2.shape[0], n, k)
        if len(pieces) > 1:
            out = torch.cat([_by_weight_rows(impl, n, k, x2[rows], args) for rows in pieces], dim=0)
            return out.view(*x.shape[:-1], n)
        return _by_weight_rows(impl, n, k, x, args)


def _by_weight_rows(impl, n: int, k: int, x: Tensor, args: tuple):
    chunks = row_chunks(n, k)
    if len(chunks) == 1:
        return impl(x, *args)
    return torch.cat([impl(x, *(part(a, n, rows) for a in args)) for rows in chunks], dim=-1)


def rows_of(x: Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("torchzip kernels need Triton on Linux; use the torch path (PackedWeight.linear)")


def dense(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def out_like(x: Tensor, n) -> Tensor:
    return x.new_empty((*x.shape[:-1], n))


def pick_path(fmt: str, x: Tensor) -> str:
    """``"gemv"``, ``"fused"`` or ``"dense"`` (dequantize + ``F.linear``) for an op of format
    ``fmt`` on activations ``x`` (see the module doc)."""
    m = rows_of(x)
    if m >= DENSE_MIN_M[fmt]:
        return "dense"
    return "gemv" if m <= GEMV_MAX_M else "fused"


# ---- self-checked fast paths -------------------------------------------------------------------
class FastPathFallbackWarning(RuntimeWarning):
    """A GPU fast path disagreed with torch on its known-answer input; its exact fallback runs."""


def _fast_env() -> bool:
    """``TORCHZIP_GPU_FAST_PATHS`` (read once at import): False forces every checked path's fallback."""
    return os.environ.get("TORCHZIP_GPU_FAST_PATHS", "1").strip().lower() not in ("0", "false", "off", "no")


_fast_enabled: bool = _fast_env()
# (path, device index, dtype) -> passed. Filled once per key; afterwards a lookup is all it costs.
fast_checks: dict[tuple[str, int, torch.dtype], bool] = {}
_fast_lock = threading.Lock()


def fast_path_ok(path: str, x: Tensor, check: Callable[[torch.device, torch.dtype], bool], fallback: str) -> bool:
    """Whether fast path ``path`` may run on ``x``'s device for ``x.dtype``.

    ``check(device, dtype)`` runs the path's kernel on a tiny known-answer input and returns
    whether it matched exactly; it runs on the first call per (device, path, dtype), eagerly. On
    CPU (the interpreter computes the fast paths' values without their PTX) it is always True.
    Inside a CUDA graph capture a path not yet checked is not taken (a check syncs, which capture
    forbids) and nothing is recorded, so the captured graph holds the exact fallback and the
    next eager call checks; torch.compile traces the ops' fake implementations, so only real
    (eager or warm-up) calls get here.
    """
    device = _gpu_of(x)
    if device is None:
        return True
    if not _fast_enabled:
        return False
    key = (path, device, x.dtype)
    ok = fast_checks.get(key)
    if ok is not None:
        return ok
    if _capturing():
        return False
    with _fast_lock:
        ok = fast_checks.get(key)
        if ok is None:
            try:
                with _on_gpu(device), torch.device("cpu"):  # the probes are built on CPU, whatever the default
                    ok = bool(check(torch.device("cuda", device), x.dtype))
                why = "its output differs from torch's"
            except Exception as e:  # noqa: BLE001 - a path that cannot run is as unusable as a wrong one
                ok, why = False, f"it raised {type(e).__name__}: {e}"
            if not ok:
                warnings.warn(f"torchzip: the {path} kernel failed its self-check on cuda:{device} for {x.dtype} "
                              f"({why}); using the slower exact path ({fallback}) instead",
                              FastPathFallbackWarning, stacklevel=2)
            fast_checks[key] = ok
    return ok


def _gpu_of(x: Tensor) -> int | None:
    """CUDA device index of ``x``, None off CUDA (the tests stand a CPU tensor in for a GPU's)."""
    if not x.is_cuda:
        return None
    return x.device.index if x.device.index is not None else torch.cuda.current_device()


def _capturing() -> bool:
    return torch.cuda.is_current_stream_capturing()


def _on_gpu(device: int):
    return torch.cuda.device(device)


def fast_path_report() -> dict[str, bool]:
    """``{"path cuda:i dtype": passed}`` for every self-check run so far (benchmarks/gpu_check.py)."""
    return {f"{p} cuda:{d} {str(t).removeprefix('torch.')}": ok for (p, d, t), ok in sorted(fast_checks.items(), key=str)}


def balanced_signs(up: Tensor, down: Tensor, mult: Tensor, target: Tensor | None = None) -> Tensor:
    """Known-answer inputs: per element ``up[n, j] >= 0`` or ``down[n, j] <= 0``, picked column by
    column so each row's running sum of ``value * mult`` heads for ``target[n]`` (default 0). Then
    ``|sum - target| <= max(|target|, max |value * mult|)``, so a sum of small integers stays exact
    in a narrow float format.

    ``mult`` ``[N, K]``; returns a bool ``[N, K]``: True where ``up`` is taken.
    """
    mult = mult.double()
    up_steps, down_steps = up.double() * mult, down.double() * mult
    take = torch.zeros(up.shape, dtype=torch.bool)
    run = torch.zeros(up.shape[0], dtype=torch.float64) if target is None else -target.double()
    for j in range(up.shape[1]):
        t = (run * up_steps[:, j]) <= 0  # up does not move away from 0 (down then would)
        take[:, j] = t
        run += torch.where(t, up_steps[:, j], down_steps[:, j])
    return take
