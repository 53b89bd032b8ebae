"""The ``distill`` recipe pass: fine-tune against a teacher.

```yaml
passes:
  - prune: {sparsity: 0.9, end_step: 1000}
  - distill: {temperature: 4.0, alpha: 0.7, features: {"blocks.3": "blocks.11"}}
```

The teacher is an object, not something a YAML file can hold, so it comes from
``compress(model, recipe, teacher=dense_model)``. The pass changes no weight: it attaches a
:class:`~torchzip.distill.DistillationCallback` to the model, which :func:`torchzip.finetune`
then uses on its own, and which a loop of your own fetches with
``torchzip.distill.callbacks(model)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from torchzip.distill import (DistillationCallback, _find_module, attach, callbacks, check_settings, detach,
                              normalize_features)
from torchzip.errors import DistillationError, RecipeError
from torchzip.passes.base import Pass


@dataclass
class Distill(Pass):
    """Knowledge distillation: ``loss = alpha * T² * KL + (1 - alpha) * task + feature_weight * MSE``.

    ``temperature`` (> 0), ``alpha`` (in [0, 1]), ``features`` (student layer name -> teacher
    layer name, or a list of names both models have), ``logits`` (field name or index of the
    logits in the outputs; None finds them), ``feature_weight`` (>= 0). See
    :class:`~torchzip.distill.DistillationCallback`.
    """

    key: ClassVar[str] = "distill"
    temperature: float = 4.0
    alpha: float = 0.5
    features: dict = field(default_factory=dict)
    logits: str | int | None = None
    feature_weight: float = 1.0

    def __post_init__(self) -> None:
        # Bad values fail when the recipe is read, before any model is touched.
        check_settings(self.temperature, self.alpha, self.feature_weight, self.logits)
        self.features = normalize_features(self.features)

    context_keys: ClassVar[tuple[str, ...]] = ("teacher",)

    def check(self, model: nn.Module, context: dict[str, Any]) -> None:
        """Before any pass runs: a teacher was given, feature names exist in both models, and an
        in-place student does not share parameters with its teacher."""
        teacher = context.get("teacher")
        if teacher is None:
            raise RecipeError("the 'distill' pass needs a teacher: call compress(model, recipe, teacher=teacher_model)")
        for student_name, teacher_name in self.features.items():
            _find_module(model, student_name, "student")
            _find_module(teacher, teacher_name, "teacher")
        if context.get("inplace") and (teacher is model or {id(p) for p in model.parameters()} & {id(p) for p in teacher.parameters()}):
            raise DistillationError(
                "the teacher shares parameters with the student, which inplace=True would compress; "
                "use inplace=False (the original model then stays the teacher)"
            )

    def __call__(self, model: nn.Module, teacher: nn.Module | None = None, **context: Any) -> nn.Module:
        """Attach a :class:`DistillationCallback` for ``teacher`` to ``model`` (returned unchanged)."""
        if teacher is None:
            raise RecipeError("the 'distill' pass needs a teacher: call compress(model, recipe, teacher=teacher_model)")
        callback = DistillationCallback(
            teacher,
            temperature=self.temperature,
            alpha=self.alpha,
            features=self.features,
            logits=self.logits,
            feature_weight=self.feature_weight,
            student=model,
        )
        for old in callbacks(model):  # a model distils from one teacher: a new pass replaces the old
            if isinstance(old, DistillationCallback):
                detach(model, old)
        attach(model, callback)
        return model
