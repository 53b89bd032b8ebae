"""Hostile files with valid checksums (tests/hostile.py) end in FormatError from load and from
inspect, fast and in bounded memory, and a failed load leaves the skeleton exactly as it was.
Runs them in a subprocess with an address-space limit, measuring peak RSS (VmHWM) per case."""

import json
import os
import re
import subprocess
import sys

import pytest

import hostile

MEMORY_LIMIT_MB = 1024  # address space the child may add while reading: a runaway case dies of MemoryError
SECONDS = 5.0  # per load or inspect of one hostile file (a 65 KB file once took 20 s)
PEAK_MB = 128  # peak RSS a hostile file may add (the 20,000-layer manifest: 8 MB of JSON)...
PEAK_MB_LARGEST = 450  # ...except the largest manifest the limits allow (4M JSON items, 1.3 MB file: ~350 MB)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    good = hostile.good_file()
    (folder / "good.tzip").write_bytes(good)
    for name, case in hostile.CASES.items():
        (folder / f"{name}.tzip").write_bytes(case.build(good))
    env = dict(os.environ, MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, hostile.__file__, str(folder), str(MEMORY_LIMIT_MB)], capture_output=True,
                          text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_the_unmodified_file_loads_in_the_harness(results):
    good = results["good"]
    assert good["load"][0] == "ok" and good["inspect"][0] == "ok", good
    assert good["cli"][0] == "SystemExit" and json.loads(good["cli_stdout"])["rows"]
    assert not good["unchanged"]  # the harness sees a skeleton change when there is one


@pytest.mark.parametrize("name", sorted(hostile.CASES))
def test_hostile_file(results, name):
    case, got = hostile.CASES[name], results[name]
    kind, message, seconds = got["load"]
    assert kind == "FormatError", f"{name}: load raised {kind}: {message}"
    assert re.search(case.match, message), f"{name}: {message!r} does not say {case.match!r}"
    assert got["unchanged"], f"{name}: the failed load changed the skeleton"
    assert seconds < SECONDS, f"{name}: load took {seconds:.2f} s"
    kind, message, seconds = got["inspect"]
    assert kind == ("FormatError" if case.inspect else "ok"), f"{name}: inspect raised {kind}: {message}"
    assert not case.inspect or re.search(case.inspect_match or case.match, message), f"{name}: inspect said {message!r}"
    assert seconds < SECONDS, f"{name}: inspect took {seconds:.2f} s"
    assert "Traceback" not in got["cli_stderr"], got["cli_stderr"]
    if case.inspect:
        assert got["cli_stderr"].startswith("torchzip: ") and got["cli_stdout"] == "", got
    else:
        json.loads(got["cli_stdout"], parse_constant=_no_constant)
    limit = PEAK_MB_LARGEST if name == "largest_manifest_allowed" else PEAK_MB
    assert got["peak_mb"] < limit, f"{name}: peak RSS grew by {got['peak_mb']:.0f} MB"


def _no_constant(token):
    raise ValueError(f"{token} is not JSON")
