"""benchmarks/gpu_check.py's CPU smoke run (--quick, interpreter): every part runs and checks out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def test_gpu_check_quick(tmp_path):
    from benchmarks import gpu_check

    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--quick", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads(out.read_text())
    rows = data["correctness"]
    assert rows and all(r["ok"] and r["rel_err"] <= r["tol"] for r in rows)
    seen = {(r["format"], r["kernel"]) for r in rows}
    for name in gpu_check.FORMATS:
        kernels = {"dispatched", "dequant"} | ({"csr"} if name.startswith("csr") else {"gemv", "gemm"})
        assert kernels <= {k for f, k in seen if f == name}, name
    timed = {r["format"] for r in data["timing"] if r.get("s")}
    assert timed == {"bf16", *gpu_check.TIMED}
    assert all(r.get("s_dequant_cublas") for r in data["timing"] if r["format"] != "bf16")
    assert {r["stream"] for r in data["decode"]} == {"4-bit", "8-bit"} and all(r["ok"] for r in data["decode"])
    assert data["load"]["load_cpu_matches"] and data["load"]["load_auto_matches"]
    assert data["run"]["quick"] is True and data["run"]["commit"]
    assert data["self_checks"] == {}  # no fast path (and no self-check) on the interpreter
