"""What every pass shares: a registry of recipe names, and layer selection by type and glob."""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from torchzip.errors import RecipeError

PASSES: dict[str, type["Pass"]] = {}

LAYER_TYPES: dict[str, type[nn.Module]] = {
    "Linear": nn.Linear,
    "Conv1d": nn.Conv1d,
    "Conv2d": nn.Conv2d,
    "Embedding": nn.Embedding,
}
DEFAULT_TARGETS = ("Linear", "Conv1d", "Conv2d", "Embedding")


class Pass:
    """A recipe step: ``pass_(model, **context) -> model``. Subclasses are dataclasses.

    ``key`` is the pass's name in a recipe (``prune``, ``quantize``...). ``context`` carries objects
    that cannot live in a YAML file, such as the distillation teacher.
    """

    key: ClassVar[str] = ""
    context_keys: ClassVar[tuple[str, ...]] = ()  # objects this pass takes from compress(..., **context)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.key:
            PASSES[cls.key] = cls

    def __call__(self, model: nn.Module, **context: Any) -> nn.Module:
        raise NotImplementedError

    def check(self, model: nn.Module, context: dict[str, Any]) -> None:
        """Raise before anything is modified if this pass cannot run on ``model`` with ``context``
        (``inplace`` included). Per-layer passes are checked by :func:`torchzip.plan_recipe`."""

    def to_dict(self) -> dict[str, Any]:
        """Arguments that differ from their defaults (what a recipe file needs to say)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if value != default:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, args: dict[str, Any] | None) -> "Pass":
        """Build from recipe arguments, naming any unknown key and listing the allowed ones."""
        args = dict(args or {})
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(args) - set(allowed))
        if unknown:
            raise RecipeError(f"unknown argument(s) {unknown} for pass '{cls.key}'; allowed: {allowed}")
        return cls(**args)


def _check_names(where: str, patterns: Any) -> tuple[str, ...]:
    if isinstance(patterns, str):
        patterns = (patterns,)
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        raise RecipeError(f"{where} must be a list of strings, got {patterns!r}")
    return tuple(patterns)


@dataclass
class LayerPass(Pass):
    """A pass applied to the weight of each targeted layer.

    ``targets``: layer type names (``Linear``, ``Conv1d``, ``Conv2d``, ``Embedding``) or classes;
    types match exactly, so subclasses such as ``MultiheadAttention.out_proj`` are not taken by
    accident. ``exclude``: glob patterns on qualified module names. ``overrides``: glob pattern ->
    arguments for the layers it matches; a layer named there must be able to take them.
    """

    targets: tuple = DEFAULT_TARGETS
    exclude: tuple = ()
    overrides: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        targets = self.targets
        if isinstance(targets, (str, type)):
            targets = (targets,)
        if not isinstance(targets, (list, tuple)) or not all(isinstance(t, (str, type)) for t in targets):
            raise RecipeError(f"targets of pass '{self.key}' must be a list of layer types, got {self.targets!r}; "
                              f"allowed: {sorted(LAYER_TYPES)}")
        self.targets = tuple(t if isinstance(t, str) else t.__name__ for t in targets)
        for t in self.targets:
            if t not in LAYER_TYPES:
                raise RecipeError(f"unknown target layer type '{t}' in pass '{self.key}'; allowed: {sorted(LAYER_TYPES)}")
        self.exclude = _check_names(f"exclude of pass '{self.key}'", self.exclude)
        if not isinstance(self.overrides, dict):
            raise RecipeError(f"overrides of pass '{self.key}' must map name patterns to arguments")
        own = {f.name for f in dataclasses.fields(self)} - {"targets", "exclude", "overrides"}
        for pattern, args in self.overrides.items():
            if not isinstance(args, dict):
                raise RecipeError(f"override '{pattern}' of pass '{self.key}' must be a mapping of arguments")
            bad = sorted(set(args) - own)
            if bad:
                raise RecipeError(f"unknown argument(s) {bad} in override '{pattern}' of pass '{self.key}'; allowed: {sorted(own)}")

    def __call__(self, model: nn.Module, **context: Any) -> nn.Module:
        """Apply this pass alone to ``model`` in place (same checks as :func:`torchzip.compress`)."""
        from torchzip.api import compress

        return compress(model, [self], inplace=True, **context)

    def layers(self, model: nn.Module) -> list[tuple[str, nn.Module, dict, bool]]:
        """``(name, module, arguments, named_by_override)`` for every layer this pass takes."""
        classes = tuple(LAYER_TYPES[t] for t in self.targets)
        base = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("targets", "exclude", "overrides")}
        out = []
        for name, module in model.named_modules():
            if parametrize.type_before_parametrizations(module) not in classes or any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
                continue
            args, named = dict(base), False
            for pattern, extra in self.overrides.items():
                if fnmatch.fnmatchcase(name, pattern):
                    args.update(extra)
                    named = True
            out.append((name, module, args, named))
        return out


def weight_before(module: nn.Module, parametrization: nn.Module) -> torch.Tensor:
    """``module.weight`` as the parametrizations ahead of ``parametrization`` in its chain make it."""
    chain = module.parametrizations.weight
    w = chain.original
    for p in chain:
        if p is parametrization:
            break
        w = p(w)
    return w



