"""Test-wide set-up: Triton runs in its CPU interpreter unless a GPU is present; fresh seeds."""

import contextlib
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported anywhere in the session.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def fresh_seed():
    """Seed torch afresh for every test; the seed is printed so a failure can be replayed."""
    seed = int(os.environ.get("TORCHZIP_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(seed)
    print(f"TORCHZIP_TEST_SEED={seed}")
    return seed


@pytest.fixture
def one_thread():
    """Run on one intra-op thread: tiny models only pay for the synchronisation of more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def plain_attention():
    """``nn.MultiheadAttention`` without its fused fast path: the plain path a packed attention
    module always takes, so a trainable model can be compared with it bit for bit."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


@pytest.fixture(params=["compiled", "torch"])
def cpu_route(request, monkeypatch):
    """Run a test on both routes of the CPU kernels: the compiled C library (where it builds) and
    torch's code."""
    from torchzip.kernels import cpu

    if request.param == "compiled" and not cpu.available():
        pytest.skip(f"needs the compiled CPU kernels (x86-64 with AVX2 and gcc; the torch route is tested everywhere): {cpu.why_not()}")
    if request.param == "torch":
        monkeypatch.setattr(cpu, "available", lambda: False)
    return request.param
