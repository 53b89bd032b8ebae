"""Benchmark torchzip's Triton kernels against cuBLAS bf16 (and PyTorch's 2:4 sparse) on one CUDA GPU.

    python benchmarks/kernels.py            # all shapes, M in {1, 16, 64, 256, 2048}
    python benchmarks/kernels.py --quick    # one shape, three M values, short timings

For each weight shape (N x K) and activation row count M it times, as medians:
``bf16`` F.linear (cuBLAS), PyTorch's semi-structured 2:4 sparse F.linear, and for every torchzip
format the dispatched op (what ``PackedLinear`` runs), the fused kernel alone, and the format's
dequantize kernel + cuBLAS. Small M is timed inside CUDA graphs (launch overhead would otherwise
dominate); several copies of every weight are rotated so that L2 never holds the one being read.
It prints speedups over bf16, achieved GB/s against a measured device-to-device copy, the
dispatched path against dequantize + cuBLAS, and the M where dequantize + cuBLAS starts to win
(the value for ``torchzip.kernels.dispatch.DENSE_MIN_M``); it writes everything to
``benchmarks/results/kernels-<device>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import triton
import triton.testing

from torchzip.kernels import _common, codebook, csr, dispatch, int8, sparse24
from torchzip.packed import CodebookWeight, CsrWeight, Int8Weight, PackedWeight, Sparse24Weight
from torchzip.packed.values import int8_quantize

REPO = Path(__file__).resolve().parents[1]
DEVICE = "cuda"  # a dry run of the script's logic can point this at "cpu" under TRITON_INTERPRET=1
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192)]
M_VALUES = [1, 16, 64, 256, 2048]
QUICK_SHAPES, QUICK_M = [(4096, 4096)], [1, 16, 256]
CUDAGRAPH_MAX_M = 64  # at and below this, host launch overhead is comparable to the kernel
# Speedup over bf16 cuBLAS wanted at M = 1 (H100), and the floor for dispatched / dequant+cuBLAS.
TARGETS_M1 = {"int8": 1.8, "codebook4": 3.2, "sparse24-bf16": 1.5, "csr90-int8": 3.0}
MIN_VS_DEQUANT = 0.9


# ---- formats -----------------------------------------------------------------------------------

def _mask24(n: int, k: int, device) -> torch.Tensor:
    keep = torch.rand(n, k // 4, 4, device=device).argsort(-1)[..., :2]
    return torch.zeros(n, k // 4, 4, dtype=torch.bool, device=device).scatter_(2, keep, True).view(n, k)


def _build_int8(w: torch.Tensor) -> PackedWeight:
    return Int8Weight.from_float(w, 0)


def _build_codebook4(w: torch.Tensor) -> PackedWeight:
    n, k = w.shape
    idx = torch.randint(0, 16, (n, k), device=w.device)
    return CodebookWeight.from_indices(idx, torch.randn(n, 16, device=w.device), 4, w.dtype)


def _build_sparse24_bf16(w: torch.Tensor) -> PackedWeight:
    return Sparse24Weight.build(w, _mask24(*w.shape, w.device), w.dtype)


def _build_sparse24_int8(w: torch.Tensor) -> PackedWeight:
    q, scales = int8_quantize(w)
    return Sparse24Weight.build(q, _mask24(*w.shape, w.device), w.dtype, scales=scales)


def _build_csr90_int8(w: torch.Tensor) -> PackedWeight:
    q, scales = int8_quantize(w)
    return CsrWeight.build(q, torch.rand(w.shape, device=w.device) < 0.1, w.dtype, scales=scales)


FORMATS: dict[str, Callable[[torch.Tensor], PackedWeight]] = {
    "int8": _build_int8,
    "codebook4": _build_codebook4,
    "sparse24-bf16": _build_sparse24_bf16,
    "sparse24-int8": _build_sparse24_int8,
    "csr90-int8": _build_csr90_int8,
}


def fused(pw: PackedWeight, x: torch.Tensor) -> torch.Tensor:
    """The format's own kernel whatever M is (GEMV at M = 1), bypassing the dispatch thresholds."""
    k = pw.shape[1]
    gemv = x.shape[0] <= dispatch.GEMV_MAX_M
    if isinstance(pw, Int8Weight):
        fn = int8.int8_gemv if gemv else int8.int8_gemm
        return fn(x, pw.qweight, pw.scales, None, pw.group_size)
    if isinstance(pw, CodebookWeight):
        fn = codebook.codebook_gemv if gemv else codebook.codebook_gemm
        return fn(x, pw.packed, pw.codebook, None, pw.bits, k)
    if isinstance(pw, Sparse24Weight):
        fn = sparse24.sparse24_gemv if gemv else sparse24.sparse24_gemm
        return fn(x, pw.values, pw.positions, pw.scales, pw.codebook, None, pw.group_size, k)
    return csr.csr_matmul(x, pw.row_ptr, pw.col_idx, pw.values, pw.scales, pw.codebook, None,
                                    pw.group_size, k)


def dequantized(pw: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """Dense weight from the format's Triton dequantize kernel."""
    k = pw.shape[1]
    if isinstance(pw, Int8Weight):
        return int8.dequantize_int8(pw.qweight, pw.scales, pw.group_size, dtype)
    if isinstance(pw, CodebookWeight):
        return codebook.dequantize_codebook(pw.packed, pw.codebook, pw.bits, k, dtype)
    if isinstance(pw, Sparse24Weight):
        return sparse24.dequantize_sparse24(pw.values, pw.positions, pw.scales, pw.codebook, pw.group_size, k, dtype)
    return csr.dequantize_csr(pw.row_ptr, pw.col_idx, pw.values, pw.scales, pw.codebook, pw.group_size, k, dtype)


# ---- timing ------------------------------------------------------------------------------------

def time_ms(fn: Callable[[], object], m: int, quick: bool) -> float:
    """Median milliseconds of ``fn()``; inside a CUDA graph for small M."""
    fn()  # compile and autotune outside any graph capture
    torch.cuda.synchronize()
    if m <= CUDAGRAPH_MAX_M:
        return float(triton.testing.do_bench_cudagraph(fn, rep=20 if quick else 100, return_mode="median"))
    return float(triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 200,
                                         return_mode="median"))


def rotating(items: list) -> Callable[[], object]:
    """Each call returns the next item (weights read in turn, so L2 never holds the current one)."""
    cycle = itertools.cycle(items)
    return lambda: next(cycle)


def copies_for(nbytes: int) -> int:
    """Enough weight copies to span three L2 caches (at least 2, at most 8)."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20) or 50 * 2**20
    return max(2, min(8, math.ceil(3 * l2 / max(nbytes, 1))))


def copy_bandwidth(quick: bool) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written), the practical ceiling."""
    src = torch.empty(2**30 // 2, dtype=torch.bfloat16, device=DEVICE)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=50 if quick else 200, return_mode="median")
    return 2 * src.numel() * src.element_size() / ms / 1e6


def semi_structured(weights: list[torch.Tensor]):
    """PyTorch 2:4 sparse weights (CUTLASS / cuSPARSELt) with the same pattern as ours, or None."""
    try:
        from torch.sparse import to_sparse_semi_structured

        out = []
        for w in weights:
            out.append(to_sparse_semi_structured(w * _mask24(*w.shape, w.device)))
        return out
    except Exception as exc:  # unsupported GPU or build
        print(f"  (PyTorch semi-structured 2:4 unavailable: {exc})")
        return None


# ---- main --------------------------------------------------------------------------------------

@dataclass
class Row:
    shape: tuple[int, int]
    m: int
    name: str
    ms: float | None
    nbytes: int
    ms_fused: float | None = None
    ms_dequant: float | None = None
    path: str = ""


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return (out.stdout.strip() or None) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


# Benchmark format -> key of dispatch.DENSE_MIN_M.
DISPATCH_KEY = {"int8": "int8", "codebook4": "codebook", "sparse24-bf16": "sparse24", "sparse24-int8": "sparse24",
                "csr90-int8": "csr"}


def dispatch_path(name: str, m: int) -> str:
    """Which path the dispatcher takes for this format at this M."""
    fmt = DISPATCH_KEY[name]
    if m >= dispatch.DENSE_MIN_M[fmt]:
        return "dequant+cuBLAS"
    if fmt == "csr":
        return "csr"
    return "gemv" if m <= dispatch.GEMV_MAX_M else "gemm"


def safe_time(fn, m, quick) -> float | None:
    try:
        return time_ms(fn, m, quick)
    except Exception as exc:  # report and go on: one failing baseline should not lose the run
        print(f"    failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return None


def run(shapes, m_values, names, quick: bool) -> tuple[list[Row], float]:
    torch.manual_seed(0)
    bw = copy_bandwidth(quick)
    print(f"device-to-device copy: {bw:.0f} GB/s")
    rows: list[Row] = []
    for n, k in shapes:
        print(f"\n== N x K = {n} x {k} ==")
        dense_bytes = n * k * 2
        weights = [torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * 0.02 for _ in range(copies_for(dense_bytes))]
        xs = {m: torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16) for m in m_values}
        io = {m: 2 * m * (n + k) for m in m_values}
        next_w = rotating(weights)
        for m in m_values:
            ms = safe_time(lambda: F.linear(xs[m], next_w()), m, quick)
            rows.append(Row((n, k), m, "bf16", ms, dense_bytes + io[m], path="cuBLAS"))
        if "sparse24-bf16" in names or "sparse24-int8" in names:
            sparse = semi_structured(weights)
            if sparse is not None:
                next_s = rotating(sparse)
                for m in m_values:
                    ms = safe_time(lambda: F.linear(xs[m], next_s()), m, quick)
                    rows.append(Row((n, k), m, "torch-2:4", ms, dense_bytes // 2 + dense_bytes // 16 + io[m],
                                    path="to_sparse_semi_structured"))
                del sparse, next_s
        for name in names:
            build = FORMATS[name]
            packed = [build(weights[0])]
            packed += [build(weights[0]) for _ in range(copies_for(packed[0].nbytes()) - 1)]
            nbytes = packed[0].nbytes()
            next_p = rotating(packed)
            for m in m_values:
                x = xs[m]
                row = Row((n, k), m, name, None, nbytes + io[m], path=dispatch_path(name, m))
                row.ms = safe_time(lambda: next_p().kernel_linear(x, None), m, quick)
                row.ms_fused = safe_time(lambda: fused(next_p(), x), m, quick)
                row.ms_dequant = safe_time(lambda: F.linear(x, dequantized(next_p(), x.dtype)), m, quick)
                rows.append(row)
            del packed, next_p
            torch.cuda.empty_cache()
        del weights, next_w
        torch.cuda.empty_cache()
        report(rows, (n, k), m_values, bw)
    return rows, bw


def _fmt(ms: float | None) -> str:
    return f"{1000 * ms:8.1f}" if ms else "     n/a"


def report(rows: list[Row], shape, m_values, bw: float) -> None:
    """Per-shape table: microseconds, speedup over bf16, GB/s (fraction of copy bandwidth)."""
    base = {r.m: r.ms for r in rows if r.shape == shape and r.name == "bf16"}
    print(f"{'format':15} {'M':>5} {'path':>15} {'us':>8} {'x bf16':>7} {'GB/s':>6} {'of copy':>7} "
          f"{'fused us':>8} {'deq+cuBLAS':>10} {'disp/deq':>8}")
    for r in rows:
        if r.shape != shape:
            continue
        speed = f"{base[r.m] / r.ms:7.2f}" if r.ms and base.get(r.m) else "    n/a"
        gbs = r.nbytes / r.ms / 1e6 if r.ms else 0.0
        vs = f"{r.ms_dequant / r.ms:8.2f}" if r.ms and r.ms_dequant else "        "
        deq = _fmt(r.ms_dequant) if r.ms_dequant is not None else ""
        fus = _fmt(r.ms_fused) if r.ms_fused is not None else ""
        print(f"{r.name:15} {r.m:5d} {r.path:>15} {_fmt(r.ms)} {speed} {gbs:6.0f} {gbs / bw:7.2f} "
              f"{fus:>8} {deq:>10} {vs}")


def summarize(rows: list[Row]) -> dict:
    """Check the targets and find, per format and shape, the M where dequantize + cuBLAS wins."""
    base = {(r.shape, r.m): r.ms for r in rows if r.name == "bf16"}
    checks, crossover = [], {}
    for r in rows:
        b = base.get((r.shape, r.m))
        if r.m == 1 and r.name in TARGETS_M1 and r.ms and b:
            checks.append({"check": f"{r.name} M=1 {r.shape[0]}x{r.shape[1]} speedup vs bf16",
                           "value": b / r.ms, "target": TARGETS_M1[r.name], "ok": b / r.ms >= TARGETS_M1[r.name]})
        if r.ms_dequant and r.ms:
            ratio = r.ms_dequant / r.ms
            checks.append({"check": f"{r.name} M={r.m} {r.shape[0]}x{r.shape[1]} dispatched vs dequant+cuBLAS",
                           "value": ratio, "target": MIN_VS_DEQUANT, "ok": ratio >= MIN_VS_DEQUANT})
        if r.ms_fused and r.ms_dequant and r.ms_dequant < r.ms_fused:
            key = f"{r.name} {r.shape[0]}x{r.shape[1]}"
            crossover[key] = min(crossover.get(key, r.m), r.m)
    print("\n== checks ==")
    for c in checks:
        print(f"{'ok  ' if c['ok'] else 'MISS'} {c['check']}: {c['value']:.2f} (target >= {c['target']})")
    print("\n== smallest M where dequantize + cuBLAS beat the fused kernel (for dispatch.DENSE_MIN_M) ==")
    for key, m in sorted(crossover.items()):
        print(f"  {key}: M = {m}")
    return {"checks": checks, "dequant_wins_from_m": crossover}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one shape, M in {1, 16, 256}, short timings")
    parser.add_argument("--formats", nargs="+", choices=sorted(FORMATS), default=list(FORMATS))
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/kernels-<device>.json)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU: torch.cuda.is_available() is False, nothing to time.")
    if _common.interpreting():
        sys.exit("benchmarks/kernels.py: unset TRITON_INTERPRET, the interpreter would time Python, not the GPU.")
    shapes, m_values = (QUICK_SHAPES, QUICK_M) if args.quick else (SHAPES, M_VALUES)
    device = torch.cuda.get_device_name(0)
    print(f"{device}, torch {torch.__version__}, triton {triton.__version__}")
    rows, bw = run(shapes, m_values, args.formats, args.quick)
    summary = summarize(rows)
    out = args.out or REPO / "benchmarks" / "results" / f"kernels-{re.sub(r'[^A-Za-z0-9]+', '-', device).strip('-')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "device": device,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "quick": args.quick,
        "copy_bandwidth_GBps": bw,
        "thresholds": {"GEMV_MAX_M": dispatch.GEMV_MAX_M, "DENSE_MIN_M": dispatch.DENSE_MIN_M},
        "results": [
            {"N": r.shape[0], "K": r.shape[1], "M": r.m, "format": r.name, "path": r.path, "ms": r.ms,
             "ms_fused": r.ms_fused, "ms_dequant_cublas": r.ms_dequant, "bytes": r.nbytes,
             "GBps": r.nbytes / r.ms / 1e6 if r.ms else None}
            for r in rows
        ],
        **summary,
    }
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
