"""The ``torchzip`` command: ``torchzip inspect model.tzip [--json]``."""

from __future__ import annotations

import argparse
import json
import sys

from torchzip.errors import FormatError


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="torchzip", description="Inspect torchzip .tzip artifacts.")
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="per-layer table of a .tzip file")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    from torchzip.inspect import format_report, inspect_file

    try:
        report = inspect_file(args.path)
    except FormatError as err:
        print(f"torchzip: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
