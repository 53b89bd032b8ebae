"""torchzip: composable model compression for PyTorch.

``compress(model, recipe)`` applies passes (pruning, int8, codebooks, distillation); ``step``
advances their schedules while fine-tuning; ``freeze`` packs the weights; ``summary`` reports
what is stored; ``export``/``load`` write and read ``.tzip`` files (``empty_weights`` builds a model to load into
without memory for its weights).

Extension points: :func:`register_pass` (a new pass, nameable in YAML), :func:`register_format`
(a new packed format) and :func:`register_layer_kind` (a new layer type to target).
"""

from torchzip import export, schedule  # noqa: F401  (tz.export is the package, callable as the function)
from torchzip.api import compress, plan_recipe
from torchzip.errors import (CalibrationError, DistillationError, FormatError, MetaTensorError, RecipeError, TorchzipError,
                             UnsupportedLayerError)
from torchzip.export import empty_weights, load, read_manifest
from torchzip.freeze import freeze
from torchzip.packed import LayerKind, PackedWeight, WeightState, register_format, register_layer_kind
from torchzip.passes.base import Pass, register_pass
from torchzip.passes.codebook import Codebook
from torchzip.passes.distill import Distill
from torchzip.passes.fold_bn import FoldBatchNorm, fold_batchnorm
from torchzip.passes.layer import LayerPass
from torchzip.passes.prune import Prune
from torchzip.passes.quantize import Quantize, QuantizeBias
from torchzip.recipe import Recipe
from torchzip.schedule import step
from torchzip.summary import Summary, summary
from torchzip.train import Callback, DistillationCallback, finetune, kd_loss
from torchzip.version import __version__  # noqa: F401

__all__ = [
    "compress", "step", "freeze", "summary", "export", "load", "empty_weights", "read_manifest", "plan_recipe", "Recipe", "Summary",
    "Prune", "Quantize", "QuantizeBias", "Codebook", "Distill", "FoldBatchNorm", "fold_batchnorm", "finetune", "Callback", "DistillationCallback", "kd_loss",
    "Pass", "LayerPass", "register_pass", "PackedWeight", "WeightState", "register_format", "LayerKind",
    "register_layer_kind",
    "TorchzipError", "RecipeError", "UnsupportedLayerError", "FormatError", "DistillationError", "CalibrationError", "MetaTensorError",
]
