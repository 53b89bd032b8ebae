"""``compress`` and ``step``: apply a recipe to a model, advance its schedules."""

from __future__ import annotations

import copy
import difflib
import fnmatch
import uuid
import warnings
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from torchzip.errors import RecipeError, UnsupportedLayerError
from torchzip.passes.base import PASSES, LayerPass
from torchzip.passes.codebook import Codebook, codebook_of, step_codebooks
from torchzip.passes.prune import Prune, masks_of, step_masks
from torchzip.passes.quantize import Int8FakeQuant, QuantizeBias
from torchzip.recipe import Recipe, as_recipe

Plan = list[tuple[str, nn.Module, dict]]


def _existing_state(module: nn.Module) -> dict[str, Any]:
    state: dict[str, Any] = {"prune": masks_of(module), "quant": None}
    if codebook_of(module) is not None:
        state["quant"] = "codebook"
    elif parametrize.is_parametrized(module, "weight") and any(isinstance(p, Int8FakeQuant) for p in module.parametrizations.weight):
        state["quant"] = "quantize"
    state["bias"] = parametrize.is_parametrized(module, "bias")
    if state["prune"] is not None:
        state["prune_end"] = state["prune"].end_step or 0
    return state


def plan_recipe(recipe: Recipe, model: nn.Module) -> list[tuple[Plan | None, list[str]]]:
    """Check a recipe against a model without touching it.

    Returns, per pass, the layers it will take (None for passes that are not per-layer) and the
    layers its general rule skips (with why). Raises :class:`RecipeError` for anything that
    cannot make sense: conflicting passes on one layer, an override a layer cannot honour, a
    model with no targeted layer.
    """
    states: dict[str, dict] = {}
    plans: list[tuple[Plan | None, list[str]]] = []
    layer_passes = 0
    owners: dict[int, str] = {}  # weight tensor -> the layer that compresses it
    for index, p in enumerate(recipe.passes):
        where = f"pass #{index + 1} '{p.key}'"
        if not isinstance(p, LayerPass):
            plans.append((None, []))
            continue
        layer_passes += 1
        plan, skipped = [], []
        taken = p.layers(model)
        names = [name for name, *_ in taken]
        for pattern in p.overrides:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                close = difflib.get_close_matches(pattern, names, n=3)
                raise UnsupportedLayerError(f"{where}: override '{pattern}' matches no layer this pass targets"
                                            + (f"; close names: {close}" if close else ""))
        for name, module, args, named in taken:
            reason = p.unfit(name, module, args)
            if reason and named:
                raise UnsupportedLayerError(f"{where}: {reason}; its override cannot be honoured")
            if reason:
                skipped.append(reason)
                continue
            state = states.setdefault(name, _existing_state(module))
            _check_order(state, p, args, name, where)
            _check_tied(owners, name, module, where)
            plan.append((name, module, args))
        plans.append((plan, skipped))
    if layer_passes and not any(plan for plan, _ in plans if plan is not None):
        skipped = [reason for _, reasons in plans for reason in reasons]
        if skipped:
            raise UnsupportedLayerError("no targeted layer can take the recipe: " + "; ".join(skipped[:5]))
        raise RecipeError(
            "no layer of the model is targeted by the recipe: targets are matched by exact type "
            "(Linear, Conv1d, Conv2d, Embedding by default) and filtered by 'exclude'"
        )
    return plans


def _check_tied(owners: dict[int, str], name: str, module: nn.Module, where: str) -> None:
    w = module.parametrizations.weight.original if parametrize.is_parametrized(module, "weight") else module.weight
    other = owners.setdefault(id(w), name)
    if other != name:
        raise RecipeError(
            f"{where}: layers '{other}' and '{name}' share one weight (tied); compressing both would untie "
            "them. Exclude one of them (it keeps the shared float weight) or untie the weights first"
        )


def _check_order(state: dict, p: LayerPass, args: dict, name: str, where: str) -> None:
    if isinstance(p, QuantizeBias):
        if state.get("bias"):
            raise RecipeError(f"{where}: the bias of layer '{name}' is already quantized")
        state["bias"] = True
    elif isinstance(p, Prune):
        if state["prune"] is not None:
            raise RecipeError(f"{where}: layer '{name}' is already pruned; use one prune pass per layer")
        if state["quant"]:
            raise RecipeError(f"{where}: layer '{name}' is quantized by an earlier '{state['quant']}' pass; prune before quantizing")
        state["prune"] = p
        state["prune_end"] = args["end_step"] or 0
    else:
        if state["quant"]:
            raise RecipeError(
                f"{where}: layer '{name}' is already quantized by an earlier '{state['quant']}' pass; "
                "a layer takes one of 'quantize' or 'codebook'"
            )
        if isinstance(p, Codebook) and state.get("prune_end", 0) > args["start_step"]:
            raise RecipeError(
                f"{where}: layer '{name}' would be clustered at step {args['start_step']} while its pruning "
                f"runs until step {state['prune_end']}; set codebook start_step >= the prune end_step"
            )
        state["quant"] = p.key


def _keep_teachers(model: nn.Module) -> dict:
    # A deep copy of the student must not copy the teacher an attached callback holds.
    from torchzip import distill

    teachers = [getattr(cb, "teacher", None) for cb in distill.callbacks(model)]
    return {id(t): t for t in teachers if t is not None}


def compress(model: nn.Module, recipe: Any, *, inplace: bool = False, progress: bool = True, **context: Any) -> nn.Module:
    """Apply ``recipe`` (a Recipe, YAML path, dict, or list of passes) to ``model``, in order.

    The recipe is checked against the model first; on any error nothing is modified. Returns a
    compressed copy (or ``model`` itself with ``inplace=True``) that trains as usual: call
    :func:`torchzip.step` once per optimizer step to advance gradual schedules. Extra keyword
    arguments (e.g. ``teacher=``) reach passes that need objects a recipe file cannot hold.
    """
    if not isinstance(model, nn.Module):
        raise RecipeError(f"compress needs an nn.Module, got {type(model).__name__}")
    known = sorted({k for cls in PASSES.values() for k in cls.context_keys})
    unknown = sorted(set(context) - set(known))
    if unknown:
        raise RecipeError(f"unknown keyword argument(s) {unknown} for compress; allowed: inplace, progress, {', '.join(known)}")
    recipe = as_recipe(recipe)
    for p in recipe.passes:
        p.check(model, dict(context, inplace=inplace))
    plans = plan_recipe(recipe, model)
    for index, (p, (_, skipped)) in enumerate(zip(recipe.passes, plans)):
        if skipped:
            warnings.warn(
                f"pass #{index + 1} '{p.key}' skipped {len(skipped)} layer(s) it cannot take: " + "; ".join(skipped),
                stacklevel=2,
            )
    if not inplace:
        model = copy.deepcopy(model, _keep_teachers(model))
    modules = dict(model.named_modules())
    call = uuid.uuid4().hex[:8]  # group names must not collide with an earlier compress call's
    for index, (p, (plan, _)) in enumerate(zip(recipe.passes, plans)):
        if plan is None:
            p(model, progress=progress, **context)
            continue
        plan = [(name, modules[name], args) for name, _, args in plan]
        if isinstance(p, Codebook):
            p.apply(model, plan, f"{p.key}{index}-{call}", progress=progress)
        else:
            p.apply(model, plan, f"{p.key}{index}-{call}")
    return model


def step(model: nn.Module) -> None:
    """Advance every gradual schedule in ``model`` by one optimizer step.

    Grows pruning masks that are due and clusters codebooks whose ``start_step`` has come.
    Call it after ``optimizer.step()`` (the fine-tuning callbacks do this for you).
    """
    if not isinstance(model, nn.Module):
        raise RecipeError(f"step needs the compressed nn.Module, got {type(model).__name__}")
    step_masks(model)
    step_codebooks(model)
