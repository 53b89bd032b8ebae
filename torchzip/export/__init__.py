"""The ``.tzip`` artifact: Huffman-coded streams in a checked, pickle-free container.

``torchzip.export`` is both this package (``torchzip.export.huffman``, ``.container``,
``.codec``...) and the function that writes a file: calling the package calls
:func:`torchzip.export.artifact.export`, so ``tz.export(model, path)`` and
``import torchzip.export.huffman`` both work.
"""

import sys
import types

from torchzip.export.artifact import export as _export
from torchzip.export.artifact import empty_weights, load, read_manifest


class _CallableModule(types.ModuleType):
    def __call__(self, model, path, *, progress: bool | None = None) -> int:
        """Write ``model`` to a ``.tzip`` file at ``path``; see :func:`torchzip.export.artifact.export`."""
        return _export(model, path, progress=progress)


sys.modules[__name__].__class__ = _CallableModule
export = _export

__all__ = ["export", "load", "read_manifest", "empty_weights"]
