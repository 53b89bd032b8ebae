"""The Triton Huffman decoder matches the CPU decoder bit for bit (CPU interpreter without a GPU)."""

from __future__ import annotations

import dataclasses
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from torchzip.errors import FormatError  # noqa: E402
from torchzip.export.huffman import decode, encode  # noqa: E402
from torchzip.kernels.huffman_decode import decode_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def rng(fresh_seed: int) -> np.random.Generator:
    """numpy generator on the test's fresh seed (conftest prints it; TORCHZIP_TEST_SEED replays)."""
    return np.random.default_rng(fresh_seed)


def check_same(stream) -> None:
    expected = decode(stream)
    got = decode_triton(stream, DEVICE)
    assert got.dtype == torch.int32 and got.device.type == DEVICE
    np.testing.assert_array_equal(got.cpu().numpy(), expected)


def skewed(rng: np.random.Generator, n: int, alphabet: int) -> np.ndarray:
    p = 1.0 / np.arange(1, alphabet + 1) ** 1.2
    return rng.permutation(alphabet)[rng.choice(alphabet, n, p=p / p.sum())]


# The interpreter runs a numpy op per kernel statement and step, so streams stay small.
@pytest.mark.parametrize(
    "alphabet, n, chunk_size",
    [
        (16, 3000, 200),  # last chunk short
        (256, 2000, 100),  # exact multiple of the chunk size
        (300, 1500, 97),  # uint16 symbols, odd chunk size
        (2, 700, 64),
        (4000, 800, 33),  # long codes, many chunks: several programs
    ],
)
def test_skewed_streams(rng, alphabet, n, chunk_size):
    check_same(encode(skewed(rng, n, alphabet), alphabet, chunk_size=chunk_size))


@pytest.mark.parametrize("alphabet, group", [(2, 8), (3, 4), (6, 2), (16, 2)])
def test_grouped_codes(rng, alphabet, group):
    # Codes for several symbols are expanded after the kernel; n is not a multiple of the group.
    n = int(rng.integers(300, 900)) * group + int(rng.integers(1, group))
    check_same(encode(skewed(rng, n, alphabet), alphabet, chunk_size=int(rng.integers(5, 60)), group=group))


def test_flat_stream(rng):
    stream = encode(rng.permutation(np.tile(np.arange(256), 10)), 256, chunk_size=150)
    assert set(stream.lengths.tolist()) == {8}
    check_same(stream)


def test_length_limited_long_codes(rng):
    # Fibonacci-like counts push codes to the 12-bit limit; windows straddle words.
    counts = [1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610]
    symbols = rng.permutation(np.repeat(np.arange(len(counts)), counts))
    stream = encode(symbols, chunk_size=77, max_len=12)
    assert stream.lengths.max() == 12
    check_same(stream)


@pytest.mark.parametrize("chunk_size", [1, 5, 4096])
def test_chunk_size_extremes(rng, chunk_size):
    check_same(encode(skewed(rng, 300, 20), 20, chunk_size=chunk_size))


def test_one_lane(rng):
    check_same(encode(skewed(rng, 200, 10), 10, chunk_size=1000))


def test_nonzero_symbols_past_the_end_raise(rng):
    # Lone code value 0b1111 of quads over {0, 1}: 6 symbols leave digits 1, 1 of the second code
    # past the end, which a reader must reject.
    stream = encode(np.array([1, 1, 0, 0, 1, 1]), 2, group=4)
    bad = dataclasses.replace(stream, lengths=np.eye(16, dtype=np.uint8)[0b1111], payload=b"\0")
    with pytest.raises(FormatError, match="past its 6 symbols"):
        decode(bad)
    with pytest.raises(FormatError, match="past its 6 symbols"):
        decode_triton(bad, DEVICE)


def test_lone_symbol_and_empty():
    check_same(encode(np.full(500, 3), 4, chunk_size=64, group=1))
    check_same(encode(np.full(501, 3), 4, chunk_size=64, group=4))
    check_same(encode(np.zeros(1, np.int64), 1))
    got = decode_triton(encode(np.zeros(0, np.int64), 5), DEVICE)
    assert got.shape == (0,)


def test_corrupted_stream_raises_like_cpu(rng):
    stream = encode(skewed(rng, 1000, 30), 30, chunk_size=100)
    payload = bytearray(stream.payload)
    payload[len(payload) // 2] ^= 0xFF
    bad = dataclasses.replace(stream, payload=bytes(payload))
    try:
        expected = decode(bad)
    except FormatError as err:
        with pytest.raises(FormatError) as got:
            decode_triton(bad, DEVICE)
        assert str(got.value) == str(err)
    else:  # the flip went unnoticed (codes resynchronised): both decoders agree anyway
        np.testing.assert_array_equal(decode_triton(bad, DEVICE).cpu().numpy(), expected)
    bits = stream.chunk_bits.copy()
    bits[3] += 1
    with pytest.raises(FormatError):
        decode_triton(dataclasses.replace(stream, chunk_bits=bits), DEVICE)
    with pytest.raises(FormatError):
        decode_triton(dataclasses.replace(stream, payload=stream.payload[:-3]), DEVICE)
