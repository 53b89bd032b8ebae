"""Compiled CPU kernels of codebook weights against a float64 reference and the torch fallback."""

import platform
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from torchzip.kernels import cpu
from torchzip.packed import CodebookWeight, base
from torchzip.passes.codebook import kmeans_1d

from test_cpu_linear import within_rounding
from test_kmeans import clustered


def _avx2_linux() -> bool:
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    return {"avx2", "fma", "f16c"} <= set(flags.split())


needs_kernels = pytest.mark.skipif(not cpu.available(), reason=f"needs the compiled CPU kernels (x86-64 with AVX2 and gcc; the torch route is tested everywhere): {cpu.why_not()}")


@pytest.mark.skipif(not (_avx2_linux() and shutil.which("gcc")), reason="needs x86-64 Linux with AVX2 and gcc")
def test_kernels_build_where_they_can():
    # Where the toolchain is there, a broken build must fail here, not fall back silently.
    assert cpu.available(), cpu.why_not()


def test_environment_turns_them_off(monkeypatch):
    monkeypatch.setenv("TORCHZIP_CPU_KERNELS", "0")
    assert not cpu.available()


def weight(n, k, bits, books, dtype, group_rows=3):
    idx = torch.randint(0, 2**bits, (n, k))
    if books == "group":  # per-row tables repeating in groups, as load and freeze build them
        book = torch.randn(-(-n // group_rows), 2**bits).repeat_interleave(group_rows, 0)[:n]
    else:
        book = torch.randn(n if books == "channel" else 1, 2**bits)
    ref = book.to(dtype).gather(1, idx) if book.shape[0] > 1 else book[0].to(dtype)[idx]  # independent of the packing
    return CodebookWeight.from_indices(idx, book, bits, dtype, group_rows=group_rows if books == "group" else 1), ref


def eager(monkeypatch):
    monkeypatch.setattr(cpu, "available", lambda: False)


@pytest.fixture
def fused(monkeypatch):
    monkeypatch.setattr(cpu, "_fused", True)
    monkeypatch.setattr(base, "BLOCK", 0)  # the fused kernels take weights over BLOCK values: all here


def spy(monkeypatch, name):
    calls = []
    real = getattr(cpu, name)
    monkeypatch.setattr(cpu, name, lambda *a: (calls.append(a), real(*a))[1])
    return calls


@needs_kernels
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_layers_are_bitwise_f_linear(monkeypatch, bits, dtype):
    # A weight of at most BLOCK values is dequantized for F.linear (the fused kernels, on by
    # default, take larger ones): packed outputs equal the trainable model's bit for bit.
    from torchzip.packed import Int8Weight

    assert cpu.fused()  # on by default
    calls = spy(monkeypatch, "linear"), spy(monkeypatch, "int8_linear")
    packed, ref = weight(37, 90, bits, "channel", dtype)
    assert torch.equal(packed.dequantize(), ref)
    x = torch.randn(1, 90).to(dtype)
    bias = torch.randn(37).to(dtype)
    assert torch.equal(packed.linear(x, bias), F.linear(x, ref, bias))
    q = Int8Weight.from_float(torch.randn(37, 90).to(dtype))
    assert torch.equal(q.linear(x, bias), F.linear(x, q.dequantize(), bias))
    assert calls == ([], [])
    monkeypatch.setattr(base, "BLOCK", 700)  # large weights now: blocks of rows when fused is off
    cpu.set_fused(False)
    try:
        packed.linear(x, bias), q.linear(x, bias)
    finally:
        cpu.set_fused(True)
    assert calls == ([], [])
    packed.linear(x, bias), q.linear(x, bias)  # fused again: both kernels run
    assert len(calls[0]) == len(calls[1]) == 1
    eager(monkeypatch)
    assert torch.equal(packed.dequantize(), ref)


ISAS = ["avx2"] + (["avx512"] if cpu.ISA == "avx512" else [])  # what this CPU can run


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("books", ["channel", "layer", "group"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_linear_matches_reference(monkeypatch, fused, isa, bits, books, dtype):
    monkeypatch.setattr(cpu, "ISA", isa)
    n, k = 23, 77  # odd: no whole number of words per row, an odd number of rows; 77 = 4 * 16 + 13
    packed, ref_w = weight(n, k, bits, books, torch.float32)
    w = ref_w.to(dtype).double()
    # M = 1 (dotted in registers), 3, 5, 8, a leading batch dim and LINEAR_MAX_M: the fused kernel
    for lead in [(1,), (3,), (5,), (2, 4), (cpu.LINEAR_MAX_M,)]:
        x = torch.randn(*lead, k).to(dtype)
        bias = torch.randn(n).to(dtype)
        want = x.double() @ w.t() + bias.double()
        scale = x.double().abs() @ w.abs().t() + bias.double().abs()
        got = packed.linear(x, bias)
        assert got.dtype == dtype and got.shape == (*lead, n)
        assert within_rounding(got, want, scale, k)
        with monkeypatch.context() as m:
            eager(m)
            assert within_rounding(packed.linear(x, bias), want, scale, k)
        assert torch.equal(packed.linear(x), packed.linear(x))


@needs_kernels
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_block_dequantize_is_bitwise_eager(monkeypatch, bits, dtype):
    n, k = 41, 203
    packed, ref = weight(n, k, bits, "channel", torch.float32)
    got = torch.empty(n - 5, k, dtype=dtype)
    packed.dequantize_block(3, n - 2, got)
    eager(monkeypatch)
    want = torch.empty_like(got)
    packed.dequantize_block(3, n - 2, want)
    assert torch.equal(got, want) and torch.equal(got, ref[3:n - 2].to(dtype))
    # A strided destination (a column slice) is left to torch and still exact.
    wide = torch.zeros(n - 5, k + 3, dtype=dtype)
    packed.dequantize_block(3, n - 2, wide[:, :k])
    assert torch.equal(wide[:, :k], want)


@needs_kernels
def test_large_m_takes_compiled_blocks(monkeypatch, fused):
    monkeypatch.setattr(base, "BLOCK", 1000)
    calls = []
    real = cpu.dequantize_rows
    monkeypatch.setattr(cpu, "dequantize_rows", lambda *a: (calls.append(a[0].shape[0]), real(*a))[1])
    packed, ref = weight(50, 70, 4, "layer", torch.float32)
    x = torch.randn(cpu.LINEAR_MAX_M + 3, 70)
    got = packed.linear(x)
    assert sum(calls) == 50 and max(calls) == 1000 // 70  # every row once, a block at a time
    assert within_rounding(got, x.double() @ ref.double().t(), x.double().abs() @ ref.double().abs().t(), 70)


@needs_kernels
def test_threads_do_not_change_results(fused):
    from torchzip.packed import Int8Weight

    for packed in (weight(301, 1000, 4, "channel", torch.float32)[0], Int8Weight.from_float(torch.randn(301, 1000), 40)):
        x = torch.randn(5, 1000)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = packed.linear(x[:1]), packed.linear(x)
            torch.set_num_threads(2)
            two = packed.linear(x[:1]), packed.linear(x)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("group", [0, 8, 16, 48, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_fused_linear_matches_reference(monkeypatch, fused, isa, group, dtype):
    # Odd widths (per channel), groups of one AVX2 vector (8), one and three AVX-512 vectors (16,
    # 48) and ragged ones (5: scalar); an odd number of rows (tiles of 4 and pairs); M past a
    # tile of 4 x rows, up to INT8_MAX_M.
    from torchzip.packed import Int8Weight

    monkeypatch.setattr(cpu, "ISA", isa)
    calls = spy(monkeypatch, "int8_linear")
    n, k = 23, (group * 7 if group else 77)
    packed = Int8Weight.from_float(torch.randn(n, k) * 3, group)
    w = packed.dequantize().double()
    for lead in [(1,), (2,), (3,), (5,), (2, 4), (13,), (cpu.INT8_MAX_M,)]:
        x = torch.randn(*lead, k).to(dtype)
        bias = torch.randn(n).to(dtype)
        want = x.double() @ w.t() + bias.double()
        got = packed.linear(x, bias)
        assert got.dtype == dtype and got.shape == (*lead, n)
        assert within_rounding(got, want, x.double().abs() @ w.abs().t() + bias.double().abs(), k)
        assert torch.equal(packed.linear(x), packed.linear(x))
    assert len(calls) == 7 * 3
    x = torch.randn(cpu.INT8_MAX_M + 1, k).to(dtype)  # past INT8_MAX_M: blocks + BLAS
    assert within_rounding(packed.linear(x), x.double() @ w.t(), x.double().abs() @ w.abs().t(), k) and len(calls) == 21


@needs_kernels
def test_int8_fused_linear_names_bad_input():
    q = torch.randint(-128, 128, (4, 32), dtype=torch.int8)
    with pytest.raises(RuntimeError, match="int8_linear takes"):
        cpu.int8_linear(torch.randn(2, 32).double(), q, torch.rand(4, 1), 32)
    with pytest.raises(RuntimeError, match="int8_linear takes"):
        cpu.int8_linear(torch.randn(2, 32), q, torch.rand(4, 1), 8)  # 1 scale for 4 groups


@needs_kernels
def test_inputs_that_need_grad_use_torch(fused):
    packed, ref = weight(9, 40, 4, "channel", torch.float32)
    x = torch.randn(2, 40, requires_grad=True)
    packed.linear(x).sum().backward()
    assert torch.allclose(x.grad, ref.sum(0).expand(2, -1), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        y = packed.linear(x)
    assert torch.allclose(y, F.linear(x.detach(), ref), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_tiny_and_empty_rows(fused):
    for n, k in [(1, 1), (2, 7), (5, 8), (3, 9)]:
        packed, ref = weight(n, k, 4, "channel", torch.float32)
        x = torch.randn(1, k)
        assert within_rounding(packed.linear(x), x.double() @ ref.double().t(), x.double().abs() @ ref.double().abs().t(), k)


def both_routes(monkeypatch, *args, **kwargs):
    compiled = kmeans_1d(*args, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(cpu, "available", lambda: False)
        eager = kmeans_1d(*args, **kwargs)
    return compiled, eager


@needs_kernels
@pytest.mark.parametrize("init", ["linear", "kmeans++"])
def test_compiled_loop_is_bitwise_torch(init, monkeypatch):
    x = clustered(33, 301)
    x[0] = 0.0  # all zero
    x[1] = 0.25  # constant
    x[2, :150] = -1.0  # half on one value: ties at a midpoint
    valid = torch.rand(33, 301) > 0.25
    valid[3] = False  # a row with nothing to cluster
    weights = torch.rand(33, 301) * 3
    for v in (torch.ones_like(valid), valid):
        for w in (None, weights):
            a, b = both_routes(monkeypatch, x, v, 16, init=init, seed=5, weights=w)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # One long row (one codebook per layer) whose final assignment is split over pieces.
    row = torch.randn(1, 200_003)
    a, b = both_routes(monkeypatch, row, torch.rand(1, 200_003) > 0.1, 8, init=init)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@needs_kernels
@pytest.mark.parametrize("group", [0, 8, 32, 12, 5])
def test_int8_block_dequantize_is_bitwise_torch(monkeypatch, group):
    # The compiled one-pass dequantize gives the very floats torch's widen-then-scale gives (so the
    # blocked int8 linear stays bitwise F.linear of the frozen weight), at odd widths and groups.
    from torchzip.packed import Int8Weight

    calls = []
    real = cpu.int8_dequantize_rows
    monkeypatch.setattr(cpu, "int8_dequantize_rows", lambda *a: (calls.append(1), real(*a))[1])
    k = (group or 7) * int(torch.randint(3, 40, ()))  # rows of whole groups (or any width per channel)
    n = int(torch.randint(1, 70, ()))
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    scales = torch.rand(n, k // group if group else 1) * 10.0 ** float(torch.randint(-6, 3, ()))
    w = Int8Weight(q, scales, group, torch.float32)
    out = torch.empty(n - n // 3, k)
    got = w.dequantize_block(n // 3, n, out)
    g = group or k
    want = (q[n // 3:].double().view(-1, k // g, g) * scales[n // 3:].double().unsqueeze(-1)).float().view(-1, k)
    assert calls and torch.equal(got, want)  # one rounding of the exact product
    monkeypatch.setattr(cpu, "available", lambda: False)  # the torch route: the same floats
    assert torch.equal(w.dequantize_block(n // 3, n, torch.empty_like(out)), got)
    with pytest.raises(RuntimeError, match="int8_dequantize_rows takes"):
        real(q.float(), scales, g, torch.empty(n, k))
