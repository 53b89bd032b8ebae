"""Calibration: the input statistics of each layer, gathered layer by layer on calibration data.

``compress(model, recipe, calibration=batches)`` gives the batches to every pass that uses
data. Such a pass calls :func:`sweep`, which visits its layers in the order the model first
calls them, in groups of layers that read the same input tensor (q/k/v, gate/up). For each group
it runs the batches through the model, whose earlier layers are already compressed, so a layer
is calibrated on what the compressed model feeds it (sequential, as GPTQ does). Forward hooks
sum ``X^T X`` of the group's inputs (float32 per batch, summed in float64): nothing but one
``[K, K]`` matrix per layer of the group is kept, and once every layer of the group has seen its
input the forward is stopped by an exception, so later layers do not run.

A batch is what the model is called with: a tensor (``model(x)``), a tuple or list
(``model(*x)``), or a dict (``model(**x)``, Hugging Face style).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from torchzip.errors import CalibrationError
from torchzip.packed.layers import kind_of
from torchzip.progress import bar
from torchzip.train.batches import call_model, eval_mode

# Layer kinds whose input rows we can form: the weight's [N, K] matrix times one row of K inputs.
CALIBRATED_KINDS = ("Linear", "Conv1D", "Conv1d", "Conv2d")


class _Stop(Exception):
    """Raised by a hook once the layers being calibrated have seen this batch."""


def as_batches(calibration: Any) -> list:
    """The calibration batches as a list; :class:`CalibrationError` if there are none."""
    if isinstance(calibration, (torch.Tensor, dict)) or not isinstance(calibration, Iterable):
        raise CalibrationError(f"calibration must be an iterable of batches (a list or a DataLoader of tensors, "
                               f"tuples or dicts), got {type(calibration).__name__}; wrap one batch in a list")
    batches = list(calibration)
    if not batches:
        raise CalibrationError("calibration is empty: give at least one batch (a few hundred inputs in all is typical)")
    return batches


@torch.no_grad()
def check_batches(model: nn.Module, batches: list) -> None:
    """Run every batch through ``model`` (eval mode, no gradients, nothing changed); a batch the
    model cannot run raises :class:`CalibrationError` naming it."""
    with eval_mode(model):
        for i, batch in enumerate(batches):
            try:
                call_model(model, batch)
            except Exception as err:  # noqa: BLE001  (any failure means the data does not fit)
                raise CalibrationError(
                    f"calibration batch #{i} cannot run through the model ({type(err).__name__}: {err}); a batch is "
                    "called as model(x) for a tensor, model(*x) for a tuple/list, model(**x) for a dict") from None


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows ``[M, K]`` the weight matrix of ``module`` multiplies, from its input ``x``
    (convolutions: the unfolded patches, in the order of ``weight.reshape(out, -1)``). Only for
    layers :func:`why_not_calibrated` accepts."""
    if not isinstance(module, (nn.Conv1d, nn.Conv2d)):  # Linear, Conv1D
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, nn.Conv1d):
        cols = F.unfold(x.unsqueeze(-2), (1, module.kernel_size[0]), dilation=(1, module.dilation[0]),
                        padding=(0, module.padding[0]), stride=(1, module.stride[0]))
    else:
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def why_not_calibrated(module: nn.Module) -> str | None:
    """Why a layer cannot be calibrated (it is then compressed from its weights alone), or None."""
    kind = kind_of(module)
    if kind is None or kind.name not in CALIBRATED_KINDS:
        return f"{type(module).__name__} layers are not calibrated (kinds calibrated: {', '.join(CALIBRATED_KINDS)})"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.groups != 1:
            return "grouped convolutions are not calibrated"
        if isinstance(module.padding, str) or (module.padding_mode != "zeros" and any(module.padding)):
            return f"convolutions with padding {module.padding!r} ({module.padding_mode}) are not calibrated"
    return None


class _Accumulator:
    """``X^T X`` of one layer's input rows, summed in float64 over calls."""

    def __init__(self, module: nn.Module) -> None:
        self.module, self.h, self.rows, self.calls = module, None, 0, 0

    def add(self, x: torch.Tensor) -> None:
        rows = input_rows(self.module, x.detach()).float()
        xtx = (rows.T @ rows).double()  # float32 product per batch, float64 sum across batches
        self.h = xtx if self.h is None else self.h + xtx
        self.rows += rows.shape[0]
        self.calls += 1


def _call_order(model: nn.Module, layers: list[tuple[str, nn.Module]], batch: Any) -> list[list[int]]:
    """Groups of ``layers`` (indices) in the order the model first calls them; layers fed the
    same input tensor share a group. Layers never called are left out."""
    first: dict[int, tuple[int, int]] = {}  # layer index -> (call position, input tensor id)
    handles = []
    seen: list[Any] = []  # keeps inputs alive, so their ids stay unique during the forward

    def hook(i: int) -> Callable:
        def record(module: nn.Module, args: tuple) -> None:
            if i not in first and args and isinstance(args[0], torch.Tensor):
                seen.append(args[0])
                first[i] = (len(first), id(args[0]))
        return record

    for i, (_, m) in enumerate(layers):
        handles.append(m.register_forward_pre_hook(hook(i)))
    try:
        with torch.no_grad(), eval_mode(model):
            call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[int]] = []
    by_input: dict[int, list[int]] = {}
    for i, (_, tid) in sorted(first.items(), key=lambda item: item[1][0]):
        if tid in by_input:
            by_input[tid].append(i)
        else:
            by_input[tid] = [i]
            groups.append(by_input[tid])
    return groups


def sweep(model: nn.Module, layers: list[tuple[str, nn.Module]], batches: list,
          compress_layer: Callable[[int, torch.Tensor], None], *, progress: bool = False, desc: str = "calibrate") -> list[int]:
    """Calibrate ``layers`` in the order the model calls them: for each group (layers sharing an
    input), sum ``X^T X`` of their inputs over ``batches`` with the model as compressed so far,
    then call ``compress_layer(index into layers, H)`` for each. Returns the indices of layers
    the model never called (they get no statistics)."""
    groups = _call_order(model, layers, batches[0])
    done = {i for g in groups for i in g}
    for group in bar(groups, progress, desc=desc, leave=False):
        stats = {i: _Accumulator(layers[i][1]) for i in group}
        pending: set[int] = set()

        def hook(i: int) -> Callable:
            def record(module: nn.Module, args: tuple) -> None:
                if args and isinstance(args[0], torch.Tensor):
                    stats[i].add(args[0])
                pending.discard(i)
                if not pending:
                    raise _Stop
            return record

        handles = [layers[i][1].register_forward_pre_hook(hook(i)) for i in group]
        try:
            with torch.no_grad(), eval_mode(model):
                for batch in batches:
                    pending.update(group)
                    try:
                        call_model(model, batch)
                    except _Stop:
                        pass
        finally:
            for h in handles:
                h.remove()
        for i in group:
            if stats[i].h is not None:
                compress_layer(i, stats[i].h)
    return [i for i in range(len(layers)) if i not in done]
