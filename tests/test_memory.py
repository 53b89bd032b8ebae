"""Export does not copy the model, and load into a meta skeleton holds little beyond what it decodes:
peak RSS growth measured in a fresh subprocess (VmHWM)."""

import json
import os
import subprocess
import sys

import pytest

_SCRIPT = r"""
import gc, json, sys
import torch
from torch import nn
import torchzip as tz

def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))

torch.manual_seed(int(sys.argv[3]))
with torch.no_grad():
    model = nn.Sequential(*[nn.Linear(1024, 512) if i % 2 == 0 else nn.Linear(512, 1024) for i in range(24)])  # 50 MB
size = sum(p.numel() * p.element_size() for p in model.parameters())
recipe = [tz.Quantize()] if sys.argv[1] == "int8" else [tz.Codebook(bits=4)]
tz.compress(model, recipe, inplace=True, progress=False)
# Warm up on one layer: lazily built tables and thread pools are not the model's copies.
tz.export(tz.compress(nn.Sequential(nn.Linear(1024, 512)), recipe, progress=False), sys.argv[2], progress=False)
gc.collect()
before = hwm()
n = tz.export(model, sys.argv[2], progress=False)
after = hwm()
print(json.dumps({"size": size, "growth": after - before, "file": n}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_export_of_a_trainable_model_does_not_copy_it(tmp_path, fresh_seed):
    recipe = "int8"  # codebooks take the same path; their k-means would only make this slower
    # A fixed mmap threshold: large blocks go back to the system when freed, so VmHWM measures
    # what export holds rather than how glibc's adaptive threshold happens to fragment the heap.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-c", _SCRIPT, recipe, str(tmp_path / "m.tzip"), str(fresh_seed)],
                         capture_output=True, text=True, timeout=300, check=True, env=env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # A copy of the model (a deepcopy before freezing) would add all of it, every packed layer
    # held until the end a quarter; what remains is one layer's temporaries (the Huffman coder
    # takes about 35 bytes a symbol), which the warm-up already reached.
    assert result["growth"] < 0.15 * result["size"], result


_BIG_LAYER = r"""
import gc, json, os, sys
import torch
from torch import nn
import torchzip as tz

def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))

def build():  # one big layer (an embedding of 64 MB in fp32) and a few small ones
    return nn.Sequential(nn.Embedding(31000, 512), *[nn.Linear(512, 512) for _ in range(4)])

what, path = sys.argv[1], sys.argv[2]
torch.manual_seed(int(sys.argv[3]))
recipe = [tz.Quantize()] if sys.argv[4] == "int8" else [tz.Codebook(bits=4)]
small = os.path.join(os.path.dirname(path), "warm.tzip")
# Warm up on one small layer: lazily built tables and thread pools are not the model's copies.
tz.export(tz.compress(nn.Sequential(nn.Linear(512, 512)), recipe, progress=False), small, progress=False)
if what == "export":
    with torch.no_grad():
        model = build()
    big = model[0].weight.numel() * model[0].weight.element_size()  # read before it is parametrized
    tz.compress(model, recipe, inplace=True, progress=False)
    gc.collect()
    before = hwm()
    n = tz.export(model, path, progress=False)
    print(json.dumps({"big": big, "growth": hwm() - before, "file": n}))
else:
    tz.load(small, nn.Sequential(nn.Linear(512, 512)), progress=False)
    with torch.device("meta"):  # the first meta tensors load torch's meta kernels (~150 MB RSS, once)
        skeleton = build()
    if what == "build":
        skeleton = build  # load builds it under tz.empty_weights(): that is measured too
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM back to the current RSS: the peak of imports and warm-up is not the load's
    before = hwm()
    loaded = tz.load(path, skeleton, progress=False)
    growth = hwm() - before
    ordinary = tz.load(path, build(), progress=False)
    same = [torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ordinary.state_dict().values())]
    decoded = sum(t.numel() * t.element_size() for t in loaded.state_dict().values())
    print(json.dumps({"file": os.path.getsize(path), "decoded": decoded, "growth": growth, "same": all(same)}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
@pytest.mark.parametrize("recipe", ["int8", "codebook4"])
def test_export_and_meta_load_of_a_big_layer_stay_near_its_packed_size(tmp_path, fresh_seed, recipe):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # see above
    path = str(tmp_path / "big.tzip")

    def run(what):
        out = subprocess.run([sys.executable, "-c", _BIG_LAYER, what, path, str(fresh_seed), recipe],
                             capture_output=True, text=True, timeout=300, check=True, env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])

    exported = run("export")
    # Packing and coding the embedding: its int8 values (a quarter of its fp32 bytes), the codes in
    # lane order and the coded bytes, about as much again. Rounding the whole layer at once, the
    # fake-quantized copies of a forward, or int64 working arrays of the coder would each add
    # one to two times its fp32 size (before these were bounded: 3.8 times).
    assert exported["growth"] < 1.2 * exported["big"], exported
    # Decoded straight into the packed tensors: beyond them, the decoder's windows, one slab's
    # output and the mapped file's pages of one slab of lanes (about 1 MB of payload), and
    # allocator slack. Before, the whole stream's windows, int32 symbols and pages: 89 MB more
    # (int8). 4-bit indices decode two a byte straight into the packed rows: about 5 MB beyond
    # the model; held one byte an index first, they added 15 MB. Built by load, the skeleton's
    # parameters are allocated (never written) and swapped for meta ones as they are registered.
    for what in ("load", "build"):  # into a meta skeleton; into what a function builds
        loaded = run(what)
        assert loaded["same"], (what, loaded)
        assert loaded["growth"] - loaded["decoded"] < 8 << 20, (what, loaded)
