"""The callback protocol: what a training loop calls around each optimizer step."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchzip.errors import TorchzipError
from torchzip.schedule import step as advance
from torchzip.train.batches import TaskLoss, default_task_loss, unwrap


def advance_schedules(model: nn.Module) -> None:
    """:func:`torchzip.step` on the model inside any DDP wrapper."""
    advance(unwrap(model))


class Callback:
    """What a training loop calls around each optimizer step; the base class only advances the
    recipe's gradual schedules, so it also serves as a schedules-only callback.

    Protocol (every hook is optional to override; :func:`finetune` calls them in this order):

    * ``on_train_begin(model)`` once, then a dry run of ``on_loss`` on the first batch in eval mode
      under ``torch.no_grad()``, so bad set-ups raise before any parameter changes;
    * per step: ``on_step_begin(model)``, forward, ``loss = on_loss(loss, outputs, targets,
      inputs)``, backward, ``optimizer.step()``, :func:`torchzip.step` (once, by the loop), then
      ``on_step_end(model)``;
    * ``on_epoch_end(model, epoch, logs)`` and finally ``on_train_end(model)`` (also when training
      fails, for every callback whose ``on_train_begin`` was called).

    In a loop of your own, :meth:`loss` and :meth:`step` stand for all of that::

        cb = Callback(model)
        loss = cb.loss(model(x), y)   # the task loss (see ``loss_fn``)
        ...; optimizer.step(); cb.step()

    ``loss_fn(outputs, targets)``: the task loss; default :func:`default_task_loss`.
    """

    def __init__(self, student: nn.Module | None = None, *, loss_fn: TaskLoss | None = None) -> None:
        object.__setattr__(self, "_student", None)  # object.__setattr__: never a registered submodule
        object.__setattr__(self, "loss_fn", loss_fn or default_task_loss)
        if student is not None:
            self.bind(student)

    @property
    def student(self) -> nn.Module | None:
        """The model being trained (unwrapped from DDP), or None until bound."""
        return self._student

    def bind(self, student: nn.Module) -> None:
        """Set the model this callback trains (``finetune`` does it for you)."""
        object.__setattr__(self, "_student", unwrap(student))

    def on_train_begin(self, model: nn.Module) -> None:
        """Bind to ``model`` if no student was given; refuse a different one."""
        inner = unwrap(model)
        if self.student is None:
            self.bind(inner)
        elif self.student is not inner:
            raise TorchzipError(f"this {type(self).__name__} was built for another model (student=...) than this one")

    def on_step_begin(self, model: nn.Module) -> None:
        """Before the forward pass of a step."""

    def on_loss(self, loss: torch.Tensor | None, outputs: Any, targets: Any = None,
                inputs: Any = None) -> torch.Tensor | None:
        """Return the loss to minimise, given the task loss (None when there is none)."""
        return loss

    def on_step_end(self, model: nn.Module) -> None:
        """After ``optimizer.step()`` and :func:`torchzip.step`."""

    def on_epoch_end(self, model: nn.Module, epoch: int, logs: dict) -> None:
        """After each epoch of :func:`finetune`, with that epoch's history entry."""

    def on_train_end(self, model: nn.Module) -> None:
        """After the last epoch of :func:`finetune`."""

    def loss(self, outputs: Any, targets: Any = None, inputs: Any = None) -> torch.Tensor:
        """The loss for one batch in a loop of your own: ``on_loss`` applied to the task loss."""
        total = self.on_loss(self.loss_fn(outputs, targets), outputs, targets, inputs)
        if total is None:
            raise TorchzipError("no loss to minimise: give targets or a loss_fn, or use a model whose outputs carry 'loss'")
        return total

    def step(self) -> None:
        """Call once after each ``optimizer.step()`` in a loop of your own: advances the recipe's
        schedules (:func:`torchzip.step`) and runs ``on_step_end``. With several callbacks, call
        ``step()`` on one of them only: each call is one schedule step."""
        if self.student is None:
            raise TorchzipError(f"{type(self).__name__}.step() needs the model: build it with student=model")
        advance_schedules(self.student)
        self.on_step_end(self.student)
