"""A billion parameters on a small machine: k-means vs sort, peak memory of compress + export,
lazy load, CPU forward of packed layers, export/load throughput vs torch.save and safetensors.

    python benchmarks/scale.py --quick     # hidden 512, 4 layers: under 2 minutes
    python benchmarks/scale.py --setting medium   # hidden 1024, 8 layers: 0.5 GB of fp32
    python benchmarks/scale.py             # hidden 2048, 16 layers, ~1B parameters (slow on 2 cores)
    python benchmarks/scale.py --setting medium --cpu-only   # k-means and CPU forward only
    python benchmarks/scale.py --setting medium --load-paths  # load into meta vs a build function

CPU forward and k-means run at one thread and at torch's thread count. Every memory figure is
VmHWM growth in a fresh subprocess (it resets at exec). Timings are best of a few runs, side by
side in one process. Prints a table and writes
benchmarks/results/scale[-quick|-medium].json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torchzip as tz  # noqa: E402
from common import write_json  # noqa: E402
from torchzip.kernels import cpu  # noqa: E402
from torchzip.packed import CodebookWeight, Int8Weight  # noqa: E402
from torchzip.passes.codebook import kmeans_1d  # noqa: E402

SETTINGS = {
    "quick": {"hidden": 512, "intermediate": 1408, "layers": 4, "vocab": 8000, "kmeans": (1024, 2048), "gemm": 2048},
    "medium": {"hidden": 1024, "intermediate": 2816, "layers": 8, "vocab": 16000, "kmeans": (2048, 4096), "gemm": 4096},
    "full": {"hidden": 2048, "intermediate": 5632, "layers": 16, "vocab": 32000, "kmeans": (4096, 4096), "gemm": 4096},
}


class Block(nn.Module):
    """Llama-style decoder block, weights only (attention and MLP projections, RMSNorm scales)."""

    def __init__(self, h: int, i: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(h, h, bias=False) for _ in range(4))
        self.gate_proj, self.up_proj = nn.Linear(h, i, bias=False), nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)
        self.input_norm, self.post_norm = nn.Parameter(torch.ones(h)), nn.Parameter(torch.ones(h))


class LlamaLike(nn.Module):
    def __init__(self, s: dict) -> None:
        super().__init__()
        self.embed = nn.Embedding(s["vocab"], s["hidden"])
        self.layers = nn.ModuleList(Block(s["hidden"], s["intermediate"]) for _ in range(s["layers"]))
        self.norm = nn.Parameter(torch.ones(s["hidden"]))
        self.lm_head = nn.Linear(s["hidden"], s["vocab"], bias=False)


def build(s: dict) -> nn.Module:
    """The model in fp32, initialised a layer at a time (no full-size temporaries)."""
    with torch.device("meta"):
        model = LlamaLike(s)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=gen) if p.dim() > 1 else p.fill_(1.0)
    return model


def hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux: ``5`` into clear_refs), so a later phase's own peak
    can be read; False where the system does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def nbytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


RECIPES = {"int8": lambda: [tz.Quantize()], "codebook4": lambda: [tz.Codebook(bits=4)]}


# ---- children: each runs in a fresh process and prints one JSON line --------------------------


def child_compress(s: dict, recipe: str, path: str) -> dict:
    model = build(s)
    gc.collect()
    start, size = hwm(), nbytes(model)
    t0 = time.perf_counter()
    tz.compress(model, RECIPES[recipe](), inplace=True, progress=False)
    t1 = time.perf_counter()
    compress_peak, compressed = hwm(), rss()
    phases = reset_hwm()  # from here VmHWM is freeze + export's own peak
    file_size = tz.export(model, path, progress=False)
    t2 = time.perf_counter()
    peak = max(compress_peak, hwm())
    out = {"model_bytes": size, "file_bytes": file_size, "compress_s": t1 - t0, "export_s": t2 - t1,
           "peak_growth_bytes": peak - start, "peak_growth_x_model": (peak - start) / size}
    if phases:  # which phase makes the peak: compress (k-means...) or freeze + export
        out.update({"compress_peak_x_model": (compress_peak - start) / size,
                    "compressed_model_growth_x_model": (compressed - start) / size,
                    "export_peak_x_model": (hwm() - start) / size,
                    "export_growth_over_compressed_x_model": (hwm() - compressed) / size})
    return out


def child_load(s: dict, path: str, how: str = "meta") -> dict:
    """Load into a meta skeleton, or (``how="build"``) into one that load builds itself under
    ``tz.empty_weights()``: the building is measured too."""
    with torch.device("meta"):  # also loads torch's meta kernels (~150 MB RSS, once) before the measurement
        skeleton = LlamaLike(s)
    if how == "build":
        skeleton = lambda: LlamaLike(s)  # noqa: E731
    gc.collect()
    start = hwm()
    t0 = time.perf_counter()
    model = tz.load(path, skeleton, progress=False)
    seconds = time.perf_counter() - t0
    decoded = nbytes(model)
    size = os.path.getsize(path)
    return {"file_bytes": size, "decoded_bytes": decoded, "load_s": seconds, "decoded_MB_s": decoded / seconds / 1e6,
            "peak_growth_bytes": hwm() - start, "peak_growth_x_file": (hwm() - start) / size}


def child_baseline(s: dict, kind: str, path: str) -> dict:
    model = build(s)
    state = model.state_dict()
    size = nbytes(model)
    t0 = time.perf_counter()
    if kind == "torch":
        torch.save(state, path)
        t1 = time.perf_counter()
        back = torch.load(path, weights_only=True, mmap=False)
    else:
        from safetensors.torch import load_file, save_file
        shared = {k: v.contiguous() for k, v in state.items()}
        save_file(shared, path)
        t1 = time.perf_counter()
        back = load_file(path)
    t2 = time.perf_counter()
    del back
    return {"file_bytes": os.path.getsize(path), "save_MB_s": size / (t1 - t0) / 1e6, "load_MB_s": size / (t2 - t1) / 1e6}


def load_paths(setting: str, runs: int) -> dict:
    """Peak memory and time of the two ways to load without a full-size skeleton, alternating
    (fresh subprocesses), on one file per recipe."""
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in RECIPES:
            path = os.path.join(tmp, f"{recipe}.tzip")
            run_child(["compress", setting, recipe, path])
            out[recipe] = {"meta": [], "build": []}
            for _ in range(runs):
                for how, results in out[recipe].items():
                    results.append(run_child(["load", setting, path, how]))
            os.unlink(path)
    return out


def run_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- in-process measurements ----------------------------------------------------------------


# Wall time by default; --cpu-time measures process CPU time at one thread, which a machine
# shared with other jobs disturbs far less (waiting for a core is not counted).
TIMER = time.perf_counter


def best(fn, repeat: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = TIMER()
        fn()
        times.append(TIMER() - t)
    return min(times)


def best_of(fns: dict, repeat: int = 7) -> dict:
    """Best time of each function, run in turns (on a shared machine, load then hits all alike)."""
    times = {k: float("inf") for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeat):
        for k, fn in fns.items():
            t = TIMER()
            fn()
            times[k] = min(times[k], TIMER() - t)
    return times


def kmeans_vs_sort(s: dict) -> list[dict]:
    rows, cols = s["kmeans"]
    w = torch.randn(rows, cols) * 0.02
    valid = torch.ones_like(w, dtype=torch.bool)
    out = []
    threads = torch.get_num_threads()
    for n_threads in sorted({1, threads}):
        torch.set_num_threads(n_threads)
        for granularity, x, v in (("channel", w, valid), ("layer", w.reshape(1, -1), valid.reshape(1, -1))):
            t = best_of({"sort": lambda: x.sort(1), "kmeans": lambda: kmeans_1d(x, v, 16)}, repeat=5)
            t_sort, t_km = t["sort"], t["kmeans"]
            out.append({"granularity": granularity, "threads": n_threads, "shape": [rows, cols], "sort_s": t_sort,
                        "kmeans_s": t_km, "ratio": t_km / t_sort})
    torch.set_num_threads(threads)
    return out


# What caps the vector width, for a run that stands in for an AVX2-only CPU: the C library
# (TORCHZIP_CPU_ISA=avx2) and torch's own kernels (ATen, oneDNN, MKL: the BLAS here).
ISA_ENV = ("TORCHZIP_CPU_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def cpu_forward(s: dict, repeat: int = 11) -> list[dict]:
    """Four n x n layers at one thread and at all threads: dense fp32 / bf16 vs packed int8 and
    4-bit codebook: the default route (fused C linears for M <= INT8_MAX_M / LINEAR_MAX_M, blocks
    above), the bit-exact dequantize-a-block + BLAS route (cpu.set_fused(False)) and the
    torch fallback (no C library). Best of ``repeat`` turns."""
    threads = torch.get_num_threads()
    n = s["gemm"]
    dense = [torch.randn(n, n) * 0.02 for _ in range(4)]
    int8 = [Int8Weight.from_float(w) for w in dense]
    book = [CodebookWeight.from_indices(torch.randint(0, 16, (n, n)), torch.randn(n, 16) * 0.02, 4, torch.float32)
            for _ in range(4)]
    bf16 = [w.bfloat16() for w in dense]
    compiled = cpu.available()
    real = cpu.available

    def torch_route():
        cpu.available = lambda: False
        try:
            return [p.linear(x) for p in book]
        finally:
            cpu.available = real

    def blocked(layers):
        def run():
            cpu.set_fused(False)
            try:
                return [p.linear(x) for p in layers]
            finally:
                cpu.set_fused(True)
        return run

    routes = ("bf16", "int8", "int8_blocked", "codebook4", "codebook4_blocked", "codebook4_torch")
    rows = []
    for n_threads in sorted({1, threads}):
        torch.set_num_threads(n_threads)
        for m in (1, 8, 64):
            x = torch.randn(m, n)
            xb = x.bfloat16()
            t = best_of({"fp32": lambda: [F.linear(x, w) for w in dense],
                         "bf16": lambda: [F.linear(xb, w) for w in bf16],
                         "int8": lambda: [p.linear(x) for p in int8],
                         "int8_blocked": blocked(int8),
                         "codebook4": lambda: [p.linear(x) for p in book],
                         "codebook4_blocked": blocked(book)}, repeat=repeat)
            t["codebook4_torch"] = best(torch_route, repeat=1)
            rows.append({"M": m, "threads": n_threads, "compiled_kernels": compiled, "isa": cpu.ISA,
                         **{f"{k}_ms": v * 1e3 for k, v in t.items()},
                         **{f"{k}_speed_vs_fp32": t["fp32"] / t[k] for k in routes}})
    torch.set_num_threads(threads)
    return rows


def print_cpu(results: dict, s: dict) -> None:
    """The k-means and CPU-forward rows of the table."""
    for r in results["kmeans"]:
        print(f"k-means 16 centroids per {r['granularity']:7s} {r['shape']}, {r['threads']} thread(s): {r['kmeans_s']:.3f} s, "
              f"sort {r['sort_s']:.3f} s, "
              f"ratio {r['ratio']:.2f}x (target <= 1.5)")
    print(f"CPU forward, 4 layers of {s['gemm']}x{s['gemm']} (speed vs fp32; targets int8 >= 1.0 at M 1, 8; codebook >= 0.8); "
          f"compiled CPU kernels: {cpu.why_not()}, C linears {cpu.ISA}; {results['isa_env'] or 'no ISA caps'}")
    for r in results["cpu_forward"]:
        print(f"  {r['threads']} thread(s), M={r['M']:3d}: fp32 {r['fp32_ms']:7.2f} ms | bf16 {r['bf16_speed_vs_fp32']:.2f}x | "
              f"int8 {r['int8_speed_vs_fp32']:.2f}x (bit-exact blocks {r['int8_blocked_speed_vs_fp32']:.2f}x) | "
              f"codebook4 {r['codebook4_speed_vs_fp32']:.2f}x (bit-exact blocks {r['codebook4_blocked_speed_vs_fp32']:.2f}x; "
              f"torch route {r['codebook4_torch_speed_vs_fp32']:.2f}x)")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="the small setting (under 2 minutes)")
    parser.add_argument("--setting", choices=sorted(SETTINGS), help="quick, medium (0.5 GB) or full (~1B parameters)")
    parser.add_argument("--cpu-only", action="store_true", help="k-means and CPU forward only (scale-SETTING-cpu.json)")
    parser.add_argument("--cpu-time", action="store_true", help="time k-means and CPU forward by process CPU time, one thread only")
    parser.add_argument("--child", nargs="+")
    parser.add_argument("--repeat", type=int, default=11, help="CPU forward: best of this many turns (more on a busy machine)")
    parser.add_argument("--note", help="a note stored in the JSON (e.g. how loaded the machine was)")
    parser.add_argument("--load-paths", type=int, nargs="?", const=3, metavar="RUNS",
                        help="only load into meta vs a build function, RUNS times each (scale-SETTING-load-paths.json)")
    args = parser.parse_args()
    if args.child:
        what, setting, *rest = args.child
        s = SETTINGS[setting]
        result = {"compress": child_compress, "load": child_load, "baseline": child_baseline}[what](s, *rest)
        print(json.dumps(result))
        return 0

    setting = args.setting or ("quick" if args.quick else "full")
    s = SETTINGS[setting]
    if args.load_paths:
        paths = load_paths(setting, args.load_paths)
        for recipe, r in paths.items():
            for how, runs in r.items():
                x = [run["peak_growth_x_file"] for run in runs]
                print(f"{recipe:9s} load into {'a meta skeleton' if how == 'meta' else 'a build function':16s}: peak growth "
                      f"{min(x):.3f}-{max(x):.3f}x file ({runs[0]['file_bytes'] / 1e6:.0f} MB), "
                      f"{min(run['load_s'] for run in runs):.2f} s best of {len(runs)}")
        write_json(f"scale-{setting}-load-paths", {"setting": setting, **s, "note": args.note, "load": paths})
        return 0
    if args.cpu_time:
        global TIMER
        TIMER = time.process_time
        torch.set_num_threads(1)
    results: dict = {"setting": setting, **s, "timer": "process CPU time" if args.cpu_time else "wall", "note": args.note,
                     "isa_env": {k: os.environ[k] for k in ISA_ENV if k in os.environ}}
    suffix = "-avx2" if cpu.ISA == "avx2" and "TORCHZIP_CPU_ISA" in os.environ else ""
    results["kmeans"] = kmeans_vs_sort(s)
    results["cpu_forward"] = cpu_forward(s, args.repeat)
    results["repeat"] = args.repeat
    if args.cpu_only:
        print_cpu(results, s)
        write_json(f"scale-{setting}-cpu" + ("-time" if args.cpu_time else "") + suffix, results)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        results["pipeline"], results["load"] = {}, {}
        for recipe in RECIPES:
            path = os.path.join(tmp, f"{recipe}.tzip")
            results["pipeline"][recipe] = run_child(["compress", setting, recipe, path])
            results["load"][recipe] = run_child(["load", setting, path])
            os.unlink(path)
        results["baselines"] = {k: run_child(["baseline", setting, k, os.path.join(tmp, f"base.{k}")]) for k in ("torch", "safetensors")}

    model_mb = results["pipeline"]["int8"]["model_bytes"] / 1e6
    print(f"setting {setting}: {model_mb:.0f} MB fp32 model")
    print_cpu(results, s)
    for recipe, r in results["pipeline"].items():
        ld = results["load"][recipe]
        print(f"{recipe:9s}: compress {r['compress_s']:.1f} s + export {r['export_s']:.1f} s "
              f"({r['model_bytes'] / r['export_s'] / 1e6:.0f} MB/s of fp32), peak growth {r['peak_growth_x_model']:.3f}x model "
              f"(target <= 0.25; compress {r.get('compress_peak_x_model', float('nan')):.3f}x, freeze + export "
              f"{r.get('export_peak_x_model', float('nan')):.3f}x); file {r['file_bytes'] / 1e6:.0f} MB; "
              f"load into meta {ld['load_s']:.2f} s, "
              f"{ld['decoded_MB_s']:.0f} MB/s decoded, peak growth {ld['peak_growth_x_file']:.2f}x file (target <= 1.3)")
    for k, r in results["baselines"].items():
        print(f"{k:11s}: save {r['save_MB_s']:.0f} MB/s, load {r['load_MB_s']:.0f} MB/s, file {r['file_bytes'] / 1e6:.0f} MB")
    write_json(("scale" if setting == "full" else f"scale-{setting}") + suffix, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
