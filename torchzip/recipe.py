"""A recipe is an ordered list of passes; YAML (or a dict) is one way to write that list.

```yaml
passes:
  - prune: {pattern: "2:4"}
  - quantize: {group_size: 128}
```
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Hashable
from typing import Any, Iterable

import yaml
from torch import nn

from torchzip.errors import RecipeError
from torchzip.passes.base import PASSES, Pass, pass_names
from torchzip.passes.layer import no_passes_error

TOP_LEVEL_KEYS = ("passes",)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (where YAML would
    silently keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *base" may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # SafeLoader rejects it below
            if key in seen:
                raise RecipeError(f"recipe YAML gives the key {key!r} twice in one mapping "
                                  f"(line {key_node.start_mark.line + 1}); each key may appear once")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML) reads 3e-4 as a string, wanting 3.0e-4; YAML 1.2 and Python read it as a float.
_UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                       list("-+0123456789"))


@dataclass
class Recipe:
    """An ordered list of passes (``Prune``, ``Quantize``, ``Codebook``, ``Distill``...)."""

    passes: list[Pass] = field(default_factory=list)

    def __post_init__(self) -> None:
        for p in self.passes:
            if not isinstance(p, Pass):
                raise RecipeError(f"a recipe holds pass objects ({', '.join(pass_names())}), got {type(p).__name__}")

    @classmethod
    def from_dict(cls, data: dict | list) -> "Recipe":
        """From ``{"passes": [{"prune": {...}}, ...]}`` (or the bare list), with at least one pass."""
        if isinstance(data, list):
            data = {"passes": data}
        if not isinstance(data, dict):
            raise RecipeError(f"a recipe is a mapping with key 'passes', got {type(data).__name__}")
        unknown = sorted(set(data) - set(TOP_LEVEL_KEYS))
        if unknown:
            raise RecipeError(f"unknown recipe key(s) {unknown}; allowed: {list(TOP_LEVEL_KEYS)}")
        entries = data.get("passes")
        if entries is not None and not isinstance(entries, list):
            raise RecipeError("'passes' must be a list of single-key mappings such as {'prune': {'sparsity': 0.5}}")
        if not entries:
            raise no_passes_error()
        return cls([_parse_entry(i, e) for i, e in enumerate(entries)])

    def to_dict(self) -> dict[str, Any]:
        """Plain data; arguments equal to their defaults are left out. Every pass must be
        registered (:func:`torchzip.register_pass`) under its key, or it could not be read back."""
        for p in self.passes:
            if PASSES.get(p.key) is not type(p):
                raise RecipeError(f"{type(p).__qualname__} is not the pass registered as '{p.key}' "
                                  f"({'nothing' if p.key not in PASSES else PASSES[p.key].__qualname__} is); "
                                  "give it a key of its own and register it with torchzip.register_pass to write it in a recipe")
        return {"passes": [{p.key: p.to_dict()} for p in self.passes]}

    def callbacks(self, model: nn.Module, **context: Any) -> list:
        """The training callbacks this recipe's passes need while ``model`` (the compressed
        student) fine-tunes, e.g. ``recipe.callbacks(student, teacher=model)`` for ``distill``;
        give them to :func:`torchzip.finetune` or call them in a loop of your own."""
        out = []
        for p in self.passes:
            out += p.callbacks(model, **context)
        return out

    @classmethod
    def from_yaml(cls, source: str | os.PathLike) -> "Recipe":
        """From YAML text, or from a file when ``source`` is a path (``Path`` or ``*.yaml``/``*.yml``).
        A key given twice in one mapping is an error."""
        if isinstance(source, os.PathLike) or str(source).endswith((".yaml", ".yml")):
            path = Path(source)
            if not path.is_file():
                raise RecipeError(f"recipe file not found: {path}")
            source = path.read_text()
        try:
            data = yaml.load(source, Loader=_UniqueKeyLoader)
        except yaml.YAMLError as err:
            raise RecipeError(f"recipe is not valid YAML: {err}") from None
        return cls.from_dict(data if data is not None else {})

    def to_yaml(self) -> str:
        """YAML text that :meth:`from_yaml` turns back into an equal recipe."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_yaml` to ``path``."""
        Path(path).write_text(self.to_yaml())


def _parse_entry(index: int, entry: Any) -> Pass:
    if isinstance(entry, str):
        entry = {entry: {}}
    if not isinstance(entry, dict) or len(entry) != 1:
        raise RecipeError(f"pass #{index + 1} must be a single-key mapping like {{'prune': {{...}}}}, got {entry!r}")
    (name, args), = entry.items()
    if name not in PASSES:
        raise RecipeError(f"unknown pass '{name}' (pass #{index + 1}); allowed: {pass_names()}")
    if args is not None and not isinstance(args, dict):
        raise RecipeError(f"arguments of pass '{name}' must be a mapping, got {args!r}")
    return PASSES[name].from_dict(args)


def as_recipe(recipe: "Recipe | str | os.PathLike | dict | Iterable[Pass]") -> Recipe:
    """Accept a Recipe, a YAML path, a dict, a list of pass objects or a single pass."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Pass):
        return Recipe([recipe])
    if isinstance(recipe, (str, os.PathLike)):
        path = Path(recipe)
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path} (pass a Recipe, a dict, a list of passes or a YAML file path)")
        return Recipe.from_yaml(path)
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, Iterable):
        items = list(recipe)
        if all(isinstance(p, Pass) for p in items):
            return Recipe(items)
        if any(isinstance(p, Pass) for p in items):
            odd = next(i for i, p in enumerate(items) if not isinstance(p, Pass))
            raise RecipeError(f"a recipe list holds either pass objects or recipe entries such as {{'prune': {{}}}}, "
                              f"not both: item #{odd + 1} is {items[odd]!r}")
        return Recipe.from_dict(items)
    raise RecipeError(f"cannot use a {type(recipe).__name__} as a recipe")
