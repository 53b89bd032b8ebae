"""Fine-tuning a compressed model: callbacks, knowledge distillation, and ``finetune``.

A *callback* is what a training loop calls around each optimizer step. Through it the recipe's
gradual schedules advance (:func:`torchzip.step`), and a :class:`DistillationCallback` adds a
teacher's knowledge to the loss. In a loop of your own it takes two lines::

    cb = DistillationCallback(teacher, student=model)
    for x, y in loader:
        loss = cb.loss(model(x), y, x)          # alpha * KD + (1 - alpha) * task [+ features]
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        cb.step()                               # advance the schedules once

:func:`finetune` is that loop written out, with progress bars and a per-epoch history.

Conventions shared by everything here:

* a batch is ``(inputs, targets)``, or a dict passed to the model as keyword arguments (its
  ``"labels"`` entry, if any, is the target);
* inputs that are a tensor are passed as ``model(x)``, a tuple/list as ``model(*x)``, a dict as
  ``model(**x)`` (the teacher is called the same way);
* logits have classes along their last dimension.
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
import math
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from torchzip.errors import DistillationError, TorchzipError

LogitsSpec = str | int | None
TaskLoss = Callable[[Any, Any], "torch.Tensor | None"]

_ATTACHED = "_torchzip_callbacks"  # model.__dict__ key: callbacks a recipe attached to the model


# ---------------------------------------------------------------------------------------------
# Small helpers on models, batches and outputs


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


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton et al. (2015) distillation loss: ``T² · KL(softmax(t/T) ‖ softmax(s/T))``.

    The KL divergence is summed over classes (the last dimension) and averaged over every other
    position (batch, sequence...). The ``T²`` factor keeps its gradients on the scale of the
    task loss's whatever ``T`` is. Computed in float32 at least.
    """
    _check_temperature(temperature)
    if student_logits.shape != teacher_logits.shape:
        raise DistillationError(
            f"teacher logits have shape {tuple(teacher_logits.shape)} but the student's have "
            f"{tuple(student_logits.shape)}; they must match (same classes, same batch)"
        )
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    classes = student_logits.shape[-1]
    log_p_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1).reshape(-1, classes)
    log_p_t = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1).reshape(-1, classes)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


def _real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_temperature(temperature: float) -> None:
    if not _real(temperature) or temperature <= 0:
        raise DistillationError(f"temperature must be a finite number > 0, got {temperature!r}")


def check_settings(temperature: float, alpha: float, feature_weight: float = 1.0, logits: Any = None) -> None:
    """Raise :class:`DistillationError` for a temperature ≤ 0, alpha outside [0, 1], a negative
    feature weight, or a logits selector that is neither a name, an index nor None."""
    _check_temperature(temperature)
    if not _real(alpha) or not 0.0 <= alpha <= 1.0:
        raise DistillationError(f"alpha must be in [0, 1] (loss = alpha * kd + (1 - alpha) * task), got {alpha!r}")
    if not _real(feature_weight) or feature_weight < 0:
        raise DistillationError(f"feature_weight must be a finite number >= 0, got {feature_weight!r}")
    if logits is not None and (isinstance(logits, bool) or not isinstance(logits, (str, int))):
        raise DistillationError(f"logits must be a field name, an index or None, got {logits!r}")


def normalize_features(features: Any) -> dict[str, str]:
    """``{student layer: teacher layer}`` from a mapping, or from a list of names both models have."""
    if features is None:
        return {}
    if isinstance(features, str):
        features = [features]
    if isinstance(features, Mapping):
        pairs = dict(features)
    elif isinstance(features, Iterable):
        pairs = {name: name for name in features}  # the same layer name in both models
    else:
        raise DistillationError(f"features must map student layer names to teacher layer names, got {features!r}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in pairs.items()):
        raise DistillationError(f"features must map student layer names to teacher layer names (strings), got {features!r}")
    return pairs


def _find_module(model: nn.Module, name: str, which: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    if name.startswith("module.") and name[len("module."):] in modules:  # a name copied from a DDP wrapper
        return modules[name[len("module."):]]
    names = [n for n in modules if n and ".parametrizations" not in n]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f"close matches: {close}; " if close else ""
    shown = names[:30] + (["..."] if len(names) > 30 else [])
    raise DistillationError(f"the {which} has no layer named '{name}'; {hint}valid names: {shown}")


# ---------------------------------------------------------------------------------------------
# Callbacks


def advance_schedules(model: nn.Module) -> None:
    """:func:`torchzip.step` on the model inside any DDP wrapper."""
    from torchzip.api import step  # late import: torchzip/__init__ imports this module

    step(unwrap(model))


class Callback:
    """What a training loop calls around each optimizer step; the base class only advances the
    recipe's gradual schedules, so it also serves as a schedules-only callback.

    Protocol (every hook is optional to override; :func:`finetune` calls them in this order):

    * ``on_train_begin(model)`` once, then a dry run of ``on_loss`` on the first batch in eval mode
      under ``torch.no_grad()``, so bad set-ups raise before any parameter changes;
    * per step: ``on_step_begin(model)``, forward, ``loss = on_loss(loss, outputs, targets,
      inputs)``, backward, ``optimizer.step()``, :func:`torchzip.step` (once, by the loop), then
      ``on_step_end(model)``;
    * ``on_epoch_end(model, epoch, logs)`` and finally ``on_train_end(model)``.

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


class _Capture:
    """Forward hook storing a module's output (its first tensor) under ``name``; a class, not a
    closure, so a model carrying it can still be pickled."""

    def __init__(self, store: dict, name: str) -> None:
        self.store, self.name = store, name

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if not isinstance(output, torch.Tensor):
            output = _first_tensor(_values(output))
        self.store[self.name] = output


class _AverageGrad:
    """Post-accumulate-grad hook: average a projection's gradient over DDP ranks (the projection
    lives outside the DDP-wrapped student, so DDP does not do it)."""

    def __call__(self, param: torch.Tensor) -> None:
        if param.grad is not None and dist.is_available() and dist.is_initialized():
            dist.all_reduce(param.grad)
            param.grad.div_(dist.get_world_size())


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class DistillationCallback(Callback, nn.Module):
    """Knowledge distillation from ``teacher`` into the model being fine-tuned.

    The loss, exactly::

        loss = alpha * T² * KL(softmax(t / T) ‖ softmax(s / T))      # kd_loss, s/t: logits
             + (1 - alpha) * task                                    # loss_fn(outputs, targets)
             + feature_weight * Σ_pairs MSE(proj(student_feature), teacher_feature)

    ``features``: ``{"student.layer": "teacher.layer"}`` (or a list of names present in both);
    the outputs of those modules are captured by forward hooks. Where a student and teacher
    feature differ in one dimension other than the batch (e.g. width, or channels of a conv
    map), a learned linear projection along that dimension maps the student's onto the
    teacher's; projections are submodules of this callback, optimised with the student by
    :func:`finetune` (in your own loop, add ``cb.parameters()`` to the optimizer after
    :meth:`prepare`). ``logits``: where the logits are in the outputs (see
    :func:`extract_logits`). The teacher runs in ``eval()`` mode under ``torch.no_grad()``; it
    is never updated. ``alpha=1`` needs no targets (pure distillation).

    Raises :class:`DistillationError` for a temperature ≤ 0, alpha outside [0, 1], a layer
    name missing from either model, and (at the first batch, before any update) teacher
    logits or features whose shape cannot match the student's.
    """

    def __init__(self, teacher: nn.Module, *, temperature: float = 4.0, alpha: float = 0.5,
                 features: Mapping[str, str] | Iterable[str] | None = None, logits: LogitsSpec = None,
                 student: nn.Module | None = None, loss_fn: TaskLoss | None = None,
                 feature_weight: float = 1.0) -> None:
        nn.Module.__init__(self)
        if not isinstance(teacher, nn.Module):
            raise DistillationError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        check_settings(temperature, alpha, feature_weight, logits)
        self.temperature, self.alpha, self.feature_weight = float(temperature), float(alpha), float(feature_weight)
        self.logits = logits
        self.features = normalize_features(features)
        self.projections = nn.ModuleDict()
        object.__setattr__(self, "_teacher", unwrap(teacher))
        object.__setattr__(self, "_hooks", [])
        object.__setattr__(self, "_captured", {"student": {}, "teacher": {}})
        object.__setattr__(self, "_ready", False)  # shapes checked and projections built
        self._teacher_modules = {s: _find_module(self.teacher, t, "teacher") for s, t in self.features.items()}
        self.teacher.eval()
        Callback.__init__(self, student, loss_fn=loss_fn)

    @property
    def teacher(self) -> nn.Module:
        """The teacher (not a registered submodule: its parameters are not this callback's)."""
        return self._teacher

    def bind(self, student: nn.Module) -> None:
        """Set the student, check its feature layer names, and (re)install the feature hooks."""
        student = unwrap(student)
        shared = {id(p) for p in student.parameters()} & {id(p) for p in self.teacher.parameters()}
        if student is self.teacher or shared:
            raise DistillationError(
                "the teacher shares parameters with the student, so training would change it; "
                "distil from a separate copy (compress(..., inplace=False) keeps the original as teacher)"
            )
        modules = {s: _find_module(student, s, "student") for s in self.features}
        self.remove_hooks()
        object.__setattr__(self, "_student", student)
        for s, module in modules.items():
            self._hooks.append(module.register_forward_hook(_Capture(self._captured["student"], s)))
            self._hooks.append(self._teacher_modules[s].register_forward_hook(_Capture(self._captured["teacher"], s)))

    def remove_hooks(self) -> None:
        """Remove the forward hooks from student and teacher (:meth:`bind` puts them back)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._clear()

    def _clear(self) -> None:
        self._captured["student"].clear()
        self._captured["teacher"].clear()

    def on_train_begin(self, model: nn.Module) -> None:
        """Bind the student and put the teacher and projections on the student's device."""
        super().on_train_begin(model)
        param = next(self.student.parameters(), None)
        if param is not None:
            self.teacher.to(param.device)
            self.to(param.device)
        self.teacher.eval()

    def _teacher_outputs(self, inputs: Any) -> Any:
        if self.teacher.training:
            self.teacher.eval()
        with torch.no_grad():
            return call_model(self.teacher, inputs)

    def on_loss(self, loss: torch.Tensor | None, outputs: Any, targets: Any = None,
                inputs: Any = None) -> torch.Tensor | None:
        """``alpha * kd + (1 - alpha) * loss + feature_weight * feature_mse`` for this batch."""
        if self.alpha == 0.0 and not self.features:
            return loss  # nothing asks for the teacher
        if inputs is None:
            raise DistillationError("the teacher needs the batch inputs: call cb.loss(outputs, targets, inputs)")
        if self.features and self.student is None:
            raise DistillationError("feature distillation needs the student: build the callback with student=model")
        try:
            teacher_out = self._teacher_outputs(inputs)
            total = None
            if self.alpha > 0.0:
                s = extract_logits(outputs, self.logits)
                t = extract_logits(teacher_out, self.logits)
                if s.shape != t.shape:
                    raise DistillationError(
                        f"teacher output shape {tuple(t.shape)} does not match the student's {tuple(s.shape)}; "
                        "distillation needs the same logits shape (same classes); pick the field with logits=..."
                    )
                total = self.alpha * kd_loss(s, t, self.temperature)
            if self.alpha < 1.0:
                if loss is None:
                    raise DistillationError(
                        f"alpha={self.alpha} mixes in a task loss, but there is none: give targets or a loss_fn, or use alpha=1"
                    )
                total = (1.0 - self.alpha) * loss if total is None else total + (1.0 - self.alpha) * loss
            if self.features:
                if not self._ready:
                    self._build_projections()
                total = total + self.feature_weight * self._feature_loss()
            object.__setattr__(self, "_ready", True)
            return total
        finally:
            self._clear()  # drop captured activations (and the graph they hold)

    def _pairs(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        out = []
        for s in self.features:
            s_feat, t_feat = self._captured["student"].get(s), self._captured["teacher"].get(s)
            for which, feat, name in (("student", s_feat, s), ("teacher", t_feat, self.features[s])):
                if feat is None:
                    raise DistillationError(
                        f"{which} layer '{name}' gave no tensor output in this forward pass; does the model's forward use it?"
                    )
            out.append((s, s_feat, t_feat))
        return out

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")  # ModuleDict keys cannot hold dots

    def _build_projections(self) -> None:
        """Check feature shapes and create a projection where exactly one non-batch dim differs."""
        created = False
        for s, s_feat, t_feat in self._pairs():
            key = self._key(s)
            if s_feat.shape == t_feat.shape or key in self.projections:
                continue
            diff = [d for d in range(s_feat.dim()) if s_feat.dim() == t_feat.dim() and s_feat.shape[d] != t_feat.shape[d]]
            if s_feat.dim() != t_feat.dim() or len(diff) != 1 or diff[0] == 0:
                raise DistillationError(
                    f"student feature '{s}' has shape {tuple(s_feat.shape)} and teacher feature '{self.features[s]}' "
                    f"{tuple(t_feat.shape)}; they may differ in one non-batch dimension only, which a linear projection maps"
                )
            d = diff[0]
            proj = nn.Linear(s_feat.shape[d], t_feat.shape[d], device=s_feat.device, dtype=torch.float32)
            proj.dim = d  # the dimension it maps
            if _distributed():
                for p in proj.parameters():
                    dist.broadcast(p.data, src=0)  # same initial projection on every rank
                    p.register_post_accumulate_grad_hook(_AverageGrad())
            self.projections[key] = proj
            created = True
        if created and torch.is_grad_enabled():
            warnings.warn(
                "distillation projections were created at the first training batch, after your optimizer; "
                "call cb.prepare(inputs) before building the optimizer and add cb.parameters() to it, "
                "or they stay at their random initialisation",
                stacklevel=4,
            )

    def _feature_loss(self) -> torch.Tensor:
        total = 0.0
        for s, s_feat, t_feat in self._pairs():
            key = self._key(s)
            if key in self.projections:
                proj = self.projections[key]
                s_feat = proj(s_feat.movedim(proj.dim, -1).to(proj.weight.dtype)).movedim(-1, proj.dim)
            if s_feat.shape != t_feat.shape:
                raise DistillationError(
                    f"student feature '{s}' has shape {tuple(s_feat.shape)} after projection, the teacher's "
                    f"{tuple(t_feat.shape)}: feature shapes changed since the first batch"
                )
            total = total + F.mse_loss(s_feat.float(), t_feat.float())
        return total

    @torch.no_grad()
    def prepare(self, inputs: Any, targets: Any = None) -> None:
        """Dry run on one batch: check logits and feature shapes and build the projections, with
        the student in eval mode under ``no_grad`` so nothing in it changes (not even BatchNorm
        statistics). Call it before building your own optimizer when features need projections."""
        if self.student is None:
            raise DistillationError("prepare() needs the student: build the callback with student=model")
        with eval_mode(self.student):
            outputs = call_model(self.student, inputs)
            task = self.loss_fn(outputs, targets)
            self.on_loss(task if task is not None else torch.zeros(()), outputs, targets, inputs)

    def on_train_end(self, model: nn.Module) -> None:
        self._clear()

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}, feature_weight={self.feature_weight}, features={self.features}"


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


# ---------------------------------------------------------------------------------------------
# Callbacks a recipe attaches to a model


def attach(model: nn.Module, callback: Callback) -> None:
    """Attach ``callback`` to ``model`` so :func:`finetune` uses it without being told.

    It is kept in the model's ``__dict__``: not a submodule, so the model's parameters and
    ``state_dict`` are unchanged. :func:`detach` removes it.
    """
    found = unwrap(model).__dict__.setdefault(_ATTACHED, [])
    if not any(c is callback for c in found):
        found.append(callback)


def callbacks(model: nn.Module) -> list[Callback]:
    """The callbacks attached to ``model`` (by a ``distill`` recipe pass, for instance)."""
    return _attached(model)


def _attached(model: nn.Module) -> list[Callback]:  # `finetune` has a parameter called `callbacks`
    return list(unwrap(model).__dict__.get(_ATTACHED, []))


def detach(model: nn.Module, callback: Callback | None = None) -> None:
    """Detach ``callback`` (or all callbacks) from ``model`` and remove their hooks, e.g. before
    saving the whole model object (an attached callback holds the teacher)."""
    found = unwrap(model).__dict__.get(_ATTACHED, [])
    for c in [c for c in found if callback is None or c is callback]:
        if isinstance(c, DistillationCallback):
            c.remove_hooks()
        found.remove(c)


# ---------------------------------------------------------------------------------------------
# The loop


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
             progress: bool = True) -> list[dict]:
    """Fine-tune ``model`` (maybe wrapped in ``DistributedDataParallel``) on ``loader``.

    ``loader`` yields ``(inputs, targets)`` pairs or dicts (passed as keyword arguments, targets =
    ``"labels"``). ``loss_fn(outputs, targets)`` is the task loss (default
    :func:`default_task_loss`: the outputs' own ``loss``, else cross-entropy). ``callbacks`` are
    used together with those a recipe attached to the model (:func:`callbacks`).
    ``optimizer`` defaults to Adam at ``lr`` over the model's and the callbacks' trainable
    parameters; a given optimizer gets the callbacks' parameters (distillation projections)
    added as a new parameter group if it lacks them. ``device`` moves the model, teacher and
    batches there. ``lr_schedule``: ``"constant"``, or ``"cosine"`` (the learning rate decays
    from its start value to 0 over all steps, following half a cosine; needs ``len(loader)``).

    Before any update, the first batch is run once in eval mode under ``no_grad`` through the
    whole loss, so a bad set-up raises (e.g. :class:`DistillationError`) with nothing changed.
    :func:`torchzip.step` runs exactly once after every optimizer step. Under
    ``torch.distributed`` give each rank its own shard (``DistributedSampler``; its epoch is
    set here); bars show on rank 0 only.

    Returns one dict per epoch: ``epoch``, ``loss`` (mean over steps), ``steps``, ``samples``,
    ``seconds``, ``lr``.
    """
    if not isinstance(epochs, int) or epochs < 0:
        raise TorchzipError(f"epochs must be a non-negative integer, got {epochs!r}")
    if lr_schedule not in ("constant", "cosine"):
        raise TorchzipError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
    if lr_schedule == "cosine" and not hasattr(loader, "__len__"):
        raise TorchzipError("lr_schedule 'cosine' needs a loader with a length (to know the number of steps)")
    inner = unwrap(model)
    given = list(callbacks)
    cbs = given + [c for c in _attached(inner) if not any(c is g for g in given)]
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

    # Dry run: every check happens here, before anything trains.
    for cb in cbs:
        cb.on_train_begin(model)
    inputs, targets = split_batch(first)
    with torch.no_grad(), eval_mode(inner):
        loss = _loss(inner, inputs, targets, loss_fn, cbs)

    optimizer = _optimizer(model, cbs, optimizer, lr)
    scheduler = None
    if lr_schedule == "cosine":
        steps = max(epochs * len(loader), 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t / steps, 1.0))))
    history: list[dict] = []
    modes = [(m, m.training) for m in inner.modules()]
    show = progress and _is_rank0()
    epoch_bar = tqdm(range(epochs), desc="finetune", unit="epoch", disable=not show)
    try:
        for epoch in epoch_bar:
            if epoch > 0:
                _set_epoch(loader, epoch)
                batches = iter(loader)
            stream = itertools.chain([first], batches) if epoch == 0 else batches
            total = len(loader) if hasattr(loader, "__len__") else None
            step_bar = tqdm(stream, total=total, desc=f"epoch {epoch + 1}/{epochs}", unit="step", leave=False,
                            disable=not show)
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
    for cb in cbs:
        cb.on_train_end(model)
    return history


def _loss(model: nn.Module, inputs: Any, targets: Any, loss_fn: TaskLoss, cbs: list[Callback]) -> torch.Tensor:
    outputs = call_model(model, inputs)
    loss = loss_fn(outputs, targets)
    for cb in cbs:
        loss = cb.on_loss(loss, outputs, targets, inputs)
    if loss is None:
        raise TorchzipError("no loss to minimise: the batches carry no targets and the outputs no 'loss'; give targets or loss_fn")
    return loss


def _optimizer(model: nn.Module, cbs: list[Callback], optimizer: torch.optim.Optimizer | None,
               lr: float) -> torch.optim.Optimizer:
    extra = _params_of(cbs)
    if optimizer is None:
        params = [p for p in model.parameters() if p.requires_grad]
        seen = {id(p) for p in params}
        return torch.optim.Adam(params + [p for p in extra if id(p) not in seen], lr=lr)
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
