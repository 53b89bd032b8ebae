"""``compress``: apply a recipe to a model; ``plan_recipe``: check one without touching the model."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from torchzip.passes.layer import Plan, plan_passes, run_passes
from torchzip.progress import enabled
from torchzip.recipe import Recipe, as_recipe


def plan_recipe(recipe: Any, model: nn.Module) -> list[tuple[Plan | None, list[str]]]:
    """Check a recipe against a model without touching it.

    Returns, per pass, the layers it will take as ``(name, module, pass for that layer)`` — the
    layer's own pass instance when an override names it — (None for passes that are not per
    layer), and the layers its general rule skips, with why. Raises :class:`RecipeError` for
    anything that cannot make sense: conflicting passes on one layer, an override a layer cannot
    honour, a model with no targeted layer.
    """
    return plan_passes(as_recipe(recipe).passes, model)


def compress(model: nn.Module, recipe: Recipe | Any, *, inplace: bool = False, progress: bool | None = None,
             calibration: Iterable | None = None, **context: Any) -> nn.Module:
    """Apply ``recipe`` (a Recipe, YAML path, dict, or list of passes) to ``model``, in order.

    The recipe is checked against the model first; on any error nothing is modified. Returns a
    compressed copy (or ``model`` itself with ``inplace=True``) that trains as usual: call
    :func:`torchzip.step` once per optimizer step to advance gradual schedules, and give
    ``recipe.callbacks(model, ...)`` to the training loop (distillation). Extra keyword
    arguments reach passes that declare them (``context_keys``): objects a recipe file cannot hold.
    ``progress``: bars for slow passes such as k-means (None: only when stderr is a terminal).
    ``calibration``: batches of model inputs (tensors, tuples, dicts: ``model(x)``, ``model(*x)``,
    ``model(**x)``) for the passes that use data (Wanda/SparseGPT pruning, GPTQ int8, activation-
    weighted codebooks); every batch is run once before anything changes, and layers are then
    calibrated in order on the outputs of the layers already compressed (:mod:`torchzip.calibrate`).
    """
    return run_passes(model, as_recipe(recipe).passes, inplace=inplace, progress=enabled(progress), context=context,
                      calibration=calibration)
