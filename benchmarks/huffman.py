"""Benchmark the Huffman codec (torchzip.export.huffman) against zlib, lzma and zstd.

Builds realistic streams of symbols, each at least 1 MiB (2**20 symbols or more; ``--quick`` uses
2**17): 4-bit codebook indices of Gaussian weights (16 Lloyd-Max levels), per-channel int8 values
of Gaussian weights (as bytes 0..255), the positions of a 90%-sparse mask as the artifact codes
them (gaps with an escape symbol, ``streams.gaps_encode``), and the raw geometric gaps clipped at
255 (a long-tailed stream with 16-bit codes). For each it reports the order-0 entropy, our coded size (payload +
lengths table + chunk table), the symbols per code the encoder picked (``group``) and the
lane length, and the ratio to the entropy, encode/decode speed, and the sizes and
speeds of zlib -9, lzma -9 and zstd -19 on the same symbols as bytes. Results go to
``benchmarks/results/huffman.json``.

Sizes count the code-length table and chunk table exactly as docs/FORMAT.md stores them
(``huffman.stored_bytes``): nibble-packed lengths, bit-packed chunk spans.

Run: ``python benchmarks/huffman.py [--quick] [--chunk-size N] [--cpu-time]``
"""

from __future__ import annotations

import argparse
import lzma
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import zstandard

import sys

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402
from torchzip.export.huffman import TZIP_MAX_LEN  # noqa: E402
from torchzip.export.huffman import HuffmanStream, decode, encode, entropy_bits, pack_chunks, pack_lengths  # noqa: E402
from torchzip.export.streams import gaps_encode  # noqa: E402

CODECS = {  # name: (compress, decompress), at their strongest settings
    "zlib": (lambda b: zlib.compress(b, 9), zlib.decompress),
    "lzma": (lambda b: lzma.compress(b, preset=9), lzma.decompress),
    "zstd": (lambda b: zstandard.ZstdCompressor(level=19).compress(b),
             lambda b: zstandard.ZstdDecompressor().decompress(b)),
}


def codebook_indices(rng: np.random.Generator, n: int) -> np.ndarray:
    """Indices into a 16-entry 1-D k-means (Lloyd-Max) codebook of Gaussian weights."""
    w = np.sort(rng.standard_normal(n))
    levels = np.quantile(w, (np.arange(16) + 0.5) / 16)
    for _ in range(30):  # Lloyd iterations on sorted data: cells are contiguous runs
        edges = np.searchsorted(w, (levels[1:] + levels[:-1]) / 2)
        sums = np.add.reduceat(w, np.concatenate(([0], edges)))
        levels = sums / np.diff(np.concatenate(([0], edges, [n])))
    x = rng.standard_normal(n)
    return np.searchsorted((levels[1:] + levels[:-1]) / 2, x).astype(np.uint8)


def int8_values(rng: np.random.Generator, n: int) -> np.ndarray:
    """Gaussian weights with per-row scales, quantized symmetric per row to int8, as bytes."""
    rows = 1024
    w = rng.standard_normal((rows, n // rows)) * rng.lognormal(0, 0.5, (rows, 1))
    scale = np.abs(w).max(axis=1, keepdims=True) / 127
    return np.round(w / scale).astype(np.int8).view(np.uint8).reshape(-1)


def sparse_gaps(rng: np.random.Generator, n: int) -> tuple[np.ndarray, int]:
    """Positions of a 90%-sparse mask as the artifact stores them: gaps with an escape symbol
    (``torchzip.export.streams.gaps_encode``). Returns the symbols and the alphabet size."""
    flat = np.flatnonzero(rng.random(n * 6) < 0.1)  # over n symbols once escapes are added
    symbols, escape = gaps_encode(flat)
    return symbols.astype(np.uint8), escape + 1


def raw_gaps(rng: np.random.Generator, n: int) -> np.ndarray:
    """Zeros between the non-zeros of a 90%-sparse mask (geometric), clipped at 255: long codes."""
    return np.minimum(rng.geometric(0.1, n) - 1, 255).astype(np.uint8)


CLOCK = time.perf_counter  # --cpu-time switches to process CPU time (steadier on a busy machine)


def best_time(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = CLOCK()
        fn()
        best = min(best, CLOCK() - t)
    return best


def coded_bytes(stream: HuffmanStream) -> dict[str, int]:
    """Sizes of the parts of a coded stream as a .tzip file stores them."""
    payload = len(stream.payload)
    lengths = len(pack_lengths(stream.lengths))
    chunks = len(pack_chunks(stream.chunk_bits)[0])
    return {"payload": payload, "lengths": lengths, "chunks": chunks, "total": payload + lengths + chunks}


def bench_stream(name: str, symbols: np.ndarray, alphabet: int, args: argparse.Namespace) -> dict:
    raw = symbols.tobytes()
    n = symbols.size
    mib = len(raw) / 2**20
    row: dict = {"stream": name, "symbols": n, "alphabet": alphabet}
    row["entropy_bytes"] = entropy_bits(symbols) / 8

    stream = encode(symbols, alphabet, chunk_size=args.chunk_size, max_len=TZIP_MAX_LEN)
    assert np.array_equal(decode(stream), symbols)
    sizes = coded_bytes(stream)
    row.update(group=stream.group, chunk_size=stream.chunk_size, n_chunks=int(stream.chunk_bits.size))
    row.update({f"huffman_{k}": v for k, v in sizes.items()})
    for part in ("payload", "total"):
        row[f"{part}_over_entropy"] = sizes[part] / row["entropy_bytes"] - 1
    enc = best_time(lambda: encode(symbols, alphabet, chunk_size=args.chunk_size, max_len=TZIP_MAX_LEN), args.reps)

    blobs = {lib: pack(raw) for lib, (pack, _) in CODECS.items()}
    # Interleave our decode with zlib's so both see the same machine load.
    dec = zdec = float("inf")
    for _ in range(3 * args.reps):
        dec = min(dec, best_time(lambda: decode(stream), 1))
        zdec = min(zdec, best_time(lambda: zlib.decompress(blobs["zlib"]), 1))
    row.update(encode_s=enc, decode_s=dec, encode_MBps=mib / enc, decode_MBps=mib / dec,
               encode_Msym_per_s=n / enc / 1e6, decode_Msym_per_s=n / dec / 1e6)
    for lib, (pack, unpack) in CODECS.items():
        blob = blobs[lib]
        row[f"{lib}_bytes"] = len(blob)
        row[f"{lib}_compress_MBps"] = mib / best_time(lambda: pack(raw), 1)
        undo = zdec if lib == "zlib" else best_time(lambda: unpack(blob), args.reps)
        row[f"{lib}_decompress_MBps"] = mib / undo

    if torch.cuda.is_available():
        from torchzip.kernels.huffman_decode import decode_triton

        decode_triton(stream, "cuda")  # compile
        torch.cuda.synchronize()

        def gpu() -> None:
            decode_triton(stream, "cuda")
            torch.cuda.synchronize()

        row["triton_decode_MBps"] = mib / best_time(gpu, args.reps)
    return row


def sweep(symbols: np.ndarray, reps: int) -> list[dict]:
    """Decode speed and total size against lane length (codes per lane) on one stream."""
    raw_zlib = zlib.compress(symbols.tobytes(), 9)
    rows = []
    for cs in (128, 256, 384, 512, 640, 768, 1024, 2048):
        stream = encode(symbols, 256, chunk_size=cs, max_len=TZIP_MAX_LEN)
        dec = zdec = float("inf")
        for _ in range(2 * reps):
            dec = min(dec, best_time(lambda: decode(stream), 1))
            zdec = min(zdec, best_time(lambda: zlib.decompress(raw_zlib), 1))
        total = coded_bytes(stream)["total"]
        rows.append({"chunk_size": cs, "decode_s": dec, "zlib_decompress_s": zdec,
                     "total_over_entropy": total / (entropy_bits(symbols) / 8) - 1})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2**17 symbols per stream, fewer repeats")
    parser.add_argument("--chunk-size", type=int, default=None, help="codes per lane (default: auto)")
    parser.add_argument("--reps", type=int, default=None, help="timing repeats (best is kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with process CPU time instead of wall clock (for shared machines)")
    args = parser.parse_args()
    global CLOCK
    if args.cpu_time:
        CLOCK = time.process_time
    torch.set_num_threads(1)  # like zlib, lzma and zstd here: one core
    args.reps = args.reps or (3 if args.quick else 7)
    n = 2**17 if args.quick else 2**20

    rng = np.random.default_rng(args.seed)
    streams = {  # name: (symbols, alphabet size)
        "codebook4": (codebook_indices(rng, n), 16),
        "int8": (int8_values(rng, n), 256),
        "gaps90": sparse_gaps(rng, n),
        "gaps90raw": (raw_gaps(rng, n), 256),
    }
    rows = [bench_stream(name, s, a, args) for name, (s, a) in streams.items()]

    head = (f"{'stream':10} {'G':>2} {'lane':>4} {'entropy':>8} {'huffman':>8} {'+%':>5} {'zlib':>8} {'lzma':>8} "
            f"{'zstd':>8} {'enc MB/s':>8} {'dec MB/s':>8} {'zlib dec':>8} {'lzma dec':>8} {'zstd dec':>8}")
    print(head)
    for r in rows:
        print(f"{r['stream']:10} {r['group']:2d} {r['chunk_size']:4d} {r['entropy_bytes']:8.0f} {r['huffman_total']:8d} "
              f"{100 * r['total_over_entropy']:5.2f} "
              f"{r['zlib_bytes']:8d} {r['lzma_bytes']:8d} {r['zstd_bytes']:8d} {r['encode_MBps']:8.1f} "
              f"{r['decode_MBps']:8.1f} {r['zlib_decompress_MBps']:8.1f} {r['lzma_decompress_MBps']:8.1f} "
              f"{r['zstd_decompress_MBps']:8.1f}")
        if "triton_decode_MBps" in r:
            print(f"{'':10} triton decode {r['triton_decode_MBps']:.1f} MB/s")
    print("symbols/s (millions), encode / decode: "
          + ", ".join(f"{r['stream']} {r['encode_Msym_per_s']:.0f} / {r['decode_Msym_per_s']:.0f}" for r in rows))
    print("sizes in bytes; huffman = payload + code-length table + chunk table as stored; +% over entropy; "
          "G = symbols per code, lane = codes per lane; speeds in MB/s of 1-byte symbols")

    checks = []
    for r in rows:
        checks.append({
            "stream": r["stream"],
            "payload_within_2pct_of_entropy": r["payload_over_entropy"] <= 0.02,
            "total_within_2pct_of_entropy": r["total_over_entropy"] <= 0.02,
            "smaller_than_zlib_lzma_zstd": all(r["huffman_total"] < r[f"{k}_bytes"] for k in CODECS),
            "decode_at_least_zlib_speed": r["decode_MBps"] >= r["zlib_decompress_MBps"],
        })
    print("\ntargets:")
    for c in checks:
        marks = (f"{k}={'yes' if v else 'NO'}" for k, v in c.items() if k != "stream")
        print(f"  {c['stream']:10} " + "  ".join(marks))

    sweep_rows = []
    if not args.quick:
        sweep_rows = sweep(streams["int8"][0], args.reps)
        print("\nint8 stream, decode time against lane length:")
        for s in sweep_rows:
            print(f"  lanes of {s['chunk_size']:4d} codes: decode {1e3 * s['decode_s']:6.2f} ms "
                  f"(zlib {1e3 * s['zlib_decompress_s']:5.2f} ms), "
                  f"total {100 * s['total_over_entropy']:5.2f}% over entropy")

    result = {
        "numpy": np.__version__,
        "quick": args.quick,
        "clock": "process CPU time" if args.cpu_time else "wall clock",
        "torch_threads": 1,
        "symbols_per_stream": n,
        "size_convention": "total = payload + nibble-packed code lengths + bit-packed chunk spans (docs/FORMAT.md)",
        "streams": rows,
        "targets": checks,
        "chunk_size_sweep_int8": sweep_rows,
    }
    print(f"\nwrote {write_json('huffman-quick' if args.quick else 'huffman', result)}")


if __name__ == "__main__":
    main()
