"""Passes that compress the weights of targeted layers, and the loop that applies a recipe.

A :class:`LayerPass` selects layers by exact type (``targets``, the names of
:data:`torchzip.packed.LAYER_KINDS`) and glob patterns (``exclude``), and may hold per-layer
``overrides``; a layer an override names gets its own pass instance (``dataclasses.replace``),
validated by the same ``__post_init__`` as any other. The orchestrator below never names a
concrete pass: what it needs, each pass declares.

- ``role`` (``"pruned"``, ``"quantized"``...) and ``tensor`` (``"weight"``, ``"bias"``): a
  tensor of a layer takes one pass of each role;
- ``must_precede``: roles that must not already be on the tensor (with the hint to show);
- ``unfit(name, module)``: why a layer cannot take this (per-layer) pass, or None;
- ``last_step()`` / ``fixes_at()``: until which step the pass keeps changing the tensor, and from
  which step it fixes it (a codebook clustered at ``start_step``); a pass may not fix a tensor
  that an earlier pass is still changing;
- ``apply(model, plan, group, progress)``: attach its parametrizations to the planned layers.

The parametrizations a pass attaches carry the same ``role``, ``key``, ``last_step()`` and
``fixes_at()``, so a model compressed earlier is checked the same way.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import fnmatch
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from torch import nn
from torch.nn.utils import parametrize

from torchzip.errors import CalibrationError, RecipeError, UnsupportedLayerError
from torchzip.packed.layers import DEFAULT_TARGETS, LAYER_KINDS, WeightView, kind_of
from torchzip.passes.base import PASSES, Pass

Plan = list[tuple[str, nn.Module, "LayerPass"]]
_COMMON = ("targets", "exclude", "overrides")


def _check_names(where: str, patterns: Any) -> tuple[str, ...]:
    if isinstance(patterns, str):
        patterns = (patterns,)
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        raise RecipeError(f"{where} must be a list of strings, got {patterns!r}")
    return tuple(patterns)


@dataclass
class LayerPass(Pass):
    """A pass applied to a tensor (``weight`` unless said) of each targeted layer.

    ``targets``: layer kinds (``Linear``, ``Conv1d``, ``Conv2d``, ``Embedding``, or any other
    registered kind) or classes; types match exactly, so subclasses such as
    ``MultiheadAttention.out_proj`` are not taken by accident. ``exclude``: glob patterns on
    qualified module names. ``overrides``: glob pattern -> arguments for the layers it matches;
    a layer named there must be able to take them.
    """

    targets: tuple = DEFAULT_TARGETS
    exclude: tuple = ()
    overrides: dict = field(default_factory=dict)

    tensor: ClassVar[str] = "weight"  # "weight": each layer kind's weight tensors; "bias": their biases
    role: ClassVar[str] = ""
    must_precede: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        targets = self.targets
        if isinstance(targets, str):
            raise RecipeError(f"targets of pass '{self.key}' must be a list of layer types, got the string {targets!r}; "
                              f"write [{targets}] for one type (allowed: {sorted(LAYER_KINDS)})")
        if isinstance(targets, type):
            targets = (targets,)
        if not isinstance(targets, (list, tuple)) or not all(isinstance(t, (str, type)) for t in targets):
            raise RecipeError(f"targets of pass '{self.key}' must be a list of layer types, got {self.targets!r}; "
                              f"allowed: {sorted(LAYER_KINDS)}")
        self.targets = tuple(t if isinstance(t, str) else t.__name__ for t in targets)
        for t in self.targets:
            if t not in LAYER_KINDS:
                raise RecipeError(f"unknown target layer type '{t}' in pass '{self.key}'; allowed: {sorted(LAYER_KINDS)}")
        self.exclude = _check_names(f"exclude of pass '{self.key}'", self.exclude)
        if not isinstance(self.overrides, dict):
            raise RecipeError(f"overrides of pass '{self.key}' must map name patterns to arguments")
        own = {f.name for f in dataclasses.fields(self)} - set(_COMMON)
        for pattern, args in self.overrides.items():
            if not isinstance(args, dict):
                raise RecipeError(f"override '{pattern}' of pass '{self.key}' must be a mapping of arguments")
            bad = sorted(set(args) - own)
            if bad:
                raise RecipeError(f"unknown argument(s) {bad} in override '{pattern}' of pass '{self.key}'; allowed: {sorted(own)}")
        self.validate(f"pass '{self.key}'")

    def validate(self, where: str) -> None:
        """Raise :class:`RecipeError` for argument values that cannot work (subclasses check theirs)."""

    def __call__(self, model: nn.Module, **context: Any) -> nn.Module:
        """Apply this pass alone to ``model`` in place (same checks as :func:`torchzip.compress`)."""
        return run_passes(model, [self], inplace=True, progress=False, context=context)

    def for_layer(self, name: str) -> tuple["LayerPass", bool]:
        """The pass a layer called ``name`` gets (a new instance if an override matches it), and
        whether an override named it."""
        extra: dict = {}
        named = False
        for pattern, args in self.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                extra.update(args)
                named = True
        if not extra:
            return self, named
        try:
            return dataclasses.replace(self, overrides={}, **extra), True
        except RecipeError as err:
            raise RecipeError(f"override for layer '{name}': {err}") from None

    def kinds(self) -> set[str]:
        """The layer kinds this pass takes: its targets and the kinds they include."""
        return set(self.targets) | {i for t in self.targets for i in LAYER_KINDS[t].includes}

    def layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of every layer of a targeted kind not excluded."""
        kinds = self.kinds()
        out = []
        for name, m in model.named_modules():
            kind = kind_of(m)
            if kind is not None and kind.name in kinds and not any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
                out.append((name, m))
        return out

    def tensors(self, module: nn.Module) -> list[tuple[str, WeightView | None]]:
        """``(tensor name, matrix view)`` of what this pass compresses in ``module``: the kind's
        weights (``tensor = "weight"``) or the biases it has (``tensor = "bias"``, no view)."""
        kind = kind_of(module)
        names = kind.weights(module)
        if self.tensor == "weight":
            return [(t, kind.view) for t in names]
        return [(b, None) for b in names.values() if b and getattr(module, b, None) is not None]

    def unfit(self, name: str, module: nn.Module) -> str | None:
        """Why ``module`` cannot take this pass (called on the layer's own instance), or None."""
        return None

    def last_step(self) -> int:
        """Last optimizer step at which this pass changes the tensor (0: only when applied)."""
        return 0

    def fixes_at(self) -> int | None:
        """Step from which this pass fixes the tensor's values for good (None: it never does)."""
        return None

    def apply(self, model: nn.Module, plan: Plan, group: str, progress: bool = False) -> None:
        """Attach this pass's parametrizations to the planned layers. ``group`` is unique to this
        pass in this ``compress`` call (e.g. to find the members of a global pruning group)."""
        raise NotImplementedError

    # -- calibration (compress(..., calibration=batches)) ------------------------------------

    def needs_calibration(self) -> bool:
        """Whether these arguments ask for calibration data (an error without it)."""
        return False

    def uses_calibration(self) -> bool:
        """Whether this pass uses calibration data when ``compress`` is given some."""
        return False

    def fits_float_outputs(self) -> bool:
        """Whether :meth:`compress_calibrated` takes the cross moment of each layer's float and
        compressed-model inputs (fitting the float model's outputs; see :func:`calibrate.sweep`)."""
        return False

    def block_tuning(self) -> tuple[int, float]:
        """Adam steps and learning rate of block tuning after each block is calibrated
        (:func:`torchzip.calibrate.tune_block`; 0 steps: none)."""
        return 0, 0.0

    def compress_calibrated(self, name: str, module: nn.Module, h, group: str) -> None:
        """Compress one layer whose inputs have second moment ``h`` (``[K, K]`` float64, summed
        over calibration rows) and attach its parametrization (passes that use data override it)."""
        raise NotImplementedError

    def apply_calibrated(self, model: nn.Module, plan: Plan, group: str, progress: bool, batches: list) -> None:
        """Apply this pass layer by layer on calibration data (:func:`torchzip.calibrate.sweep`);
        embeddings are compressed first on their output metric (:func:`torchzip.calibrate.output_metrics`)
        and layers that cannot be calibrated (kind, tied weights) from their weights alone, so that
        the layers calibrated after them see their compressed outputs (layers the batches never
        call: after the sweep, from their weights alone); one warning lists those."""
        from torchzip.calibrate import OUTPUT_METRIC_KINDS, output_metrics, sweep, why_not_calibrated

        held = holders(model)
        calibrated, by_output, rest, notes = [], [], [], []
        for name, module, own in plan:
            reason = why_not_calibrated(module) if own.uses_calibration() else "its arguments use no data"
            tied = any(len(held.get(id(raw_tensor(module, t)), [])) > 1 for t, _ in own.tensors(module))
            # A lookup (embedding) has no input statistics: it is weighted by its effect on the output.
            lookup = own.uses_calibration() and self.tensor == "weight" and kind_of(module).name in OUTPUT_METRIC_KINDS
            if reason is None and self.tensor != "weight":
                reason = "only weights are calibrated"
            if (reason is None or lookup) and tied:
                reason, lookup = "its weight is tied to another layer's", False
            if reason is None:
                calibrated.append((name, module, own))
            elif lookup:
                by_output.append((name, module, own))
            else:
                rest.append((name, module, own))
                if own.uses_calibration():
                    notes.append(f"{name} ({reason})")
        # A pass that fits the float model's outputs needs that model as it is now, uncompressed.
        reference = copy.deepcopy(model) if calibrated and self.fits_float_outputs() else None
        # First, so that the layers calibrated after them see what they output compressed.
        if by_output:
            metrics = output_metrics(model, [m for _, m, _ in by_output], batches)
            for (name, module, own), g in zip(by_output, metrics):
                if g is None:
                    rest.append((name, module, own))
                    notes.append(f"{name} (on the calibration batches its output never reaches the model's)")
                else:
                    own.compress_calibrated(name, module, g, group)
        if rest:
            self.apply(model, rest, group, progress)
        if calibrated:
            tune_steps, tune_lr = self.block_tuning()
            missed = sweep(model, [(n, m) for n, m, _ in calibrated], batches,
                           lambda i, h, *cross: calibrated[i][2].compress_calibrated(calibrated[i][0], calibrated[i][1],
                                                                                     h, group, *cross),
                           progress=progress, desc=f"calibrate {self.key}", reference=reference,
                           tune_steps=tune_steps, tune_lr=tune_lr)
            del reference
            for i in missed:
                notes.append(f"{calibrated[i][0]} (the calibration batches never call it)")
            if missed:
                self.apply(model, [calibrated[i] for i in missed], group, progress)
        if notes:
            warnings.warn(f"pass '{self.key}': {len(notes)} layer(s) compressed from their weights alone, without "
                          f"calibration: {'; '.join(notes[:8])}" + (" ..." if len(notes) > 8 else ""), stacklevel=4)


# ---- planning: what each pass takes, checked before anything changes ------------------------


@dataclass
class _Entry:
    role: str
    key: str
    last: int
    fixes: int | None


def _entry(obj: Any) -> _Entry:
    fixes = obj.fixes_at() if hasattr(obj, "fixes_at") else None
    return _Entry(obj.role, obj.key, obj.last_step() if hasattr(obj, "last_step") else 0, fixes)


def _existing(module: nn.Module, tensor: str) -> list[_Entry]:
    """What earlier compress calls left on ``module.<tensor>`` (parametrizations with a role)."""
    if not parametrize.is_parametrized(module, tensor):
        return []
    return [_entry(p) for p in module.parametrizations[tensor] if getattr(p, "role", "")]


def _check_order(entries: list[_Entry], p: LayerPass, what: str, where: str) -> None:
    for e in entries:
        if e.role == p.role:
            raise RecipeError(f"{where}: {what} is already {e.role} by an earlier '{e.key}' pass; "
                              f"a {p.tensor} takes one such pass")
        if e.role in p.must_precede:
            raise RecipeError(f"{where}: {what} is {e.role} by an earlier '{e.key}' pass; {p.must_precede[e.role]}")
    start = p.fixes_at()
    for e in entries:
        if start is not None and e.last > start:
            raise RecipeError(
                f"{where}: {what} would be fixed by '{p.key}' at step {start} while its '{e.key}' pass changes it "
                f"until step {e.last}; set {p.key} start_step >= {e.key} end_step"
            )


def raw_tensor(module: nn.Module, tensor: str):
    """The parameter behind ``module.<tensor>`` (its original when parametrized)."""
    return module.parametrizations[tensor].original if parametrize.is_parametrized(module, tensor) else getattr(module, tensor)


def holders(model: nn.Module) -> dict[int, list[tuple[str, str]]]:
    """``id(parameter) -> [(module name, tensor name), ...]`` for every parameter, ties included."""
    out: dict[int, list[tuple[str, str]]] = {}
    for mname, m in model.named_modules():
        for tname in list(m._parameters) + (list(m.parametrizations) if parametrize.is_parametrized(m) else []):
            t = raw_tensor(m, tname) if tname not in m._parameters else m._parameters[tname]
            if t is not None and not mname.endswith(".parametrizations") and ".parametrizations." not in mname:
                out.setdefault(id(t), []).append((mname, tname))
    return out


def _untie_check(p: LayerPass, taken: list[tuple[str, nn.Module, "LayerPass"]], model: nn.Module, where: str,
                 skipped: list[str]) -> list[tuple[str, nn.Module, "LayerPass"]]:
    """Tied tensors are compressed together or not at all: drop every layer whose tensor is shared
    with one this pass does not take (it keeps the shared float weight), and refuse tied layers
    that would get different arguments."""
    held = holders(model)
    planned = {(name, t) for name, m, own in taken for t, _ in own.tensors(m)}
    args = {name: own for name, _, own in taken}
    keep = []
    for name, module, own in taken:
        ok = True
        for t, _ in own.tensors(module):
            group = held.get(id(raw_tensor(module, t)), [(name, t)])
            outside = [f"{n}.{tt}" for n, tt in group if (n, tt) not in planned]
            if outside:
                skipped.append(f"{name}.{t} is tied to {', '.join(outside)}, which this pass does not take: both stay float")
                ok = False
            for n, _ in group:
                if n in args and args[n] != own:
                    raise RecipeError(f"{where}: tied layers '{n}' and '{name}' get different arguments "
                                      f"({args[n].to_dict()} vs {own.to_dict()}); give both the same")
        if ok:
            keep.append((name, module, own))
    return keep


def _override_targets(p: LayerPass, model: nn.Module, names: list[str], where: str) -> None:
    kinds = p.kinds()
    for pattern in p.overrides:
        if any(fnmatch.fnmatchcase(n, pattern) for n in names):
            continue
        other = [(n, m) for n, m in model.named_modules() if n and fnmatch.fnmatchcase(n, pattern)]
        if other:
            n, m = other[0]
            kind = kind_of(m)
            why = (f"its kind '{kind.name}' is not among this pass's targets {sorted(kinds)}" if kind
                   else f"{type(m).__name__} is not a layer kind torchzip can pack; kinds: {sorted(LAYER_KINDS)}")
            raise UnsupportedLayerError(f"{where}: override '{pattern}' names layer '{n}' ({type(m).__name__}), which "
                                        f"this pass cannot take: {why}")
        close = difflib.get_close_matches(pattern, names, n=3)
        raise UnsupportedLayerError(f"{where}: override '{pattern}' matches no layer this pass targets"
                                    + (f"; close names: {close}" if close else ""))


def plan_passes(passes: list[Pass], model: nn.Module) -> list[tuple[Plan | None, list[str]]]:
    """Check passes against a model without touching it.

    Returns, per pass, the layers it will take as ``(name, module, pass for that layer)`` (None
    for passes that are not per-layer) and the layers its general rule skips (with why). Raises
    :class:`RecipeError` for anything that cannot make sense: conflicting passes on one layer, an
    override a layer cannot honour, a model with no targeted layer.
    """
    states: dict[tuple[str, str], list[_Entry]] = {}
    plans: list[tuple[Plan | None, list[str]]] = []
    layer_passes = 0
    for index, p in enumerate(passes):
        where = f"pass #{index + 1} '{p.key}'"
        if not isinstance(p, LayerPass):
            plans.append((None, []))
            continue
        layer_passes += 1
        taken, skipped = [], []
        candidates = p.layers(model)
        _override_targets(p, model, [name for name, _ in candidates], where)
        for name, module in candidates:
            own, named = p.for_layer(name)
            reason = own.unfit(name, module) if own.tensors(module) else f"layer '{name}' has no {p.tensor} to compress"
            if reason and named:
                raise UnsupportedLayerError(f"{where}: {reason}; its override cannot be honoured")
            if reason:
                skipped.append(reason)
                continue
            taken.append((name, module, own))
        plan: Plan = []
        for name, module, own in _untie_check(p, taken, model, where, skipped):
            for t, _ in own.tensors(module):
                entries = states.setdefault((name, t), _existing(module, t))
                what = f"layer '{name}'" if t == "weight" else f"{t} of layer '{name}'"
                _check_order(entries, own, what, where)
                entries.append(_entry(own))
            plan.append((name, module, own))
        plans.append((plan, skipped))
    if layer_passes and not any(plan for plan, _ in plans if plan is not None):
        skipped = [reason for _, reasons in plans for reason in reasons]
        if skipped:
            raise UnsupportedLayerError("no targeted layer can take the recipe: " + "; ".join(skipped[:5]))
        raise RecipeError(
            "no layer of the model is targeted by the recipe: targets are matched by exact type "
            f"({', '.join(DEFAULT_TARGETS)} by default) and filtered by 'exclude'"
        )
    return plans


def attach(plan: Plan, make: Callable[["LayerPass", nn.Module, str, WeightView | None], nn.Module]) -> None:
    """Register ``make(pass, module, tensor name, view)`` as a parametrization on every planned
    tensor. A tensor several layers share (tied) gets one parametrization, registered on each of
    them, so the layers stay tied while they train and after ``freeze``."""
    made: dict[int, nn.Module] = {}
    for _, module, own in plan:
        for t, view in own.tensors(module):
            raw = raw_tensor(module, t)
            if id(raw) not in made:
                made[id(raw)] = make(own, module, t, view)
            # unsafe: torch's check would run the parametrization once over the whole weight (a
            # full-size temporary or three per layer); ours keep shape and dtype by construction.
            parametrize.register_parametrization(module, t, made[id(raw)], unsafe=True)


def no_passes_error() -> RecipeError:
    """The error for a recipe without passes: it would target no layer."""
    return RecipeError("the recipe has no passes, so it targets no layer; list at least one, e.g. "
                       f"passes: [{{prune: {{sparsity: 0.5}}}}] (passes: {', '.join(sorted(PASSES))})")


def context_keys() -> list[str]:
    """Objects registered passes take from ``compress(..., **context)``."""
    return sorted({k for cls in PASSES.values() for k in cls.context_keys})


def run_passes(model: nn.Module, passes: list[Pass], *, inplace: bool, progress: bool,
               context: dict[str, Any], calibration: Any = None) -> nn.Module:
    """Check ``passes`` against ``model``, then apply them in order (see :func:`torchzip.compress`)."""
    from torchzip.calibrate import as_batches, check_batches, why_not_calibrated

    if not isinstance(model, nn.Module):
        raise RecipeError(f"compress needs an nn.Module, got {type(model).__name__}")
    if not passes:
        raise no_passes_error()
    allowed = context_keys()
    unknown = sorted(set(context) - set(allowed))
    if unknown:
        raise RecipeError(f"unknown keyword argument(s) {unknown} for compress; allowed: inplace, progress"
                          + "".join(f", {k}" for k in allowed))
    batches = None if calibration is None else as_batches(calibration)
    if batches is not None:
        check_batches(model, batches)  # before any pass looks at them

    def given(p: Pass) -> dict[str, Any]:  # passes that want an example input get the batches
        return {"calibration": batches} if getattr(p, "takes_calibration", False) else {}

    for p in passes:
        p.check(model, dict(context, inplace=inplace, **given(p)))
    plans = plan_passes(passes, model)
    for index, p in enumerate(passes):
        if getattr(p, "first", False) and any(isinstance(q, LayerPass) for q in passes[:index]):
            raise RecipeError(f"pass #{index + 1} '{p.key}' must come before every pass that compresses layers")
    # Layers no data could calibrate (embeddings, say) are compressed from their weights either way.
    wanting = [f"'{own.key}' on {name}" for plan, _ in plans if plan for name, module, own in plan
               if own.needs_calibration() and why_not_calibrated(module) is None]
    if batches is None and wanting:
        raise CalibrationError(f"{len(wanting)} layer(s) need calibration data ({', '.join(wanting[:4])}"
                               + (" ..." if len(wanting) > 4 else "") + "): pass compress(model, recipe, "
                               "calibration=batches), or use the data-free choices (prune score: magnitude, "
                               "quantize method: round, codebook method: kmeans)")
    uses = [any(own.uses_calibration() for _, _, own in plan) if plan else False for plan, _ in plans]
    if batches is not None:
        if not any(uses) and not any(getattr(p, "takes_calibration", False) for p in passes):
            warnings.warn("calibration data was given but no pass of the recipe uses it", stacklevel=3)
    for index, (p, (_, skipped)) in enumerate(zip(passes, plans)):
        if skipped:
            warnings.warn(f"pass #{index + 1} '{p.key}' skipped {len(skipped)} layer(s) it cannot take: "
                          + "; ".join(skipped), stacklevel=3)
    if not inplace:
        model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    call = uuid.uuid4().hex[:8]  # group names must not collide with an earlier compress call's
    for index, (p, (plan, _)) in enumerate(zip(passes, plans)):
        if plan is None:
            p(model, **context, **given(p))
        elif batches is not None and uses[index]:
            p.apply_calibrated(model, [(name, modules[name], own) for name, _, own in plan], f"{p.key}{index}-{call}",
                               progress, batches)
        else:
            if p.block_tuning()[0]:
                warnings.warn(f"pass #{index + 1} '{p.key}': block tuning needs calibration data (compress(..., "
                              "calibration=batches)); the blocks are not tuned", stacklevel=3)
            p.apply(model, [(name, modules[name], own) for name, _, own in plan], f"{p.key}{index}-{call}", progress)
    return model
