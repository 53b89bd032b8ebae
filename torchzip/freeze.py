"""``freeze``: turn trainable compressed layers into packed inference layers.

The format of each layer follows from what its passes left: codebook or int8 values, and a
mask that is 2:4 (semi-structured), or sparse enough that CSR is smaller than a dense form.
Pruned codebook weights are always stored sparse: pruned zeros take no centroid.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from torchzip.errors import TorchzipError
from torch.nn.utils import parametrize

from torchzip.packed import CodebookWeight, CsrWeight, Int8Weight, PackedWeight, Sparse24Weight
from torchzip.packed.layers import wrap
from torchzip.packed.values import int8_quantize
from torchzip.passes.base import weight_before
from torchzip.passes.codebook import CodebookQuant
from torchzip.passes.prune import Mask, parse_nm
from torchzip.passes.quantize import Int8FakeQuant


def _is_24(mask: Mask | None) -> bool:
    return mask is not None and parse_nm(mask.pattern) == (2, 4)


def pack_weight(module: nn.Module) -> PackedWeight | None:
    """The packed form of a parametrized ``module.weight``, or None to keep it dense."""
    chain = list(module.parametrizations.weight)
    mask = next((p for p in chain if isinstance(p, Mask)), None)
    quant = next((p for p in chain if isinstance(p, (Int8FakeQuant, CodebookQuant))), None)
    w = module.weight.detach()
    w2 = w.reshape(w.shape[0], -1)
    n, k = w2.shape
    keep = None if mask is None else mask.mask.reshape(n, k)

    if isinstance(quant, CodebookQuant) and not bool(quant.clustered):
        warnings.warn(f"freezing a codebook layer before its start_step ({quant.start_step}, now at step "
                      f"{int(quant.step)}): it is stored as float, not clustered", stacklevel=3)
        quant = None  # the weight is still float: packed like an unquantized one
    if isinstance(quant, CodebookQuant):
        idx = quant.assign.long()
        keep = idx >= 0 if keep is None else keep & (idx >= 0)
        book = quant.centroids.detach()
        if _is_24(mask):
            return Sparse24Weight.build(idx.clamp(min=0).to(torch.uint8), mask.mask.reshape(n, k), w.dtype, codebook=book)
        if bool(keep.all()):
            return CodebookWeight.from_indices(idx, book, quant.bits, w.dtype)
        return CsrWeight.build(idx.clamp(min=0).to(torch.uint8), keep, w.dtype, codebook=book)

    if isinstance(quant, Int8FakeQuant):
        # Quantize what the fake-quant saw (not its output), exactly as it did.
        q, scales = int8_quantize(weight_before(module, quant).detach().reshape(n, k), quant.group_size)
        if _is_24(mask):
            return Sparse24Weight.build(q, keep, w.dtype, scales=scales, group_size=quant.group_size)
        if keep is not None and CsrWeight.bytes_for(n, k, int(keep.sum()), 1) < n * k:
            return CsrWeight.build(q, keep, w.dtype, scales=scales, group_size=quant.group_size)
        return Int8Weight(q, scales, quant.group_size, w.dtype)

    if keep is None:
        return None
    if _is_24(mask):
        return Sparse24Weight.build(w2, keep, w.dtype)
    if CsrWeight.bytes_for(n, k, int(keep.sum()), w.element_size()) < n * k * w.element_size():
        return CsrWeight.build(w2, keep, w.dtype)
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
    del module._modules["parametrizations"]
    module.__class__ = parametrize.type_before_parametrizations(module)
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
    from torchzip import distill

    distill.detach(model)  # training is over: drop attached callbacks (and the teacher they hold)
    for name, module in list(model.named_modules()):
        if not parametrize.is_parametrized(module):
            continue
        packed = pack_weight(module) if parametrize.is_parametrized(module, "weight") else None
        _bake(module)
        if packed is None:
            continue
        if not name:  # the model is itself one compressed layer
            return wrap(module, packed)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, wrap(module, packed))
    return model
