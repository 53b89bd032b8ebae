"""Calibration: the input statistics of each layer, gathered layer by layer on calibration data.

``compress(model, recipe, calibration=batches)`` gives the batches to every pass that uses
data. Such a pass calls :func:`sweep`, which visits its layers in the order the model first
calls them, in groups of layers that read the same input tensor (q/k/v, gate/up). For each group
it runs the batches through the model, whose earlier layers are already compressed, so a layer
is calibrated on what the compressed model feeds it (sequential, as GPTQ does). Forward hooks
sum ``X^T X`` of the group's inputs (float32 per batch, summed in float64): nothing but one
``[K, K]`` matrix per layer of the group is kept, and once every layer of the group has seen its
input the forward is stopped by an exception, so later layers do not run.

When the model runs a list of blocks as a chain (a transformer's layers: each block's first
argument is the previous block's output, its other arguments the same objects; checked on one
recorded forward), the sweep keeps the current block's inputs for every batch and re-runs only
that block for each of its groups, then once more to make the next block's inputs: a few model
passes in all instead of one per group, with the same statistics. Padding tokens (zeros of a
dict batch's ``attention_mask``) are left out of ``X^T X``: they are part of no output.

With a ``reference`` (a float copy of the model), each batch also runs through it, and the sweep
sums the cross moment ``X_ref^T X`` of each layer's float and compressed inputs, for passes that
fit the float model's outputs (``codebook: {float_targets: true}``).

Block tuning (``codebook: {block_tune: steps}``, BRECQ-style block reconstruction): once every
layer of a block is compressed, its continuous parameters (codebook centroids, biases, norm
weights) take ``steps`` Adam steps on the cached block inputs so that the block's output matches
the float block's (:func:`tune_block`); the next block is then calibrated on the tuned block's
outputs.

A batch is what the model is called with: a tensor (``model(x)``), a tuple or list
(``model(*x)``), or a dict (``model(**x)``, Hugging Face style).
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from torchzip.errors import CalibrationError, DistillationError
from torchzip.packed.layers import kind_of
from torchzip.progress import bar
from torchzip.train.batches import call_model, eval_mode, extract_logits

# Layer kinds whose input rows we can form: the weight's [N, K] matrix times one row of K inputs.
CALIBRATED_KINDS = ("Linear", "Conv1D", "Conv1d", "Conv2d")


class _Stop(Exception):
    """Raised by a hook once the layers being calibrated have seen this batch."""


# Layer kinds whose inputs carry no statistics (a lookup), calibrated by their outputs' effect instead.
OUTPUT_METRIC_KINDS = ("Embedding",)

# Random output directions per batch for output_metrics: an unbiased estimate of J^T J with a few
# backward passes. With 8, 2:4 + int8 embeddings of all-MiniLM-L6-v2 alone: cos 0.9752 -> 0.9847.
PROBES = 8


# The most bytes of block inputs the sweep keeps (one set per batch) to re-run a block alone;
# beyond it, every group re-runs the model from its inputs.
CACHE_BYTES = 2 << 30


def as_batches(calibration: Any) -> list:
    """The calibration batches as a list; :class:`CalibrationError` if there are none."""
    if isinstance(calibration, (torch.Tensor, dict)) or not isinstance(calibration, Iterable):
        raise CalibrationError(f"calibration must be an iterable of batches (a list or a DataLoader of tensors, "
                               f"tuples or dicts), got {type(calibration).__name__}; wrap one batch in a list")
    batches = list(calibration)
    if not batches:
        raise CalibrationError("calibration is empty: give at least one batch (a few hundred inputs in all is typical)")
    return batches


@torch.no_grad()
def check_batches(model: nn.Module, batches: list) -> None:
    """Run every batch through ``model`` (eval mode, no gradients, nothing changed); a batch the
    model cannot run raises :class:`CalibrationError` naming it."""
    with eval_mode(model):
        for i, batch in enumerate(batches):
            try:
                call_model(model, batch)
            except Exception as err:  # noqa: BLE001  (any failure means the data does not fit)
                raise CalibrationError(
                    f"calibration batch #{i} cannot run through the model ({type(err).__name__}: {err}); a batch is "
                    "called as model(x) for a tensor, model(*x) for a tuple/list, model(**x) for a dict") from None


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows ``[M, K]`` the weight matrix of ``module`` multiplies, from its input ``x``
    (convolutions: the unfolded patches, in the order of ``weight.reshape(out, -1)``). Only for
    layers :func:`why_not_calibrated` accepts."""
    if not isinstance(module, (nn.Conv1d, nn.Conv2d)):  # Linear, Conv1D
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, nn.Conv1d):
        cols = F.unfold(x.unsqueeze(-2), (1, module.kernel_size[0]), dilation=(1, module.dilation[0]),
                        padding=(0, module.padding[0]), stride=(1, module.stride[0]))
    else:
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def why_not_calibrated(module: nn.Module) -> str | None:
    """Why a layer cannot be calibrated (it is then compressed from its weights alone), or None."""
    kind = kind_of(module)
    if kind is None or kind.name not in CALIBRATED_KINDS:
        return f"{type(module).__name__} layers are not calibrated (kinds calibrated: {', '.join(CALIBRATED_KINDS)})"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.groups != 1:
            return "grouped convolutions are not calibrated"
        if isinstance(module.padding, str) or (module.padding_mode != "zeros" and any(module.padding)):
            return f"convolutions with padding {module.padding!r} ({module.padding_mode}) are not calibrated"
    return None


def token_mask(batch: Any) -> torch.Tensor | None:
    """The real (not padding) tokens of a dict batch, from its ``attention_mask`` ``[batch,
    tokens]`` (Hugging Face style), or None."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


GRAM_BLOCK = 768  # columns a block of the Gram matrix: from 2 blocks wide, only those on and above the diagonal are multiplied


def gram(rows: torch.Tensor) -> torch.Tensor:
    """``rows^T rows`` ``[K, K]``: for wide rows only the blocks of columns on and above the
    diagonal are multiplied and mirrored (K = 3072: 5/8 of the flops of the whole product)."""
    k = rows.shape[1]
    if k < 2 * GRAM_BLOCK:
        return rows.T @ rows
    out = torch.empty(k, k, dtype=rows.dtype, device=rows.device)
    for i in range(0, k, GRAM_BLOCK):
        part = rows[:, i:i + GRAM_BLOCK].T @ rows[:, i:]  # block row i, from the diagonal on
        out[i:i + GRAM_BLOCK, i:] = part
        out[i:, i:i + GRAM_BLOCK] = part.T
    return out


class _Accumulator:
    """``X^T X`` of one layer's input rows, summed in float64 over calls; with reference rows
    (the same rows as the float model computes them), also ``X_ref^T X``."""

    def __init__(self, module: nn.Module) -> None:
        self.module, self.h, self.cross, self.rows, self.calls = module, None, None, 0, 0
        self.paired = True

    def rows_of(self, x: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """The input rows of one call, float32, padding tokens left out."""
        x = x.detach()
        if tokens is not None and x.dim() == 3 and x.shape[:2] == tokens.shape and kind_of(self.module).name in ("Linear", "Conv1D"):
            x = x[tokens]  # padding positions are not part of any output: leave them out
        return input_rows(self.module, x).float()

    def row_form(self) -> tuple:
        """What :func:`input_rows` makes of an input for this layer: layers of one form make the
        same rows of the same tensor."""
        m = self.module
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            return type(m).__name__, m.kernel_size, m.dilation, m.padding, m.stride
        return ("rows",)

    def add(self, x: torch.Tensor, tokens: torch.Tensor | None = None, reference: torch.Tensor | None = None,
            memo: dict | None = None) -> None:
        """Add one call's rows. ``memo`` (one dict per model call, no ``reference``): ``X^T X`` of
        a tensor already summed for another layer that reads it (q, k and v) is reused."""
        key = (id(x), self.row_form())
        hit = memo.get(key) if memo is not None and reference is None else None
        if hit is not None and hit[0] is x and hit[3] == x._version:  # the same tensor, unchanged
            count, xtx = hit[1], hit[2]
        else:
            rows = self.rows_of(x, tokens)
            count, xtx = rows.shape[0], gram(rows).double()  # float32 product per batch, float64 sum across batches
            if memo is not None and reference is None:
                memo[key] = (x, count, xtx, x._version)
            if reference is not None and reference.shape == rows.shape:
                cross = (reference.T @ rows).double()
                self.cross = cross if self.cross is None else self.cross + cross
            elif reference is not None or self.cross is not None:
                self.paired = False  # rows without their float twin (a layer called twice): no cross moment
        self.h = xtx.clone() if self.h is None else self.h + xtx  # its own copy: xtx may be a sibling's
        self.rows += count
        self.calls += 1


def _plain(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _same(a: Any, b: Any) -> bool:
    """Whether two block arguments are the same thing: one tensor object, or equal plain values
    (anything else, such as a key-value cache object the block may change, is not re-runnable)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return _plain(a) and _plain(b) and a == b


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    out, todo = [], list(args) + list(kwargs.values())
    while todo:
        v = todo.pop()
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (tuple, list)):
            todo.extend(v)
    return out


class _Plan:
    """What one recorded forward tells the sweep: the groups of layers in call order, and, when the
    model runs a list of blocks as a chain (each block's first argument is the previous block's
    output, its other arguments the same objects), which block each group lies in, so that a
    group can be calibrated by re-running its block alone on that block's cached inputs."""

    def __init__(self, model: nn.Module, layers: list[tuple[str, nn.Module]], batch: Any) -> None:
        self.blocks = _block_list(model, layers)
        first: dict[int, tuple[int, int, int | None]] = {}  # layer -> (call position, input id, block)
        seen: list[Any] = []  # keeps inputs alive, so their ids stay unique during the forward
        calls: list[tuple[int, tuple, dict, list[int]]] = []  # block, args, kwargs, tensor versions
        outputs: dict[int, Any] = {}
        changed: list[int] = []
        current: list[int | None] = [None]

        def layer_hook(i: int) -> Callable:
            def record(module: nn.Module, args: tuple) -> None:
                if i not in first and args and isinstance(args[0], torch.Tensor):
                    seen.append(args[0])
                    first[i] = (len(first), id(args[0]), current[0])
            return record

        def block_pre(b: int) -> Callable:
            def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
                calls.append((b, args, kwargs, [t._version for t in _tensors(args, kwargs)]))
                current[0] = b
            return record

        def block_post(b: int) -> Callable:
            def record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
                # A block that changes its inputs in place cannot be re-run on them.
                if [t._version for t in _tensors(args, kwargs)] != calls[-1][3]:
                    changed.append(b)
                outputs[b] = output
                current[0] = None
            return record

        handles = [m.register_forward_pre_hook(layer_hook(i)) for i, (_, m) in enumerate(layers)]
        for b, block in enumerate(self.blocks or []):
            handles.append(block.register_forward_pre_hook(block_pre(b), with_kwargs=True))
            handles.append(block.register_forward_hook(block_post(b), with_kwargs=True))
        try:
            with torch.no_grad(), eval_mode(model):
                call_model(model, batch)
        finally:
            for h in handles:
                h.remove()
        self.groups: list[list[int]] = []
        by_input: dict[int, list[int]] = {}
        where: dict[int, int | None] = {}
        for i, (_, tid, block) in sorted(first.items(), key=lambda item: item[1][0]):
            if tid in by_input:
                by_input[tid].append(i)
                if where[id(by_input[tid])] != block:
                    where[id(by_input[tid])] = None
            else:
                by_input[tid] = [i]
                self.groups.append(by_input[tid])
                where[id(by_input[tid])] = block
        self.tuple_out = False
        if self.blocks is None or changed or not self._chain(calls, outputs):
            self.blocks = None
        self.block_of = [None if self.blocks is None else where[id(g)] for g in self.groups]

    def _chain(self, calls: list, outputs: dict) -> bool:
        if [c[0] for c in calls] != list(range(len(self.blocks))):
            return False  # each block once, in order
        for b, args, kwargs, _ in calls:
            if not args or not isinstance(args[0], torch.Tensor):
                return False
            if b == 0:
                if not all(_same(a, a) for a in list(args[1:]) + list(kwargs.values())):
                    return False
                continue
            prev_args, prev_kwargs, out = calls[b - 1][1], calls[b - 1][2], outputs.get(b - 1)
            if args[0] is out:
                tuple_out = False
            elif isinstance(out, (tuple, list)) and out and args[0] is out[0]:
                tuple_out = True
            else:
                return False
            if (b > 1 and tuple_out != self.tuple_out) or len(args) != len(prev_args) or kwargs.keys() != prev_kwargs.keys():
                return False
            self.tuple_out = tuple_out
            if not all(_same(a, p) for a, p in zip(args[1:], prev_args[1:])):
                return False
            if not all(_same(v, prev_kwargs[k]) for k, v in kwargs.items()):
                return False
        return True


def _block_list(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> list[nn.Module] | None:
    """The children of the ``ModuleList``/``Sequential`` (two or more children) that holds the most
    of ``layers`` (a transformer's list of blocks), or None."""
    ids = {id(m) for _, m in layers}
    best, most = None, 0
    for m in model.modules():
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) >= 2:
            count = sum(1 for sub in m.modules() if id(sub) in ids)
            if count > most:
                best, most = list(m), count
    return best


class _BlockInputs:
    """The inputs ``(args, kwargs)`` one block receives for every batch, to re-run it alone."""

    def __init__(self, block: int, inputs: list[tuple[tuple, dict]]) -> None:
        self.block, self.inputs = block, inputs

    @classmethod
    def capture(cls, model: nn.Module, blocks: list[nn.Module], b: int, batches: list) -> "_BlockInputs | None":
        """Run the model up to block ``b`` for every batch; None if a batch does not reach it or
        the inputs would take more than :data:`CACHE_BYTES`."""
        got: list[tuple[tuple, dict]] = []

        def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
            got.append((args, kwargs))
            raise _Stop

        handle = blocks[b].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad(), eval_mode(model), parametrize.cached():
                for batch in batches:
                    count = len(got)
                    try:
                        call_model(model, batch)
                    except _Stop:
                        pass
                    if len(got) == count:
                        return None
        finally:
            handle.remove()
        sizes = {t.data_ptr(): t.numel() * t.element_size() for a, k in got for t in _tensors(a, k)}
        return cls(b, got) if sum(sizes.values()) <= CACHE_BYTES else None

    def advance(self, model: nn.Module, blocks: list[nn.Module], tuple_out: bool) -> None:
        """Run this block (now compressed) on its inputs: they become the next block's."""
        with torch.no_grad(), eval_mode(model), parametrize.cached():
            for n, (args, kwargs) in enumerate(self.inputs):
                out = blocks[self.block](*args, **kwargs)
                self.inputs[n] = ((out[0] if tuple_out else out,) + tuple(args[1:]), kwargs)
        self.block += 1


def _twins(model: nn.Module, reference: nn.Module, modules: list[nn.Module]) -> list[nn.Module]:
    """The modules of ``reference`` (a copy of ``model``) with the names ``modules`` have in ``model``."""
    names = {id(m): n for n, m in model.named_modules()}
    theirs = dict(reference.named_modules())
    return [theirs[names[id(m)]] for m in modules]


NORM_FLOOR = 1e-2  # block tuning: no output dimension weighs more than 100x one of average mean square
BLOCK_TUNE_LR = 1e-4  # Adam's step for block tuning (centroids are ~1e-2: a step moves each by about this)


def tunable(block: nn.Module) -> list[nn.Parameter]:
    """The continuous parameters block tuning adjusts in a compressed ``block``: codebook
    centroids (``*.centroids`` of a parametrization), biases that are plain parameters, and the
    parameters of normalisation layers (modules whose class name holds ``Norm``). Float weights
    and fixed codes are left alone."""
    out: dict[int, nn.Parameter] = {}
    for name, p in block.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "centroids" or (leaf == "bias" and ".parametrizations." not in f".{name}"):
            out[id(p)] = p
    for m in block.modules():
        if "Norm" in type(m).__name__:
            for p in m.parameters(recurse=False):
                out[id(p)] = p
    return [p for p in out.values() if p.is_floating_point()]


def _real(out: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
    """The block output as rows ``[M, D]`` (D: the last dimension), padding tokens left out."""
    if tokens is not None and out.dim() == 3 and out.shape[:2] == tokens.shape:
        return out[tokens]
    return out.reshape(-1, out.shape[-1])


def block_error(out: torch.Tensor, target: torch.Tensor, tokens: torch.Tensor | None,
                weight: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_t sum_d weight_d (out - target)_td^2`` over the real tokens ``t`` (``tokens``: the
    batch's attention mask) and the output's last dimension ``d`` (``weight`` None: all 1)."""
    diff = _real(out, tokens) - _real(target, tokens).to(out.dtype)
    sq = diff * diff
    return (sq if weight is None else sq * weight.to(sq.dtype)).sum()


def tune_block(block: nn.Module, inputs: list[tuple[tuple, dict]], targets: list[torch.Tensor],
               tokens: list[torch.Tensor | None], steps: int, lr: float = BLOCK_TUNE_LR, *,
               tuple_out: bool = False, normalise: bool = True) -> tuple[float, float]:
    """Block reconstruction: ``steps`` Adam steps (cosine-decayed ``lr``) on the :func:`tunable`
    parameters of ``block`` so that its outputs on ``inputs`` (``(args, kwargs)`` per batch, one
    batch a step in turn) match ``targets`` (the float block's outputs), in the error
    :func:`block_error` per real token. ``normalise``: each output dimension's error is divided by
    the mean square of its targets (at least :data:`NORM_FLOOR` times their mean over dimensions),
    so outlier dimensions (BERT has a few, ~10-100x the others) do not drown the rest. Eval mode; every other parameter is frozen meanwhile. If the tuned block's
    error over all batches is not lower than before, the parameters are put back. Returns the
    error per token over all batches ``(before, after)``."""
    params = tunable(block)
    weight = None
    if normalise:
        total, count = None, 0
        for t, m in zip(targets, tokens):
            rows = _real(t, m).double()
            total = (rows * rows).sum(0) if total is None else total + (rows * rows).sum(0)
            count += rows.shape[0]
        square = total / max(count, 1)
        # A floor: a dimension whose targets are all zero (a LayerNorm weight of 0: all-MiniLM's
        # last layer has two) would otherwise weigh without bound.
        weight = (1 / square.clamp(min=NORM_FLOOR * float(square.mean().clamp(min=1e-30)))).float()
    n_tokens = [max(1, _real(t, m).shape[0]) for t, m in zip(targets, tokens)]

    def error() -> float:
        with torch.no_grad():
            got = [block(*a, **k) for a, k in inputs]
        return sum(float(block_error(o[0] if tuple_out else o, t, m, weight)) for o, t, m in zip(got, targets, tokens)) \
            / sum(n_tokens)

    if not params or steps <= 0:
        e = error()
        return e, e
    frozen = [(p, p.requires_grad) for p in block.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    saved = [p.detach().clone() for p in params]
    try:
        with eval_mode(block):
            before = error()
            opt = torch.optim.Adam(params, lr=lr)
            with torch.enable_grad():
                for step in range(steps):
                    for group in opt.param_groups:  # cosine decay to zero over the steps
                        group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
                    n = step % len(inputs)
                    args, kwargs = inputs[n]
                    out = block(*args, **kwargs)
                    loss = block_error(out[0] if tuple_out else out, targets[n], tokens[n], weight) / n_tokens[n]
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            after = error()
            if not after < before:  # tuning made it worse on its own data: undo
                with torch.no_grad():
                    for p, s in zip(params, saved):
                        p.copy_(s)
                after = before
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    return before, after


def sweep(model: nn.Module, layers: list[tuple[str, nn.Module]], batches: list,
          compress_layer: Callable[..., None], *, progress: bool = False, desc: str = "calibrate",
          reuse_blocks: bool = True, reference: nn.Module | None = None, tune_steps: int = 0,
          tune_lr: float = BLOCK_TUNE_LR, tune_target: str = "model", tune_log: list | None = None) -> list[int]:
    """Calibrate ``layers`` in the order the model calls them: for each group (layers sharing an
    input), sum ``X^T X`` of their inputs over ``batches`` with the model as compressed so far,
    then call ``compress_layer(index into layers, H)`` for each. Returns the indices of layers
    the model never called (they get no statistics).

    ``reference``: an uncompressed copy of ``model`` (same module names). Each batch then also
    runs through it, and ``compress_layer(i, H, C)`` gets ``C = X_ref^T X``, the cross moment of
    the layer's float inputs ``X_ref`` with its inputs in the compressed model ``X`` (row by
    row, the same tokens), for passes that fit the float model's outputs.

    When the model runs its layers' blocks as a chain (a transformer's layer list), the inputs
    of the current block are kept for every batch and only that block is re-run per group, then
    once more to make the next block's inputs: a few model passes in all instead of one per
    group. ``reuse_blocks=False`` re-runs the whole model per group (same statistics, slower).

    ``tune_steps`` > 0 (needs that chain of blocks): once every group of a block is compressed,
    :func:`tune_block` tunes the block on its cached inputs before the next block's inputs are
    made from it, towards the float outputs: ``tune_target="model"``, the float model's block
    outputs on its own (float) inputs, so tuning also makes up for the error of the blocks before
    (needs ``reference``; without one, ``"block"``); ``"block"``, the float block's outputs on
    the compressed model's inputs (the block as it was before this sweep compressed it).
    ``tune_log``: a list that gets ``(block index, error before, error after)`` per tuned block.
    """
    plan = _Plan(model, layers, batches[0])
    blocks = plan.blocks if reuse_blocks else None
    ref_layers = None if reference is None else _twins(model, reference, [m for _, m in layers])
    ref_blocks = None if reference is None or blocks is None else _twins(model, reference, blocks)
    cache: _BlockInputs | None = None
    ref_cache: _BlockInputs | None = None
    use_cache = blocks is not None
    done = {i for g in plan.groups for i in g}
    if tune_steps and blocks is None:
        warnings.warn("block tuning needs a model that runs its layers' blocks as a chain (a transformer's layer "
                      "list, each block called with the previous one's output and nothing that changes between "
                      "calls, such as a key-value cache: use_cache=False for Hugging Face models); this one does "
                      "not: the blocks are not tuned", stacklevel=6)
    tokens = [token_mask(batch) for batch in batches]
    float_block: list[nn.Module | None] = [None]  # the current block before compression ("block" target, no reference)
    tuned: set[int] = set()

    def finish() -> None:
        """Tune the cached block, once, now that its groups are compressed."""
        if not tune_steps or cache is None or cache.block in tuned:
            return
        b = cache.block
        tuned.add(b)
        if ref_cache is not None and tune_target == "model":
            source, inputs = ref_blocks[b], ref_cache.inputs
        else:
            source, inputs = (ref_blocks[b] if ref_blocks is not None else float_block[0]), cache.inputs
        with torch.no_grad(), eval_mode(source):
            outs = [source(*args, **kwargs) for args, kwargs in inputs]
        targets = [o[0] if plan.tuple_out else o for o in outs]
        errors = tune_block(blocks[b], cache.inputs, targets, tokens, tune_steps, tune_lr, tuple_out=plan.tuple_out)
        float_block[0] = None
        if tune_log is not None:
            tune_log.append((b,) + errors)

    def moved() -> None:
        if tune_steps and reference is None and cache is not None:
            float_block[0] = copy.deepcopy(blocks[cache.block])  # before any of its layers is compressed here

    for group, b in zip(bar(plan.groups, progress, desc=desc, leave=False), plan.block_of):
        run = ref_run = None
        if cache is not None and cache.block != b:
            finish()
        if use_cache and b is not None:
            if cache is not None and cache.block == b - 1:
                cache.advance(model, blocks, plan.tuple_out)
                if ref_cache is not None:
                    ref_cache.advance(reference, ref_blocks, plan.tuple_out)
                moved()
            elif cache is None or cache.block != b:
                cache = _BlockInputs.capture(model, blocks, b, batches)
                if cache is not None and reference is not None:
                    ref_cache = _BlockInputs.capture(reference, ref_blocks, b, batches)
                    cache = cache if ref_cache is not None else None
                use_cache = cache is not None  # too big or unreachable: the whole model from now on
                moved()
            if cache is not None:
                run = [(blocks[b], args, kwargs) for args, kwargs in cache.inputs]
                if ref_cache is not None:
                    ref_run = [(ref_blocks[b], args, kwargs) for args, kwargs in ref_cache.inputs]
        if reference is None:
            stats = _accumulate(model, layers, group, batches, run)
        else:
            stats = _accumulate(model, layers, group, batches, run, reference, ref_layers, ref_run)
        for i in group:
            if stats[i].h is not None:
                if reference is None:
                    compress_layer(i, stats[i].h)
                else:  # None when some rows had no float twin: the pass then uses its usual target
                    compress_layer(i, stats[i].h, stats[i].cross if stats[i].paired else None)
    finish()
    return [i for i in range(len(layers)) if i not in done]


def _calls(model: nn.Module, batches: list, run: list[tuple[nn.Module, tuple, dict]] | None) -> list[Callable]:
    if run is None:
        return [(lambda b=b: call_model(model, b)) for b in batches]
    return [(lambda m=m, a=a, k=k: m(*a, **k)) for m, a, k in run]


def _accumulate(model: nn.Module, layers: list[tuple[str, nn.Module]], group: list[int], batches: list,
                run: list[tuple[nn.Module, tuple, dict]] | None, reference: nn.Module | None = None,
                ref_layers: list[nn.Module] | None = None,
                ref_run: list[tuple[nn.Module, tuple, dict]] | None = None) -> dict[int, _Accumulator]:
    """``X^T X`` of the group's inputs: the model on every batch, or (``run``) one block on its
    cached inputs; each forward stops once every layer of the group has seen its input. With a
    ``reference`` model, each batch first runs through it (or ``ref_run``'s block) to record the
    group's float input rows, which the cross moments then pair with the model's."""
    stats = {i: _Accumulator(layers[i][1]) for i in group}
    pending: set[int] = set()
    tokens: list[torch.Tensor | None] = [None]
    ref_rows: dict[int, torch.Tensor] = {}
    memo: dict = {}  # X^T X of the current call's inputs, by tensor, for layers that share one

    def hook(i: int) -> Callable:
        def record(module: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor):
                if reference is None:
                    stats[i].add(args[0], tokens[0], memo=memo)
                elif i in ref_rows:
                    stats[i].add(args[0], tokens[0], ref_rows.pop(i))
                else:
                    stats[i].add(args[0], tokens[0])
                    stats[i].paired = False
            pending.discard(i)
            if not pending:
                raise _Stop
        return record

    def ref_hook(i: int) -> Callable:
        def record(module: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor):
                ref_rows[i] = stats[i].rows_of(args[0], tokens[0])
            pending.discard(i)
            if not pending:
                raise _Stop
        return record

    handles = [layers[i][1].register_forward_pre_hook(hook(i)) for i in group]
    if reference is not None:
        handles += [ref_layers[i].register_forward_pre_hook(ref_hook(i)) for i in group]
    calls = _calls(model, batches, run)
    ref_calls = [None] * len(batches) if reference is None else _calls(reference, batches, ref_run)
    try:
        # Compressed weights are rebuilt once for all the batches, not once a batch (no layer
        # changes while the group's statistics are summed).
        with torch.no_grad(), eval_mode(model), eval_mode(reference) if reference is not None else contextlib.nullcontext(), \
                parametrize.cached():
            for call, ref_call, batch in zip(calls, ref_calls, batches):
                tokens[0] = token_mask(batch)
                for c in ([ref_call] if ref_call is not None else []) + [call]:
                    pending.update(group)
                    memo.clear()
                    try:
                        c()
                    except _Stop:
                        pass
    finally:
        for h in handles:
            h.remove()
    return stats


def output_metrics(model: nn.Module, modules: list[nn.Module], batches: list, probes: int = PROBES,
                   seed: int = 0) -> list[torch.Tensor | None]:
    """For each of ``modules`` (layers whose input is a lookup, such as embeddings), the metric
    ``G = sum_t J_t^T J_t`` ``[K, K]`` (float64) of the model output's squared error over a change
    to one row ``t`` of the module's output (``K`` its last dimension): the output error of a
    change ``E`` to a weight whose rows are output rows (an embedding table) is then about
    ``sum_i E_i G E_i^T``, the form the calibrated passes minimise (``H`` for a linear layer).

    ``J^T J`` is estimated with ``probes`` random directions ``v`` of the output per batch (the
    gradient of ``<v, output>`` at the module's output, ``E[v v^T] = I``): a few backward passes,
    nothing stored but ``[K, K]`` per module. The output is the model's tensor (else its
    ``logits``, else its first tensor); padding tokens' outputs (a dict batch's
    ``attention_mask``) get no direction. None for a module the batches never call or whose
    output never reaches the model's (or when the model's outputs hold no tensor)."""
    sums: list[torch.Tensor | None] = [None] * len(modules)
    outs: dict[int, list[torch.Tensor]] = {}
    gen = torch.Generator().manual_seed(seed)

    def hook(i: int) -> Callable:
        def leaf(module: nn.Module, args: tuple, out: Any) -> Any:
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                out = out.detach().requires_grad_(True)  # a leaf: its gradient is what we want
                outs.setdefault(i, []).append(out)
                return out
            return None
        return leaf

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        with torch.enable_grad(), eval_mode(model):
            for batch in batches:
                outs.clear()
                try:
                    out = extract_logits(call_model(model, batch))
                except DistillationError:  # no tensor to measure the error of: weights alone
                    return [None] * len(modules)
                tokens = token_mask(batch)
                leaves = [(i, t) for i, ts in outs.items() for t in ts]
                if not leaves or not out.requires_grad:
                    continue
                for p in range(probes):
                    v = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(out)
                    if tokens is not None and out.dim() >= 2 and out.shape[:2] == tokens.shape:
                        v = v * tokens.view(*tokens.shape, *([1] * (out.dim() - 2))).to(v.dtype)
                    grads = torch.autograd.grad((out * v).sum(), [t for _, t in leaves], retain_graph=p < probes - 1,
                                                allow_unused=True)
                    for (i, t), g in zip(leaves, grads):
                        if g is not None:
                            g = g.reshape(-1, g.shape[-1]).double()
                            gram = g.T @ g / probes
                            sums[i] = gram if sums[i] is None else sums[i] + gram
    finally:
        for h in handles:
            h.remove()
    return sums
