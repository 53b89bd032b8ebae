"""The ``torchzip`` command.

    torchzip inspect model.tzip [--json]
    torchzip compress --recipe R.yaml --model package.module:factory weights.pt out.tzip
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from torchzip.errors import TorchzipError


def _factory(spec: str):
    module, _, name = spec.partition(":")
    if not module or not name:
        raise TorchzipError(f"--model must look like 'package.module:factory', got {spec!r}")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules in the current directory import
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise TorchzipError(f"cannot import the model factory {spec!r}: {err}") from None


def compress_checkpoint(recipe_path: str, model_spec: str, weights: str, out: str, progress: bool | None = None) -> int:
    """Build the model, load ``weights`` (a state_dict file), compress, export; returns file size.

    The recipe and the destination are checked before anything is built. ``progress``: stage
    lines and bars on stderr (None: only when stderr is a terminal).
    """
    import torch

    import torchzip as tz
    from torchzip.export.container import check_destination
    from torchzip.progress import enabled

    def stage(text: str) -> None:
        if enabled(progress):
            print(f"torchzip: {text}", file=sys.stderr, flush=True)

    recipe = tz.Recipe.from_yaml(Path(recipe_path))
    check_destination(out)
    factory = _factory(model_spec)
    try:
        model = factory()
    except Exception as err:  # noqa: BLE001 - whatever the user's factory raises, say where it came from
        raise TorchzipError(f"the model factory {model_spec} raised {type(err).__name__}: {err}") from err
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is the same user error
        raise TorchzipError(f"cannot read {weights} as a state_dict: {err}") from None
    if not isinstance(state, dict):
        raise TorchzipError(f"{weights} holds a {type(state).__name__}, not a state_dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise TorchzipError(f"{weights} does not fit the model from {model_spec}: {err}") from None
    model.eval()
    stage(f"compressing with {len(recipe.passes)} pass(es): {', '.join(p.key for p in recipe.passes)}")
    small = tz.compress(model, recipe, progress=progress)
    # Without training data, schedules run to their end: masks reach their final sparsity and
    # delayed codebooks get clustered (training-only passes such as distill change nothing).
    stage("running gradual schedules to their end")
    tz.schedule.finish(small, progress=progress)
    stage(f"writing {out}")
    return tz.export(small, out, progress=progress)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="torchzip", description="Compress PyTorch models; inspect .tzip artifacts.")
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="per-layer table of a .tzip file")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    comp = sub.add_parser("compress", help="compress a checkpoint with a recipe (no fine-tuning) and export it")
    comp.add_argument("--recipe", required=True, help="recipe YAML file")
    comp.add_argument("--model", required=True, help="'package.module:factory' returning the uncompressed model")
    comp.add_argument("weights", help="state_dict saved with torch.save")
    comp.add_argument("out", help="the .tzip file to write")
    comp.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                      help="stage lines and progress bars on stderr (default: only when stderr is a terminal)")
    args = parser.parse_args(argv)

    from torchzip.inspect import format_report, inspect_file, json_safe

    try:
        if args.command == "compress":
            compress_checkpoint(args.recipe, args.model, args.weights, args.out, args.progress)
            args.path, args.json = args.out, False
        report = inspect_file(args.path)
    except (TorchzipError, OSError) as err:
        print(f"torchzip: {err}", file=sys.stderr)
        return 2
    except MemoryError:  # a valid but huge model on a small machine: say so, without a traceback
        print(f"torchzip: out of memory while running '{args.command}' on {getattr(args, 'out', None) or args.path}",
              file=sys.stderr)
        return 2
    print(json.dumps(json_safe(report), indent=2, allow_nan=False) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
