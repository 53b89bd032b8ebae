"""Gradual schedules: ``step`` advances every parametrization that declares one.

A parametrization takes part by having a ``schedule_key`` (members with the same class and key
advance together, e.g. the masks of one global pruning pass) and a classmethod
``advance(members, to_end=False)`` that gets ``[(module, parametrization), ...]``. Groups advance
in the order the model first lists them, so within a layer earlier passes go first (a pruning
mask grows before a codebook clusters the weight it leaves).
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

from torchzip.errors import RecipeError
from torchzip.progress import bar


def _groups(model: nn.Module) -> dict[tuple, list[tuple[nn.Module, nn.Module]]]:
    groups: dict[tuple, list[tuple[nn.Module, nn.Module]]] = {}
    seen: set[int] = set()  # a parametrization shared by tied layers advances once
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        for chain in module.parametrizations.values():
            for p in chain:
                if hasattr(p, "schedule_key") and hasattr(type(p), "advance") and id(p) not in seen:
                    seen.add(id(p))
                    groups.setdefault((type(p), p.schedule_key), []).append((module, p))
    return groups


def step(model: nn.Module) -> None:
    """Advance every gradual schedule in ``model`` by one optimizer step.

    Grows pruning masks that are due and clusters codebooks whose ``start_step`` has come.
    Call it after ``optimizer.step()`` (the fine-tuning callbacks do this for you).
    """
    if not isinstance(model, nn.Module):
        raise RecipeError(f"step needs the compressed nn.Module, got {type(model).__name__}")
    for (cls, _), members in _groups(model).items():
        cls.advance(members)


def finish(model: nn.Module, progress: bool | None = None) -> None:
    """Run every schedule in ``model`` to its end at once (what stepping to the last scheduled
    step would leave, without training in between): masks reach their final sparsity, delayed
    codebooks get clustered. ``progress``: a bar over the layers, advanced a group of layers
    at a time (None: only when stderr is a terminal)."""
    if not isinstance(model, nn.Module):
        raise RecipeError(f"finish needs the compressed nn.Module, got {type(model).__name__}")
    groups = _groups(model)
    with bar(total=sum(len(m) for m in groups.values()), progress=progress, desc="schedules", unit="layer") as shown:
        for (cls, key), members in groups.items():
            shown.set_postfix_str(f"{getattr(members[0][1], 'key', key)}: {len(members)} layer(s)")
            cls.advance(members, to_end=True)
            shown.update(len(members))
