"""Tests for the canonical, length-limited Huffman codec in torchzip.export.huffman."""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchzip.errors import FormatError
from torchzip.export import huffman
from torchzip.export.huffman import (
    MAX_CODE_LEN,
    HuffmanStream,
    canonical_codes,
    check_stream,
    code_lengths,
    decode,
    encode,
    entropy_bits,
    pack_chunks,
    stored_bytes,
    unpack_chunks,
)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture
def rng(fresh_seed: int) -> np.random.Generator:
    """numpy generator on the test's fresh seed (conftest prints it; TORCHZIP_TEST_SEED replays)."""
    return np.random.default_rng(fresh_seed)


def heap_huffman_cost(counts: np.ndarray) -> tuple[int, int]:
    """(total bits, longest code) of a plain Huffman code built with a heap (independent reference)."""
    heap = [(int(c), i, 0) for i, c in enumerate(counts) if c > 0]
    if len(heap) <= 1:
        return (int(heap[0][0]) if heap else 0), min(len(heap), 1)
    heapq.heapify(heap)
    cost, tie, depth = 0, len(counts), 0
    while len(heap) > 1:
        a, _, da = heapq.heappop(heap)
        b, _, db = heapq.heappop(heap)
        cost += a + b  # every merge adds one bit to every symbol below it
        depth = max(da, db) + 1
        heapq.heappush(heap, (a + b, tie, depth))
        tie += 1
    return cost, heap[0][2]


def kraft(lengths: np.ndarray) -> Fraction:
    return sum((Fraction(1, 2 ** int(x)) for x in lengths if x > 0), Fraction(0))


def coded_bits(stream: HuffmanStream, symbols: np.ndarray) -> int:
    return int(stream.lengths.astype(np.int64)[symbols].sum())


def zipf(rng: np.random.Generator, n: int, alphabet: int, a: float) -> np.ndarray:
    p = 1.0 / np.arange(1, alphabet + 1) ** a
    return rng.choice(alphabet, n, p=p / p.sum())


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("alphabet", [2, 16, 256, 1000])
def test_round_trip_geometric(rng, alphabet):
    symbols = np.minimum(rng.geometric(0.15, 20_000) - 1, alphabet - 1)
    stream = encode(symbols, alphabet, chunk_size=int(rng.integers(1, 700)))
    out = decode(stream)
    assert out.dtype == (np.uint8 if alphabet <= 256 else np.uint16)
    np.testing.assert_array_equal(out, symbols)


@pytest.mark.parametrize("a", [0.6, 1.1, 2.0])
def test_round_trip_zipf(rng, a):
    symbols = zipf(rng, 30_000, 300, a)
    stream = encode(symbols, 300)
    np.testing.assert_array_equal(decode(stream), symbols)


def test_round_trip_flat(rng):
    symbols = rng.integers(0, 256, 50_000)
    stream = encode(symbols, 256)
    assert set(np.unique(stream.lengths)) == {8}
    assert len(stream.payload) == symbols.size
    np.testing.assert_array_equal(decode(stream), symbols)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 7, 8, 9, 63, 64, 1000, 1023, 4096, 65536])
def test_chunk_sizes(rng, chunk_size):
    symbols = zipf(rng, 5000, 40, 1.0)
    stream = encode(symbols, 40, chunk_size=chunk_size)
    assert stream.chunk_bits.size == -(-symbols.size // chunk_size)
    np.testing.assert_array_equal(decode(stream), symbols)


def test_chunks_start_mid_byte_and_mid_word(rng):
    # Lane offsets are in bits: with odd code lengths most lanes start inside a byte.
    symbols = zipf(rng, 4001, 7, 1.3)
    stream = encode(symbols, 7, chunk_size=3, group=1)
    assert np.any(stream.chunk_bits % 8 != 0)
    assert np.any(stream.chunk_bits % 32 > 24)  # a lane's first code straddles a 32-bit word
    lanes = -(-symbols.size // 3)
    spans = [int(stream.lengths.astype(np.int64)[symbols[j::lanes]].sum()) for j in range(lanes)]
    np.testing.assert_array_equal(stream.chunk_bits, np.cumsum([0] + spans[:-1]))
    np.testing.assert_array_equal(decode(stream), symbols)


def reference_payload(symbols: np.ndarray, alphabet: int, group: int, lengths: np.ndarray, chunk_size: int):
    """Payload bytes and lane offsets built bit by bit with Python strings (independent of encode)."""
    padded = list(symbols) + [0] * (-len(symbols) % group)
    values = [sum(int(padded[i + k]) * alphabet**k for k in range(group)) for i in range(0, len(padded), group)]
    codes = canonical_codes(lengths)
    lanes = -(-len(values) // chunk_size)
    bits, starts = "", []
    for lane in range(lanes):
        starts.append(len(bits))
        for v in values[lane::lanes]:
            bits += format(int(codes[v]), f"0{int(lengths[v])}b")
    bits += "0" * (-len(bits) % 8)
    return bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)), starts


@pytest.mark.parametrize("alphabet, group", [(2, 8), (3, 4), (4, 4), (5, 2), (16, 2), (9, 1), (300, 1)])
def test_lane_layout_matches_bit_by_bit_reference(rng, alphabet, group):
    n = int(rng.integers(1, 900))  # rarely a multiple of the group
    symbols = zipf(rng, n, alphabet, 1.1)
    chunk_size = int(rng.integers(1, 40))
    stream = encode(symbols, alphabet, chunk_size=chunk_size, group=group)
    payload, starts = reference_payload(symbols, alphabet, group, stream.lengths, chunk_size)
    assert stream.group == group and stream.lengths.size == alphabet**group
    assert bytes(stream.payload) == payload
    assert stream.chunk_bits.tolist() == starts
    np.testing.assert_array_equal(decode(stream), symbols)


@pytest.mark.parametrize("alphabet", [2, 3, 6, 16])
def test_grouping_gets_small_alphabets_near_entropy(rng, alphabet):
    # One code per symbol costs at least a bit: a skewed small alphabet is far above its entropy
    # then. Codes for pairs or quads (picked automatically) close most of that gap.
    p = np.full(alphabet, 0.12 / (alphabet - 1))
    p[0] = 0.88
    symbols = rng.choice(alphabet, 200_003, p=p)
    best = encode(symbols, alphabet, max_len=15)
    single = encode(symbols, alphabet, group=1, max_len=15)
    assert best.group > 1
    np.testing.assert_array_equal(decode(best), symbols)
    entropy = entropy_bits(symbols) / 8
    assert len(single.payload) > 1.2 * entropy
    assert len(best.payload) - entropy < 0.3 * (len(single.payload) - entropy)
    for group in (2, 4, 8):
        if alphabet**group <= 256:
            other = encode(symbols, alphabet, group=group, max_len=15)
            np.testing.assert_array_equal(decode(other), symbols)
            assert stored_bytes(best) <= stored_bytes(other) + 64  # auto is (near) the smallest


def test_group_arguments_are_checked():
    with pytest.raises(ValueError, match="group"):
        encode(np.arange(5), 5, group=3)
    with pytest.raises(ValueError, match="group"):
        encode(np.arange(5), 256, group=2)
    stream = encode(np.arange(16).repeat(3), 16, group=2)
    with pytest.raises(FormatError, match="group"):
        decode(dataclasses.replace(stream, group=4))
    with pytest.raises(FormatError, match="alphabet"):
        decode(dataclasses.replace(stream, alphabet=15))
    with pytest.raises(FormatError, match="group"):
        decode(dataclasses.replace(stream, group=0))
    with pytest.raises(FormatError, match="alphabet"):
        decode(dataclasses.replace(encode(np.arange(300), 300), alphabet=256))
    with pytest.raises(FormatError, match="group"):  # a**g in Python ints, no numpy overflow
        decode(dataclasses.replace(stream, alphabet=np.int64(2**61 + 1), group=8))
    numpy_alphabet = dataclasses.replace(encode(np.arange(4).repeat(9), 4, group=4), alphabet=np.uint8(4))
    np.testing.assert_array_equal(decode(numpy_alphabet), np.arange(4).repeat(9))
    with pytest.raises(ValueError, match="group"):
        encode(np.zeros(0, np.int64), 0, group=2)
    # Groups whose used values cannot all get codes under max_len are skipped, not an error.
    bits = np.random.default_rng(0).integers(0, 2, 1000)
    np.testing.assert_array_equal(decode(encode(bits, 2, max_len=4)), bits)


@pytest.mark.parametrize("alphabet, n_used", [(4, 4), (16, 16), (300, 12), (40_000, 5)])
@pytest.mark.parametrize("chunk_size", [1, 3, 1001, 4096])
@pytest.mark.parametrize("n", [300_000, 1 << 19])
def test_long_streams(rng, alphabet, n_used, chunk_size, n):
    # Lane counts that do not divide the code count leave a partial last step; small alphabets
    # are grouped (codes for 2 or 4 symbols), uint16 symbols are not.
    used = rng.choice(alphabet, n_used, replace=False)
    symbols = used[zipf(rng, n, used.size, 1.2)]
    stream = encode(symbols, alphabet, chunk_size=chunk_size)
    np.testing.assert_array_equal(decode(stream), symbols)


def test_empty_stream():
    for stream in (encode(np.zeros(0, np.int64)), encode(np.zeros(0, np.int64), 10)):
        assert stream.payload == b"" and stream.n_symbols == 0 and stream.chunk_bits.size == 0
        out = decode(stream)
        assert out.size == 0
    assert encode(np.zeros(0, np.int64), 10).lengths.tolist() == [0] * 10


def test_one_symbol_alphabet():
    symbols = np.zeros(1001, np.int64)
    stream = encode(symbols, 1, chunk_size=100, group=1)
    assert stream.lengths.tolist() == [1]
    assert stream.payload == bytes(126)  # 1001 zero bits
    np.testing.assert_array_equal(decode(stream), symbols)
    grouped = encode(symbols, 1)  # 8 symbols per code, one bit each
    assert grouped.group == 8 and grouped.payload == bytes(16)
    np.testing.assert_array_equal(decode(grouped), symbols)


def test_single_used_symbol_in_big_alphabet():
    symbols = np.full(77, 40_000)
    stream = encode(symbols, 65_536)
    assert np.count_nonzero(stream.lengths) == 1 and stream.lengths[40_000] == 1
    out = decode(stream)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, symbols)


def test_sparse_use_of_65536_symbol_alphabet(rng):
    used = rng.choice(65_536, 3000, replace=False)
    symbols = used[zipf(rng, 40_000, used.size, 0.9)]
    stream = encode(symbols, 65_536)
    assert stream.lengths.size == 65_536
    assert np.count_nonzero(stream.lengths) == np.unique(symbols).size
    np.testing.assert_array_equal(decode(stream), symbols)


def test_full_65536_alphabet():
    symbols = np.arange(65_536)
    stream = encode(symbols, max_len=16)
    assert set(stream.lengths.tolist()) == {16}
    np.testing.assert_array_equal(decode(stream), symbols)
    with pytest.raises(ValueError, match="cannot all get codes"):
        code_lengths(np.ones(65_536, np.int64), max_len=15)


def test_payload_may_be_a_numpy_array(rng):
    symbols = zipf(rng, 999, 20, 1.0)
    stream = encode(symbols)
    stream = dataclasses.replace(stream, payload=np.frombuffer(stream.payload, np.uint8))
    np.testing.assert_array_equal(decode(stream), symbols)


def test_bit_layout_is_msb_first():
    # counts give lengths 1, 2, 2: canonical codes 0, 10, 11.
    symbols = np.array([1, 0, 2, 2, 0, 0])
    stream = encode(symbols, 3, chunk_size=2, group=1)
    assert stream.lengths.tolist() == [1, 2, 2]
    assert canonical_codes(stream.lengths).tolist() == [0b0, 0b10, 0b11]
    # 3 lanes of 2: lane 0 holds symbols 0 and 3 (1, 2), lane 1 symbols 1 and 4 (0, 0), lane 2
    # symbols 2 and 5 (2, 0). Bits: 10 11 | 0 0 | 11 0 -> 1011 0011 0(0000000 padding)
    assert stream.payload == bytes([0b10110011, 0b00000000])
    assert stream.chunk_bits.tolist() == [0, 4, 6]
    np.testing.assert_array_equal(decode(stream), symbols)


def test_canonical_codes_order():
    lengths = np.array([3, 0, 2, 3, 2, 2])
    codes = canonical_codes(lengths)
    # sorted by (length, symbol): 2->00, 4->01, 5->10, 0->110, 3->111
    assert codes.tolist() == [0b110, 0, 0b00, 0b111, 0b01, 0b10]


# ---------------------------------------------------------------------------------------------
# Code lengths: limits, Kraft, optimality


def fibonacci(n: int) -> np.ndarray:
    f = [1, 1]
    while len(f) < n:
        f.append(f[-1] + f[-2])
    return np.array(f[:n], np.int64)


@pytest.mark.parametrize("max_len", [5, 8, 12, 16, 20])
def test_fibonacci_counts_respect_max_len(max_len):
    counts = fibonacci(30)  # plain Huffman would need a 29-bit code
    assert heap_huffman_cost(counts)[1] == 29
    lengths = code_lengths(counts, max_len)
    assert lengths.max() == max_len
    assert kraft(lengths) == 1
    symbols = np.repeat(np.arange(12), counts[:12])  # a stream using the rarest symbols
    stream = encode(symbols, max_len=max_len)
    assert stream.lengths.max() <= max_len
    np.testing.assert_array_equal(decode(stream), symbols)


def test_length_limit_is_optimal_against_brute_force(rng):
    for _ in range(40):
        n = int(rng.integers(2, 7))
        max_len = int(rng.integers(max(1, math.ceil(math.log2(n))), 5))
        counts = rng.integers(1, 1000, n) ** int(rng.integers(1, 4))
        best = min(
            sum(int(c) * l for c, l in zip(counts, ls))
            for ls in itertools.product(range(1, max_len + 1), repeat=n)
            if sum(Fraction(1, 2**l) for l in ls) == 1
        )
        lengths = code_lengths(counts, max_len)
        assert lengths.max() <= max_len and kraft(lengths) == 1
        assert int((counts * lengths).sum()) == best


@SETTINGS
@given(
    counts=st.lists(st.integers(0, 10**6), min_size=1, max_size=300),
    max_len=st.integers(9, MAX_CODE_LEN),
)
def test_code_lengths_match_heap_huffman(counts, max_len):
    counts = np.array(counts, np.int64)
    lengths = code_lengths(counts, max_len)
    used = counts > 0
    assert np.all((lengths > 0) == used)
    assert lengths.max(initial=0) <= max_len
    if used.sum() >= 2:
        assert kraft(lengths) == 1
    elif used.sum() == 1:
        assert lengths[used].tolist() == [1]
    cost, depth = heap_huffman_cost(counts)
    ours = int((counts * lengths).sum())
    if depth <= max_len:
        assert ours == cost  # optimal when the limit does not bind
    else:
        assert ours >= cost


def test_code_lengths_edge_cases():
    assert code_lengths(np.zeros(5, np.int64)).tolist() == [0] * 5
    assert code_lengths(np.zeros(0, np.int64)).size == 0
    assert code_lengths(np.array([0, 9, 0])).tolist() == [0, 1, 0]
    assert code_lengths(np.array([3, 3])).tolist() == [1, 1]
    with pytest.raises(ValueError, match="max_len"):
        code_lengths(np.array([1, 2]), max_len=21)
    with pytest.raises(ValueError, match="max_len"):
        code_lengths(np.array([1, 2]), max_len=0)
    with pytest.raises(ValueError, match="non-negative"):
        code_lengths(np.array([1, -2]))
    with pytest.raises(ValueError, match="cannot all get codes"):
        code_lengths(np.ones(5, np.int64), max_len=2)


@pytest.mark.parametrize("kind", ["geometric", "zipf", "flat", "two"])
def test_coded_size_near_entropy(rng, kind):
    n = 100_000
    symbols = {
        "geometric": lambda: np.minimum(rng.geometric(0.1, n) - 1, 255),
        "zipf": lambda: zipf(rng, n, 256, 1.1),
        "flat": lambda: rng.integers(0, 256, n),
        "two": lambda: (rng.random(n) < 0.3).astype(np.int64),
    }[kind]()
    stream = encode(symbols, group=1)  # one code per symbol: the plain Huffman code
    counts = np.bincount(symbols)
    bits = coded_bits(stream, symbols)
    assert bits == int((counts * stream.lengths[: counts.size].astype(np.int64)).sum())
    assert len(stream.payload) == (bits + 7) // 8
    h = entropy_bits(symbols)
    assert h <= bits <= h + n  # Huffman is within 1 bit/symbol of entropy
    cost, depth = heap_huffman_cost(counts)
    if depth <= 16:
        assert bits == cost


def test_entropy_bits():
    assert entropy_bits(np.zeros(0, np.int64)) == 0.0
    assert entropy_bits(np.zeros(10, np.int64)) == 0.0
    assert entropy_bits(np.array([0, 1, 2, 3] * 5)) == pytest.approx(40.0)
    with pytest.raises(ValueError):
        entropy_bits(np.array([-1, 2]))


@SETTINGS
@given(
    weights=st.lists(st.integers(0, 50), min_size=1, max_size=70),
    n=st.integers(0, 3000),
    chunk_size=st.integers(1, 600),
    max_len=st.integers(7, 16),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_property(weights, n, chunk_size, max_len, seed):
    weights = np.array(weights, np.float64) ** 3
    if weights.sum() == 0:
        weights[0] = 1.0
    symbols = np.random.default_rng(seed).choice(weights.size, n, p=weights / weights.sum())
    stream = encode(symbols, weights.size, chunk_size=chunk_size, max_len=max_len)
    assert stream.lengths.max() <= max_len
    out = decode(stream)
    np.testing.assert_array_equal(out, symbols)


def test_encode_rejects_bad_input():
    with pytest.raises(ValueError, match="lie in"):
        encode(np.array([0, 5]), 5)
    with pytest.raises(ValueError, match="lie in"):
        encode(np.array([-1, 2]))
    with pytest.raises(ValueError, match="alphabet_size"):
        encode(np.array([1]), 70_000)
    with pytest.raises(ValueError, match="1-D"):
        encode(np.zeros((2, 2), np.int64))
    with pytest.raises(ValueError, match="integers"):
        encode(np.array([0.5]))
    with pytest.raises(ValueError, match="chunk_size"):
        encode(np.array([1]), chunk_size=0)


# ---------------------------------------------------------------------------------------------
# Malformed and corrupted streams


def test_lengths_validation():
    with pytest.raises(FormatError, match="not a prefix code"):
        canonical_codes(np.array([1, 1, 1]))
    with pytest.raises(FormatError, match="incomplete"):
        canonical_codes(np.array([1, 2, 0]))
    with pytest.raises(FormatError, match="0..20"):
        canonical_codes(np.array([21, 1]))
    with pytest.raises(FormatError, match="0..4"):
        canonical_codes(np.array([5, 5, 1, 2, 3, 4]), max_len=4)
    with pytest.raises(FormatError, match="lone used"):
        canonical_codes(np.array([0, 3]))
    with pytest.raises(FormatError, match="integers"):
        canonical_codes(np.array([1.0, 1.0]))
    with pytest.raises(FormatError, match="1-D"):
        canonical_codes(np.ones((2, 2), np.uint8))
    assert canonical_codes(np.array([0, 1])).tolist() == [0, 0]
    assert canonical_codes(np.zeros(3, np.uint8)).tolist() == [0, 0, 0]


@pytest.fixture
def sample(rng) -> tuple[HuffmanStream, np.ndarray]:
    symbols = zipf(rng, 5000, 50, 1.0)
    return encode(symbols, 50, chunk_size=97), symbols


def replace(stream: HuffmanStream, **changes) -> HuffmanStream:
    return dataclasses.replace(stream, **changes)


def test_corrupt_lengths_table(sample):
    stream, _ = sample
    lengths = stream.lengths.copy()
    lengths[np.argmax(lengths)] -= 1  # now over-full: Kraft sum above 1
    with pytest.raises(FormatError, match="not a prefix code"):
        decode(replace(stream, lengths=lengths))
    lengths = stream.lengths.copy()
    lengths[np.argmax(lengths)] += 1  # now under-full
    with pytest.raises(FormatError, match="incomplete"):
        decode(replace(stream, lengths=lengths))
    with pytest.raises(FormatError, match="codes none"):
        decode(replace(stream, lengths=np.zeros(50, np.uint8)))
    # A different but valid code parses the bits differently.
    flat = code_lengths((stream.lengths > 0).astype(np.int64))
    with pytest.raises(FormatError):
        decode(replace(stream, lengths=flat))


def test_flipped_bit_breaks_chunk_alignment():
    # Fixed seed: Huffman codes often resynchronise, so many single flips go unnoticed.
    symbols = zipf(np.random.default_rng(7), 5000, 50, 1.0)
    stream = encode(symbols, 50, chunk_size=97)
    payload = bytearray(stream.payload)
    payload[200] ^= 0x80
    with pytest.raises(FormatError, match=r"chunk \d+ decodes to end at bit \d+, but chunk \d+ starts"):
        decode(replace(stream, payload=bytes(payload)))


def test_truncated_or_extended_payload(sample):
    stream, _ = sample
    with pytest.raises(FormatError):
        decode(replace(stream, payload=stream.payload[:-1]))
    with pytest.raises(FormatError, match="too short"):
        decode(replace(stream, payload=stream.payload[:10]))
    with pytest.raises(FormatError):
        decode(replace(stream, payload=stream.payload + b"\0"))
    with pytest.raises(FormatError, match="too long"):
        decode(replace(stream, payload=stream.payload + bytes(10_000)))
    with pytest.raises(FormatError, match="uint8"):
        decode(replace(stream, payload=np.zeros(5, np.int32)))
    with pytest.raises(FormatError, match="bytes"):
        decode(replace(stream, payload="abc"))


def test_bad_chunk_offsets(sample):
    stream, _ = sample
    bits = stream.chunk_bits
    for bad in (
        bits[:-1],  # too few entries
        np.append(bits, bits[-1] + 5),  # too many
        bits + 1,  # first chunk not at 0
        np.concatenate(([0], bits[2:2], bits[1:][::-1])),  # non-monotonic
        np.where(np.arange(bits.size) == 3, bits + 1, bits),  # one offset off by a bit
        np.where(np.arange(bits.size) == bits.size - 1, 8 * len(stream.payload) + 64, bits),
        np.where(np.arange(bits.size) == 2, -5, bits),
        bits.astype(np.float64),
        bits.reshape(1, -1),
    ):
        with pytest.raises(FormatError):
            decode(replace(stream, chunk_bits=bad))


def test_lane_length_is_bounded(rng):
    # One step per code of a lane: a file may not declare one endless lane (decoding would take
    # time out of proportion to its size).
    symbols = zipf(rng, 3000, 30, 1.0)
    one_lane = encode(symbols, 30, chunk_size=5000)
    np.testing.assert_array_equal(decode(one_lane), symbols)
    for cs in (65537, 2**70):
        with pytest.raises(FormatError, match="chunk_size"):
            decode(replace(one_lane, chunk_size=cs))
    with pytest.raises(ValueError, match="chunk_size"):
        encode(symbols, 30, chunk_size=65537)


def test_nonzero_symbols_past_the_end_are_rejected():
    # Lone code value 0b1111 of quads over {0, 1}: 6 symbols leave digits 1, 1 of the second code
    # past the end, which a reader must reject (a writer pads with zeros).
    stream = encode(np.array([1, 1, 0, 0, 1, 1]), 2, group=4)
    np.testing.assert_array_equal(decode(stream), [1, 1, 0, 0, 1, 1])
    with pytest.raises(FormatError, match="past its 6 symbols"):
        decode(replace(stream, lengths=np.eye(16, dtype=np.uint8)[0b1111], payload=b"\0"))


def test_counts_that_do_not_add_up(sample):
    stream, _ = sample
    with pytest.raises(FormatError, match="chunk table"):
        decode(replace(stream, n_symbols=stream.n_symbols * 2))
    with pytest.raises(FormatError):
        decode(replace(stream, chunk_size=stream.chunk_size // 2))  # twice the lanes
    with pytest.raises(FormatError):
        decode(replace(stream, n_symbols=-1))
    with pytest.raises(FormatError):
        decode(replace(stream, chunk_size=0))
    with pytest.raises(FormatError, match="too short"):  # a huge count allocates nothing
        decode(replace(stream, n_symbols=10**9, chunk_size=65536, chunk_bits=np.zeros(15259, np.int64)))
    with pytest.raises(FormatError, match="empty"):
        decode(replace(stream, n_symbols=0, chunk_bits=np.zeros(0, np.int64)))


def test_lone_symbol_stream_with_set_bits():
    stream = encode(np.zeros(30, np.int64), 1, group=1)
    with pytest.raises(FormatError, match="non-zero"):
        decode(replace(stream, payload=b"\0\0\0\x01"))


def test_nonzero_padding_is_rejected():
    stream = encode(np.array([1, 0, 2, 2, 0, 0]), 3, chunk_size=2, group=1)
    with pytest.raises(FormatError, match="padding"):
        decode(replace(stream, payload=bytes([0b10110011, 0b00000001])))


@SETTINGS
@given(data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_random_corruption_never_crashes(data, seed):
    rng = np.random.default_rng(seed)
    alphabet = data.draw(st.integers(1, 300))
    symbols = zipf(rng, data.draw(st.integers(1, 2000)), alphabet, 1.0)
    stream = encode(symbols, alphabet, chunk_size=data.draw(st.integers(1, 300)))
    payload = bytearray(stream.payload)
    lengths = stream.lengths.copy()
    chunk_bits = stream.chunk_bits.copy()
    n, cs, group = stream.n_symbols, stream.chunk_size, stream.group
    for _ in range(data.draw(st.integers(1, 3))):
        what = data.draw(st.sampled_from(["byte", "length", "offset", "n", "cs", "group", "cut"]))
        if what == "byte" and payload:
            payload[data.draw(st.integers(0, len(payload) - 1))] ^= data.draw(st.integers(1, 255))
        elif what == "length":
            lengths[data.draw(st.integers(0, lengths.size - 1))] = data.draw(st.integers(0, 25))
        elif what == "offset":
            chunk_bits[data.draw(st.integers(0, chunk_bits.size - 1))] += data.draw(
                st.integers(-100, 100)
            )
        elif what == "n":
            n = max(0, n + data.draw(st.integers(-50, 50)))
        elif what == "cs":
            cs = max(1, cs + data.draw(st.integers(-5, 5)))
        elif what == "group":
            group = data.draw(st.sampled_from([0, 1, 2, 3, 4, 8]))
        elif payload:
            del payload[data.draw(st.integers(0, len(payload) - 1)) :]
    bad = HuffmanStream(lengths, bytes(payload), chunk_bits, n, cs, group, alphabet)
    try:
        out = decode(bad)
    except FormatError:
        return
    assert out.size == n  # corruption may go unnoticed, but the result is well-formed
    check_stream(bad)


# ---------------------------------------------------------------------------------------------
# Chunk tables (lane offsets)


@pytest.mark.parametrize("case", ["normal", "equal", "spread", "one", "two", "huge"])
def test_chunk_table_round_trip(rng, case):
    count = {"one": 1, "two": 2, "normal": 2000}.get(case, int(rng.integers(3, 3000)))
    spans = {
        "normal": lambda: np.maximum(np.round(rng.normal(3500, 30, count - 1)), 0),
        "equal": lambda: np.full(count - 1, 777),
        "spread": lambda: rng.integers(0, 100_000, count - 1),
        "huge": lambda: rng.integers(0, 2**40, count - 1),
    }.get(case, lambda: rng.integers(0, 50, count - 1))()
    starts = np.concatenate(([0], np.cumsum(spans))).astype(np.int64)
    data, median, k = pack_chunks(starts)
    np.testing.assert_array_equal(unpack_chunks(data, count, median, k), starts)
    if case == "normal":  # near-normal spans (entropy 6.95 bits): well under fixed-width fields
        fixed = int(spans.max() - spans.min()).bit_length()
        assert 8 * len(data) < min(7.3, fixed - 0.75) * (count - 1) + 8
    if case == "equal":
        assert k == 0 and len(data) == -(-(count - 1) // 8)  # a single 0 bit per lane


def test_corrupt_chunk_table_raises(rng):
    starts = np.concatenate(([0], np.cumsum(rng.integers(90, 110, 500)))).astype(np.int64)
    data, median, k = pack_chunks(starts)
    # (A wrong lane count can parse by chance; the stream checks catch the spans then.)
    for bad, count in ((data[:-1], 501), (data + b"\0", 501), (b"\xff" * len(data), 501), (data, 1), (b"", 501)):
        with pytest.raises(FormatError, match="chunk table"):
            unpack_chunks(bad, count, median, k)
    for header in ((-1, median, k), (501, -5, k), (501, median, 41), (501, 2**63, k)):
        with pytest.raises(FormatError, match="chunk table header"):
            unpack_chunks(data, *header)


@pytest.mark.parametrize("alphabet, group, max_len", [(300, 1, 20), (256, 1, 15), (16, 2, 15), (3, 4, 16)])
def test_joined_codes_and_decoder_slabs_match_bit_by_bit_reference(rng, monkeypatch, alphabet, group, max_len):
    # Tiny, odd slabs: codes are joined (15 -> 30 -> 60 bits, or 20 -> 40) within slabs that end
    # anywhere, and the decoder runs many slabs of lanes whose windows cover only their own bytes.
    monkeypatch.setattr(huffman, "_ENCODE_SLAB", int(rng.integers(3, 60)))
    monkeypatch.setattr(huffman, "_DECODE_LANES", int(rng.integers(1, 5)))
    monkeypatch.setattr(huffman, "_DECODE_BYTES", int(rng.integers(1, 40)))
    n = int(rng.integers(500, 3000))
    symbols = zipf(rng, n, alphabet, 1.6)  # skewed: long codes for the rare symbols
    # Lanes short enough that there are more than 4 slabs' worth of them (n // group codes).
    chunk_size = int(rng.integers(1, 1 + min(59, n // (group * (4 * huffman._DECODE_LANES + 1)))))
    stream = encode(symbols, alphabet, chunk_size=chunk_size, group=group, max_len=max_len)
    payload, starts = reference_payload(symbols, alphabet, group, stream.lengths, chunk_size)
    assert bytes(stream.payload) == payload and stream.chunk_bits.tolist() == starts
    assert stream.chunk_bits.size > 4 * huffman._DECODE_LANES  # several slabs
    np.testing.assert_array_equal(decode(stream), symbols)
    released = []
    np.testing.assert_array_equal(decode(stream, release=lambda: released.append(1)), symbols)
    assert len(released) > 1  # called after each slab
    # A lane that ends one bit off is caught across slab boundaries too.
    bad = stream.chunk_bits.copy()
    bad[len(bad) // 2] += 1
    with pytest.raises(FormatError):
        decode(dataclasses.replace(stream, chunk_bits=bad))


@pytest.mark.parametrize("alphabet, group", [(2, 8), (4, 4), (16, 2), (256, 1), (3, 4), (5, 2), (300, 1)])
def test_decode_codes_gives_each_codes_value_across_many_slabs(rng, monkeypatch, alphabet, group):
    # One value per code, sum(s[i*G + k] * A**k): for A = 2**b, G = 8 // b the byte that packs the
    # code's symbols b bits each, first lowest (what codebook indices are decoded straight into).
    # Tiny, odd slabs of lanes: every slab boundary falls mid-stream, lane counts are odd.
    monkeypatch.setattr(huffman, "_DECODE_LANES", int(rng.integers(1, 5)))
    monkeypatch.setattr(huffman, "_DECODE_BYTES", int(rng.integers(1, 40)))
    n = group * int(rng.integers(400, 2500)) + int(rng.integers(0, group))  # a partial last code when G > 1
    symbols = zipf(rng, n, alphabet, 1.4)
    stream = encode(symbols, alphabet, chunk_size=int(rng.integers(3, 60)) | 1, group=group, max_len=15)
    m = -(-n // group)
    padded = symbols.tolist() + [0] * (m * group - n)
    want = [sum(padded[i * group + k] * alphabet**k for k in range(group)) for i in range(m)]  # Python ints
    released = []
    out = np.full(m, 77, np.uint8 if alphabet**group <= 256 else np.uint16)  # filled over, not added to
    got = huffman.decode_codes(stream, out, release=lambda: released.append(1))
    assert got is out and got.tolist() == want and len(released) > 1
    if alphabet**group == 256:
        bits = 8 // group
        packed = [sum(padded[i * group + k] << (bits * k) for k in range(group)) for i in range(m)]
        assert got.tolist() == packed
    np.testing.assert_array_equal(huffman.decode_codes(stream), got)  # its own array
    # The symbols decode gives are the same stream (decode expands the same codes).
    np.testing.assert_array_equal(decode(stream), symbols)
    with pytest.raises(ValueError, match="out must be"):
        huffman.decode_codes(stream, np.empty(m + 1, out.dtype))
    with pytest.raises(ValueError, match="out must be"):
        huffman.decode_codes(stream, np.empty(m, np.int64))
    # Corruption is caught as decode catches it: a lane start one bit off, a flipped payload.
    bad = stream.chunk_bits.copy()
    bad[len(bad) // 2] += 1
    with pytest.raises(FormatError):
        huffman.decode_codes(dataclasses.replace(stream, chunk_bits=bad))
    if group > 1:  # non-zero symbols past n in the last code
        short_n = group * (n // group - 1) + 1  # one symbol in the last code, then G - 1 of padding
        padded_ones = np.concatenate([symbols[:short_n], np.ones(group - 1, symbols.dtype)])
        longer = encode(padded_ones, alphabet, chunk_size=stream.chunk_size, group=group, max_len=15)
        short = dataclasses.replace(longer, n_symbols=short_n)
        for fn in (decode, huffman.decode_codes):
            with pytest.raises(FormatError, match="non-zero symbols past"):
                fn(short)


def test_decode_codes_of_a_lone_symbol_and_an_empty_stream():
    stream = encode(np.full(1000, 3, np.uint8), 16, group=2, max_len=15)
    assert huffman.decode_codes(stream).tolist() == [3 | 3 << 4] * 500
    nonzero = bytearray(bytes(stream.payload))
    nonzero[0] |= 1
    with pytest.raises(FormatError, match="lone symbol"):
        huffman.decode_codes(dataclasses.replace(stream, payload=bytes(nonzero)))
    assert huffman.decode_codes(encode(np.zeros(0, np.uint8), 16, group=2)).size == 0


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_encode_packed_is_encode_of_the_unpacked_symbols(rng, bits):
    """Symbols handed over packed 8 // bits to a byte code to the very stream encode makes of
    them: skewed streams (a grouped code wins), flat ones, a lone used value, odd lengths."""
    per = 8 // bits
    for size, skew in [(1, 1.0), (37, 0.0), (1001, 1.5), (20000, 0.3), (4096, 6.0)]:
        weights = np.exp(-skew * np.arange(1 << bits))
        symbols = rng.choice(1 << bits, size=size * per, p=weights / weights.sum()).astype(np.uint8)
        if skew == 6.0 and bits > 1:
            symbols[:] = 3  # one used value
        data = np.zeros(size, np.uint8)
        for j in range(per):
            data |= symbols[j::per] << np.uint8(j * bits)
        want = huffman.encode(symbols, 1 << bits, max_len=huffman.TZIP_MAX_LEN)
        got = huffman.encode_packed(data, bits, max_len=huffman.TZIP_MAX_LEN)
        assert (got.group, got.n_symbols, got.chunk_size, got.alphabet) == (want.group, want.n_symbols, want.chunk_size,
                                                                             want.alphabet)
        assert np.array_equal(got.lengths, want.lengths) and np.array_equal(got.chunk_bits, want.chunk_bits)
        assert bytes(got.payload) == bytes(want.payload)
        assert np.array_equal(huffman.decode(got), symbols)
        for g in (g for g in huffman.GROUPS if per % g == 0):  # a group asked for, as encode takes it
            forced = huffman.encode_packed(data, bits, max_len=huffman.TZIP_MAX_LEN, group=g)
            want = huffman.encode(symbols, 1 << bits, max_len=huffman.TZIP_MAX_LEN, group=g)
            assert forced.group == g and bytes(forced.payload) == bytes(want.payload)
            assert np.array_equal(forced.chunk_bits, want.chunk_bits)
    with pytest.raises(ValueError, match="bits must be 1, 2, 4 or 8"):
        huffman.encode_packed(np.zeros(4, np.uint8), 3)
    with pytest.raises(ValueError, match="group must divide"):
        huffman.encode_packed(np.zeros(4, np.uint8), 4, group=4)
