"""Magnitude pruning: unstructured (per layer or global), N:M, output channels; gradual schedules.

A pruned weight carries a :class:`Mask` parametrization (``torch.nn.utils.parametrize``): the
layer keeps its type and its float master weight, and the weight every forward sees is
``master * mask``, so masked entries stay exactly zero whatever the optimizer does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from torchzip.errors import RecipeError
from torchzip.passes.base import check_choice, check_int, register_pass
from torchzip.passes.calibrated import sparsegpt
from torchzip.packed.layers import WeightView
from torchzip.passes.layer import LayerPass, attach, raw_tensor

PATTERNS = ("unstructured", "channel", "N:M (e.g. 2:4)")
NORMS = ("l1", "l2")
SCORES = ("auto", "magnitude", "wanda", "sparsegpt")


def parse_nm(pattern: str) -> tuple[int, int] | None:
    """``(n, m)`` for an ``"N:M"`` pattern string, else None."""
    found = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    return (int(found[1]), int(found[2])) if found else None


def _scores(w: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    # Already-pruned weights score below everything so they stay pruned as sparsity grows.
    s = w.detach().abs().float()
    return s if mask is None else torch.where(mask, s, torch.full_like(s, -1.0))


def _keep_all_but_lowest(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if n_prune:
        keep[torch.topk(scores.flatten(), n_prune, largest=False).indices] = False
    return keep.view(scores.shape)


def unstructured_mask(w: torch.Tensor, sparsity: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask that prunes exactly ``round(sparsity * numel)`` smallest-magnitude weights."""
    return _keep_all_but_lowest(_scores(w, mask), round(sparsity * w.numel()))


def global_masks(weights: list[torch.Tensor], sparsity: float, masks: list | None = None) -> list[torch.Tensor]:
    """Keep-masks pruning ``round(sparsity * total)`` smallest weights across all ``weights``."""
    masks = masks or [None] * len(weights)
    scores = torch.cat([_scores(w, m).flatten() for w, m in zip(weights, masks)])
    keep = _keep_all_but_lowest(scores, round(sparsity * scores.numel()))
    return [k.view(w.shape) for k, w in zip(torch.split(keep, [w.numel() for w in weights]), weights)]


def nm_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest of every ``m`` consecutive input weights of each output row."""
    w2 = w.detach().abs().reshape(w.shape[0], -1)
    groups = w2.reshape(w2.shape[0], -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, torch.topk(groups, n, dim=-1).indices, True)
    return keep.view(w.shape)


def channel_mask(w: torch.Tensor, sparsity: float, norm: str = "l2", mask: torch.Tensor | None = None) -> torch.Tensor:
    """Prune ``round(sparsity * out_channels)`` whole output rows with the smallest L1/L2 norm."""
    rows = w.detach().float().reshape(w.shape[0], -1)
    if mask is not None:
        rows = rows * mask.reshape(w.shape[0], -1)
    score = rows.abs().sum(1) if norm == "l1" else rows.pow(2).sum(1).sqrt()
    if mask is not None:  # pruned rows stay pruned
        score = torch.where(mask.reshape(w.shape[0], -1).any(1), score, torch.full_like(score, -1.0))
    keep = _keep_all_but_lowest(score, round(sparsity * w.shape[0]))
    return keep.view(-1, *([1] * (w.dim() - 1))).expand(w.shape).clone()


def wanda_scores(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Wanda (Sun et al., 2023): ``|w_ij| * ||x_j||``, the norm over calibration rows of input ``j``."""
    return w.detach().double().abs() * torch.diagonal(h).double().clamp(min=0).sqrt().unsqueeze(0)


def wanda_mask(w: torch.Tensor, h: torch.Tensor, *, pattern: str, sparsity: float, nm: tuple[int, int] | None,
               norm: str = "l2", mask: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask of ``w`` ``[N, K]`` by Wanda scores: the magnitude rules applied to the scores
    (unstructured: the ``round(sparsity * N * K)`` lowest; ``nm``: the ``n`` highest of every
    ``m``; channel: rows by the ``norm`` of their scores)."""
    score = wanda_scores(w, h)
    if nm:
        return nm_mask(score, *nm)
    if pattern == "channel":
        return channel_mask(score, sparsity, norm, mask)
    return unstructured_mask(score, sparsity, mask)


def cubic_sparsity(step: int, final: float, initial: float, start: int, end: int | None) -> float:
    """Zhu & Gupta (2017) schedule: ``s_f + (s_i - s_f) * (1 - progress)**3``, clamped to the ends."""
    if end is None or step >= end:
        return final
    if step <= start:
        return initial
    progress = (step - start) / (end - start)
    return final + (initial - final) * (1.0 - progress) ** 3


class Mask(nn.Module):
    """Parametrization ``w -> w * mask`` plus the schedule that grows the mask.

    ``step`` counts optimizer steps (advanced by :func:`torchzip.step`); it is a buffer so it
    is saved with the model and kept equal across DDP ranks. The mask has the tensor's own shape;
    patterns are computed on its matrix ``view`` (rows: output channels). ``tensor`` is the name
    of the parametrized tensor in its module.
    """

    role, key = "pruned", "prune"

    def __init__(self, mask: torch.Tensor, *, pattern: str, sparsity: float, scope: str, norm: str,
                 initial_sparsity: float, start_step: int, end_step: int | None, frequency: int, group: str,
                 view: WeightView | None = None, tensor: str = "weight") -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.pattern, self.sparsity, self.scope, self.norm = pattern, sparsity, scope, norm
        self.initial_sparsity, self.start_step, self.end_step, self.frequency = initial_sparsity, start_step, end_step, frequency
        self.group, self.view, self.tensor = group, view or WeightView(), tensor

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask

    def last_step(self) -> int:
        return self.end_step or 0

    def describe(self, state, w: torch.Tensor) -> None:
        """For ``freeze``: the keep-mask and its pattern (``"N:M"`` normalised)."""
        nm = parse_nm(self.pattern)
        state.mask = self.view.matrix(self.mask)
        state.pattern = f"{nm[0]}:{nm[1]}" if nm else self.pattern

    def target(self, step: int) -> float:
        """Sparsity the schedule asks for at ``step``."""
        return cubic_sparsity(step, self.sparsity, self.initial_sparsity, self.start_step, self.end_step)

    def due(self, step: int) -> bool:
        """Whether the mask is recomputed at ``step``."""
        if self.end_step is None or step < self.start_step or step > self.end_step:
            return False
        return (step - self.start_step) % self.frequency == 0 or step == self.end_step

    def recompute(self, w: torch.Tensor, sparsity: float) -> None:
        """Grow the mask to ``sparsity`` (per-layer scopes; global groups are handled together)."""
        m, mask = self.view.matrix(w), self.view.matrix(self.mask)
        keep = channel_mask(m, sparsity, self.norm, mask) if self.pattern == "channel" else unstructured_mask(m, sparsity, mask)
        self.mask.copy_(self.view.tensor(keep, w.shape))

    # -- schedule protocol (torchzip.schedule): masks of one prune pass advance together --------

    @property
    def schedule_key(self) -> str:
        return self.group

    @classmethod
    @torch.no_grad()
    def advance(cls, members: list[tuple[nn.Module, "Mask"]], to_end: bool = False) -> None:
        """One optimizer step for the masks of one group (or, ``to_end``, straight to the end of
        their schedule: masks only grow, so one recomputation at the final sparsity gives what
        stepping there would, the weights being unchanged)."""
        first = members[0][1]
        for _, m in members:
            m.step.fill_(max(int(m.step), m.end_step or 0) if to_end else int(m.step) + 1)
        step = int(first.step)

        def due(m: Mask) -> bool:
            return m.due(step) or (to_end and m.end_step is not None)

        if first.scope == "global":
            if not due(first):
                return
            weights = [mod.parametrizations[m.tensor].original for mod, m in members]
            for (_, m), keep in zip(members, global_masks(weights, first.target(step), [m.mask for _, m in members])):
                m.mask.copy_(keep)
            chosen = members
        else:
            chosen = [(mod, m) for mod, m in members if due(m)]
            for mod, m in chosen:
                m.recompute(mod.parametrizations[m.tensor].original, m.target(step))
        for mod, m in chosen:
            # Zero the master too, so a checkpoint of the original weights agrees with the mask.
            mod.parametrizations[m.tensor].original.mul_(m.mask)


def masks_of(module: nn.Module, tensor: str = "weight") -> Mask | None:
    """The :class:`Mask` parametrization on ``module.<tensor>``, if any."""
    if not parametrize.is_parametrized(module, tensor):
        return None
    return next((p for p in module.parametrizations[tensor] if isinstance(p, Mask)), None)


@register_pass
@dataclass
class Prune(LayerPass):
    """Magnitude pruning.

    ``pattern``: ``"unstructured"``, ``"channel"`` (whole output channels by ``norm``) or
    ``"N:M"`` such as ``"2:4"`` (keep N of every M consecutive input weights; ``sparsity`` is then
    ignored). ``scope``: ``"layer"`` (each layer reaches ``sparsity``) or ``"global"`` (one
    magnitude threshold across all targeted layers; unstructured only). With ``end_step`` set,
    sparsity grows from ``initial_sparsity`` at ``start_step`` to ``sparsity`` at ``end_step`` on
    Zhu & Gupta's cubic schedule, the mask recomputed every ``frequency`` steps.

    ``score``: ``magnitude``; ``wanda`` (``|w| * ||x||`` over calibration inputs); ``sparsegpt``
    (output-error pruning that also updates the kept weights; unstructured and N:M); ``auto``:
    ``sparsegpt`` (``wanda`` for channels) when ``compress`` is given calibration data and the
    prune is one-shot and per layer, else ``magnitude``. ``refit`` (SparseGPT only): after
    choosing the mask, set the kept weights of each row to the exact least-squares solution of
    its output error on the calibration data (costs about ``N * (K/2)^3 / 3`` flops per layer).
    """

    key = "prune"
    role = "pruned"
    must_precede = {"quantized": "prune before quantizing"}
    sparsity: float = 0.5
    pattern: str = "unstructured"
    scope: str = "layer"
    norm: str = "l2"
    initial_sparsity: float = 0.0
    start_step: int = 0
    end_step: int | None = None
    frequency: int = 1
    score: str = "auto"
    refit: bool = True

    def validate(self, where: str) -> None:
        """Raise :class:`RecipeError` for argument values that cannot work."""
        pattern = self.pattern
        if pattern not in ("unstructured", "channel") and parse_nm(pattern) is None:
            raise RecipeError(f"unknown pruning pattern {pattern!r} in {where}; allowed: {list(PATTERNS)}")
        nm = parse_nm(pattern)
        if nm and not 0 < nm[0] < nm[1]:
            raise RecipeError(f"N:M pattern {pattern!r} in {where} needs 0 < N < M")
        for key in ("sparsity", "initial_sparsity"):
            value = getattr(self, key)
            if type(value) not in (int, float) or not 0.0 <= value < 1.0:
                raise RecipeError(f"{key} must be in [0, 1), got {value!r} in {where}")
        if self.scope not in ("layer", "global"):
            raise RecipeError(f"scope must be 'layer' or 'global', got {self.scope!r} in {where}")
        if self.scope == "global" and pattern != "unstructured":
            raise RecipeError(f"scope 'global' needs pattern 'unstructured', got {pattern!r} in {where}")
        if self.scope == "global" and self.overrides:
            raise RecipeError("global pruning uses one threshold for all layers: overrides are not allowed with scope 'global'")
        check_choice(where, "norm", self.norm, NORMS)
        if self.initial_sparsity > self.sparsity:
            raise RecipeError(f"initial_sparsity {self.initial_sparsity} exceeds sparsity {self.sparsity} in {where}: masks only grow")
        check_int(where, "frequency", self.frequency, low=1)
        check_choice(where, "score", self.score, SCORES)
        if not isinstance(self.refit, bool):
            raise RecipeError(f"refit must be true or false, got {self.refit!r} in {where}")
        if self.score in ("wanda", "sparsegpt") and (self.end_step is not None or self.scope != "layer"):
            raise RecipeError(f"score '{self.score}' prunes once per layer on calibration data: it needs end_step null "
                              f"and scope 'layer' in {where} (gradual and global pruning use score magnitude)")
        if self.score == "sparsegpt" and pattern == "channel":
            raise RecipeError(f"score 'sparsegpt' prunes weights, not channels, in {where}; use wanda or magnitude "
                              "for pattern 'channel'")
        end, start = self.end_step, self.start_step
        check_int(where, "start_step", start)
        if end is not None:
            if nm:
                raise RecipeError(f"N:M pruning is applied at once; remove end_step from {where}")
            if type(end) is not int or not start < end:
                raise RecipeError(f"need 0 <= start_step < end_step, got {start!r}, {end!r} in {where}")

    def unfit(self, name: str, module: nn.Module) -> str | None:
        """Why ``module`` cannot take this pruning, or None."""
        nm = parse_nm(self.pattern)
        for t, view in self.tensors(module):
            k = view.matrix_shape(getattr(module, t).shape)[1]
            if nm and k % nm[1]:
                what = f"layer '{name}'" if t == "weight" else f"'{name}.{t}'"
                return f"{self.pattern} needs in_features divisible by {nm[1]}, {what} has {k}"
        return None

    def last_step(self) -> int:
        return self.end_step or 0

    def _initial(self) -> float:
        return cubic_sparsity(0, self.sparsity, self.initial_sparsity, self.start_step, self.end_step)

    def keep(self, w: torch.Tensor, view: WeightView) -> torch.Tensor:
        """This pass's starting keep-mask for one tensor (per-layer scopes), in its own shape."""
        m, nm = view.matrix(w), parse_nm(self.pattern)
        if nm:
            keep = nm_mask(m, *nm)
        elif self.pattern == "channel":
            keep = channel_mask(m, self._initial(), self.norm)
        else:
            keep = unstructured_mask(m, self._initial())
        return view.tensor(keep, w.shape)

    def needs_calibration(self) -> bool:
        """Wanda and SparseGPT scores need calibration data."""
        return self.score in ("wanda", "sparsegpt")

    def uses_calibration(self) -> bool:
        """One-shot per-layer pruning uses data when given (``score`` other than magnitude)."""
        return self.score != "magnitude" and self.end_step is None and self.scope == "layer"

    def compress_calibrated(self, name: str, module: nn.Module, h: torch.Tensor, group: str) -> None:
        """Prune one layer by Wanda scores or SparseGPT (which also rewrites its kept weights)."""
        (tensor, view), = self.tensors(module)
        w = getattr(module, tensor)
        m, nm = view.matrix(w.detach()), parse_nm(self.pattern)
        score = self.score if self.score != "auto" else ("wanda" if self.pattern == "channel" else "sparsegpt")
        if score == "sparsegpt":
            # N:M: groups by decreasing input energy (all-MiniLM 2:4 + int8: cos 0.8827 -> 0.8868 with 128
            # calibration sentences, 0.8979 -> 0.8983 with 256).
            new, keep = sparsegpt(m, h, sparsity=self.sparsity, nm=nm, refit=self.refit, group_order=nm is not None)
            with torch.no_grad():
                raw_tensor(module, tensor).copy_(view.tensor(new.to(w.dtype), w.shape))
        else:
            keep = wanda_mask(m, h, pattern=self.pattern, sparsity=self.sparsity, nm=nm, norm=self.norm)
        keep = view.tensor(keep, w.shape).clone()
        attach([(name, module, self)], lambda own, mod, t, v: self._mask(keep, group, v, t))

    def _mask(self, keep: torch.Tensor, group: str, view: WeightView, tensor: str) -> Mask:
        opts = {k: getattr(self, k) for k in ("pattern", "sparsity", "scope", "norm", "initial_sparsity", "start_step",
                                              "end_step", "frequency")}
        return Mask(keep, group=group, view=view, tensor=tensor, **opts)

    def apply(self, model: nn.Module, plan: list, group: str, progress: bool = False) -> None:
        """Attach masks to the planned layers at the schedule's starting sparsity."""
        keeps: dict[int, torch.Tensor] = {}
        if self.scope == "global":  # one threshold over every distinct planned tensor
            tensors = {id(raw_tensor(m, t)): getattr(m, t) for _, m, own in plan for t, _ in own.tensors(m)}
            keeps = dict(zip(tensors, global_masks(list(tensors.values()), self._initial())))

        def make(own: "Prune", module: nn.Module, tensor: str, view: WeightView) -> Mask:
            w = getattr(module, tensor)
            keep = keeps[id(raw_tensor(module, tensor))] if own.scope == "global" else own.keep(w, view)
            return own._mask(keep, group, view, tensor)

        attach(plan, make)
