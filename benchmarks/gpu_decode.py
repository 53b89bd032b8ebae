"""Huffman decoding on the GPU against the CPU decoder and a plain host->device copy.

    python benchmarks/gpu_decode.py [--quick]

Needs CUDA. For 4-bit and 8-bit symbol streams of 10**8 symbols (10**7 with --quick): decode
symbols/s and output GB/s with the Triton decoder, the numpy CPU decoder, and the time to copy the
raw symbols host->device (pinned). Then end to end: a model of >= 1 GB of fp32 weights, int8
quantized and exported, loaded onto the GPU with CPU decoding and with GPU decoding. Prints a
table and writes benchmarks/results/gpu_decode-<device>.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torchzip as tz  # noqa: E402
from common import write_json  # noqa: E402
from torchzip.export import huffman  # noqa: E402
from torchzip.export.huffman import TZIP_MAX_LEN  # noqa: E402


def cuda_seconds(fn, reps: int = 5) -> float:
    """Median wall time of ``fn`` with the GPU synchronised around it."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def streams(n: int, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, int]]:
    w = rng.standard_normal(n).astype(np.float32)
    levels = np.quantile(w[: 1 << 20], (np.arange(16) + 0.5) / 16)  # 16 equal-mass levels
    four = np.searchsorted((levels[1:] + levels[:-1]) / 2, w)  # nearest level
    eight = np.clip(np.round(w / (4.0 / 127)), -127, 127).astype(np.int8).view(np.uint8)
    return {"4-bit": (four.astype(np.int64), 16), "8-bit": (eight.astype(np.int64), 256)}


def bench_streams(n: int, device: torch.device) -> list[dict]:
    from torchzip.kernels.huffman_decode import decode_triton

    rows = []
    for name, (symbols, alphabet) in streams(n, np.random.default_rng(0)).items():
        stream = huffman.encode(symbols, alphabet, max_len=TZIP_MAX_LEN)
        out = decode_triton(stream, device)
        assert torch.equal(out.cpu().long(), torch.from_numpy(symbols)), "GPU decode differs from the input"
        gpu = cuda_seconds(lambda: decode_triton(stream, device))
        t = time.perf_counter()
        huffman.decode(stream)
        cpu = time.perf_counter() - t
        raw = torch.from_numpy(symbols.astype(np.uint8)).pin_memory()
        copy = cuda_seconds(lambda: raw.to(device, non_blocking=True))
        rows.append({
            "stream": name, "symbols": n, "coded_bytes": huffman.stored_bytes(stream),
            "gpu_decode_s": gpu, "gpu_Gsym_per_s": n / gpu / 1e9, "gpu_output_GBps_int32": 4 * n / gpu / 1e9,
            "cpu_decode_s": cpu, "cpu_Msym_per_s": n / cpu / 1e6, "h2d_copy_raw_s": copy,
        })
        print(f"{name:6} {n:>11,} symbols: GPU {rows[-1]['gpu_Gsym_per_s']:7.1f} Gsym/s ({gpu * 1e3:8.2f} ms)  "
              f"CPU {rows[-1]['cpu_Msym_per_s']:8.1f} Msym/s ({cpu * 1e3:8.1f} ms)  raw H2D copy {copy * 1e3:7.2f} ms")
    return rows


def bench_load(gigabytes: float, device: torch.device) -> dict:
    width = 8192
    layers = max(1, round(gigabytes * 1e9 / (4 * width * width)))

    def skeleton() -> nn.Module:
        return nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])

    model = tz.compress(skeleton(), [tz.Quantize()], progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.tzip"
        size = tz.export(model, path, progress=False)
        times = {}
        for decode in ("cpu", "auto"):
            torch.cuda.synchronize()
            t = time.perf_counter()
            loaded = tz.load(path, skeleton(), device=device, decode=decode, progress=False)
            torch.cuda.synchronize()
            times[decode] = time.perf_counter() - t
            del loaded
    row = {"fp32_weight_bytes": 4 * layers * width * width, "file_bytes": size,
           "load_cpu_decode_s": times["cpu"], "load_gpu_decode_s": times["auto"]}
    print(f"load {row['fp32_weight_bytes'] / 1e9:.2f} GB model ({size / 1e9:.2f} GB file): CPU decode {times['cpu']:.2f} s, "
          f"GPU decode {times['auto']:.2f} s ({times['cpu'] / times['auto']:.2f}x)")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10**7 symbols and a 1 GB model")
    parser.add_argument("--model-gb", type=float, default=1.1)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu_decode.py needs a CUDA GPU (none found); the decoder's correctness is "
                 "tested on the CPU under TRITON_INTERPRET=1 by tests/test_huffman_kernel.py")
    device = torch.device("cuda")
    rows = bench_streams(10**7 if args.quick else 10**8, device)
    load = bench_load(args.model_gb, device)
    name = "gpu_decode-" + torch.cuda.get_device_name().replace(" ", "_")
    print(f"wrote {write_json(name, {'streams': rows, 'load': load})}")


if __name__ == "__main__":
    main()
