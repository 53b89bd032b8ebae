"""CSR packed weights on the CPU path: no torch.compile graph break, and the int32 row_ptr limit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchzip as tz
from torchzip.packed import CsrWeight
from torchzip.packed import csr as csr_mod


def _tiny_lm(vocab: int, dim: int) -> nn.Module:
    return nn.Sequential(nn.Embedding(vocab, dim), nn.Linear(dim, 3 * dim + 1), nn.ReLU(), nn.Linear(3 * dim + 1, vocab))


def test_csr_model_compiles_without_graph_breaks():
    vocab, dim = int(torch.randint(40, 90, ())), int(torch.randint(20, 50, ()))
    model = _tiny_lm(vocab, dim).eval()
    student = tz.compress(model, tz.Recipe([tz.Prune(sparsity=0.9), tz.Codebook(bits=5)]), progress=False)
    frozen = tz.freeze(student)
    packed = [m.packed for m in frozen if hasattr(m, "packed")]
    assert len(packed) == 3 and all(isinstance(p, CsrWeight) for p in packed), "every layer should pack as CSR"
    ids = torch.randint(0, vocab, (2, int(torch.randint(3, 9, ()))))
    with torch.no_grad():
        eager = frozen(ids)
        explained = torch._dynamo.explain(frozen)(ids)
        torch._dynamo.reset()
        compiled = torch.compile(frozen, backend="eager", fullgraph=True)(ids)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_csr_row_ptr_limit(monkeypatch):
    n, k = int(torch.randint(3, 9, ())), int(torch.randint(5, 20, ()))
    mask = torch.rand(n, k) < 0.5
    mask[0, 0] = True
    nnz = int(mask.sum())
    dense = torch.randn(n, k)
    w = CsrWeight.build(dense, mask, torch.float32)  # under the limit: fine
    assert w.row_ptr.dtype == torch.int32 and int(w.row_ptr[-1]) == nnz
    torch.testing.assert_close(w.dequantize(), dense * mask, rtol=0, atol=0)
    rows, cols = mask.nonzero(as_tuple=True)
    with pytest.raises(tz.FormatError, match="row_ptr must have"):
        CsrWeight(torch.zeros(n, dtype=torch.int32), cols.to(torch.int16), torch.randn(nnz), (n, k), torch.float32)
    monkeypatch.setattr(csr_mod, "INT32_MAX", nnz - 1)  # the limit, made small enough to reach
    with pytest.raises(tz.FormatError, match=f"at most {nnz - 1}"):
        CsrWeight.build(dense, mask, torch.float32)
