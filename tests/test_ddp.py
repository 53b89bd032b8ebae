"""Fine-tuning under torchrun: two CPU processes on gloo end with the same model.

The ranks start from different students and see different data (tests/ddp_worker.py); DDP, the
distillation projection's gradient averaging and the schedules must leave them identical.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch

from torchzip.packed.bits import unpack_fields

WORKER = Path(__file__).with_name("ddp_worker.py")


def test_ddp_two_gloo_ranks_end_identical(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    # Different shards: the ranks really saw different batches.
    assert r0["history"][0]["loss"] != r1["history"][0]["loss"]
    assert [h["steps"] for h in r0["history"]] == [6, 6]

    state0, state1 = r0["state"], r1["state"]
    assert state0.keys() == state1.keys()
    for name in state0:
        assert torch.equal(state0[name], state1[name]), f"{name} differs between ranks"

    masks = [name for name in state0 if name.endswith(".mask")]
    assigns = [name for name in state0 if name.endswith(".assign")]
    kept = [name for name in state0 if name.endswith(".kept")]
    assert len(masks) == 3 and len(assigns) == 3 and len(kept) == 3
    for name in masks:  # the gradual prune reached its final sparsity on both ranks
        assert 1 - state0[name].float().mean().item() == 0.75
    for name in kept:  # clustered at step 8 from the same weights: a centroid for each kept weight
        cols = state0[name.replace(".1.kept", ".original")].shape[1]
        assert unpack_fields(state0[name], 1, cols, torch.bool).float().mean().item() == 0.25
    for name in state0:
        if name.endswith(".step"):
            assert int(state0[name]) == 12  # one schedule step per optimizer step, 2 x 6 steps
    trained = [n for n in state0 if n.endswith("original") or n.endswith("centroids")]
    assert all(not torch.equal(state0[n], r0["before"][n]) for n in trained)

    for name, value in r0["projection"].items():
        assert torch.equal(value, r1["projection"][name]), f"projection {name} differs between ranks"
        assert torch.equal(r0["projection_before"][name], r1["projection_before"][name])
        assert not torch.equal(value, r0["projection_before"][name])  # and it was trained
