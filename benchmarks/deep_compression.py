"""Deep Compression end to end on real data: LeNet-300-100 on scikit-learn's digits.

    python benchmarks/deep_compression.py [--quick] [--recipe recipes/deep_compression.yaml]
    python benchmarks/deep_compression.py --recipe recipes/deep_compression_50x.yaml
    python benchmarks/deep_compression.py --calibrated   # one-shot: data-free vs calibrated

For each of 5 stratified folds (every one of the 1797 images is a test image once): train the
dense MLP 64-300-100-10, compress it with the recipe through ``torchzip.compress``, fine-tune
with distillation from the dense model, ``export`` to ``.tzip``, ``load`` the file into a fresh
skeleton and evaluate *the loaded model*. Prints a table and writes
benchmarks/results/<recipe name>.json.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torchzip as tz  # noqa: E402
from common import write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def lenet_300_100() -> nn.Module:
    """LeNet-300-100 sized for 8x8 inputs."""
    return nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 digits, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.data, dtype=torch.float32) / 16.0, torch.tensor(data.target)


def folds(y: torch.Tensor, k: int = 5, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Stratified k-fold (train, test) index pairs."""
    from sklearn.model_selection import StratifiedKFold

    split = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(y.numpy(), y.numpy())
    return [(torch.tensor(a), torch.tensor(b)) for a, b in split]


def loader(x, y, seed: int, batch_size: int = 64):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=g)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.eval()(x).argmax(1)


def scale_steps(recipe: tz.Recipe, factor: float) -> tz.Recipe:
    """The recipe with its schedule steps scaled, for runs shorter than the 200 epochs it assumes."""
    passes = []
    for p in recipe.passes:
        args = p.to_dict()
        for key in ("start_step", "end_step"):
            if args.get(key):
                args[key] = max(1, round(args[key] * factor))
        passes.append(type(p).from_dict(args))
    return tz.Recipe(passes)


def run_fold(x, y, train, test, *, recipe, dense_epochs: int, finetune_epochs: int, seed: int) -> dict:
    """One fold: dense training, compression + distillation, export, load, evaluation."""
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    dense = lenet_300_100()
    tz.finetune(dense, loader(x[train], y[train], seed), epochs=dense_epochs, lr=1e-3, progress=False)
    dense.eval()
    student = tz.compress(dense, recipe, progress=False)
    tz.finetune(student, loader(x[train], y[train], seed + 1), epochs=finetune_epochs, lr=1e-3, lr_schedule="cosine",
                callbacks=recipe.callbacks(student, teacher=dense), progress=False)
    finetuned = predict(student, x[test])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lenet.tzip"
        file_bytes = tz.export(student, path, progress=False)
        loaded = tz.load(path, lenet_300_100(), progress=False)
    compressed = predict(loaded, x[test])
    fp32_bytes = sum(t.numel() * 4 for t in dense.state_dict().values())
    weights = [m.weight for m in tz.freeze(copy.deepcopy(student)).modules() if hasattr(m, "packed")]
    total = sum(w.numel() for w in weights)
    kept = sum(int((w != 0).sum()) for w in weights)
    return {
        "test_images": len(test),
        "dense_correct": int((predict(dense, x[test]) == y[test]).sum()),
        "compressed_correct": int((compressed == y[test]).sum()),
        "loaded_matches_finetuned": bool(torch.equal(compressed, finetuned)),
        "fp32_bytes": fp32_bytes, "tzip_bytes": file_bytes, "ratio": fp32_bytes / file_bytes,
        "weights_kept": kept / total, "bits_per_weight": file_bytes * 8 / total,
        "seconds": time.perf_counter() - t0,
    }


ONE_SHOT = {  # no fine-tuning: what calibration alone recovers
    "data-free": [tz.Prune(sparsity=0.8, score="magnitude"), tz.Codebook(bits=4, granularity="layer", method="kmeans"),
                  tz.QuantizeBias()],
    "calibrated": [tz.Prune(sparsity=0.8, score="sparsegpt"), tz.Codebook(bits=4, granularity="layer", method="gptq"),
                   tz.QuantizeBias()],
}


def run_fold_one_shot(x, y, train, test, *, dense_epochs: int, seed: int, calibration: int = 256) -> dict:
    """One fold: dense training, then each one-shot recipe (80% pruned, 4-bit codebook per layer,
    int8 biases) without fine-tuning, data-free and calibrated on ``calibration`` training images;
    accuracy of the model loaded back from its file."""
    torch.manual_seed(seed)
    dense = lenet_300_100()
    tz.finetune(dense, loader(x[train], y[train], seed), epochs=dense_epochs, lr=1e-3, progress=False)
    dense.eval()
    picked = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:calibration]]
    batches = list(torch.split(x[picked], 64))
    out = {"test_images": len(test), "dense_correct": int((predict(dense, x[test]) == y[test]).sum())}
    for kind, recipe in ONE_SHOT.items():
        t0 = time.perf_counter()
        student = tz.compress(dense, recipe, progress=False, calibration=batches if kind == "calibrated" else None)
        seconds = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "lenet.tzip"
            file_bytes = tz.export(student, path, progress=False)
            loaded = tz.load(path, lenet_300_100(), progress=False)
        out[kind] = {"correct": int((predict(loaded, x[test]) == y[test]).sum()), "tzip_bytes": file_bytes,
                     "seconds": seconds}
    return out


def main_one_shot(args) -> dict:
    x, y = digits()
    splits = folds(y, seed=args.seed)[:1] if args.quick else folds(y, seed=args.seed)
    rows = [{"fold": i, **run_fold_one_shot(x, y, train, test, dense_epochs=15 if args.quick else args.dense_epochs,
                                            seed=args.seed + 10 * i)} for i, (train, test) in enumerate(splits)]
    images = sum(r["test_images"] for r in rows)
    fp32 = sum(t.numel() * 4 for t in lenet_300_100().state_dict().values())
    result = {"dense_accuracy": sum(r["dense_correct"] for r in rows) / images, "images": images, "folds": rows,
              "recipes": {k: tz.Recipe(v).to_dict() for k, v in ONE_SHOT.items()}}
    print(f"one shot, no fine-tuning (80% pruned, 4-bit codebook per layer, int8 biases); dense "
          f"{result['dense_accuracy']:.2%} over {images} images")
    for kind in ONE_SHOT:
        acc = sum(r[kind]["correct"] for r in rows) / images
        worst = max(r[kind]["tzip_bytes"] for r in rows)
        result[kind] = {"accuracy": acc, "ratio": fp32 / worst, "seconds": sum(r[kind]["seconds"] for r in rows)}
        print(f"  {kind:10s} accuracy {acc:.2%}  ratio {fp32 / worst:.1f}x (worst fold)  compress "
              f"{result[kind]['seconds']:.1f} s in all")
    if not args.quick and not args.no_write:
        print(f"wrote {write_json('deep_compression_calibrated', result)}")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "deep_compression.yaml"))
    parser.add_argument("--quick", action="store_true", help="one fold, fewer epochs (what the test suite runs)")
    parser.add_argument("--dense-epochs", type=int, default=80)
    parser.add_argument("--finetune-epochs", type=int, default=200, help="the recipe's steps assume 200")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--calibrated", action="store_true", help="one-shot recipes, data-free vs calibrated")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny matmuls: threads cost more than they give, and results stay reproducible
    if args.calibrated:
        return main_one_shot(args)
    recipe = tz.Recipe.from_yaml(args.recipe)
    x, y = digits()
    splits = folds(y, seed=args.seed)[:1] if args.quick else folds(y, seed=args.seed)
    epochs = (15, 30) if args.quick else (args.dense_epochs, args.finetune_epochs)
    recipe = scale_steps(recipe, epochs[1] / 200)
    rows = []
    print(f"{'fold':>4} {'dense acc':>9} {'tzip acc':>9} {'fp32 B':>8} {'tzip B':>7} {'ratio':>7} {'kept':>6} {'bits/w':>7} {'time s':>7}")
    for i, (train, test) in enumerate(splits):
        r = run_fold(x, y, train, test, recipe=recipe, dense_epochs=epochs[0], finetune_epochs=epochs[1], seed=args.seed + 10 * i)
        rows.append({"fold": i, **r})
        print(f"{i:>4} {r['dense_correct'] / r['test_images']:>9.2%} {r['compressed_correct'] / r['test_images']:>9.2%} "
              f"{r['fp32_bytes']:>8,} {r['tzip_bytes']:>7,} {r['ratio']:>6.1f}x {r['weights_kept']:>6.1%} "
              f"{r['bits_per_weight']:>7.3f} {r['seconds']:>7.1f}")
    images = sum(r["test_images"] for r in rows)
    result = {
        "ratio": min(r["ratio"] for r in rows),
        "mean_ratio": sum(r["ratio"] for r in rows) / len(rows),
        "dense_accuracy": sum(r["dense_correct"] for r in rows) / images,
        "compressed_accuracy": sum(r["compressed_correct"] for r in rows) / images,
        "images": images,
        "recipe": recipe.to_dict(),
        "folds": rows,
    }
    drop = (result["dense_accuracy"] - result["compressed_accuracy"]) * 100
    print(f"all {images} images: dense {result['dense_accuracy']:.2%}, compressed {result['compressed_accuracy']:.2%} "
          f"(drop {drop:+.2f} pp), ratio {result['ratio']:.1f}x (worst fold), {result['mean_ratio']:.1f}x (mean)")
    if not args.quick and not args.no_write:  # results named after the recipe file
        print(f"wrote {write_json(Path(args.recipe).stem, result)}")
    return result


if __name__ == "__main__":
    main()
