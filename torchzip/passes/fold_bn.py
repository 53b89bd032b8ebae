"""BatchNorm folding: each BatchNorm merged into the conv or linear layer right before it.

In eval mode a BatchNorm is an affine map per channel, ``y = (x - mean) * g / sqrt(var + eps) + b``,
so it folds into the layer feeding it: ``W' = W * s``, ``bias' = (bias - mean) * s + b`` with
``s = g / sqrt(var + eps)`` (computed in float64). Folding before quantizing makes what is
quantized what runs, and the folded (and frozen) model skips the BatchNorm (an ``nn.Identity``).

Which layer feeds a BatchNorm is read from a ``torch.fx`` trace of the model. A BatchNorm that is
called more than once, that does not directly follow a ``Linear``/``Conv1d/2d/3d`` whose output
nothing else reads, or whose layer is shared or already compressed is refused by name (``exclude``
leaves such BatchNorms as they are).
"""

from __future__ import annotations

import fnmatch
import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from torchzip.errors import RecipeError
from torchzip.passes.base import Pass, register_pass

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _input_ranks(model: nn.Module, names: list[str], example: Any) -> dict[str, set[int]]:
    """The ranks of the inputs each named module sees when ``model`` runs ``example`` (eval mode,
    no gradients, nothing changed)."""
    from torchzip.train.batches import call_model, eval_mode

    ranks: dict[str, set[int]] = {n: set() for n in names}
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_pre_hook(lambda m, args, n=n: ranks[n].add(args[0].dim())) for n in names]
    try:
        with torch.no_grad(), eval_mode(model):
            call_model(model, example)
    except Exception as err:  # noqa: BLE001  (the example does not fit the model)
        raise RecipeError(f"fold_batchnorm: the example input cannot run through the model ({type(err).__name__}: {err})") from None
    finally:
        for h in hooks:
            h.remove()
    return ranks


def batchnorm_pairs(model: nn.Module, exclude: tuple = (), example: Any = None) -> list[tuple[str, str]]:
    """``(layer name, BatchNorm name)`` for every BatchNorm of ``model`` not excluded; raises
    :class:`RecipeError` naming a BatchNorm that cannot be folded, and why. ``example`` (a batch
    the model runs) shows which BatchNorm1d after a Linear sees 2-D input (the only foldable case)."""
    modules = dict(model.named_modules())
    norms = [n for n, m in modules.items() if type(m) in BATCHNORMS and not any(fnmatch.fnmatchcase(n, p) for p in exclude)]
    if not norms:
        return []
    # Optional arguments are traced at their defaults (a flag such as ``embed=False`` picks a branch).
    params = inspect.signature(model.forward).parameters.values()
    concrete = {p.name: p.default for p in params
                if p.default is not inspect.Parameter.empty and isinstance(p.default, (bool, int, float, str, type(None)))}
    try:
        graph = torch.fx.symbolic_trace(model, concrete_args=concrete or None).graph
    except Exception as err:  # noqa: BLE001  (fx fails in many ways on dynamic models)
        raise RecipeError(f"fold_batchnorm needs a model torch.fx can trace, to find the layer before each BatchNorm; "
                          f"tracing failed ({type(err).__name__}: {err}); exclude the BatchNorms or fold them yourself") from None
    calls: dict[str, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(str(node.target), []).append(node)
    pairs = []
    for name in norms:
        norm, nodes = modules[name], calls.get(name, [])
        where = f"fold_batchnorm: BatchNorm '{name}'"
        if len(nodes) != 1:
            raise RecipeError(f"{where} is called {len(nodes)} times in the forward; only a BatchNorm used once can be "
                              "folded (exclude it to leave it as it is)")
        source = nodes[0].args[0] if nodes[0].args else None
        layer_name = str(source.target) if isinstance(source, torch.fx.Node) and source.op == "call_module" else None
        layer = modules.get(layer_name) if layer_name is not None else None
        if type(layer) not in FOLDABLE:
            what = "nothing traceable" if source is None else (f"'{source.target}' ({source.op})" if isinstance(source, torch.fx.Node)
                                                               else repr(source))
            raise RecipeError(f"{where} does not directly follow a Linear or Conv1d/2d/3d layer (its input is {what}); "
                              "only a BatchNorm right after its layer can be folded (exclude it to leave it as it is)")
        if len(source.users) != 1 or len(calls[layer_name]) != 1:
            raise RecipeError(f"{where}: the output of '{layer_name}' is also used elsewhere, or the layer is called more "
                              "than once, so folding would change those uses (exclude it to leave it as it is)")
        out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        if norm.num_features != out:
            raise RecipeError(f"{where} has {norm.num_features} features but '{layer_name}' gives {out} channels")
        if norm.running_mean is None or norm.running_var is None:
            raise RecipeError(f"{where} keeps no running statistics (track_running_stats=False): it has no fixed "
                              "affine map to fold")
        if parametrize.is_parametrized(layer):
            raise RecipeError(f"{where}: '{layer_name}' is already compressed; fold BatchNorms before compressing")
        pairs.append((layer_name, name))
    # After a Linear, BatchNorm1d normalises the Linear's features only on [batch, features] input;
    # on [B, C, L] it normalises dim 1 (tokens, say). A trace has no shapes: an example run tells.
    linear = [norm for layer, norm in pairs if isinstance(modules[layer], nn.Linear)]
    if linear:
        if example is None:
            raise RecipeError(f"fold_batchnorm: BatchNorm '{linear[0]}' follows a Linear, which folds only if it sees "
                              "2-D [batch, features] input, and a trace cannot tell: give an example input "
                              "(fold_batchnorm(model, example=x), or compress(..., calibration=batches)), or exclude it")
        for norm, ranks in _input_ranks(model, linear, example).items():
            if ranks != {2}:
                seen = "is not called by the example" if not ranks else f"sees {sorted(ranks)}-D input"
                raise RecipeError(f"fold_batchnorm: BatchNorm '{norm}' after a Linear {seen}; only 2-D [batch, "
                                  "features] input folds (on [B, C, L] it normalises dim 1): exclude it")
    return pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module, exclude: tuple | list = (), example: Any = None) -> nn.Module:
    """Fold every BatchNorm of ``model`` (those not matching an ``exclude`` glob) into the layer
    before it, in place, replacing the BatchNorm by ``nn.Identity``; returns ``model``. Exact in
    eval mode (the running statistics are folded). Also prepares a fresh skeleton for
    :func:`torchzip.load` of a file written from a folded model. ``example``: a batch the model
    runs (tensor, tuple or dict), needed only when a BatchNorm1d follows a Linear. Raises
    :class:`RecipeError` before changing anything if a BatchNorm cannot be folded."""
    pairs = batchnorm_pairs(model, tuple(exclude), example)
    modules = dict(model.named_modules())
    for layer_name, norm_name in pairs:
        layer, norm = modules[layer_name], modules[norm_name]
        w = layer.weight
        if w.is_meta:  # a skeleton with empty weights (tz.empty_weights, a build function): only the shape
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.empty(w.shape[0], dtype=w.dtype, device="meta"), requires_grad=w.requires_grad)
        else:
            _fold(layer, norm)
        parent, _, child = norm_name.rpartition(".")
        setattr(modules[parent] if parent else model, child, nn.Identity())
    return model


def _fold(layer: nn.Module, norm: nn.Module) -> None:
    """``layer``'s weight and bias times the BatchNorm's eval-mode scale, plus its shift (float64 math)."""
    w = layer.weight
    scale = torch.rsqrt(norm.running_var.double() + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.double()
    shift = -norm.running_mean.double() * scale + (norm.bias.double() if norm.bias is not None else 0.0)
    bias = shift if layer.bias is None else layer.bias.double() * scale + shift
    w.copy_((w.double() * scale.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(bias.to(w.dtype), requires_grad=w.requires_grad)
    else:
        layer.bias.copy_(bias.to(layer.bias.dtype))


@register_pass
@dataclass
class FoldBatchNorm(Pass):
    """Fold each BatchNorm into the Linear/Conv layer before it (see :func:`fold_batchnorm`).
    Must come before the passes that compress layers. ``exclude``: glob patterns on BatchNorm
    names to leave as they are."""

    key: ClassVar[str] = "fold_batchnorm"
    first: ClassVar[bool] = True  # run_passes: before every layer pass
    takes_calibration: ClassVar[bool] = True  # run_passes hands it compress's batches (an example input)
    exclude: tuple = ()

    def __post_init__(self) -> None:
        if isinstance(self.exclude, str) or not isinstance(self.exclude, (list, tuple)) or not all(
                isinstance(p, str) for p in self.exclude):
            raise RecipeError(f"exclude of pass 'fold_batchnorm' must be a list of name patterns, got {self.exclude!r}")
        self.exclude = tuple(self.exclude)

    def check(self, model: nn.Module, context: dict[str, Any]) -> None:
        """Refuse, before anything changes, BatchNorms that cannot be folded."""
        batchnorm_pairs(model, self.exclude, _example(context))

    def __call__(self, model: nn.Module, **context: Any) -> nn.Module:
        return fold_batchnorm(model, self.exclude, _example(context))


def _example(context: dict[str, Any]) -> Any:
    batches = context.get("calibration")
    return batches[0] if batches else None
