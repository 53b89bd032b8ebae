"""Test and benchmark helper: import torchvision's model zoo next to a CPU-only torch."""

from __future__ import annotations

import sys
from types import ModuleType

import torch

_keep_alive: list = []


def import_torchvision() -> ModuleType:
    """Import torchvision, also where its compiled ops do not match the installed torch.

    torchvision's PyPI wheels are built against CUDA torch; with a CPU-only torch their extension
    fails to load, and 0.28's import then dies registering fake kernels for the missing
    ``nms``/``qnms`` ops. The model zoo is plain Python, so declaring those two schemas first lets
    it import. Nothing here runs a torchvision op.
    """
    try:
        import torchvision
    except RuntimeError:
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor")
        _keep_alive.append(lib)
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
        import torchvision
    return torchvision
