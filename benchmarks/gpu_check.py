"""One GPU session's worth of kernel checks and timings (H100/H200: well under 8 minutes).

    python benchmarks/gpu_check.py            # on a CUDA GPU; writes benchmarks/results/gpu_check-<device>.json
    python benchmarks/gpu_check.py --quick    # CPU smoke run under TRITON_INTERPRET=1 (what the tests run)

(0) Self-checks: every GPU fast path's known-answer check (``kernels.dispatch.fast_path_ok``:
tensor-core subnormals, subnormal FMAs, PTX byte permutes and shuffles) for fp16 and bf16, which
passed, and so which paths the rest of the run uses (a failed one runs its exact fallback).
(a) Correctness: every kernel (each format's GEMV, tiled GEMM, CSR kernel and dequantize kernel,
and the dispatched op) against a float64 reference, at odd shapes and at LLM shapes (4096^2,
4096x11008, 11008x4096, 8192^2), fp16 and bf16, M in {1, 2, 4, 8, 16, 32, 64, 128, 512, 4096}.
(b) Speed at every shape and M, one method throughout: each timed call is one replay of a CUDA
graph that runs the op once on each of C weight copies, C chosen so the copies add up to at least
4x the L2 size (no cap); CUDA events around many replays; per-call time = total / (replays * C).
For every format: the dispatched op, bf16 cuBLAS (``F.linear``) and the format's dequantize
kernel + cuBLAS. It prints speedups and the M from which dequantize + cuBLAS wins (for
``kernels.dispatch.DENSE_MIN_M``). (c) The Huffman decode kernel alone (buffers already on the
GPU, events around the launch only) and ``tz.load`` end to end with the file dropped from the
page cache first, decoding on the CPU and on the GPU.

On a GPU the run records device, date and commit (benchmarks/common.py). --quick runs the same
code on CPU tensors with tiny shapes and wall-clock timing: it checks the script, not the speed.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import torchzip as tz  # noqa: E402
from benchmarks.common import RESULTS, run_info  # noqa: E402
from torchzip.kernels import codebook, csr, dispatch, int8, sparse24  # noqa: E402
from torchzip.packed import CodebookWeight, CsrWeight, Int8Weight, PackedWeight, Sparse24Weight  # noqa: E402
from torchzip.packed.values import int8_quantize  # noqa: E402

LLM_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192)]
ODD_SHAPES = [(1000, 1000), (333, 4104)]  # N x K: K a multiple of 8 (groups of 8, 2:4), nothing else round
M_VALUES = [1, 2, 4, 8, 16, 32, 64, 128, 512, 4096]
QUICK_SHAPES, QUICK_M = [(19, 136)], [1, 3]
TOL = {torch.float16: 3e-3, torch.bfloat16: 1.5e-2, torch.float32: 1e-5}
# Speedup over bf16 cuBLAS wanted at M = 1, and the floor for the dispatched path vs dequant+cuBLAS.
TARGETS_M1 = {"int8": 1.8, "codebook4": 3.2, "sparse24-bf16": 1.5, "csr90-int8": 3.0}
MIN_VS_DEQUANT = 0.9


# ---- formats ------------------------------------------------------------------------------------

def mask24(n: int, k: int, device) -> torch.Tensor:
    keep = torch.rand(n, k // 4, 4, device=device).argsort(-1)[..., :2]
    return torch.zeros(n, k // 4, 4, dtype=torch.bool, device=device).scatter_(2, keep, True).view(n, k)


def build(name: str, w: torch.Tensor) -> PackedWeight:
    """A packed weight of format ``name`` from a dense ``[N, K]`` weight (values random where the
    format stores indices)."""
    n, k = w.shape
    if name == "int8":
        return Int8Weight.from_float(w, 0)
    if name == "int8-g128":
        return Int8Weight.from_float(w, 128 if k % 128 == 0 else 8)
    if name in ("codebook4", "codebook3"):
        bits = int(name[-1])
        idx = torch.randint(0, 2**bits, (n, k), device=w.device)
        book = torch.randn(1 if bits == 4 else n, 2**bits, device=w.device)
        return CodebookWeight.from_indices(idx, book, bits, w.dtype)
    if name == "sparse24-bf16":
        return Sparse24Weight.build(w, mask24(n, k, w.device), w.dtype)
    if name == "sparse24-int8":
        q, scales = int8_quantize(w)
        return Sparse24Weight.build(q, mask24(n, k, w.device), w.dtype, scales=scales)
    if name == "csr90-int8":
        q, scales = int8_quantize(w)
        return CsrWeight.build(q, torch.rand(w.shape, device=w.device) < 0.1, w.dtype, scales=scales)
    if name == "csr90-codebook5":
        idx = torch.randint(0, 32, (n, k), device=w.device, dtype=torch.uint8)
        return CsrWeight.build(idx, torch.rand(w.shape, device=w.device) < 0.1, w.dtype,
                               codebook=torch.randn(1, 32, device=w.device))
    raise ValueError(name)


FORMATS = ["int8", "int8-g128", "codebook4", "codebook3", "sparse24-bf16", "sparse24-int8", "csr90-int8",
           "csr90-codebook5"]
TIMED = ["int8", "codebook4", "sparse24-bf16", "sparse24-int8", "csr90-int8"]
DISPATCH_KEY = {"int8": "int8", "int8-g128": "int8", "codebook4": "codebook", "codebook3": "codebook",
                "sparse24-bf16": "sparse24", "sparse24-int8": "sparse24", "csr90-int8": "csr", "csr90-codebook5": "csr"}


# Where each kernel is checked besides the M the dispatcher gives it (a GEMV at M = 4096 reads the
# weight 4096 times; it is correct there, just pointless, and slow enough to cost the time budget).
GEMV_CHECK_MAX_M, GEMM_CHECK_MIN_M, CSR_CHECK_MAX_M = 16, 2, 128


def kernels_of(pw: PackedWeight, x: torch.Tensor, every: bool = False) -> dict[str, Callable[[], torch.Tensor]]:
    """The kernels of ``pw``'s format worth running on ``x`` (bypassing the M thresholds; ``every``:
    all of them), plus the dispatched op and dequantize + ``F.linear``."""
    k = pw.shape[1]
    out: dict[str, Callable[[], torch.Tensor]] = {"dispatched": lambda: pw.kernel_linear(x, None)}
    if isinstance(pw, Int8Weight):
        a = (pw.qweight, pw.scales, None, pw.group_size)
        out.update(gemv=lambda: int8.int8_gemv(x, *a), gemm=lambda: int8.int8_gemm(x, *a),
                   dequant=lambda: F.linear(x, int8.dequantize_int8(pw.qweight, pw.scales, pw.group_size, x.dtype)))
    elif isinstance(pw, CodebookWeight):
        a = (pw.packed, pw.codebook, None, pw.bits, k)
        out.update(gemv=lambda: codebook.codebook_gemv(x, *a), gemm=lambda: codebook.codebook_gemm(x, *a),
                   dequant=lambda: F.linear(x, codebook.dequantize_codebook(pw.packed, pw.codebook, pw.bits, k, x.dtype)))
    elif isinstance(pw, Sparse24Weight):
        a = (pw.values, pw.positions, pw.scales, pw.codebook, None, pw.group_size, k)
        out.update(gemv=lambda: sparse24.sparse24_gemv(x, *a), gemm=lambda: sparse24.sparse24_gemm(x, *a),
                   dequant=lambda: F.linear(x, sparse24.dequantize_sparse24(
                       pw.values, pw.positions, pw.scales, pw.codebook, pw.group_size, k, x.dtype)))
    else:
        a = (pw.row_ptr, pw.col_idx, pw.values, pw.scales, pw.codebook, None, pw.group_size, k)
        out.update(csr=lambda: csr.csr_matmul(x, *a),
                   dequant=lambda: F.linear(x, csr.dequantize_csr(pw.row_ptr, pw.col_idx, pw.values, pw.scales,
                                                                  pw.codebook, pw.group_size, k, x.dtype)))
    m = x.shape[0]
    if not every:
        for name, keep in (("gemv", m <= GEMV_CHECK_MAX_M), ("gemm", m >= GEMM_CHECK_MIN_M),
                           ("csr", m <= CSR_CHECK_MAX_M)):
            if not keep:
                out.pop(name, None)
    return out


# ---- (a) correctness ----------------------------------------------------------------------------

def reference(pw: PackedWeight, x: torch.Tensor) -> torch.Tensor:
    """float64 ``x @ W.T``: the kernel files' own float64 references (the ones the tests use)."""
    k = pw.shape[1]
    if isinstance(pw, Int8Weight):
        return int8.reference(x, pw.qweight, pw.scales, None, pw.group_size)
    if isinstance(pw, CodebookWeight):
        return codebook.reference(x, pw.packed, pw.codebook, None, pw.bits, k)
    if isinstance(pw, Sparse24Weight):
        return sparse24.sparse24_reference(x, pw.values, pw.positions, pw.scales, pw.codebook, None, pw.group_size, k)
    return csr.csr_reference(x, pw.row_ptr, pw.col_idx, pw.values, pw.scales, pw.codebook, None, pw.group_size, k)


def self_checks(device) -> dict[str, bool]:
    """Run every fast path's self-check on ``device`` now, before anything else launches; returns
    ``{"path cuda:i dtype": passed}`` (empty on CPU, where no fast path needs one, or when
    ``TORCHZIP_GPU_FAST_PATHS=0`` turned them all off)."""
    if device == "cpu":
        print("self-checks: none on CPU (the interpreter runs no PTX)")
        return {}
    if not dispatch._fast_enabled:
        print("self-checks: TORCHZIP_GPU_FAST_PATHS=0, every fast path runs its fallback")
        return {}
    for module in (int8, codebook, sparse24):
        for path, (check, fallback) in module.SELF_CHECKS.items():
            for dtype in (torch.float16, torch.bfloat16) + ((torch.float32,) if path == "int8.gemv" else ()):
                dispatch.fast_path_ok(path, torch.empty(0, device=device, dtype=dtype), check, fallback)
    report = dispatch.fast_path_report()
    for key, ok in report.items():
        print(f"self-check {'pass' if ok else 'FAIL (fallback used)'}: {key}")
    return report


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def check_all(shapes, m_values, dtypes, device, formats, quick: bool) -> list[dict]:
    rows = []
    for n, k in shapes:
        base = torch.randn(n, k, device=device) * 0.05
        for name in formats:
            pw = build(name, base.to(torch.float32))
            for dtype in dtypes:
                pw = pw.to(dtype)
                for m in m_values:
                    x = torch.randn(m, k, device=device, dtype=dtype)
                    ref = reference(pw, x)
                    tol = TOL[dtype]
                    for kernel, fn in kernels_of(pw, x, every=quick).items():
                        try:
                            out = fn()
                            err = rel_err(out, ref)
                            ok = out.shape == ref.shape and out.dtype == dtype and err <= tol
                            note = ""
                        except Exception as exc:  # record and go on: one failure must not lose the run
                            err, ok, note = float("nan"), False, f"{type(exc).__name__}: {str(exc)[:200]}"
                        rows.append({"N": n, "K": k, "M": m, "dtype": str(dtype).split(".")[-1], "format": name,
                                     "kernel": kernel, "rel_err": err, "tol": tol, "ok": ok, "error": note})
                        if not ok:
                            print(f"FAIL {name} {kernel} {n}x{k} M={m} {dtype}: err={err:.2e} {note}")
                    del x, ref
            del pw
            sync(device)
        print(f"checked {n}x{k}: {sum(r['ok'] for r in rows)}/{len(rows)} ok so far")
    return rows


# ---- (b) timing ---------------------------------------------------------------------------------

def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def l2_bytes(device) -> int:
    if torch.device(device).type != "cuda":
        return 0  # the CPU smoke run: two copies suffice
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 * 2**20)


def copies_for(nbytes: int, device) -> int:
    """Weight copies that together span at least 4x the L2 cache (no upper cap)."""
    return max(2, math.ceil(4 * l2_bytes(device) / max(nbytes, 1)))


def time_per_call(calls: list[Callable[[], object]], device, quick: bool) -> float:
    """Seconds per call: one CUDA graph runs every call once (each on its own weight copy), timed
    with events over many replays. On CPU (--quick): wall clock of one pass, for the smoke run."""
    for c in calls:  # compile, autotune, allocate outside the capture
        c()
    sync(device)
    if torch.device(device).type != "cuda":
        t = time.perf_counter()
        for c in calls:
            c()
        return (time.perf_counter() - t) / len(calls)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    # replays so a measurement lasts ~20 ms
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    once = max(start.elapsed_time(end) / 1e3, 1e-6)
    reps = max(3, min(200, int(0.02 / once)))
    samples = []
    for _ in range(5):
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / reps / len(calls))
    del graph
    return float(np.median(samples))


def time_all(shapes, m_values, device, quick: bool, formats) -> list[dict]:
    rows = []
    dtype = torch.bfloat16
    for n, k in shapes:
        dense = [torch.randn(n, k, device=device, dtype=dtype) * 0.02
                 for _ in range(copies_for(2 * n * k, device))]
        xs = {m: torch.randn(m, k, device=device, dtype=dtype) for m in m_values}
        for m in m_values:
            s = time_per_call([lambda w=w: F.linear(xs[m], w) for w in dense], device, quick)
            rows.append({"N": n, "K": k, "M": m, "format": "bf16", "path": "cuBLAS", "s": s})
        proto = dense[0].float()
        del dense
        for name in formats:
            first = build(name, proto).to(dtype)
            packed = [first] + [build(name, proto).to(dtype) for _ in range(copies_for(first.nbytes(), device) - 1)]
            for m in m_values:
                x = xs[m]
                row = {"N": n, "K": k, "M": m, "format": name, "path": dispatch.pick_path(DISPATCH_KEY[name], x)
                       if DISPATCH_KEY[name] != "csr" else ("dense" if m >= dispatch.DENSE_MIN_M["csr"] else "csr"),
                       "bytes": first.nbytes()}
                for label, pick in (("s", "dispatched"), ("s_dequant_cublas", "dequant")):
                    try:
                        row[label] = time_per_call([kernels_of(p, x)[pick] for p in packed], device, quick)
                    except Exception as exc:
                        row[label], row[f"{label}_error"] = None, f"{type(exc).__name__}: {str(exc)[:200]}"
                rows.append(row)
            del packed, first
            sync(device)
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
        print(f"timed {n}x{k}")
    return rows


def summarise(times: list[dict]) -> dict:
    base = {(r["N"], r["K"], r["M"]): r["s"] for r in times if r["format"] == "bf16"}
    checks, crossover = [], {}
    for r in times:
        if r["format"] == "bf16" or not r.get("s"):
            continue
        b = base.get((r["N"], r["K"], r["M"]))
        r["speedup_vs_bf16"] = b / r["s"] if b else None
        if r.get("s_dequant_cublas"):
            r["vs_dequant_cublas"] = r["s_dequant_cublas"] / r["s"]
            checks.append({"check": f"{r['format']} {r['N']}x{r['K']} M={r['M']} dispatched vs dequant+cuBLAS",
                           "value": r["vs_dequant_cublas"], "target": MIN_VS_DEQUANT,
                           "ok": r["vs_dequant_cublas"] >= MIN_VS_DEQUANT})
            if r["s_dequant_cublas"] < r["s"] and r["path"] != "dense":
                key = f"{r['format']} {r['N']}x{r['K']}"
                crossover[key] = min(crossover.get(key, r["M"]), r["M"])
        if r["M"] == 1 and r["format"] in TARGETS_M1 and b:
            checks.append({"check": f"{r['format']} {r['N']}x{r['K']} M=1 vs bf16 cuBLAS", "value": b / r["s"],
                           "target": TARGETS_M1[r["format"]], "ok": b / r["s"] >= TARGETS_M1[r["format"]]})
    return {"checks": checks, "dequant_cublas_wins_from_m": crossover}


# ---- (c) decode and load ------------------------------------------------------------------------

def time_decode(n: int, device, quick: bool) -> list[dict]:
    from torchzip.export import huffman
    from torchzip.export.huffman import TZIP_MAX_LEN
    from torchzip.kernels.huffman_decode import prepare_decode

    rng = np.random.default_rng(0)
    w = rng.standard_normal(n).astype(np.float32)
    streams = {"4-bit": (np.searchsorted(np.quantile(w, np.arange(1, 16) / 16), w), 16),
               "8-bit": (np.clip(np.round(w / (4.0 / 127)), -127, 127).astype(np.int8).view(np.uint8), 256)}
    rows = []
    for name, (symbols, alphabet) in streams.items():
        stream = huffman.encode(symbols.astype(np.int64), alphabet, max_len=TZIP_MAX_LEN)
        job = prepare_decode(stream, device)
        job.launch()
        ok = bool(torch.equal(job.finish().cpu().long(), torch.from_numpy(symbols.astype(np.int64))))
        if torch.device(device).type == "cuda":  # events around the kernel launches only
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            samples = []
            for _ in range(5):
                start.record()
                for _ in range(10):
                    job.launch()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / 1e3 / 10)
            s = float(np.median(samples))
        else:
            t = time.perf_counter()
            job.launch()
            s = time.perf_counter() - t
        t = time.perf_counter()
        huffman.decode(stream)
        cpu = time.perf_counter() - t
        rows.append({"stream": name, "symbols": n, "coded_bytes": huffman.stored_bytes(stream), "ok": ok,
                     "kernel_s": s, "Gsym_per_s": n / s / 1e9, "cpu_decode_s": cpu})
        print(f"decode {name}: kernel {s * 1e3:.3f} ms ({n / s / 1e9:.2f} Gsym/s), CPU {cpu * 1e3:.1f} ms, ok={ok}")
    return rows


def drop_page_cache(path: Path) -> None:
    """Evict the file's pages (clean pages go without root), so the next read hits the disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())  # dirty pages cannot be dropped
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def time_load(width: int, layers: int, device) -> dict:
    def skeleton() -> nn.Module:
        return nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])

    model = tz.compress(skeleton(), [tz.Quantize()], progress=False)
    out = {"fp32_weight_bytes": 4 * layers * width * width}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.tzip"
        out["file_bytes"] = tz.export(model, path, progress=False)
        frozen = tz.freeze(model)
        for decode in ("cpu", "auto"):
            drop_page_cache(path)
            sync(device)
            t = time.perf_counter()
            loaded = tz.load(path, skeleton(), device=device, decode=decode, progress=False)
            sync(device)
            out[f"load_{decode}_decode_s"] = time.perf_counter() - t
            x = torch.randn(2, width, device=device)
            with torch.no_grad():
                out[f"load_{decode}_matches"] = bool(torch.equal(loaded.cpu()(x.cpu()), frozen(x.cpu())))
            del loaded
    print(f"load {out['fp32_weight_bytes'] / 1e9:.2f} GB model (cold cache): CPU decode {out['load_cpu_decode_s']:.2f} s, "
          f"GPU-side decode {out['load_auto_decode_s']:.2f} s")
    return out


# ---- main ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU smoke run under TRITON_INTERPRET=1, tiny shapes")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: check,time,decode,load")
    ap.add_argument("--out", default="", help="JSON path (default benchmarks/results/gpu_check-<device>.json)")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    torch.manual_seed(0)
    if args.quick:
        from torchzip.kernels import _common

        if not _common.interpreting():
            sys.exit("--quick runs the kernels on CPU tensors: set TRITON_INTERPRET=1")
        device, shapes, t_shapes, m_values, dtypes = "cpu", QUICK_SHAPES, QUICK_SHAPES[:1], QUICK_M, [torch.bfloat16]
        t_m, decode_n, load_args = QUICK_M[:1], 2000, (64, 2)
    else:
        if not torch.cuda.is_available():
            sys.exit("benchmarks/gpu_check.py needs a CUDA GPU (or --quick under TRITON_INTERPRET=1)")
        device, shapes, t_shapes, m_values = "cuda", ODD_SHAPES + LLM_SHAPES, LLM_SHAPES, M_VALUES
        dtypes, t_m, decode_n, load_args = [torch.float16, torch.bfloat16], M_VALUES, 3 * 10**7, (8192, 4)
    t0 = time.perf_counter()
    result: dict = {}
    with dispatch.force_kernels():
        result["self_checks"] = self_checks(device)
        if "check" not in skip:
            result["correctness"] = check_all(shapes, m_values, dtypes, device, FORMATS, args.quick)
        if "time" not in skip:
            result["timing"] = time_all(t_shapes, t_m, device, args.quick, TIMED)
            result.update(summarise(result["timing"]))
        if "decode" not in skip:
            result["decode"] = time_decode(decode_n, device, args.quick)
    if "load" not in skip:
        result["load"] = time_load(*load_args, device)
    result["seconds"] = time.perf_counter() - t0
    failed = [r for r in result.get("correctness", []) if not r["ok"]]
    print(f"\ncorrectness: {len(result.get('correctness', [])) - len(failed)} ok, {len(failed)} failed")
    bad = [key for key, ok in result["self_checks"].items() if not ok]
    print(f"self-checks: {len(result['self_checks']) - len(bad)} passed, {len(bad)} failed" + (f" ({', '.join(bad)})" if bad else ""))
    for c in result.get("checks", []):
        if not args.quick:
            print(f"{'ok  ' if c['ok'] else 'MISS'} {c['check']}: {c['value']:.2f} (target >= {c['target']})")
    for key, m in sorted(result.get("dequant_cublas_wins_from_m", {}).items()):
        print(f"dequant + cuBLAS beats the dispatched kernel from M = {m}: {key}")
    import triton

    info = {**run_info(), "triton": triton.__version__, "quick": args.quick,
            "thresholds": {"GEMV_MAX_M": dispatch.GEMV_MAX_M, "DENSE_MIN_M": dict(dispatch.DENSE_MIN_M)},
            "l2_bytes": l2_bytes(device)}
    name = "gpu_check-" + "".join(c if c.isalnum() else "-" for c in info["device"]).strip("-")
    path = Path(args.out) if args.out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    import json

    path.write_text(json.dumps({"run": info, **result}, indent=2, default=str) + "\n")
    print(f"wrote {path} in {result['seconds']:.0f} s")
    return 1 if failed or not all(r["ok"] for r in result.get("decode", [])) else 0


if __name__ == "__main__":
    sys.exit(main())
