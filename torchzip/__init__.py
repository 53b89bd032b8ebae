"""torchzip: composable model compression for PyTorch.

``compress(model, recipe)`` applies passes (pruning, int8, codebooks, distillation); ``step``
advances their schedules while fine-tuning; ``freeze`` packs the weights; ``summary`` reports
what is stored.
"""

from torchzip import distill  # noqa: F401  (tz.distill.callbacks, tz.distill.detach)
from torchzip.api import compress, plan_recipe, step
from torchzip.distill import Callback, DistillationCallback, finetune, kd_loss
from torchzip.export import export, load, read_manifest
from torchzip.errors import DistillationError, FormatError, RecipeError, TorchzipError, UnsupportedLayerError
from torchzip.freeze import freeze
from torchzip.passes.codebook import Codebook
from torchzip.passes.distill import Distill
from torchzip.passes.prune import Prune
from torchzip.passes.quantize import Quantize, QuantizeBias
from torchzip.recipe import Recipe
from torchzip.summary import Summary, summary

__version__ = "0.1.0"

__all__ = [
    "compress", "step", "freeze", "summary", "export", "load", "read_manifest", "plan_recipe", "Recipe", "Summary",
    "Prune", "Quantize", "QuantizeBias", "Codebook", "Distill", "finetune", "Callback", "DistillationCallback", "kd_loss",
    "TorchzipError", "RecipeError", "UnsupportedLayerError", "FormatError", "DistillationError",
]
