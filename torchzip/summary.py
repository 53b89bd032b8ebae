"""``summary``: per-layer parameters, sparsity, bits per weight and bytes, read from packed tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from torchzip.errors import TorchzipError
from torchzip.freeze import NOTE, freeze, shared_copy
from torchzip.packed.base import PackedWeight
from torchzip.packed.layers import PackedLayer, kind_of


@dataclass
class LayerRow:
    """One module's stored tensors. ``fp32_bytes`` is what they would take as float32."""

    name: str
    kind: str
    format: str
    params: int
    sparsity: float
    bits_per_weight: float
    bytes: int
    fp32_bytes: int
    note: str = ""

    @property
    def ratio(self) -> float:
        """fp32 bytes / stored bytes."""
        return self.fp32_bytes / self.bytes if self.bytes else float("inf")


@dataclass
class Summary:
    """Rows for every module that owns tensors, and totals over the model."""

    rows: list[LayerRow] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.rows)

    @property
    def fp32_bytes(self) -> int:
        return sum(r.fp32_bytes for r in self.rows)

    @property
    def ratio(self) -> float:
        return self.fp32_bytes / self.bytes if self.bytes else float("inf")

    def to_dict(self) -> dict:
        """Plain data (for JSON)."""
        rows = [dict(vars(r), ratio=r.ratio) for r in self.rows]
        return {"rows": rows, "params": self.params, "bytes": self.bytes, "fp32_bytes": self.fp32_bytes, "ratio": self.ratio}

    def __repr__(self) -> str:
        return str(self)

    def __str__(self) -> str:
        head = f"{'layer':<32} {'kind':<12} {'format':<16} {'params':>10} {'sparsity':>8} {'bits/w':>7} {'bytes':>11} {'ratio':>7}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(
                f"{r.name[:32]:<32} {r.kind[:12]:<12} {r.format[:16]:<16} {r.params:>10,} {r.sparsity:>8.1%} "
                f"{r.bits_per_weight:>7.2f} {r.bytes:>11,} " + (f"{r.ratio:>6.2f}x" if r.bytes else f"{'-':>7}")
            )
        lines.append("-" * len(head))
        lines.append(f"{'total':<62} {self.params:>10,} {'':>8} {'':>7} {self.bytes:>11,} {self.ratio:>6.2f}x")
        notes = [f"  {r.name}: {r.note}" for r in self.rows if r.note]
        if notes:
            lines += ["notes:"] + notes
        return "\n".join(lines)


def _identity(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.numel() else (id(t),)


def _fp32_bytes(t: torch.Tensor) -> int:
    return t.numel() * (4 if t.is_floating_point() else t.element_size())


def _own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    # What the module itself stores: parameters and persistent buffers, not its children's.
    return {k: v for k, v in module.state_dict(keep_vars=True).items() if "." not in k}


def _packed_row(name: str, layer: PackedLayer, seen: dict[tuple, str], owners: dict[int, str]) -> LayerRow:
    weights = {t: getattr(layer, attr) for t, attr in layer.packed_weights().items()}
    notes, own = [], {}
    for t, p in weights.items():  # a packed weight shared with an earlier layer (tied) is counted there
        owner = owners.setdefault(id(p), name)
        if owner == name:
            own[t] = p
        else:
            notes.append(f"{t} is tied to {owner} (counted there)")
    dense = {k: v for k, v in _own_tensors(layer).items() if not _tied(seen, name, k, v, notes)}
    weight_params = sum(p.shape[0] * p.shape[1] for p in own.values())
    zeros = sum(p.sparsity * p.shape[0] * p.shape[1] for p in own.values())
    packed_bytes = sum(p.nbytes() for p in own.values())
    labels = sorted({p.label for p in weights.values()})
    return LayerRow(
        name, layer.kind, "+".join(labels), weight_params + sum(t.numel() for t in dense.values() if t.is_floating_point()),
        zeros / weight_params if weight_params else 0.0, packed_bytes * 8 / weight_params if weight_params else 0.0,
        packed_bytes + sum(t.numel() * t.element_size() for t in dense.values()),
        4 * weight_params + sum(_fp32_bytes(t) for t in dense.values()), "; ".join(notes),
    )


def _tied(seen: dict[tuple, str], name: str, key: str, t: torch.Tensor, notes: list[str]) -> bool:
    """Whether ``t`` was counted with an earlier module (then it is noted, not counted again)."""
    full = f"{name}.{key}" if name else key
    owner = seen.setdefault(_identity(t), full)
    if owner != full:
        notes.append(f"{key} is tied to {owner} (counted there)")
    return owner != full


def _dense_row(name: str, module: nn.Module, tensors: dict[str, torch.Tensor], seen: dict[tuple, str]) -> LayerRow:
    notes = [getattr(module, NOTE)] if getattr(module, NOTE, "") else []
    tensors = {k: v for k, v in tensors.items() if not _tied(seen, name, k, v, notes)}
    weight = tensors.get("weight")
    params = sum(t.numel() for t in tensors.values() if t.is_floating_point())
    sparsity = float((weight == 0).sum()) / weight.numel() if weight is not None else 0.0
    bits = weight.element_size() * 8 if weight is not None else 0.0
    note = "; ".join(notes)
    if kind_of(module) is None:
        odd = [k for k, v in tensors.items() if v.dim() >= 2]
        if odd:
            note = "; ".join(filter(None, [note, f"{', '.join(odd)} of {type(module).__name__} (not a plain weight of a targeted layer)"]))
    return LayerRow(
        name or "(model)", type(module).__name__, "dense", params, sparsity, bits,
        sum(t.numel() * t.element_size() for t in tensors.values()), sum(_fp32_bytes(t) for t in tensors.values()), note,
    )


@torch.no_grad()
def summary(model: nn.Module, *, print_table: bool = False) -> Summary:
    """Per-layer parameters, sparsity, bits per weight, stored bytes and ratio vs fp32, with totals.

    Returns the report (its ``str``, and its ``repr`` in a REPL, is the table); prints it too
    only with ``print_table=True``.

    A model that is still trainable is frozen on a copy first, so the bytes are always those of
    the packed tensors. Modules holding tensors torchzip left alone are listed too, with a note
    when a matrix in them was not a plain weight of a targeted layer (e.g. ``in_proj_weight``).
    """
    if not isinstance(model, nn.Module):
        raise TorchzipError(f"summary needs an nn.Module, got {type(model).__name__}")
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        model = freeze(shared_copy(model))  # shares the weights: no second copy of every one
    result = Summary()
    seen: dict[tuple, str] = {}
    owners: dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, PackedWeight):  # counted with the packed layer holding it
            continue
        if isinstance(module, PackedLayer):
            result.rows.append(_packed_row(name, module, seen, owners))
            continue
        tensors = _own_tensors(module)
        if tensors:
            result.rows.append(_dense_row(name, module, tensors, seen))
    if print_table:
        print(result)
    return result
