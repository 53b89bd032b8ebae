"""Triton kernels for packed weights, against float64 references built from the dequantized weight.

Without a GPU these run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
Every test draws its own seed (shapes and data are random; shapes avoid block-size multiples
where the format allows) and names it in failure messages; TORCHZIP_TEST_SEED=<n> replays one.
Packed weights are built with the real ``torchzip.packed`` classes.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import random
import sys
from pathlib import Path

import pytest
import torch
import triton

from torchzip.kernels import codebook, csr, dispatch, int8, sparse24
from torchzip.packed import CodebookWeight, CsrWeight, Int8Weight, PackedLinear, Sparse24Weight
from torchzip.packed.values import int8_quantize
from torchzip.packed.bits import pack_bits

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# ||out - ref|| / ||ref|| bounds: output rounding plus (for the tl.dot paths) rounding the weight
# tile to the activation dtype, which F.linear does too.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
M_VALUES = (1, 3, 17, 64)


@pytest.fixture
def seed(request) -> int:
    """This test's seed: conftest's ``fresh_seed`` (which seeds torch and prints it) if present."""
    try:
        return request.getfixturevalue("fresh_seed")
    except pytest.FixtureLookupError:
        s = int(os.environ.get("TORCHZIP_TEST_SEED") or random.SystemRandom().randrange(2**31))
        torch.manual_seed(s)
        return s


@pytest.fixture(autouse=True)
def kernel_device():
    """Tensors are made on the GPU when there is one (the interpreter runs on CPU tensors)."""
    if not torch.cuda.is_available():
        yield
        return
    torch.set_default_device("cuda")
    try:
        yield
    finally:
        torch.set_default_device(None)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, seed: int, what: str) -> None:
    assert out.dtype == dtype and out.shape == ref.shape, f"{what}: got {out.dtype} {tuple(out.shape)} (seed={seed})"
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"{what}: relative error {err:.2e} > {TOL[dtype]:.0e} (seed={seed})"


def randint(lo: int, hi: int) -> int:
    return int(torch.randint(lo, hi + 1, ()))


def pick_k(base: int, lo: int = 65, hi: int = 400) -> int:
    """A random K that is a multiple of ``base`` (group size, 4 for 2:4) and, if possible, of no block size."""
    ks = [k for k in range(lo, hi + 1) if k % base == 0]
    odd = [k for k in ks if k % 32]
    pool = odd or ks
    return pool[randint(0, len(pool) - 1)]


def pick_n() -> int:
    return randint(9, 70) | 1  # odd: never a multiple of a block


def cases(*axes, rotate=M_VALUES):
    """Full product of ``axes`` with M (and bias) rotating through the cases, so that every value
    of every axis is met without the full product's test time."""
    out = []
    for i, combo in enumerate(itertools.product(*axes)):
        m, bias = rotate[i % len(rotate)], i % 2 == 0
        name = "-".join(str(v).replace("torch.", "") for v in combo) + f"-M{m}" + ("-bias" if bias else "")
        out.append(pytest.param(*combo, m, bias, id=name))
    return out


def mask24(n: int, k: int) -> torch.Tensor:
    keep = torch.rand(n, k // 4, 4).argsort(-1)[..., :2]
    return torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(2, keep, True).view(n, k)


# ---- int8 --------------------------------------------------------------------------------------

@pytest.mark.parametrize("group_size,dtype,m,with_bias", cases((0, 32, 48, 128), DTYPES))
def test_int8_kernels(seed, group_size, dtype, m, with_bias):
    n, k = pick_n(), pick_k(group_size or 1)
    w = Int8Weight.from_float(torch.randn(n, k), group_size)
    bias = torch.randn(n).to(dtype) if with_bias else None
    x = torch.randn(m, k).to(dtype)
    ref = int8.reference(x, w.qweight, w.scales, bias, group_size)
    what = f"int8 g={group_size} {dtype} M={m} N={n} K={k} bias={with_bias}"
    check(int8.int8_gemm(x, w.qweight, w.scales, bias, group_size), ref, dtype, seed, "gemm " + what)
    if m <= 3:
        check(int8.int8_gemv(x, w.qweight, w.scales, bias, group_size), ref, dtype, seed, "gemv " + what)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("split", (None, 2, 3))
@pytest.mark.parametrize("kernel", ("mma", "words"))
def test_int8_word_gemv(seed, dtype, split, kernel):
    """The per-channel GEMVs on int32 words (weights as subnormals: fp32 ones for the FMA kernel,
    fp16/bf16 ones for the tensor-core kernel; bf16 x scaled by 2**64, 128 * sum(x) taken off) at
    K = 4 * odd (a ragged last step) and odd N (rows past N in both halves of a program), with x of
    large and tiny magnitude; an x row that starts off a 4-byte boundary takes the tile GEMV
    instead, one off an 8-byte boundary the word kernel."""
    n, k = pick_n(), 4 * (randint(17, 100) | 1)
    w = Int8Weight.from_float(torch.randn(n, k), 0)
    bias = torch.randn(n).to(dtype)
    config = triton.Config({"BLOCK_N": 16, "BLOCK_W": 8}) if kernel == "words" else None
    # Large x: 1e3 in bf16, but only 1e2 in fp16, whose outputs would pass 65504 (inf) at 1e3.
    for scale in (1.0, 1e2 if dtype == torch.float16 else 1e3, 1e-5):
        x = (torch.randn(randint(1, 3), k) * scale).to(dtype)
        assert int8.words_path(x, w.qweight, 0) and int8.mma_path(x, w.qweight, 0)
        ref = int8.reference(x, w.qweight, w.scales, bias, 0)
        check(int8.int8_gemv(x, w.qweight, w.scales, bias, 0, split_k=split, config=config), ref, dtype, seed,
              f"{kernel} gemv {dtype} N={n} K={k} x*{scale} split={split}")
    x = torch.randn(1, k + 2).to(dtype)[:, 2:]
    assert int8.words_path(x, w.qweight, 0) and not int8.mma_path(x, w.qweight, 0)
    check(int8.int8_gemv(x, w.qweight, w.scales, None, 0), int8.reference(x, w.qweight, w.scales, None, 0), dtype,
          seed, "x off 8 bytes")
    x = torch.randn(1, k + 1).to(dtype)[:, 1:]
    assert not int8.words_path(x, w.qweight, 0)
    check(int8.int8_gemv(x, w.qweight, w.scales, None, 0), int8.reference(x, w.qweight, w.scales, None, 0), dtype,
          seed, "unaligned x")


# ---- codebook ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,books,dtype,m,with_bias", cases((2, 3, 4, 8), ("layer", "channel"), DTYPES))
def test_codebook_kernels(seed, bits, books, dtype, m, with_bias):
    n, k = pick_n(), pick_k(1)
    book = torch.randn(1 if books == "layer" else n, 2**bits)
    w = CodebookWeight.from_indices(torch.randint(0, 2**bits, (n, k)), book, bits, dtype)
    bias = torch.randn(n).to(dtype) if with_bias else None
    x = torch.randn(m, k).to(dtype)
    ref = codebook.reference(x, w.packed, w.codebook, bias, bits, k)
    what = f"codebook {bits}-bit per {books} {dtype} M={m} N={n} K={k} bias={with_bias}"
    check(codebook.codebook_gemm(x, w.packed, w.codebook, bias, bits, k), ref, dtype, seed, "gemm " + what)
    if m <= 3:
        check(codebook.codebook_gemv(x, w.packed, w.codebook, bias, bits, k), ref, dtype, seed, "gemv " + what)


@pytest.mark.parametrize("bits", (*range(1, 9), 12, 16))
def test_codebook_every_width(seed, bits):
    """Every index width (5-7 bits pad their fields to a power of two like 3 bits; 12 and 16 bits
    with a per-layer codebook, as a per-channel one would be huge)."""
    n, k = pick_n(), pick_k(1)
    book = torch.randn(n if bits <= 8 else 1, 2**bits)
    w = CodebookWeight.from_indices(torch.randint(0, 2**bits, (n, k)), book, bits, torch.float32)
    x = torch.randn(2, k)
    ref = codebook.reference(x, w.packed, w.codebook, None, bits, k)
    check(codebook.codebook_gemv(x[:1], w.packed, w.codebook, None, bits, k), ref[:1], torch.float32, seed,
          f"gemv {bits}-bit")
    check(codebook.codebook_gemm(x, w.packed, w.codebook, None, bits, k), ref, torch.float32, seed,
          f"gemm {bits}-bit")
    assert torch.equal(codebook.dequantize_codebook(w.packed, w.codebook, bits, k, torch.float32), w.dequantize())


# ---- sparse: 2:4 and CSR -----------------------------------------------------------------------

VALUE_KINDS = ("float16", "float32", "int8", "int8-group", "codebook-layer", "codebook-channel")


def sparse_weight(cls, kind: str, mask: torch.Tensor, dtype: torch.dtype):
    """A ``Sparse24Weight``/``CsrWeight`` with values of ``kind`` (the three kinds, float in two dtypes)."""
    n, k = mask.shape
    w = torch.randn(n, k)
    if kind.startswith("float"):
        return cls.build(w.to(getattr(torch, kind)), mask, dtype)
    if kind.startswith("int8"):
        group = 4 * randint(1, 4) if kind == "int8-group" else 0
        while group and k % group:
            group //= 2
        q, scales = int8_quantize(w, group)
        return cls.build(q, mask, dtype, scales=scales, group_size=group)
    entries = 16 if kind == "codebook-layer" else 256  # indices >= 128 check the uint8 load
    book = torch.randn(1 if kind == "codebook-layer" else n, entries)
    return cls.build(torch.randint(0, entries, (n, k), dtype=torch.uint8), mask, dtype, codebook=book)


def sparse24_args(w: Sparse24Weight):
    return (w.values, w.positions, w.scales, w.codebook)


def csr_args(w: CsrWeight):
    return (w.row_ptr, w.col_idx, w.values, w.scales, w.codebook)


def assert_reference_is_dequantize(x, w, bias, ref, seed):
    """The kernel file's float64 reference is ``x @ PackedWeight.dequantize().T + bias`` (which
    multiplies int8 scales in fp32, hence not exact)."""
    dense = x.double() @ w.dequantize().double().T + (0 if bias is None else bias.double())
    assert rel_err(dense, ref) < 1e-6, f"reference disagrees with {type(w).__name__}.dequantize (seed={seed})"


@pytest.mark.parametrize("kind,dtype,m,with_bias", cases(VALUE_KINDS, DTYPES))
def test_sparse24_kernels(seed, kind, dtype, m, with_bias):
    n, k = pick_n(), pick_k(4)
    w = sparse_weight(Sparse24Weight, kind, mask24(n, k), torch.float32)  # fp32: dequantize() exact
    bias = torch.randn(n).to(dtype) if with_bias else None
    x = torch.randn(m, k).to(dtype)
    args = (*sparse24_args(w), bias, w.group_size, k)
    ref = sparse24.sparse24_reference(x, *args)
    assert_reference_is_dequantize(x, w, bias, ref, seed)
    what = f"2:4 {kind} {dtype} M={m} N={n} K={k} bias={with_bias}"
    check(sparse24.sparse24_gemm(x, *args), ref, dtype, seed, "gemm " + what)
    if m <= 3:
        check(sparse24.sparse24_gemv(x, *args), ref, dtype, seed, "gemv " + what)


@pytest.mark.parametrize("config", [c for c in sparse24.S24_GEMV_CONFIGS if sparse24.groups_per_thread(c) == 8],
                         ids=lambda c: f"{c.kwargs['BLOCK_N']}x{c.kwargs['BLOCK_W']}w{c.num_warps}")
@pytest.mark.parametrize("kind", ["int8", "int8-group", "codebook-channel", "float32"])
def test_sparse24_gemv_eight_group_configs(seed, config, kind):
    """The 8-groups-a-thread GEMV configs (the codebook GEMV's fastest) at an odd N and a K that
    runs two unmasked two-step iterations and a masked tail, against float64 (float32 values too,
    for coverage; on a GPU the autotuner offers them to 8-bit values only: gemv_config_ok)."""
    bw = config.kwargs["BLOCK_W"]
    n, k = config.kwargs["BLOCK_N"] + 5, 32 * (4 * bw + 3) - 4 * random.randint(1, 7)
    w = sparse_weight(Sparse24Weight, kind, mask24(n, k), torch.float32)
    x = torch.randn(1, k).to(torch.bfloat16)
    args = (*sparse24_args(w), None, w.group_size, k)
    ref = sparse24.sparse24_reference(x, *args)
    got = sparse24.sparse24_gemv(x, *args, split_k=1, config=config)
    check(got, ref, torch.bfloat16, seed, f"gemv 2:4 {kind} {config} N={n} K={k}")
    assert not sparse24.gemv_config_ok(config, 2, 0) and sparse24.gemv_config_ok(config, 1, 16)
    for values, lanes in ((torch.zeros(1, dtype=torch.bfloat16), 0), (torch.zeros(1), 0),
                          (torch.zeros(1, dtype=torch.uint8), 16), (torch.zeros(1, dtype=torch.int8), 0)):
        pruned = sparse24._prune_lanes(sparse24.S24_GEMV_CONFIGS, {"v_ptr": values}, LANES=lanes)
        assert (config in pruned) == (values.element_size() == 1), values.dtype


@pytest.mark.parametrize("kind,dtype,m,with_bias", cases(VALUE_KINDS, DTYPES))
def test_csr_kernel(seed, kind, dtype, m, with_bias):
    n, k = pick_n(), pick_k(4)
    density = 0.05 + 0.15 * float(torch.rand(()))  # 80-95% sparse
    mask = torch.rand(n, k) < density
    mask[0] = False  # an empty row
    mask[1, : k // 2] = True  # and a long one, so rows of a program end at different steps
    w = sparse_weight(CsrWeight, kind, mask, torch.float32)
    bias = torch.randn(n).to(dtype) if with_bias else None
    x = torch.randn(m, k).to(dtype)
    args = (*csr_args(w), bias, w.group_size, k)
    ref = csr.csr_reference(x, *args)
    assert_reference_is_dequantize(x, w, bias, ref, seed)
    what = f"CSR {kind} {dtype} M={m} N={n} K={k} density={density:.2f} bias={with_bias}"
    check(csr.csr_matmul(x, *args), ref, dtype, seed, what)
    # the aligned copy (what CsrWeight.kernel_linear passes): same result, padding never counted
    segments = csr.aligned_segments(w.row_ptr, w.col_idx, w.values)
    assert all(int(s) % csr.ALIGN == 0 for s in segments[0])
    torch.testing.assert_close(segments[1], (w.row_ptr[1:] - w.row_ptr[:-1]).int(), rtol=0, atol=0)
    # padding: value 0 (codebook indices: PAD_CODE, no centroid) at the row's last column (the M = 1
    # gather reads it unmasked)
    pad = csr.PAD_CODE.value if kind.startswith("codebook") else 0
    for r in range(n):
        lo, length, hi = int(segments[0][r]), int(segments[1][r]), int(segments[0][r + 1])
        assert hi - lo - length < csr.ALIGN
        if hi > lo + length:
            assert (segments[3][lo + length: hi] == pad).all()
            assert (segments[2][lo + length: hi] == w.col_idx[int(w.row_ptr[r + 1]) - 1]).all()
    # the kernel loads the copy's columns unmasked: every program's steps stay inside it
    spans = segments[0][1:] - segments[0][:-1]
    for c in csr.CSR_CONFIGS + [csr.CSR_INTERP]:
        br, bz = c.kwargs["BLOCK_R"], c.kwargs["BLOCK_NZ"]
        for p in range(0, n, br):
            steps = -(-int(spans[p: p + br].max()) // bz)
            assert int(segments[0][p: p + br].max()) + steps * bz <= segments[2].numel(), (c, p)
    check(csr.csr_matmul(x, *args, aligned=segments), ref, dtype, seed, what + " aligned")


# ---- split-K -----------------------------------------------------------------------------------

@pytest.mark.parametrize("split", (2, 3))
def test_split_k(seed, split):
    """Split-K partials (fp32 workspace + reduce kernel with bias) for every kernel that splits."""
    dtype = torch.float16
    n, k = pick_n(), pick_k(16, lo=200)
    bias = torch.randn(n).to(dtype)
    x1, x5 = torch.randn(1, k).to(dtype), torch.randn(5, k).to(dtype)
    for group in (0, 16):
        w = Int8Weight.from_float(torch.randn(n, k), group)
        for x, fn in ((x1, int8.int8_gemv), (x5, int8.int8_gemm)):
            ref = int8.reference(x, w.qweight, w.scales, bias, group)
            check(fn(x, w.qweight, w.scales, bias, group, split_k=split), ref, dtype, seed, f"{fn.__name__} g={group}")
    cw = CodebookWeight.from_indices(torch.randint(0, 8, (n, k)), torch.randn(n, 8), 3, dtype)
    for x, fn in ((x1, codebook.codebook_gemv), (x5, codebook.codebook_gemm)):
        ref = codebook.reference(x, cw.packed, cw.codebook, bias, 3, k)
        check(fn(x, cw.packed, cw.codebook, bias, 3, k, split_k=split), ref, dtype, seed, fn.__name__)
    sw = sparse_weight(Sparse24Weight, "int8-group", mask24(n, k), dtype)
    args = (*sparse24_args(sw), bias, sw.group_size, k)
    for x, fn in ((x1, sparse24.sparse24_gemv), (x5, sparse24.sparse24_gemm)):
        check(fn(x, *args, split_k=split), sparse24.sparse24_reference(x, *args), dtype, seed, fn.__name__)


# ---- dequantize --------------------------------------------------------------------------------

def same_weights(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal, except that the interpreter truncates fp32 -> bf16 where a GPU rounds to nearest:
    there bf16 may be one unit in the last place off."""
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    if want.dtype == torch.bfloat16 and dispatch._INTERPRET:
        return bool(((got.float() - want.float()).abs() <= want.float().abs() * 2.0**-7).all())
    return torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_kernels(seed, dtype):
    """Each dequantize kernel equals the format's torch ``dequantize`` cast to ``dtype``."""
    n, k = pick_n(), pick_k(16)
    for group in (0, 16):
        w = Int8Weight.from_float(torch.randn(n, k), group)
        got = int8.dequantize_int8(w.qweight, w.scales, group, dtype)
        assert same_weights(got, w.dequantize().to(dtype)), f"int8 g={group} (seed={seed})"
    for bits, rows in ((3, 1), (4, n)):
        w = CodebookWeight.from_indices(torch.randint(0, 2**bits, (n, k)), torch.randn(rows, 2**bits), bits, dtype)
        got = codebook.dequantize_codebook(w.packed, w.codebook, bits, k, dtype)
        assert same_weights(got, w.dequantize()), f"codebook {bits}-bit (seed={seed})"
    csr_mask = torch.rand(n, k) < 0.1
    for kind in VALUE_KINDS:
        w = sparse_weight(Sparse24Weight, kind, mask24(n, k), torch.float32)
        got = sparse24.dequantize_sparse24(*sparse24_args(w), w.group_size, k, dtype)
        assert same_weights(got, w.dequantize().to(dtype)), f"2:4 {kind} (seed={seed})"
        w = sparse_weight(CsrWeight, kind, csr_mask, torch.float32)
        got = csr.dequantize_csr(*csr_args(w), w.group_size, k, dtype)
        assert same_weights(got, w.dequantize().to(dtype)), f"CSR {kind} (seed={seed})"


# ---- dispatch through torchzip.packed ----------------------------------------------------------

def packed_weights(n: int, k: int, dtype: torch.dtype):
    """One weight of every format and value kind, all ``[n, k]``."""
    out = [
        Int8Weight.from_float(torch.randn(n, k).to(dtype), 0),
        Int8Weight.from_float(torch.randn(n, k).to(dtype), 16),
        CodebookWeight.from_indices(torch.randint(0, 16, (n, k)), torch.randn(1, 16), 4, dtype),
        CodebookWeight.from_indices(torch.randint(0, 8, (n, k)), torch.randn(n, 8), 3, dtype),
    ]
    csr_mask = torch.rand(n, k) < 0.1
    for kind in ("float32", "int8", "codebook-channel"):
        out.append(sparse_weight(Sparse24Weight, kind, mask24(n, k), dtype))
        out.append(sparse_weight(CsrWeight, kind, csr_mask, dtype))
    return out


@pytest.mark.parametrize("lead", [(1,), (3,), (2, 4, 8)], ids=["M1", "M3", "M64"])
def test_packed_linear_kernel_path_matches_torch_path(seed, lead, monkeypatch):
    """``PackedWeight.linear`` with the kernels forced on equals its torch path (leading batch dims
    included), through every dispatch branch: GEMV at M=1, fused kernels at M=3, and at M=64
    dequantize + F.linear (thresholds lowered to 64 so the test stays small)."""
    monkeypatch.setattr(dispatch, "DENSE_MIN_M", {name: 64 for name in dispatch.DENSE_MIN_M})
    dtype = torch.float32
    n, k = pick_n(), pick_k(16)
    x = torch.randn(*lead, k, dtype=dtype)
    for w in packed_weights(n, k, dtype):
        bias = torch.randn(n, dtype=dtype)
        torch_out = w.linear(x, bias)
        with dispatch.force_kernels():
            kernel_out = w.linear(x, bias)
        assert kernel_out.shape == (*lead, n)
        check(kernel_out, torch_out.double(), dtype, seed, f"{w.format_name} {w.extra_repr()} x={tuple(x.shape)}")


def test_big_weights_run_in_row_chunks(seed, monkeypatch):
    """Weights past int32 offsets run as row chunks (limit lowered here to force several chunks)."""
    dtype = torch.float32
    n, k = pick_n(), pick_k(16)
    monkeypatch.setattr(dispatch, "MAX_KERNEL_ELEMENTS", 7 * k)  # chunks of 7 rows, the last one ragged
    monkeypatch.setattr(dispatch, "DENSE_MIN_M", {name: 8 for name in dispatch.DENSE_MIN_M})
    for m in (1, 8):  # fused kernels, then dequantize + F.linear
        x = torch.randn(m, k, dtype=dtype)
        for w in packed_weights(n, k, dtype):
            bias = torch.randn(n, dtype=dtype)
            with dispatch.force_kernels():
                out = w.linear(x, bias)
            check(out, w.linear(x, bias).double(), dtype, seed, f"{w.format_name} {w.extra_repr()} M={m} in chunks")


def test_big_activations_run_in_row_chunks(seed, monkeypatch):
    """Activations whose [M, K] input or [M, N] output pass int32 offsets run in activation-row
    chunks (limit lowered to force ragged chunks of both activations and weight rows)."""
    dtype = torch.float32
    n, k = pick_n(), pick_k(16)
    limit = 5 * max(n, k)
    monkeypatch.setattr(dispatch, "MAX_KERNEL_ELEMENTS", limit)
    assert len(dispatch.activation_chunks(12, n, k)) == 3
    x = torch.randn(3, 4, k, dtype=dtype)  # 12 rows: chunks of 5, 5, 2
    for w in packed_weights(n, k, dtype):
        bias = torch.randn(n, dtype=dtype)
        with dispatch.force_kernels():
            out = w.linear(x, bias)
        assert out.shape == (3, 4, n)
        check(out, w.linear(x, bias).double(), dtype, seed, f"{w.format_name} {w.extra_repr()} in activation chunks")


def test_dispatch_paths(monkeypatch):
    """The op picks GEMV / fused / dequantize + F.linear by M."""
    calls = []
    for name in ("int8_gemv", "int8_gemm"):
        real = getattr(int8, name)
        monkeypatch.setattr(int8, name, lambda *a, _n=name, _f=real: calls.append(_n) or _f(*a))
    real_dq = int8.dequantize_int8
    monkeypatch.setattr(int8, "dequantize_int8", lambda *a: calls.append("dequant") or real_dq(*a))
    w = Int8Weight.from_float(torch.randn(5, 24))
    for m in (1, 2, dispatch.DENSE_MIN_M["int8"]):
        int8.int8_linear(torch.randn(m, 24), w.qweight, w.scales, None, 0)
    assert calls == ["int8_gemv", "int8_gemm", "dequant"]


def test_use_kernels_switch(monkeypatch):
    x = torch.randn(2, 3, device="cpu")
    assert not dispatch.use_kernels(x)  # CPU tensor, nothing forced
    with dispatch.force_kernels():
        assert dispatch.use_kernels(x) == dispatch._INTERPRET  # CPU tensors need the interpreter
        assert not dispatch.use_kernels(x.double())  # no fp64 kernels
        assert not dispatch.use_kernels(x.clone().requires_grad_())  # no backward: the torch path
        with torch.no_grad():
            assert dispatch.use_kernels(x.clone().requires_grad_()) == dispatch._INTERPRET
        with dispatch.force_kernels(False):
            assert not dispatch.use_kernels(x)
    assert not dispatch.use_kernels(x)
    if torch.cuda.is_available():
        assert dispatch.use_kernels(x.cuda())
        with dispatch.force_kernels(False):
            assert not dispatch.use_kernels(x.cuda())
    monkeypatch.setenv("TORCHZIP_KERNELS", "1")
    assert dispatch._env_setting() is True
    monkeypatch.setenv("TORCHZIP_KERNELS", "off")
    assert dispatch._env_setting() is False
    monkeypatch.setenv("TORCHZIP_KERNELS", "")
    assert dispatch._env_setting() is None


def test_shape_errors():
    w = Int8Weight.from_float(torch.randn(4, 32))
    with pytest.raises(ValueError, match="input features"):
        int8.int8_gemv(torch.randn(1, 31), w.qweight, w.scales, None, 0)
    with pytest.raises(ValueError, match="scales"):
        int8.int8_gemm(torch.randn(2, 32), w.qweight, w.scales, None, 16)
    with pytest.raises(ValueError, match="2:4"):
        sparse24.sparse24_gemv(torch.randn(1, 30), torch.randn(4, 15), torch.zeros(4, 1, dtype=torch.int32),
                                    None, None, None, 0, 30)


def test_torch_compile_sees_one_op(seed):
    """``torch.compile(fullgraph=True, backend="aot_eager")`` runs a PackedLinear on the kernel path
    (no graph break), its graph holds the torchzip custom op, and it matches eager."""
    n, k = pick_n(), pick_k(4)
    layers = [
        PackedLinear(Int8Weight.from_float(torch.randn(n, k), 0), torch.randn(n)),
        PackedLinear(sparse_weight(CsrWeight, "int8", torch.rand(n, k) < 0.1, torch.float32), None),
    ]
    x = torch.randn(2, 3, k)
    for layer in layers:
        graphs = []

        def record(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        with dispatch.force_kernels():
            eager = layer(x)
            torch._dynamo.reset()
            compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
            torch._dynamo.reset()
            torch.compile(layer, fullgraph=True, backend=record)(x)
        targets = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
        assert len(graphs) == 1 and any("torchzip" in t for t in targets), targets
        check(compiled, eager.double(), torch.float32, seed, f"compiled {layer.packed.format_name}")
    torch._dynamo.reset()


def _benchmark_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("torchzip_bench_gpu_check", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # as an import would (dataclasses look the module up)
    try:
        spec.loader.exec_module(bench)
    finally:
        del sys.modules[spec.name]
    return bench


def test_benchmark_script_imports_without_a_gpu():
    assert callable(_benchmark_module().main)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where there is no GPU")
def test_benchmark_script_without_cuda_exits_with_a_message():
    with pytest.raises(SystemExit) as exc:
        _benchmark_module().main([])
    assert "CUDA" in str(exc.value.code)


def test_sparse24_gemv_words_select_the_kept_activations(seed):
    """gemv_words + the GEMV's selector formula + PTX prmt (emulated) pick, for every group, the
    activations at its two kept positions: checked on every position pair and random words."""
    n, k = 3, 4 * 8 * 5
    rng = torch.Generator().manual_seed(seed)
    pairs = torch.tensor([(a, b) for a in range(4) for b in range(4) if a < b])
    pos = pairs[torch.randint(0, len(pairs), (n, k // 4), generator=rng)].reshape(n, k // 2)
    positions = pack_bits(pos, 2)
    words = sparse24.gemv_words(positions).long() & 0xFFFFFFFF
    x = torch.randint(0, 2**16, (k,), generator=rng)  # 16-bit patterns
    for row in range(n):
        for g in range(k // 4):
            q, h = (g % 8) // 2, g % 2
            sel = ((((int(words[row, g // 8]) >> (2 * q)) & 0x03030303) * 0x22 + 0x10101010) >> (16 * h)) & 0xFFFF
            pool = b"".join(int(v).to_bytes(2, "little") for v in x[4 * g: 4 * g + 4])
            out = bytes(pool[(sel >> (4 * i)) & 7] for i in range(4))
            got = (int.from_bytes(out[:2], "little"), int.from_bytes(out[2:], "little"))
            want = tuple(int(x[4 * g + int(p)]) for p in pos[row, 2 * g: 2 * g + 2])
            assert got == want, f"row {row} group {g}: {got} != {want} (seed={seed})"
