"""``finetune``: the training loop, with callbacks, progress bars and a per-epoch history."""

from __future__ import annotations

import fnmatch
import itertools
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from torchzip.errors import TorchzipError
from torchzip.progress import bar, enabled
from torchzip.train.batches import TaskLoss, _batch_size, _to, call_model, default_task_loss, eval_mode, split_batch, unwrap
from torchzip.train.callbacks import Callback, advance_schedules


def _params_of(callbacks_: list[Callback]) -> list[nn.Parameter]:
    out: list[nn.Parameter] = []
    for cb in callbacks_:
        if isinstance(cb, nn.Module):
            out += [p for p in cb.parameters() if p.requires_grad]
    return out


def _is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def finetune(model: nn.Module, loader: Iterable, *, loss_fn: TaskLoss | None = None, callbacks: Iterable[Callback] = (),
             epochs: int = 1, optimizer: torch.optim.Optimizer | None = None, lr: float = 1e-3,
             device: torch.device | str | None = None, lr_schedule: str = "constant",
             progress: bool | None = None, param_lrs: Mapping[str, float] | None = None) -> list[dict]:
    """Fine-tune ``model`` (maybe wrapped in ``DistributedDataParallel``) on ``loader``.

    ``loader`` yields ``(inputs, targets)`` pairs or dicts (passed as keyword arguments, targets =
    ``"labels"``). ``loss_fn(outputs, targets)`` is the task loss (default
    :func:`default_task_loss`: the outputs' own ``loss``, else cross-entropy). ``callbacks`` run
    in order (a recipe's: ``recipe.callbacks(model, teacher=...)``).
    ``optimizer`` defaults to Adam at ``lr`` over the model's and the callbacks' trainable
    parameters; a given optimizer gets the callbacks' parameters (distillation projections)
    added as a new parameter group if it lacks them. ``device`` moves the model, teacher and
    batches there. ``lr_schedule``: ``"constant"``, or ``"cosine"`` (the learning rate decays
    from its start value to 0 over all steps, following half a cosine; needs ``len(loader)``).
    ``param_lrs`` (default optimizer only): ``{glob pattern: lr}`` over the model's parameter
    names, e.g. ``{"*.original": 3e-4}`` for the master weights under quantizers; a parameter
    takes the rate of the first pattern it matches, else ``lr``. A pattern that matches no
    trainable parameter raises :class:`TorchzipError`.

    Before any update, the first batch is run once in eval mode under ``no_grad`` through the
    whole loss, so a bad set-up raises (e.g. :class:`DistillationError`) with nothing changed.
    :func:`torchzip.step` runs exactly once after every optimizer step. Under
    ``torch.distributed`` give each rank its own shard (``DistributedSampler``; its epoch is
    set here). ``progress``: tqdm bars, on rank 0 only (None: only when stderr is a terminal).

    Returns one dict per epoch: ``epoch``, ``loss`` (mean over steps), ``steps``, ``samples``,
    ``seconds``, ``lr``.
    """
    if not isinstance(epochs, int) or epochs < 0:
        raise TorchzipError(f"epochs must be a non-negative integer, got {epochs!r}")
    if lr_schedule not in ("constant", "cosine"):
        raise TorchzipError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
    _check_param_lrs(param_lrs, optimizer)
    if lr_schedule == "cosine" and not hasattr(loader, "__len__"):
        raise TorchzipError("lr_schedule 'cosine' needs a loader with a length (to know the number of steps)")
    inner = unwrap(model)
    cbs = list(callbacks)
    loss_fn = loss_fn or default_task_loss
    if device is not None:
        model.to(device)
    if epochs == 0:
        return []

    _set_epoch(loader, 0)
    batches = iter(loader)
    first = next(batches, None)
    if first is None:
        raise TorchzipError("the loader yielded no batch")
    first = _to(first, device)

    began: list[Callback] = []
    try:
        # Dry run: every check happens here, before anything trains.
        for cb in cbs:
            began.append(cb)
            cb.on_train_begin(model)
        inputs, targets = split_batch(first)
        with torch.no_grad(), eval_mode(inner):
            loss = _loss(inner, inputs, targets, loss_fn, cbs)

        optimizer = _optimizer(model, cbs, optimizer, lr, param_lrs)
        scheduler = None
        if lr_schedule == "cosine":
            steps = max(epochs * len(loader), 1)
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t / steps, 1.0))))
        history: list[dict] = []
        modes = [(m, m.training) for m in inner.modules()]
        show = enabled(progress) and _is_rank0()
        epoch_bar = bar(range(epochs), show, desc="finetune", unit="epoch")
        try:
            for epoch in epoch_bar:
                if epoch > 0:
                    _set_epoch(loader, epoch)
                    batches = iter(loader)
                stream = itertools.chain([first], batches) if epoch == 0 else batches
                total = len(loader) if hasattr(loader, "__len__") else None
                step_bar = bar(stream, show, total=total, desc=f"epoch {epoch + 1}/{epochs}", unit="step", leave=False)
                model.train()
                start, losses, samples = time.perf_counter(), [], 0
                for batch in step_bar:
                    inputs, targets = split_batch(_to(batch, device))
                    for cb in cbs:
                        cb.on_step_begin(model)
                    loss = _loss(model, inputs, targets, loss_fn, cbs)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if scheduler is not None:
                        scheduler.step()
                    advance_schedules(model)  # once per optimizer step, however many callbacks
                    for cb in cbs:
                        cb.on_step_end(model)
                    losses.append(loss.item())
                    samples += _batch_size(inputs)
                    step_bar.set_postfix(loss=f"{losses[-1]:.4f}")
                step_bar.close()
                logs = {
                    "epoch": epoch,
                    "loss": sum(losses) / len(losses) if losses else math.nan,
                    "steps": len(losses),
                    "samples": samples,
                    "seconds": time.perf_counter() - start,
                    "lr": optimizer.param_groups[0]["lr"],
                }
                history.append(logs)
                epoch_bar.set_postfix(loss=f"{logs['loss']:.4f}")
                for cb in cbs:
                    cb.on_epoch_end(model, epoch, logs)
        finally:
            epoch_bar.close()
            for m, training in modes:
                m.training = training
        return history
    finally:
        # Also after an error or Ctrl-C: callbacks undo what they set up (hooks, latent codebooks).
        for cb in began:
            cb.on_train_end(model)


def _loss(model: nn.Module, inputs: Any, targets: Any, loss_fn: TaskLoss, cbs: list[Callback]) -> torch.Tensor:
    outputs = call_model(model, inputs)
    loss = loss_fn(outputs, targets)
    for cb in cbs:
        loss = cb.on_loss(loss, outputs, targets, inputs)
    if loss is None:
        raise TorchzipError("no loss to minimise: the batches carry no targets and the outputs no 'loss'; give targets or loss_fn")
    return loss


def _check_param_lrs(param_lrs: Any, optimizer: torch.optim.Optimizer | None) -> None:
    if param_lrs is None:
        return
    if optimizer is not None:
        raise TorchzipError("param_lrs sets the rates of finetune's own optimizer: give it or an optimizer, not both")
    if not isinstance(param_lrs, Mapping) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
            for k, v in param_lrs.items()):
        raise TorchzipError(f"param_lrs must map parameter-name patterns to learning rates >= 0, got {param_lrs!r}")


def _param_groups(model: nn.Module, lr: float, param_lrs: Mapping[str, float]) -> list[dict]:
    """Adam parameter groups: each trainable parameter at the rate of the first pattern its name matches."""
    groups: dict[float, list] = {}
    used = set()
    for name, p in unwrap(model).named_parameters():
        if not p.requires_grad:
            continue
        pattern = next((k for k in param_lrs if fnmatch.fnmatchcase(name, k)), None)
        used.add(pattern)
        groups.setdefault(lr if pattern is None else float(param_lrs[pattern]), []).append(p)
    unused = [k for k in param_lrs if k not in used]
    if unused:
        names = [n for n, p in unwrap(model).named_parameters() if p.requires_grad][:10]
        raise TorchzipError(f"param_lrs pattern(s) {unused} match no trainable parameter; names look like {names}")
    return [{"params": ps, "lr": rate} for rate, ps in groups.items()]


def _optimizer(model: nn.Module, cbs: list[Callback], optimizer: torch.optim.Optimizer | None,
               lr: float, param_lrs: Mapping[str, float] | None = None) -> torch.optim.Optimizer:
    extra = _params_of(cbs)
    if optimizer is None:
        groups = (_param_groups(model, lr, param_lrs) if param_lrs
                  else [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}])
        seen = {id(p) for g in groups for p in g["params"]}
        rest = [p for p in extra if id(p) not in seen]
        return torch.optim.Adam([g for g in groups + [{"params": rest, "lr": lr}] if g["params"]], lr=lr)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [p for p in extra if id(p) not in held]
    if missing:
        optimizer.add_param_group({"params": missing})
    return optimizer


def _set_epoch(loader: Any, epoch: int) -> None:
    # DistributedSampler reshuffles per epoch only when told the epoch.
    for sampler in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
