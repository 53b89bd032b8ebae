"""Self-checked GPU fast paths (kernels.dispatch.fast_path_ok): routing to the fallback, one
warning, TORCHZIP_GPU_FAST_PATHS, CUDA-graph capture, and the checks' known answers being exact.

No GPU here: the ``fake_gpu`` fixture lets CPU tensors stand in for cuda:0's, so the kernels run
in the interpreter behind the same gate a GPU call goes through."""

import contextlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from torchzip.kernels import codebook, csr, dispatch, int8, sparse24  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not dispatch.HAS_TRITON, reason="needs Triton on Linux")


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(dispatch, "_gpu_of", lambda x: 0)
    monkeypatch.setattr(dispatch, "_capturing", lambda: False)
    monkeypatch.setattr(dispatch, "_on_gpu", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(dispatch, "fast_checks", {})
    monkeypatch.setattr(dispatch, "_fast_enabled", True)


class Check:
    """A stand-in self-check: counts its calls, answers ``ok`` (or raises)."""

    def __init__(self, ok=True, raises=False):
        self.ok, self.raises, self.calls = ok, raises, 0

    def __call__(self, device, dtype):
        self.calls += 1
        if self.raises:
            raise RuntimeError("no such instruction")
        return self.ok


def fake_checks(monkeypatch, module, **oks):
    checks = {path: Check(oks.get(path.split(".")[-1], True)) for path in module.SELF_CHECKS}
    monkeypatch.setattr(module, "SELF_CHECKS", {p: (c, module.SELF_CHECKS[p][1]) for p, c in checks.items()})
    return checks


@pytest.fixture
def launches(monkeypatch):
    """Names of the int8 kernels launched (``"dense"``: dequantize + F.linear)."""
    seen = []
    launch, dequantize = int8.C.launch, int8.dequantize_int8

    def spy_launch(kernel, *args, **kwargs):
        seen.append(kernel.fn.__name__)
        return launch(kernel, *args, **kwargs)

    def spy_dequantize(*args):
        seen.append("dense")
        return dequantize(*args)

    monkeypatch.setattr(int8.C, "launch", spy_launch)
    monkeypatch.setattr(int8, "dequantize_int8", spy_dequantize)
    return seen


def int8_case(group_size=0, dtype=torch.bfloat16):
    x = torch.randn(1, 64).to(dtype)
    q = torch.randint(-128, 128, (24, 64), dtype=torch.int8)
    scales = torch.rand(24, 64 // group_size if group_size else 1) + 0.5
    return x, q, scales, int8.reference(x, q, scales, None, group_size)


def close(out, ref):
    return torch.allclose(out.double(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_failing_check_routes_to_fallback_and_warns_once(fake_gpu, monkeypatch, launches):
    checks = fake_checks(monkeypatch, int8, mma=False)
    x, q, s, ref = int8_case()
    with pytest.warns(dispatch.FastPathFallbackWarning, match=r"int8\.mma.*slower exact path.*word GEMV"):
        out = int8.int8_gemv(x, q, s, None, 0)
    assert close(out, ref)
    assert launches == ["_int8_gemv_words_kernel"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second check
        assert close(int8.int8_gemv(x, q, s, None, 0), ref)
    assert checks["int8.mma"].calls == 1 and checks["int8.words"].calls == 1
    assert dispatch.fast_checks == {("int8.mma", 0, torch.bfloat16): False, ("int8.words", 0, torch.bfloat16): True}
    assert dispatch.fast_path_report() == {"int8.mma cuda:0 bfloat16": False, "int8.words cuda:0 bfloat16": True}
    # Once per dtype: fp16 checks again (and passes here), bf16 stays routed.
    checks["int8.mma"].ok = True
    int8.int8_gemv(x.half(), q, s, None, 0)
    assert checks["int8.mma"].calls == 2 and launches[-1] == "_int8_gemv_mma_kernel"


def test_chain_ends_in_dequantize(fake_gpu, monkeypatch, launches):
    fake_checks(monkeypatch, int8, mma=False, words=False, gemv=False)
    for group_size, dtype in ((0, torch.bfloat16), (16, torch.float16), (0, torch.float32)):
        x, q, s, ref = int8_case(group_size, dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dispatch.FastPathFallbackWarning)
            out = int8.int8_gemv(x, q, s, None, group_size)
        assert close(out, ref) and out.dtype == dtype and out.shape == (1, 24)
    assert launches == ["dense"] * 3
    # The op a packed layer calls goes the same way.
    x, q, s, ref = int8_case()
    with dispatch.force_kernels():
        assert close(int8.int8_linear(x, q, s, None, 0), ref)
    assert launches[-1] == "dense"


def test_words_failing_leaves_mma(fake_gpu, monkeypatch, launches):
    fake_checks(monkeypatch, int8, words=False)
    x, q, s, _ = int8_case(16)
    with pytest.warns(dispatch.FastPathFallbackWarning):
        int8.int8_gemv(x, q, s, None, 16)  # groups: the word kernel, so it is checked
    x, q, s, _ = int8_case()
    int8.int8_gemv(x, q, s, None, 0)
    assert launches == ["_int8_gemv_kernel", "_int8_gemv_mma_kernel"]


def test_check_that_raises_counts_as_failed(fake_gpu):
    check = Check(raises=True)
    with pytest.warns(dispatch.FastPathFallbackWarning, match="raised RuntimeError: no such instruction"):
        assert not dispatch.fast_path_ok("demo.path", torch.empty(0), check, "the demo fallback")
    assert not dispatch.fast_path_ok("demo.path", torch.empty(0), check, "the demo fallback")
    assert check.calls == 1


def test_env_var_forces_fallback(fake_gpu, monkeypatch, launches):
    checks = fake_checks(monkeypatch, int8)
    monkeypatch.setattr(dispatch, "_fast_enabled", False)
    x, q, s, ref = int8_case()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert close(int8.int8_gemv(x, q, s, None, 0), ref)
    assert launches == ["dense"] and all(c.calls == 0 for c in checks.values())
    for value, on in (("0", False), ("off", False), ("false", False), ("1", True), ("", True)):
        monkeypatch.setenv("TORCHZIP_GPU_FAST_PATHS", value)
        assert dispatch._fast_env() is on


def test_env_var_read_at_import():
    code = "from torchzip.kernels import dispatch; print(dispatch._fast_enabled)"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TORCHZIP_GPU_FAST_PATHS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_capture_skips_unchecked_paths(fake_gpu, monkeypatch):
    """Inside a CUDA graph capture an unchecked path is not taken and not checked (a check syncs);
    the next eager call checks it. A checked one is a lookup, capture or not."""
    check = Check()
    monkeypatch.setattr(dispatch, "_capturing", lambda: True)
    assert not dispatch.fast_path_ok("demo.path", torch.empty(0), check, "fallback")
    assert check.calls == 0 and dispatch.fast_checks == {}
    monkeypatch.setattr(dispatch, "_capturing", lambda: False)
    assert dispatch.fast_path_ok("demo.path", torch.empty(0), check, "fallback")
    monkeypatch.setattr(dispatch, "_capturing", lambda: True)
    assert dispatch.fast_path_ok("demo.path", torch.empty(0), check, "fallback") and check.calls == 1


def test_cpu_tensors_need_no_check():
    check = Check(ok=False)
    assert dispatch.fast_path_ok("demo.path", torch.empty(0), check, "fallback") and check.calls == 0


def test_codebook_and_sparse24_gates(fake_gpu, monkeypatch):
    """Their fast paths only exist on a GPU (the interpreter never takes them), so here: the gate
    is asked with the path's name and its answer is what the launcher uses."""
    asked = []
    monkeypatch.setattr(dispatch, "fast_path_ok", lambda path, x, check, fallback: asked.append(path) or False)
    monkeypatch.setattr(codebook.C, "interpreting", lambda: False)
    seen = {}
    monkeypatch.setattr(codebook.C, "launch", lambda kernel, tuned, grid, args, config, default, **kw: seen.update(kw))
    x = torch.randn(1, 64)
    codebook.codebook_gemv(x, torch.zeros(8, 8, dtype=torch.int32), torch.randn(8, 16), None, 4, 64)
    assert asked == ["codebook.lanes4"] and seen["LANES"] is False and seen["XS"] == 0
    # Once the shuffles pass: x staged in shared memory where the program's columns fit (zeros
    # past K up to whole 128-word steps) and N fills every config's rows, else the unstaged loop.
    monkeypatch.setattr(dispatch, "fast_path_ok", lambda path, x, check, fallback: True)
    monkeypatch.setattr(codebook.C, "finish_split_k", lambda *args: None)  # nothing was launched
    rows = max(c.kwargs["BLOCK_N"] for c in codebook.GEMV_STAGED_CONFIGS4)
    for k, split, n, xs in ((64, 1, rows, 1024), (8 * 1376, 1, rows + 3, 11264), (8 * 1376, 2, rows, 6144),
                            (8 * 1500, 1, rows, 0), (64, 1, rows - 1, 0)):
        codebook.codebook_gemv(torch.randn(1, k), torch.zeros(n, k // 8, dtype=torch.int32), torch.randn(n, 16),
                               None, 4, k, split)
        assert seen["LANES"] is True and seen["XS"] == xs and (seen["XS_ASM"] != "") == (xs > 0), (k, split, n)
        assert seen["WS"] == (k // 8 if xs else 0) and (xs == 0 or f"[{4 * xs}]" in seen["XS_ASM"])
    monkeypatch.setattr(dispatch, "fast_path_ok", lambda path, x, check, fallback: asked.append(path) or False)
    sparse24.sparse24_gemv(x.bfloat16(), torch.zeros(8, 32), torch.zeros(8, 2, dtype=torch.int32), None, None, None,
                           0, 64)
    assert asked[-1] == "sparse24.prmt" and seen["FAST"] is False
    sparse24.sparse24_gemv(x.bfloat16(), torch.zeros(8, 32, dtype=torch.uint8), torch.zeros(8, 2, dtype=torch.int32),
                           None, torch.randn(1, 16), None, 0, 64)
    assert asked[-2:] == ["sparse24.lanes", "sparse24.prmt"] and seen["LANES"] == 0


def test_csr_asm_gate(fake_gpu, monkeypatch):
    """The CSR kernel's inline PTX: the gate is asked on every GPU call (any M may get a one-row
    config); its answer turns ASM on, and at M = 1 with up to 32 entries picks LANES (1: a zero
    lane for padding, 2: 32 entries and a bit test, 0: gather)."""
    asked, answer, seen = [], [False], {}
    monkeypatch.setattr(dispatch, "fast_path_ok", lambda path, x, check, fallback: asked.append(path) or answer[0])
    monkeypatch.setattr(csr.C, "interpreting", lambda: False)
    monkeypatch.setattr(csr.C, "launch", lambda kernel, tuned, grid, args, config, default, **kw: seen.update(kw))
    row_ptr, cols, codes = torch.tensor([0, 2, 3], dtype=torch.int32), torch.tensor([1, 5, 0], dtype=torch.int16), \
        torch.tensor([0, 3, 1], dtype=torch.uint8)

    def gate(m, entries, ok):
        asked.clear()
        answer[0] = ok
        book = torch.randn(2, entries) if entries else None
        values = codes if entries else torch.randn(3).bfloat16()
        csr.csr_matmul(torch.randn(m, 8), row_ptr, cols, values, None, book, None, 0, 8)
        return asked, seen["ASM"], seen["LANES"]

    assert gate(1, 16, False) == (["csr.asm"], False, 0)
    assert gate(1, 16, True) == (["csr.asm"], True, 1)
    assert gate(1, 31, True) == (["csr.asm"], True, 1)
    assert gate(1, 32, True) == (["csr.asm"], True, 2)
    assert gate(1, 33, True) == (["csr.asm"], True, 0)
    assert gate(2, 16, True) == (["csr.asm"], True, 0)
    assert gate(1, 0, True) == (["csr.asm"], True, 0)
    assert gate(4, 0, False) == (["csr.asm"], False, 0)


# ---- the known answers --------------------------------------------------------------------------

@pytest.mark.parametrize("group_size", [0, 16])
def test_int8_probe_is_exact(group_size):
    x, q, s, want = int8.probe(group_size)
    assert q.min() == -128 and q.max() == 127 and want.unique().numel() > 20
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert torch.equal(want.to(dtype).double(), want), dtype  # the output format holds it exactly
        assert torch.equal(int8.reference(x.to(dtype), q, s, None, group_size), want)
    # What a flush to zero or swapped bytes in a word would give differs in every row / most rows.
    flushed = int8.reference(x, torch.zeros_like(q), s, None, group_size)
    assert not torch.isclose(flushed, want).any()
    swapped = q.view(q.shape[0], -1, 4).flip(-1).reshape(q.shape)
    assert (int8.reference(x, swapped, s, None, group_size) != want).float().mean() > 0.9


@pytest.mark.parametrize("path", sorted(int8.SELF_CHECKS))
def test_int8_self_checks_pass_in_the_interpreter(path):
    check, _ = int8.SELF_CHECKS[path]
    for dtype in (torch.float32,) if path == "int8.gemv" else (torch.bfloat16, torch.float16):
        assert check(torch.device("cpu"), dtype), dtype


@pytest.mark.parametrize("bits", range(1, codebook.LANE_MAX_BITS + 1))
def test_codebook_probe_is_exact(bits):
    for per_row in (True, False):
        x, packed, book, k, want = codebook.probe(bits, per_row)
        assert k % 2 == 0 and k % (32 // bits) and want.unique().numel() > 5
        for dtype in (torch.bfloat16, torch.float16):
            assert torch.equal(want.to(dtype).double(), want)
            assert torch.equal(codebook.reference(x.to(dtype), packed, book, None, bits, k), want)
    got = codebook._gemv(x.bfloat16(), packed, book, None, bits, k, 1, codebook.gemv_configs(bits)[0], lambda *a: True,
                         True)
    assert torch.equal(got.double(), want)


def test_sparse24_probe_is_exact():
    x, values, positions, k, want = sparse24.probe()
    assert want.unique().numel() > 5
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(want.to(dtype).double(), want)
        assert torch.equal(sparse24.sparse24_reference(x.to(dtype), values.to(dtype), positions, None, None, None, 0, k),
                           want)
        got = sparse24._gemv(x.to(dtype), values.to(dtype), positions, None, None, None, 0, k, 1,
                             sparse24.S24_GEMV_CONFIGS[0], None, lambda *a: True)
        assert torch.equal(got.double(), want)


@pytest.mark.parametrize("entries", (csr.LANE_ENTRIES, 32))
def test_csr_asm_cases_are_exact(entries):
    """The CSR self-check's known answers: integer sums a 16-bit output holds, every code and
    padding (PAD_CODE) used; float (bf16 and the activations' dtype) and int8 values of the same
    weight; the interpreter's kernel (Triton loads, gathered codebook) gives them exactly, and so
    does the whole check."""
    for per_row in (True, False):
        x, row_ptr, cols, codes, book, k, want = csr.lanes_probe(per_row, entries)
        assert want.unique().numel() > 5 and want.abs().max() <= 256
        assert codes.unique().numel() == entries and book.shape[1] == entries
        segments = csr.aligned_segments(row_ptr, cols, codes)
        assert (segments[3] == csr.PAD_CODE.value).sum() > 0
        for dtype in (torch.bfloat16, torch.float16):
            x, row_ptr, cols, cases, k = csr.asm_cases(per_row, entries, dtype)
            assert len(cases) == (4 if per_row and entries == csr.LANE_ENTRIES else 1)
            for values, scales, book, want in cases:
                assert torch.equal(want, cases[0][3])  # one weight, however its values are held
                assert torch.equal(want.to(dtype).double(), want)
                for aligned in (csr.aligned_segments(row_ptr, cols, values), None):
                    got = csr._matmul(x.to(dtype), row_ptr, cols, values, scales, book, None, 0, k, csr.CSR_CONFIGS[2],
                                      aligned, lambda *a: True)
                    assert torch.equal(got.double(), want)
            assert csr._asm_check(torch.device("cpu"), dtype)


def test_sparse24_codebook_probe_is_exact():
    for per_row in (True, False):
        x, codes, positions, book, k, want = sparse24.probe_codebook(per_row)
        assert codes.min() == 0 and codes.max() == 15 and want.unique().numel() > 5
        for dtype in (torch.bfloat16, torch.float16):
            assert torch.equal(want.to(dtype).double(), want)
            for config in sparse24.LANES_PROBE_CONFIGS:  # both thread layouts the lanes check runs
                got = sparse24._gemv(x.to(dtype), codes, positions, None, book, None, 0, k, 1, config, None,
                                     lambda *a: True)
                assert torch.equal(got.double(), want)
