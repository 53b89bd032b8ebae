"""What every pass shares: the registry of recipe names, argument checks, and the ``Pass`` protocol.

A pass is a small dataclass. Its fields are its recipe arguments; ``__post_init__`` validates them,
so a pass object that exists is a valid one (overrides build new instances with
``dataclasses.replace`` and are validated the same way). A pass is named in YAML only once it is
registered::

    @tz.register_pass
    @dataclass
    class MyPass(tz.LayerPass):
        key = "my_pass"
        ...

Subclassing a registered pass does not register the subclass: ``class MyPrune(tz.Prune)`` leaves
the YAML name ``prune`` to ``Prune``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from torchzip.errors import RecipeError

PASSES: dict[str, type["Pass"]] = {}


def register_pass(cls: type["Pass"]) -> type["Pass"]:
    """Make ``cls`` the pass that its ``key`` names in recipes (usable as a class decorator).

    Raises :class:`RecipeError` when ``cls`` has no key of its own (a subclass inherits its parent's)
    or when another class already holds that key.
    """
    if not (isinstance(cls, type) and issubclass(cls, Pass) and dataclasses.is_dataclass(cls)):
        raise RecipeError(f"register_pass takes a dataclass subclass of torchzip Pass, got {cls!r}")
    key = cls.__dict__.get("key")
    if not isinstance(key, str) or not key:
        inherited = getattr(cls, "key", "")
        raise RecipeError(f"{cls.__qualname__} needs a 'key' of its own to be registered"
                          + (f" (it inherits '{inherited}' from a parent)" if inherited else ""))
    other = PASSES.get(key)
    if other is not None and other is not cls:
        raise RecipeError(f"pass name '{key}' is already registered by {other.__module__}.{other.__qualname__}")
    PASSES[key] = cls
    return cls


def pass_names() -> list[str]:
    """Registered recipe names, sorted."""
    return sorted(PASSES)


class Pass:
    """A recipe step. Subclasses are dataclasses; ``key`` is the name a recipe uses for them.

    ``context_keys`` name objects the pass takes from its caller rather than from a recipe file
    (a teacher, calibration data). Hooks, all optional:

    - ``check(model, context)``: raise before anything is modified if the pass cannot run;
    - ``__call__(model, **context)``: apply the pass to ``model`` in place and return it;
    - ``callbacks(model, **context)``: training callbacks this pass needs while fine-tuning.
    """

    key: ClassVar[str] = ""
    context_keys: ClassVar[tuple[str, ...]] = ()

    def __call__(self, model: nn.Module, **context: Any) -> nn.Module:
        return model

    def check(self, model: nn.Module, context: dict[str, Any]) -> None:
        """Raise before anything is modified if this pass cannot run on ``model``."""

    def callbacks(self, model: nn.Module, **context: Any) -> list:
        """Callbacks (``torchzip.Callback``) that fine-tuning ``model`` needs for this pass."""
        return []

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


def check_int(where: str, name: str, value: Any, low: int = 0) -> None:
    """Raise :class:`RecipeError` unless ``value`` is an int (not a bool) of at least ``low``."""
    if type(value) is not int or value < low:
        kind = "a non-negative integer" if low == 0 else f"an integer >= {low}"
        raise RecipeError(f"{name} must be {kind}, got {value!r} in {where}")


def check_choice(where: str, name: str, value: Any, allowed: tuple) -> None:
    """Raise :class:`RecipeError` unless ``value`` is one of ``allowed``."""
    if not isinstance(value, str) or value not in allowed:
        raise RecipeError(f"{name} must be one of {list(allowed)}, got {value!r} in {where}")


def weight_before(module: nn.Module, parametrization: nn.Module, name: str = "weight") -> torch.Tensor:
    """``module.<name>`` as the parametrizations ahead of ``parametrization`` in its chain make it."""
    chain = module.parametrizations[name]
    w = chain.original
    for p in chain:
        if p is parametrization:
            break
        w = p(w)
    return w
