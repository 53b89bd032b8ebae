"""Compress a ResNet-18 and a small transformer with several recipes: time per pass, packed size.

    python benchmarks/compress.py [--quick]

Prints a table and writes benchmarks/results/compress.json.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torchzip as tz  # noqa: E402
from common import write_json  # noqa: E402
import torchvision  # noqa: E402

RECIPES = {
    "int8": [tz.Quantize()],
    "int8_g128": [tz.Quantize(group_size=128)],
    "codebook4": [tz.Codebook(bits=4)],
    "sparse24_int8": [tz.Prune(pattern="2:4"), tz.Quantize()],
    "prune90_codebook5": [tz.Prune(sparsity=0.9), tz.Codebook(bits=5, granularity="layer")],
}


def small_transformer() -> nn.Module:
    """A 4-layer encoder (d=256) with token embedding and classifier: Linear-heavy, like an LM."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(8192, 256)
            layer = nn.TransformerEncoderLayer(256, 8, 1024, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
            self.head = nn.Linear(256, 8192)

        def forward(self, idx):
            return self.head(self.encoder(self.embed(idx)))

    return Model().eval()


def run(model: nn.Module, x: torch.Tensor, recipe: list) -> dict:
    times = {}
    work = copy.deepcopy(model)
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore")
        for p in recipe:
            t = time.perf_counter()
            work = tz.compress(work, [p], inplace=True, progress=False)
            times[p.key] = time.perf_counter() - t
    with torch.no_grad():
        expected = work(x)
        t = time.perf_counter()
        frozen = tz.freeze(work)
        times["freeze"] = time.perf_counter() - t
        err = (frozen(x) - expected).abs().max().item()
    report = tz.summary(frozen, print_table=False)
    return {"seconds": times, "bytes": report.bytes, "fp32_bytes": report.fp32_bytes, "ratio": report.ratio, "max_abs_diff_frozen": err}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="transformer only, two recipes")
    args = parser.parse_args()
    models = {"transformer": (small_transformer(), torch.randint(0, 8192, (2, 32)))}
    if not args.quick:
        models["resnet18"] = (torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64))
    recipes = dict(list(RECIPES.items())[:2]) if args.quick else RECIPES
    rows = []
    print(f"{'model':<12} {'recipe':<18} {'pass times (s)':<44} {'packed MB':>10} {'fp32 MB':>8} {'ratio':>7}")
    for mname, (model, x) in models.items():
        for rname, recipe in recipes.items():
            r = run(model, x, recipe)
            rows.append({"model": mname, "recipe": rname, **r})
            times = " ".join(f"{k}={v:.2f}" for k, v in r["seconds"].items())
            print(f"{mname:<12} {rname:<18} {times:<44} {r['bytes'] / 1e6:>10.2f} {r['fp32_bytes'] / 1e6:>8.2f} {r['ratio']:>6.2f}x")
    path = write_json("compress", {"rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
