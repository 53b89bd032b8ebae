"""The blocked CPU linear of packed weights: the same outputs as dequantize + F.linear."""

import pytest
import torch
import torch.nn.functional as F

from torchzip.kernels import cpu
from torchzip.packed import base
from torchzip.packed import CodebookWeight, Int8Weight


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(base, "BLOCK", 700)  # several blocks of rows, and a ragged last one
    monkeypatch.setattr(cpu, "_fused", False)  # the blocked route at every M


def within_rounding(got, want, scale, k):
    """|got - want| within what summing k products (and a bias) in got's dtype can lose: a
    (k + 2) * u bound relative to sum |x_j w_j| + |bias| (u: unit roundoff), whatever the order."""
    u = torch.finfo(got.dtype).eps / 2
    return bool(((got.double() - want).abs() <= (k + 2) * u * scale + 1e-300).all())


def check(packed, k, dtype):
    for lead in [(1,), (5,), (2, 3)]:
        x = torch.randn(*lead, k).to(dtype)
        bias = torch.randn(packed.shape[0]).to(dtype)
        w = packed.dequantize().to(dtype).double()
        got = packed.linear(x, bias)
        assert got.dtype == dtype and got.shape == (*lead, packed.shape[0])
        assert within_rounding(got, x.double() @ w.t() + bias.double(), x.double().abs() @ w.abs().t() + bias.double().abs(), k)
        assert torch.equal(packed.linear(x), packed.linear(x))  # the reused buffer leaves nothing behind
    # Each block holds exactly the rows dequantize() gives.
    n = packed.shape[0]
    out = torch.empty(n - 3, k, dtype=dtype)
    assert torch.equal(packed.dequantize_block(2, n - 1, out), packed.dequantize()[2:n - 1].to(dtype))


@pytest.mark.parametrize("group_size", [0, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_blocked_linear(small_blocks, group_size, dtype):
    n, k = 37, 52
    packed = Int8Weight.from_float(torch.randn(n, k).to(dtype), group_size)
    check(packed, k, dtype)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("books", ["channel", "layer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_codebook_blocked_linear(small_blocks, bits, books, dtype):
    n, k = 29, 61  # k fills no whole number of words
    idx = torch.randint(0, 2**bits, (n, k))
    book = torch.randn(n if books == "channel" else 1, 2**bits)
    packed = CodebookWeight.from_indices(idx, book, bits, dtype)
    ref = book.to(dtype).gather(1, idx) if books == "channel" else book[0].to(dtype)[idx]  # independent of the packing
    assert torch.equal(packed.dequantize(), ref)
    check(packed, k, dtype)


def test_large_layer_takes_blocks_bitwise_like_f_linear(monkeypatch):
    calls = []
    real = Int8Weight.dequantize_block
    monkeypatch.setattr(Int8Weight, "dequantize_block", lambda self, *a: (calls.append(a[:2]), real(self, *a))[1])
    packed = Int8Weight.from_float(torch.randn(640, 2048))  # 1.3M weights: over BLOCK
    x = torch.randn(cpu.INT8_MAX_M + 1, 2048)  # more rows than the fused kernel takes
    got = packed.linear(x)
    assert calls == [(0, 512), (512, 640)]
    assert torch.allclose(got, F.linear(x, packed.dequantize()), rtol=1e-5, atol=1e-5)


def test_compiled_large_layer_has_no_graph_break():
    packed = Int8Weight.from_float(torch.randn(1100, 1024))  # over BLOCK: eager takes the C kernel
    x = torch.randn(3, 1024)
    compiled = torch.compile(lambda inp: packed.linear(inp), fullgraph=True)
    assert torch.allclose(compiled(x), F.linear(x, packed.dequantize()), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("make", [lambda w: Int8Weight.from_float(w, 14),
                                  lambda w: CodebookWeight.from_indices(torch.randint(0, 16, w.shape), torch.randn(w.shape[0], 16), 4, torch.float32)])
def test_a_bias_that_needs_grad_gets_it_through_large_layers(small_blocks, monkeypatch, make, fused):
    """A trainable bias (or x) on a packed weight: every M takes the differentiable route, and the
    gradients are those of dequantize + F.linear."""
    monkeypatch.setattr(cpu, "_fused", fused)
    packed = make(torch.randn(45, 70))
    for m in (1, 40, cpu.INT8_MAX_M + 3):
        bias = torch.randn(45, requires_grad=True)
        x = torch.randn(m, 70, requires_grad=m == 40)
        packed.linear(x, bias).square().sum().backward()
        ref_bias = bias.detach().clone().requires_grad_(True)
        ref_x = x.detach().clone().requires_grad_(x.requires_grad)
        F.linear(ref_x, packed.dequantize(), ref_bias).square().sum().backward()
        assert torch.allclose(bias.grad, ref_bias.grad, rtol=1e-5, atol=1e-5)
        if x.requires_grad:
            assert torch.allclose(x.grad, ref_x.grad, rtol=1e-5, atol=1e-5)
