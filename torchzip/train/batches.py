"""Batches, model calls and model outputs, as every training helper sees them.

* a batch is ``(inputs, targets)``, or a dict passed to the model as keyword arguments (its
  ``"labels"`` entry, if any, is the target);
* inputs that are a tensor are passed as ``model(x)``, a tuple/list as ``model(*x)``, a dict as
  ``model(**x)`` (a teacher is called the same way);
* logits have classes along their last dimension.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from torchzip.errors import DistillationError, TorchzipError

LogitsSpec = str | int | None
TaskLoss = Callable[[Any, Any], "torch.Tensor | None"]


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside ``DistributedDataParallel`` / ``DataParallel`` wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a dict, ``model(*inputs)`` for a tuple/list, else ``model(inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _field(outputs: Any, name: str) -> Any:
    # Mappings (incl. Hugging Face ModelOutput, an OrderedDict) by key, other objects by attribute.
    if isinstance(outputs, Mapping):
        return outputs.get(name)
    return getattr(outputs, name, None)


def _values(outputs: Any) -> list[Any]:
    # What a container holds, in order: a mapping's values, a tuple's items; nothing otherwise.
    if isinstance(outputs, Mapping):
        return list(outputs.values())
    return list(outputs) if isinstance(outputs, (tuple, list)) else []


def _first_tensor(values: Iterable[Any]) -> torch.Tensor | None:
    return next((v for v in values if isinstance(v, torch.Tensor)), None)


def _describe(outputs: Any) -> str:
    if isinstance(outputs, Mapping):
        return f"{type(outputs).__name__} with keys {list(outputs)}"
    if isinstance(outputs, (tuple, list)):
        return f"{type(outputs).__name__} of {[type(v).__name__ for v in outputs]}"
    return type(outputs).__name__


def extract_logits(outputs: Any, logits: LogitsSpec = None) -> torch.Tensor:
    """The logits tensor inside a model's outputs.

    ``logits``: a key or attribute name (``"logits"``), an index into a tuple/list (or into the
    non-None values of a dict, as Hugging Face's ``to_tuple`` counts), or None for the default:
    the tensor itself, else a ``logits`` key/attribute, else the first tensor found.
    """
    if isinstance(outputs, torch.Tensor):
        if logits is not None:
            raise DistillationError(f"the outputs are a single tensor: logits={logits!r} selects nothing; use logits=None")
        return outputs
    if isinstance(logits, str):
        found = _field(outputs, logits)
        if not isinstance(found, torch.Tensor):
            raise DistillationError(f"no tensor field {logits!r} in the model outputs ({_describe(outputs)})")
        return found
    if isinstance(logits, int) and not isinstance(logits, bool):
        values = [v for v in _values(outputs) if v is not None]
        if not -len(values) <= logits < len(values) or not isinstance(values[logits], torch.Tensor):
            raise DistillationError(f"logits index {logits} selects no tensor in the model outputs ({_describe(outputs)})")
        return values[logits]
    if logits is not None:
        raise DistillationError(f"logits must be a field name, an index or None, got {logits!r}")
    found = _field(outputs, "logits")
    if isinstance(found, torch.Tensor):
        return found
    found = _first_tensor(_values(outputs))
    if found is None:
        raise DistillationError(f"no logits in the model outputs ({_describe(outputs)}); name their field with logits=...")
    return found


def default_task_loss(outputs: Any, targets: Any) -> torch.Tensor | None:
    """The model's own ``loss`` output if it has one (Hugging Face style), else cross-entropy of
    the logits against ``targets`` (positions flattened), or None when there are no targets."""
    own = _field(outputs, "loss") if not isinstance(outputs, (torch.Tensor, tuple, list)) else None
    if isinstance(own, torch.Tensor):
        return own
    if targets is None:
        return None
    logits = extract_logits(outputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside the block; every submodule's own mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def _to(batch: Any, device: torch.device | str | None) -> Any:
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` from an ``(inputs, targets)`` pair or a dict batch (targets = its
    ``"labels"``; the whole dict goes to the model as keyword arguments)."""
    if isinstance(batch, Mapping):
        return batch, batch.get("labels")
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TorchzipError(
        f"finetune expects batches that are (inputs, targets) pairs or dicts of keyword arguments, got {_describe(batch)}"
    )


def _batch_size(inputs: Any) -> int:
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0] if inputs.dim() else 1
    first = _first_tensor(_values(inputs))
    return first.shape[0] if first is not None and first.dim() else 1
