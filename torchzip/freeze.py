"""``freeze``: turn trainable compressed layers into packed inference layers.

Each parametrization on a weight describes what it did (``describe(state, w)``: a mask and its
pattern, int8 or codebook values...) into a :class:`~torchzip.packed.WeightState`; the registered
formats are then asked in priority order for a packed form (``PackedWeight.pack``). Nothing here
names a pass or a format.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from torchzip.errors import TorchzipError
from torchzip.packed.base import PackedWeight, WeightState, formats_in_order
from torchzip.packed.layers import kind_of, replace_module, wrap


def weight_state(module: nn.Module) -> WeightState:
    """What the parametrizations on ``module.weight`` left, as one ``[N, K]`` description."""
    chain = module.parametrizations.weight
    w = chain.original
    final = module.weight.detach()
    state = WeightState(final.reshape(final.shape[0], -1), final.dtype)
    for p in chain:
        if hasattr(p, "describe"):
            p.describe(state, w)
        w = p(w)
    return state


def pack_weight(module: nn.Module) -> PackedWeight | None:
    """The packed form of a parametrized ``module.weight``, or None to keep it dense."""
    state = weight_state(module)
    for fmt in formats_in_order():
        packed = fmt.pack(state)
        if packed is not None:
            return packed
    return None


def _bake(module: nn.Module) -> None:
    """Make ``module`` a plain layer again, holding the current values of its parametrized tensors.

    ``parametrize.remove_parametrizations`` deletes properties from the module's class, and a
    deep copy of a parametrized module shares that class with the original: removing them there
    would break the caller's model (e.g. when ``summary`` freezes a copy). So restore the plain
    class on this instance only.
    """
    names = list(module.parametrizations.keys())
    values = {n: (getattr(module, n).detach().clone(), module.parametrizations[n].original.requires_grad) for n in names}
    plain = parametrize.type_before_parametrizations(module)  # asked before the parametrizations go
    del module._modules["parametrizations"]
    module.__class__ = plain
    for n, (value, requires_grad) in values.items():
        module.register_parameter(n, nn.Parameter(value, requires_grad=requires_grad))


@torch.no_grad()
def freeze(model: nn.Module) -> nn.Module:
    """Replace every compressed layer of ``model`` (in place) by its packed inference layer.

    Outputs are unchanged: each packed weight decodes to exactly the weight the trainable layer
    computed. Layers that stay dense (e.g. pruned too little for a sparse form to pay) keep their
    type with the final weight baked in. Returns ``model`` — or, when ``model`` is itself a single
    compressed layer, the packed layer that replaces it (use the return value).
    """
    if not isinstance(model, nn.Module):
        raise TorchzipError(f"freeze needs an nn.Module, got {type(model).__name__}")
    for name, module in list(model.named_modules()):
        if not parametrize.is_parametrized(module):
            continue
        packed = None
        if parametrize.is_parametrized(module, "weight") and kind_of(module) is not None:
            packed = pack_weight(module)
        _bake(module)
        if packed is not None:
            model = replace_module(model, name, wrap(module, packed))
    return model
