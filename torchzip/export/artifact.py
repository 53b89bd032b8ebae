"""``export`` and ``load``: packed models to and from ``.tzip`` files.

Each packed layer's weight is written by its format (``PackedWeight.encode``, through
:class:`~torchzip.export.codec.StreamWriter`) and read back by it (``decode``); this module only
loops over layers, adds the bias, and stores every other tensor of the model (layers left
dense, norms, buffers) raw and losslessly in one last section.

``load`` runs in two phases: :func:`_plan_load` checks the file against the skeleton and decodes
everything into new modules and tensors without touching the skeleton, then :func:`_commit`
puts them in. A file that fails any check leaves the skeleton exactly as it was.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from torchzip.errors import TorchzipError
from torchzip.export import container
from torchzip.export.codec import DTYPES, Section, StreamReader, StreamWriter, checked_shape, dtype_name, lookup, need
from torchzip.export.container import brief
from torchzip.freeze import freeze
from torchzip.packed.base import FORMATS, PackedWeight
from torchzip.packed.layers import LAYER_KINDS, LayerKind, PackedLayer, kind_of, replace_module, wrap
from torchzip.packed.values import int8_quantize
from torchzip.progress import bar
from torchzip.version import __version__

# Small layers share a section until it holds about this much: one alignment gap and one CRC per
# section instead of per layer (it matters for tiny models); a big layer fills a section alone.
SECTION_BYTES = 1 << 20

if sys.byteorder != "little":  # pragma: no cover - raw sections are written in host byte order
    raise ImportError("torchzip.export needs a little-endian machine")


# ---- writing -------------------------------------------------------------------------------


def _bias(out: StreamWriter, bias: torch.Tensor) -> dict:
    # A bias that is exactly int8 times one scale (as quantize_bias leaves it) is stored so, losslessly.
    if bias.dtype == torch.float32 and bias.numel():
        q, scale = int8_quantize(bias.reshape(1, -1))
        if torch.equal((q.float() * scale).reshape(bias.shape), bias):
            return out.int8(q, scale=float(scale))
    return out.raw(bias)


def _encode_layer(name: str, layer: PackedLayer, out: StreamWriter) -> dict:
    p = layer.packed
    n, k = p.shape
    entry: dict[str, Any] = {"name": name, "kind": layer.kind, "format": p.format_name, "shape": [n, k],
                             "dtype": dtype_name(p.dtype), "zeros": int((p.dequantize() == 0).sum())}
    entry.update(p.encode(out))
    if getattr(layer, "bias", None) is not None:
        entry["tensors"]["bias"] = _bias(out, layer.bias.detach().cpu())
    return entry


def export(model: nn.Module, path: str | os.PathLike, *, progress: bool | None = None) -> int:
    """Write ``model`` to a ``.tzip`` file at ``path``; returns the file size in bytes.

    A trainable compressed model is frozen on a copy first. ``path`` is checked before any work
    (:func:`torchzip.export.container.check_destination`). The write is atomic: a crash never
    leaves a partial file under ``path`` (see :func:`torchzip.export.container.write`).
    ``progress``: a bar per layer (None: only when stderr is a terminal).
    """
    if not isinstance(model, nn.Module):
        raise TorchzipError(f"export needs an nn.Module, got {type(model).__name__}")
    container.check_destination(path)
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        model = freeze(copy.deepcopy(model))
    layers, sections, skip = [], [], []
    out = StreamWriter()
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, PackedLayer)]
    for name, layer in bar(named, progress, desc="export", leave=False):
        if out.section.size >= SECTION_BYTES:
            sections.append(out.section.getvalue())
            out = StreamWriter()
        entry = _encode_layer(name, layer, out)
        entry["section"] = len(sections)
        layers.append(entry)
        skip.append(name + "." if name else "")
    dense, stored = {}, {}
    for key, t in model.state_dict().items():
        if any(key.startswith(s) for s in skip):
            continue
        same = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.numel() else None
        dense[key] = dict(stored[same]) if same in stored else out.raw(t)  # tied tensors: one copy
        if same is not None:
            stored.setdefault(same, dense[key])
    sections.append(out.section.getvalue())
    manifest = {"format": "torchzip", "torchzip_version": __version__, "layers": layers,
                "dense": {"section": len(sections) - 1, "tensors": dense}}
    return container.write(path, manifest, sections)


# ---- reading: checks shared by load and inspect ----------------------------------------------


@dataclass(frozen=True)
class LayerHeader:
    """The checked fields of a manifest layer entry that say what the layer is."""

    name: str
    kind: LayerKind
    shape: tuple[int, int]
    dtype: torch.dtype
    format: type[PackedWeight]
    zeros: int
    has_bias: bool


def _is_text(value: Any) -> bool:
    # Names are printed in reports and errors: a lone surrogate from a "\ud800" escape cannot be.
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def layer_header(entry: Any, where: str = "manifest") -> LayerHeader:
    """Check a manifest layer entry's own fields (not its streams): ``name``, ``kind``,
    ``shape``, ``dtype``, ``format``, ``zeros`` and ``tensors`` (docs/FORMAT.md, "Layers")."""
    need(isinstance(entry, dict), where, f"a layer entry must be an object, got {brief(entry)}")
    name = entry.get("name")
    need(_is_text(name), where, f"layer name {brief(name)} is not a string of UTF-8 text")
    where = f"layer {brief(name)}"
    kind = lookup(LAYER_KINDS, entry.get("kind"))
    need(kind is not None, where, f"unknown layer kind {brief(entry.get('kind'))}; allowed: {', '.join(sorted(LAYER_KINDS))}")
    shape = checked_shape(entry.get("shape"), where)
    need(len(shape) == 2, where, f"weight shape must be [out, in], got {shape}")
    dtype = lookup(DTYPES, entry.get("dtype"))
    need(dtype is not None and dtype.is_floating_point, where,
         f"bad weight dtype {brief(entry.get('dtype'))}; allowed: {', '.join(n for n, d in DTYPES.items() if d.is_floating_point)}")
    fmt = lookup(FORMATS, entry.get("format"))
    need(fmt is not None, where, f"unknown packed format {brief(entry.get('format'))}; allowed: {', '.join(sorted(FORMATS))}")
    zeros = entry.get("zeros")
    need(type(zeros) is int and 0 <= zeros <= shape[0] * shape[1], where,
         f"zeros {brief(zeros)} must count zero weights: an integer in 0..{shape[0] * shape[1]}")
    tensors = entry.get("tensors")
    need(isinstance(tensors, dict), where, "no tensors (an object of stream entries)")
    return LayerHeader(name, kind, (shape[0], shape[1]), dtype, fmt, zeros, "bias" in tensors)


def check_manifest(manifest: dict, n_sections: int, where: str) -> None:
    """The manifest's keys (docs/FORMAT.md, "Manifest keys"): required ones present and typed,
    every layer header valid, no layer or tensor name twice, section indices in range."""
    need(manifest.get("format") == "torchzip", where, "manifest does not describe a torchzip model (format must be 'torchzip')")
    layers, dense = manifest.get("layers"), manifest.get("dense")
    need(isinstance(layers, list), where, "manifest 'layers' must be a list")
    need(isinstance(dense, dict) and isinstance(dense.get("tensors"), dict), where,
         "manifest 'dense' must be an object with 'section' and 'tensors'")
    names: set[str] = set()
    for entry in layers:
        name = layer_header(entry, where).name
        need(name not in names, where, f"layer {name!r} is listed twice; each layer appears once")
        names.add(name)
    for key in dense["tensors"]:
        need(_is_text(key), where, f"dense tensor name {brief(key)} is not a string of UTF-8 text")
    for entry in layers + [dense]:
        sec = entry.get("section")
        need(type(sec) is int and 0 <= sec < n_sections, where,
             f"section index {brief(sec)} out of range (the file has {n_sections} sections)")


def read_manifest(path: str | os.PathLike) -> tuple[dict, list[memoryview]]:
    """Read and check a ``.tzip`` file (container, then :func:`check_manifest`); returns its
    manifest and sections. Streams are checked when decoded."""
    manifest, sections = container.read(path)
    check_manifest(manifest, len(sections), str(path))
    return manifest, sections


def shared_sections(sections: list[memoryview]) -> list[Section]:
    """One :class:`Section` per section, to be shared by every reader of the file."""
    return [Section(s, f"section {i}") for i, s in enumerate(sections)]


def _read_bias(src: StreamReader, spec: Any, n: int) -> torch.Tensor:
    if not (isinstance(spec, dict) and "scale" in spec):
        return src.float_raw(spec, "bias")
    scale = spec.get("scale")
    src.need(type(scale) is float and math.isfinite(scale) and scale > 0, f"bad bias scale {brief(scale)}")
    return src.int8(spec, n, "bias").float() * torch.tensor(scale, dtype=torch.float32)


def decode_layer(entry: dict, section: memoryview | Section, device: torch.device | None) -> tuple[PackedWeight, torch.Tensor | None]:
    """The packed weight and bias of one manifest layer entry (see docs/FORMAT.md).

    ``section``: the layer's section, or the :class:`Section` every reader of the file shares
    (then its pieces may overlap no other layer's either; call ``check_overlaps`` at the end).
    """
    head = layer_header(entry)
    src = StreamReader(section, f"layer {brief(head.name)}", device)
    packed = head.format.decode(entry, src, head.shape, head.dtype)
    bias = _read_bias(src, entry["tensors"]["bias"], head.shape[0]) if head.has_bias else None
    src.need(bias is None or tuple(bias.shape) == (head.shape[0],), "bias shape does not match")
    if not isinstance(section, Section):
        src.section.check_overlaps()
    return packed, bias


def decode_dense(manifest: dict, sections: list[Section]) -> dict[str, torch.Tensor]:
    """Every dense tensor of a checked manifest, by ``state_dict`` key. Tied tensors (identical
    entries, stored once) are decoded once and come back as one tensor under each key."""
    dense = manifest["dense"]
    src = StreamReader(sections[dense["section"]], "dense tensor")
    out: dict[str, torch.Tensor] = {}
    first: dict[str, str] = {}
    for key, spec in dense["tensors"].items():
        same = json.dumps(spec, sort_keys=True)
        if same in first:
            out[key] = out[first[same]]
            continue
        out[key] = src.raw(spec, repr(key))
        first[same] = key
    return out


# ---- load ---------------------------------------------------------------------------------


@dataclass
class LoadPlan:
    """What ``load`` puts into the skeleton, decoded and checked; the skeleton is not touched.

    ``modules``: qualified name -> the packed layer that replaces that module. ``tensors``:
    every other ``state_dict`` entry, each of the skeleton's own shape and dtype.
    """

    modules: dict[str, nn.Module]
    tensors: dict[str, torch.Tensor]


def _skeleton_layer(head: LayerHeader, modules: dict[str, nn.Module], where: str) -> nn.Module:
    """The skeleton's module for a layer of the file, checked to take it."""
    name = head.name
    module = modules.get(name)
    need(module is not None, where, f"the skeleton has no module named {name!r}")
    need(not isinstance(module, PackedLayer), where,
         f"layer '{name}' is already a {type(module).__name__} in the skeleton; load into a freshly built, uncompressed model")
    if kind_of(module) is not head.kind:
        cls = head.kind.module_type
        if isinstance(module, cls):
            need(False, where, f"layer '{name}' is a {cls.__name__} in the file but a {type(module).__name__} (a subclass of "
                 f"{cls.__name__}) in the skeleton: layer kinds match by exact type, because the packed layer that would "
                 f"replace it cannot keep the subclass's own behaviour; use a plain {cls.__name__} there, or leave "
                 "that layer uncompressed")
        need(False, where, f"layer '{name}' is a {head.kind.name!r} in the file but a {type(module).__name__} in the skeleton")
    weight = module.weight
    rows = (weight.shape[0], weight[0].numel()) if weight.dim() else ()
    need(rows == head.shape, where, f"layer '{name}' has shape {list(head.shape)} in the file, {list(rows)} in the skeleton")
    need(weight.dtype == head.dtype, where, f"layer '{name}' is {dtype_name(head.dtype)} in the file but {weight.dtype} in "
         "the skeleton; build the skeleton in the same dtype")
    need(head.has_bias == (getattr(module, "bias", None) is not None), where,
         f"layer '{name}' has {'a' if head.has_bias else 'no'} bias in the file but "
         f"{'a' if getattr(module, 'bias', None) is not None else 'no'} bias in the skeleton")
    return module


def _check_dense(specs: dict, expected: dict[str, torch.Tensor], where: str) -> None:
    """Dense entries against the skeleton's tensors: same keys, shapes and dtypes (no casting)."""
    missing, unexpected = sorted(set(expected) - set(specs)), sorted(set(specs) - set(expected))
    need(not missing and not unexpected, where,
         f"skeleton and file disagree: missing from the file {missing[:5]}, not in the skeleton {unexpected[:5]}")
    for key, spec in specs.items():
        want = expected[key]
        dtype, shape = (spec.get("dtype"), spec.get("shape")) if isinstance(spec, dict) else (None, None)
        need(shape == list(want.shape), where,
             f"tensor '{key}' has shape {brief(shape)} in the file, {list(want.shape)} in the skeleton")
        stored = dtype if lookup(DTYPES, dtype) is not None else brief(dtype)
        need(dtype == dtype_name(want.dtype), where,
             f"tensor '{key}' is {stored} in the file but {dtype_name(want.dtype)} in the skeleton; a tensor loads only "
             f"into its own dtype (nothing is cast): build the skeleton with {stored} there")


def _plan_load(path: str | os.PathLike, skeleton: nn.Module, on: torch.device | None,
               progress: bool | None) -> LoadPlan:
    """Check the file at ``path`` against ``skeleton`` and decode it, touching nothing of the
    skeleton. Every check against the skeleton runs before anything is decoded."""
    manifest, sections = read_manifest(path)
    where = str(path)
    modules = dict(skeleton.named_modules())
    targets = []
    for entry in manifest["layers"]:
        head = layer_header(entry)
        targets.append((entry, head, _skeleton_layer(head, modules, where)))
    replaced = tuple(head.name + "." if head.name else "" for _, head, _ in targets)
    expected = {k: v for k, v in skeleton.state_dict().items() if not k.startswith(replaced)}
    _check_dense(manifest["dense"]["tensors"], expected, where)

    shared = shared_sections(sections)
    new: dict[str, nn.Module] = {}
    for entry, head, module in bar(targets, progress, desc="load", leave=False):
        packed, bias = decode_layer(entry, shared[entry["section"]], on)
        if bias is not None:
            need(bias.dtype == module.bias.dtype, where, f"layer '{head.name}': its bias is {dtype_name(bias.dtype)} in the "
                 f"file but {module.bias.dtype} in the skeleton; build the skeleton in the same dtype")
        new[head.name] = wrap(module, packed, bias)
    tensors = decode_dense(manifest, shared)
    for section in shared:
        section.check_overlaps()
    return LoadPlan(new, tensors)


def _commit(skeleton: nn.Module, plan: LoadPlan) -> nn.Module:
    """Put a checked :class:`LoadPlan` into ``skeleton``: swap in the packed layers, then copy
    the dense tensors. Returns the model (the packed layer itself when it replaced the root)."""
    model, swapped = skeleton, []
    try:
        for name, layer in plan.modules.items():
            if name:
                swapped.append((name, skeleton.get_submodule(name)))
            model = replace_module(model, name, layer)
        # Keys, shapes and dtypes were checked: this copies values and casts nothing.
        model.load_state_dict(plan.tensors, strict=False)
    except BaseException:
        for name, module in reversed(swapped):  # a load hook of the user's model raised: undo the swaps
            replace_module(skeleton, name, module)
        raise
    return model


@torch.no_grad()
def load(path: str | os.PathLike, model_skeleton: nn.Module, *, device: str | torch.device | None = None,
         decode: str = "auto", progress: bool | None = None) -> nn.Module:
    """Load a ``.tzip`` file into ``model_skeleton`` (a freshly built, uncompressed model).

    Compressed layers are replaced by packed layers restored bit for bit; every other tensor is
    loaded into the skeleton. Returns the model (on ``device``). ``decode``: where Huffman
    streams of values and indices are decoded — ``"auto"`` (the Triton decoder on ``device``
    when it is CUDA, so only the compressed bytes cross to the GPU; else the CPU), ``"cpu"``, or
    ``"triton"`` (on ``device``, or the CPU under ``TRITON_INTERPRET=1``). The result is
    bit-identical either way. ``progress``: a bar per layer (None: only on a terminal).

    All or nothing: raises :class:`torchzip.FormatError` for a damaged or hostile file, or a
    skeleton whose layer names, types (matched exactly: not subclasses), shapes or dtypes do not
    match, and then the skeleton is exactly as it was.
    """
    if not isinstance(model_skeleton, nn.Module):
        raise TorchzipError(f"load needs a model skeleton (an nn.Module), got {type(model_skeleton).__name__}")
    if decode not in ("auto", "cpu", "triton"):
        raise TorchzipError(f"decode must be 'auto', 'cpu' or 'triton', got {decode!r}")
    try:
        target = torch.device(device) if device is not None else torch.device("cpu")
    except (RuntimeError, TypeError) as err:
        raise TorchzipError(f"bad device {device!r}: {err}") from None
    on = target if decode == "triton" or (decode == "auto" and target.type == "cuda") else None
    model = _commit(model_skeleton, _plan_load(path, model_skeleton, on, progress))
    return model.to(device) if device is not None else model
