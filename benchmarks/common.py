"""What every benchmark script shares: run metadata and writing results as JSON."""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def git_commit() -> str:
    """The checked-out commit, or 'uncommitted' outside a repository with commits."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=RESULTS.parent, timeout=10)
        return out.stdout.strip() or "uncommitted"
    except (OSError, subprocess.SubprocessError):
        return "uncommitted"


def cpu_info() -> dict:
    """The CPU's name, family/model and vector extensions (CPU timings depend on the
    microarchitecture: e.g. bf16 matmuls and the AVX2 lookups differ a lot between AMD Zen 2 and
    Zen 4, which report the same model name on some virtual machines)."""
    info: dict = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    first = text.split("\n\n", 1)[0]
    for line in first.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in ("model name", "cpu family", "model"):
            info[key.replace(" ", "_")] = value
        elif key == "flags":
            flags = set(value.split())
            info["vector"] = sorted(flags & {"avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512vl", "amx_bf16"})
    return info


def run_info() -> dict:
    """Date, commit, machine and library versions for a results file."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_info(),
    }


def write_json(name: str, data: dict) -> Path:
    """Write ``data`` plus :func:`run_info` to ``benchmarks/results/<name>.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"run": run_info(), **data}, indent=2) + "\n")
    return path
