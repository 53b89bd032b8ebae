"""Progress bars: shown when asked (``progress=True``), or by default (``progress=None``) only
when stderr is a terminal, so logs and pipes get no bar fragments."""

from __future__ import annotations

import sys
from typing import Any, Iterable

from tqdm.auto import tqdm

from torchzip.errors import TorchzipError


def enabled(progress: bool | None) -> bool:
    """Whether to show bars: ``progress`` itself, or for None whether stderr is a terminal."""
    if progress is None:
        stream = sys.stderr
        try:
            return bool(stream is not None and stream.isatty())
        except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
            return False
    if not isinstance(progress, bool):
        raise TorchzipError(f"progress must be True, False or None (bars only on a terminal), got {progress!r}")
    return progress


def bar(iterable: Iterable | None = None, progress: bool | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar over ``iterable`` that shows only when :func:`enabled` says so."""
    return tqdm(iterable, disable=not enabled(progress), **kwargs)
