"""``freeze``: turn trainable compressed layers into packed inference layers.

Each parametrization on a weight describes what it did (``describe(state, w)``: a mask and its
pattern, int8 or codebook values...) into a :class:`~torchzip.packed.WeightState`; the registered
formats are then asked in priority order for a packed form (``PackedWeight.pack``). Nothing here
names a pass or a format. A weight that layers share (tied) is packed once and the packed layers
share it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from torchzip.errors import TorchzipError
from torchzip.packed.base import PackedWeight, WeightState, formats_in_order
from torchzip.packed.layers import WeightView, build_packed, kind_of, replace_module

NOTE = "torchzip_note"  # attribute on a module left dense by freeze, saying why (shown by summary)


def weight_state(module: nn.Module, tensor: str = "weight", view: WeightView | None = None) -> WeightState:
    """What the parametrizations on ``module.<tensor>`` left, as one ``[N, K]`` description.

    The final float weight is computed only if a format asks for it (``state.weight``): the
    int8 and codebook formats never do, and computing it costs several full-size temporaries.
    """
    view = view or WeightView()
    chain = module.parametrizations[tensor]
    w = chain.original
    # Parametrizations keep the raw tensor's shape and dtype, so the state is sized without a forward.
    state = WeightState(lambda: view.matrix(getattr(module, tensor).detach()), w.dtype,
                        shape=tuple(view.matrix_shape(w.shape)))
    last = len(chain) - 1
    for i, p in enumerate(chain):
        if hasattr(p, "describe"):
            p.describe(state, w)
        if i < last:  # each describe sees what the ones before it made; the last output is not needed
            w = p(w)
    return state


def pack_weight(module: nn.Module, tensor: str = "weight", view: WeightView | None = None) -> PackedWeight | None:
    """The packed form of a parametrized ``module.<tensor>``, or None to keep it dense."""
    state = weight_state(module, tensor, view)
    for fmt in formats_in_order():
        packed = fmt.pack(state)
        if packed is not None:
            return packed
    return None


def _bake(module: nn.Module, memo: dict[int, nn.Parameter], skip: frozenset[str] = frozenset()) -> None:
    """Make ``module`` a plain layer again, holding the current values of its parametrized tensors.

    ``parametrize.remove_parametrizations`` deletes properties from the module's class, and a
    deep copy of a parametrized module shares that class with the original: removing them there
    would break the caller's model (e.g. when ``summary`` freezes a copy). So restore the plain
    class on this instance only. ``memo`` keeps tied tensors one parameter. Tensors in ``skip``
    (packed: the module is about to be replaced) keep their raw tensor instead of a computed
    copy, which would be a full-size temporary nobody reads.
    """
    values = {}
    for n, chain in module.parametrizations.items():
        key = id(chain.original)
        if n in skip and key not in memo:
            values[n] = chain.original
            continue
        if key not in memo:
            memo[key] = nn.Parameter(getattr(module, n).detach().clone(), requires_grad=chain.original.requires_grad)
        values[n] = memo[key]
    plain = parametrize.type_before_parametrizations(module)  # asked before the parametrizations go
    del module._modules["parametrizations"]
    module.__class__ = plain
    for n, value in values.items():
        module.register_parameter(n, value if isinstance(value, nn.Parameter) else nn.Parameter(value, value.requires_grad))


def _names(model: nn.Module) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        out.setdefault(id(m), []).append(name)
    return out


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules that shares every parameter and buffer with it: ``freeze``
    on it leaves ``model`` trainable without a second copy of every weight (``export`` and
    ``summary`` freeze such a copy). Freezing only replaces modules and adds new tensors, so the
    shared ones are never changed."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


class Freezer:
    """``freeze`` one compressed module at a time (``export`` packs, writes and drops each layer
    before the next, so no more than one layer's temporaries live at once)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.names = _names(model)
        self.packed_of: dict[int, PackedWeight | None] = {}  # id of the trainable tensor -> its packed form
        self.baked: dict[int, nn.Parameter] = {}  # ties among the layers that stay dense

    @torch.no_grad()
    def module(self, module: nn.Module) -> nn.Module:
        """Freeze one parametrized ``module``; returns what replaces it (itself when it stays dense)."""
        kind = kind_of(module)
        packed: dict[str, PackedWeight | None] = {}
        raws = [chain.original for chain in module.parametrizations.values()]
        for t in (kind.weights(module) if kind else {}):
            if parametrize.is_parametrized(module, t):
                raw = module.parametrizations[t].original
                if id(raw) not in self.packed_of:
                    # The raw tensor has the final weight's shape and dtype: no second forward to size it.
                    self.packed_of[id(raw)] = _smaller(pack_weight(module, t, kind.view), raw, module, t)
                packed[t] = self.packed_of[id(raw)]
        whole = bool(kind and packed and all(packed.get(t) is not None for t in kind.weights(module)))
        _bake(module, self.baked, frozenset(packed) if whole else frozenset())
        if not whole:
            return module
        new = build_packed(module, packed)
        for raw in raws:  # packed: its dense values are no longer needed by anyone
            self.baked.pop(id(raw), None)
        for name in self.names[id(module)]:
            self.model = replace_module(self.model, name, new)
        return new


@torch.no_grad()
def freeze(model: nn.Module) -> nn.Module:
    """Replace every compressed layer of ``model`` (in place) by its packed inference layer.

    Outputs are unchanged: each packed weight decodes to exactly the weight the trainable layer
    computed. Layers that stay dense (pruned too little for a sparse form to pay, or whose packed
    form would be larger than the dense weight) keep their type with the final weight baked in,
    and a note saying why (``summary`` shows it). Returns ``model`` — or, when ``model`` is itself
    a single compressed layer, the packed layer that replaces it (use the return value).

    Packed tensors are taken over, not copied: a codebook layer's packed indices are the
    trainable layer's ``assign`` buffer itself, so a reference to it kept from before (a saved
    ``state_dict()`` entry) must not be written to afterwards.
    """
    if not isinstance(model, nn.Module):
        raise TorchzipError(f"freeze needs an nn.Module, got {type(model).__name__}")
    freezer = Freezer(model)
    modules = [m for m in model.modules() if parametrize.is_parametrized(m)]
    originals = [chain.original for m in modules for chain in m.parametrizations.values()]  # ids stay unique
    while modules:  # dropped as they go: a replaced module's baked weight is freed at once
        freezer.module(modules.pop(0))
    del originals
    return freezer.model


def _smaller(packed: PackedWeight | None, dense: torch.Tensor, module: nn.Module, tensor: str) -> PackedWeight | None:
    """``packed`` unless it takes more bytes than the dense tensor (then the layer stays dense)."""
    dense_bytes = dense.numel() * dense.element_size()
    if packed is None or packed.nbytes() <= dense_bytes:
        return packed
    note = f"{tensor} kept dense: as {packed.label} it would take {packed.nbytes():,} bytes, dense {dense_bytes:,}"
    object.__setattr__(module, NOTE, "; ".join(filter(None, [getattr(module, NOTE, ""), note])))
    return None
