"""The ``distill`` recipe pass: fine-tune against a teacher.

```yaml
passes:
  - prune: {sparsity: 0.9, end_step: 1000}
  - distill: {temperature: 4.0, alpha: 0.7, features: {"blocks.3": "blocks.11"}}
```

The pass changes no weight: ``compress`` only checks that its feature layers exist in the
student. What it adds is a training callback, built explicitly once the teacher is known::

    recipe = tz.Recipe.from_yaml("recipe.yaml")
    student = tz.compress(model, recipe)
    tz.finetune(student, loader, callbacks=recipe.callbacks(student, teacher=model))

so no teacher is ever stored on the model (deep copies, ``freeze`` and ``export`` never see one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from torchzip.errors import DistillationError, RecipeError
from torchzip.passes.base import Pass, register_pass
from torchzip.train.distill import (DistillationCallback, check_features_mode, check_settings, find_module,
                                    normalize_features)


@register_pass
@dataclass
class Distill(Pass):
    """Knowledge distillation: ``loss = alpha * T² * KL + (1 - alpha) * task + feature_weight * MSE``.

    ``temperature`` (> 0), ``alpha`` (in [0, 1]), ``features`` (student layer name -> teacher
    layer name, or a list of names both models have), ``logits`` (field name or index of the
    logits in the outputs; None finds them), ``feature_weight`` (>= 0), ``features_only`` (no
    logits, no task loss: encoders), ``feature_loss`` (``mse``, ``cosine`` or ``standardized``), ``latent_weights``
    (codebooks also learn their assignments, through float master weights). See
    :class:`~torchzip.DistillationCallback`.
    """

    key: ClassVar[str] = "distill"
    temperature: float = 4.0
    alpha: float = 0.5
    features: dict = field(default_factory=dict)
    logits: str | int | None = None
    feature_weight: float = 1.0
    features_only: bool = False
    feature_loss: str = "mse"
    latent_weights: bool = False

    def __post_init__(self) -> None:
        # Bad values fail when the recipe is read, before any model is touched.
        check_settings(self.temperature, self.alpha, self.feature_weight, self.logits)
        if not isinstance(self.latent_weights, bool):
            raise RecipeError(f"distill: latent_weights must be true or false, got {self.latent_weights!r}")
        self.features = normalize_features(self.features)
        try:
            check_features_mode(self.features_only, self.feature_loss, self.features)
        except DistillationError as err:
            raise RecipeError(f"distill: {err}") from None

    def check(self, model: nn.Module, context: dict[str, Any]) -> None:
        """Before any pass runs: the feature layers exist in the student."""
        for student_name in self.features:
            find_module(model, student_name, "student")

    def callbacks(self, model: nn.Module, teacher: nn.Module | None = None, **context: Any) -> list:
        """A :class:`DistillationCallback` from ``teacher`` into ``model`` (the compressed student)."""
        if teacher is None:
            raise RecipeError("the 'distill' pass needs a teacher: call recipe.callbacks(student, teacher=teacher_model)")
        return [DistillationCallback(teacher, temperature=self.temperature, alpha=self.alpha, features=self.features,
                                     logits=self.logits, feature_weight=self.feature_weight, student=model,
                                     features_only=self.features_only, feature_loss=self.feature_loss,
                                     latent_weights=self.latent_weights)]
