"""Triton 3.6's CPU interpreter under NumPy >= 2.4: loops over a runtime bound.

The interpreter turns a runtime loop bound (``for t in range(0, steps)``, ``range(w_lo, w_hi,
BLOCK_W)``: every kernel family has one) into a Python int with ``int()`` of a 1-element NumPy
array, which NumPy 2.4 made a TypeError ("only 0-dimensional arrays can be converted to Python
scalars"), so under Triton 3.6 every such kernel failed in the interpreter. Compiled kernels are
unaffected: there the bound is a kernel parameter the loop compares against. Triton 3.8 squeezes
the array first (triton-lang/triton#9171); importing this module does the same on older Tritons
when ``TRITON_INTERPRET=1``, and nothing otherwise. The kernel modules import it.
"""

from __future__ import annotations

import triton


def backport_index_fix() -> None:
    """Make the interpreter's ``tensor.__index__`` squeeze its 1-element array (Triton 3.8's)."""
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor  # called at every launch, looked up by name

    def patched(tensor, scope) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched


_OLD = tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 8)
_knobs = getattr(triton, "knobs", None)
if _OLD and _knobs is not None and _knobs.runtime.interpret:
    backport_index_fix()
