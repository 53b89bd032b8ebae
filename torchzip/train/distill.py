"""Knowledge distillation: the KD loss and the callback that adds a teacher to fine-tuning."""

from __future__ import annotations

import difflib
import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from torchzip.errors import DistillationError
from torchzip.train.batches import (LogitsSpec, TaskLoss, _first_tensor, _values, call_model, eval_mode,
                                    extract_logits, unwrap)
from torchzip.train.callbacks import Callback


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


FEATURE_LOSSES = ("mse", "cosine", "standardized")


def check_features_mode(features_only: Any, feature_loss: Any, features: Any) -> None:
    """Raise :class:`DistillationError` unless ``features_only`` is a bool (True needing
    features) and ``feature_loss`` is ``"mse"`` or ``"cosine"``."""
    if not isinstance(features_only, bool):
        raise DistillationError(f"features_only must be True or False, got {features_only!r}")
    if feature_loss not in FEATURE_LOSSES:
        raise DistillationError(f"feature_loss must be one of {FEATURE_LOSSES}, got {feature_loss!r}")
    if features_only and not normalize_features(features):
        raise DistillationError("features_only distils features alone: name at least one, e.g. features={'': ''} "
                                "for the models' outputs")


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


def find_module(model: nn.Module, name: str, which: str) -> nn.Module:
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

    ``features_only=True`` (encoders, sentence embeddings: no logits, no labels): the loss is the
    feature terms alone, ``feature_weight * Σ_pairs distance(student_feature, teacher_feature)``;
    name ``""`` for the model's own output (its first tensor, e.g. a pooled embedding).
    ``feature_loss``: ``"mse"``, ``"cosine"`` (``1 - cos`` along the last dimension, averaged) or
    ``"standardized"``: MSE with each channel (last dimension) divided by the teacher feature's
    standard deviation over the batch's other positions (every token of a hidden state), floored
    at a tenth of the channels' mean, so a few outlier channels (BERT has some) do not outweigh
    the rest as they do in plain MSE, nor a near-constant one all of them.

    ``latent_weights=True``: the student's codebooks train their assignments too, not only their
    centroids: for the length of :func:`finetune` each weight takes the centroid nearest to a
    float master weight that starts at its dequantized value and learns with a straight-through
    gradient (:meth:`~torchzip.passes.codebook.CodebookQuant.start_latent`); at the end the
    nearest assignments are fixed again (the packed size in memory is unchanged; the Huffman-coded
    file changes a little with the codes' frequencies). Give the master weights
    their own rate with ``finetune(..., param_lrs={"*.original": ...})``.

    Raises :class:`DistillationError` for a temperature ≤ 0, alpha outside [0, 1], a layer
    name missing from either model, and (at the first batch, before any update) teacher
    logits or features whose shape cannot match the student's.
    """

    def __init__(self, teacher: nn.Module, *, temperature: float = 4.0, alpha: float = 0.5,
                 features: Mapping[str, str] | Iterable[str] | None = None, logits: LogitsSpec = None,
                 student: nn.Module | None = None, loss_fn: TaskLoss | None = None,
                 feature_weight: float = 1.0, features_only: bool = False, feature_loss: str = "mse",
                 latent_weights: bool = False) -> None:
        nn.Module.__init__(self)
        if not isinstance(latent_weights, bool):
            raise DistillationError(f"latent_weights must be True or False, got {latent_weights!r}")
        self.latent_weights = latent_weights
        if not isinstance(teacher, nn.Module):
            raise DistillationError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        check_settings(temperature, alpha, feature_weight, logits)
        check_features_mode(features_only, feature_loss, features)
        self.features_only, self.feature_loss = features_only, feature_loss
        self.temperature, self.alpha, self.feature_weight = float(temperature), float(alpha), float(feature_weight)
        self.logits = logits
        self.features = normalize_features(features)
        self.projections = nn.ModuleDict()
        object.__setattr__(self, "_teacher", unwrap(teacher))
        object.__setattr__(self, "_hooks", [])
        object.__setattr__(self, "_captured", {"student": {}, "teacher": {}})
        object.__setattr__(self, "_ready", False)  # shapes checked and projections built
        object.__setattr__(self, "_latent_on", False)  # latent codebooks started by this callback
        self._teacher_modules = {s: find_module(self.teacher, t, "teacher") for s, t in self.features.items()}
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
        modules = {s: find_module(student, s, "student") for s in self.features}
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
        if not self._hooks and self.features:
            self.bind(self.student)  # a previous finetune's end removed them
        from torchzip.passes.codebook import clustered_codebooks  # here: passes import this module

        if self.latent_weights and next(clustered_codebooks(self.student), None) is None:
            raise DistillationError("latent_weights: the student has no clustered codebook")
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
        if self.features_only:
            return self._features_only(inputs)
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

    def _features_only(self, inputs: Any) -> torch.Tensor:
        if inputs is None:
            raise DistillationError("the teacher needs the batch inputs: call cb.loss(outputs, targets, inputs)")
        if self.student is None:
            raise DistillationError("feature distillation needs the student: build the callback with student=model")
        try:
            self._teacher_outputs(inputs)
            if not self._ready:
                self._build_projections()
                object.__setattr__(self, "_ready", True)
            return self.feature_weight * self._feature_loss()
        finally:
            self._clear()

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
            if self.feature_loss == "cosine":
                total = total + (1.0 - F.cosine_similarity(s_feat.float(), t_feat.float(), dim=-1)).mean()
            elif self.feature_loss == "standardized":
                t = t_feat.float()
                flat = t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(-1, 1)
                std = flat.std(0, correction=0)
                # Floored at a tenth of the mean: a near-constant channel (MiniLM's last hidden
                # state has one, std ~1e-5) would otherwise outweigh all the rest and wreck training.
                # A batch of one sample has no spread per channel: then the whole feature's spread.
                floor = 0.1 * float(std.mean()) or float(t.std(correction=0)) or 1.0
                scale = std.clamp(min=floor)
                total = total + ((s_feat.float() - t) / scale).pow(2).mean()
            else:
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

    def on_step_begin(self, model: nn.Module) -> None:
        """With ``latent_weights``, the first step starts latent mode (not ``on_train_begin``: a
        set-up error in the dry run then leaves the student's master weights as they were)."""
        self._start_latent()

    def on_step_end(self, model: nn.Module) -> None:
        """In a loop of your own (``cb.step()``), latent mode starts after the first step."""
        self._start_latent()

    def _start_latent(self) -> None:
        if self.latent_weights and not self._latent_on and self.student is not None:
            from torchzip.passes.codebook import latent_codebooks

            latent_codebooks(self.student, True)
            object.__setattr__(self, "_latent_on", True)

    def on_train_end(self, model: nn.Module) -> None:
        """Remove the feature hooks (the next ``finetune`` puts them back: left on, every later
        forward of the student would keep its activation and graph); with ``latent_weights``, fix
        the codebooks' new assignments. :func:`finetune` calls it even when training fails."""
        self.remove_hooks()
        if self._latent_on:
            from torchzip.passes.codebook import latent_codebooks

            latent_codebooks(self.student, False)
            object.__setattr__(self, "_latent_on", False)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, alpha={self.alpha}, feature_weight={self.feature_weight}, "
                f"features={self.features}, features_only={self.features_only}, feature_loss={self.feature_loss!r}, "
                f"latent_weights={self.latent_weights}")
