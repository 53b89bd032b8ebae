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

import contextlib
import ctypes
import json
import math
import os
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from torchzip.errors import MetaTensorError, TorchzipError
from torchzip.export import container
from torchzip.export.codec import DTYPES, Section, StreamReader, StreamWriter, checked_shape, dtype_name, lookup, need
from torchzip.export.container import brief
from torchzip.freeze import Freezer, freeze, shared_copy
from torchzip.packed.base import BLOCK, FORMATS, PackedWeight, scratch
from torchzip.packed.layers import LAYER_KINDS, LayerKind, PackedLayer, build_packed, kind_of, replace_module
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


def _encode_weight(name: str, layer: PackedLayer, tensor: str, out: StreamWriter, first: dict[int, int],
                   index: int) -> tuple[dict, list[str]]:
    """One manifest entry (a packed weight of ``layer``) and the state_dict keys it covers."""
    attr = layer.packed_weights()[tensor]
    p = getattr(layer, attr)
    n, k = p.shape
    entry: dict[str, Any] = {"name": name, "kind": layer.kind, "shape": [n, k], "dtype": dtype_name(p.dtype)}
    if tensor != "weight":
        entry["tensor"] = tensor
    if id(p) in first:  # shared with an earlier entry (tied weights): stored there once
        entry["tied"] = first[id(p)]
        entry["tensors"] = {}
    else:
        first[id(p)] = index
        entry.update({"format": p.format_name, "zeros": _zeros(p)})
        entry.update(p.encode(out))
    bias_name = layer.bias_names.get(tensor)
    bias = getattr(layer, bias_name, None) if bias_name else None
    if bias is not None:
        entry["tensors"]["bias"] = _bias(out, bias.detach().cpu())
    return entry, covered_keys(name, layer, {t: t == tensor and bias is not None for t in layer.packed_weights()})


def export(model: nn.Module, path: str | os.PathLike, *, progress: bool | None = None) -> int:
    """Write ``model`` to a ``.tzip`` file at ``path``; returns the file size in bytes.

    A trainable compressed model is frozen on a copy that shares its tensors, one layer at a
    time: each layer is packed, encoded and written to the (hidden) file before the next, and its
    packed tensors are dropped, so memory grows by about one layer, not by a copy of the model.
    ``path`` is checked before any work (:func:`torchzip.export.container.check_destination`).
    The write is atomic: a crash never leaves a partial file under ``path`` (see
    :func:`torchzip.export.container.write`). A packed weight several layers share (tied) is
    stored once. ``progress``: a bar per layer (None: only when stderr is a terminal).
    """
    if not isinstance(model, nn.Module):
        raise TorchzipError(f"export needs an nn.Module, got {type(model).__name__}")
    container.check_destination(path)
    freezer = None
    if parametrize.is_parametrized(model):  # a single compressed layer: freeze all of it
        model = freeze(shared_copy(model))
    elif any(parametrize.is_parametrized(m) for m in model.modules()):
        freezer = Freezer(shared_copy(model))
        model = freezer.model
    layers, covered, dense = [], [], {}
    first: dict[int, int] = {}
    # Names and ids only: holding every trainable module here would keep each one's baked
    # weight alive after it is replaced.
    named = [(n, id(m)) for n, m in model.named_modules(remove_duplicate=False)
             if isinstance(m, PackedLayer) or (freezer is not None and parametrize.is_parametrized(m))]
    pending = {i: m for n, m in model.named_modules() if freezer is not None and parametrize.is_parametrized(m)
               for i in [id(m)]}
    n_sections = 0

    def sections():
        nonlocal n_sections
        out = StreamWriter()
        done: dict[int, nn.Module] = {}  # trainable module -> what froze it (modules listed twice)
        for name, key in bar(named, progress, desc="export", leave=False):
            if key in pending:
                done[key] = freezer.module(pending.pop(key))
            layer = done[key] if key in done else model.get_submodule(name)
            if not isinstance(layer, PackedLayer):
                continue
            for tensor in layer.packed_weights():
                if out.section.size >= SECTION_BYTES:
                    n_sections += 1
                    yield out.section
                    out = StreamWriter()
                entry, keys = _encode_weight(name, layer, tensor, out, first, len(layers))
                entry["section"] = n_sections
                layers.append(entry)
                covered.extend(keys)
            if freezer is not None:
                _drop_packed(layer, first)
            trim_heap()
        stored: dict = {}
        for key, t in freezer.model.state_dict().items() if freezer else model.state_dict().items():
            if _is_covered(key, covered):
                continue
            same = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.numel() else None
            dense[key] = dict(stored[same]) if same in stored else out.raw(t)  # tied tensors: one copy
            if same is not None:
                stored.setdefault(same, dense[key])
        n_sections += 1
        yield out.section

    def manifest() -> dict:
        return {"format": "torchzip", "torchzip_version": __version__, "layers": layers,
                "dense": {"section": n_sections - 1, "tensors": dense}}

    return container.write_streamed(path, sections(), manifest)


def _zeros(p: PackedWeight) -> int:
    """Weights of ``p`` that are exactly zero, counted a block of rows at a time where it can
    (as numel minus ``count_nonzero``: summing a bool tensor widens it to int64 first)."""
    n, k = p.shape
    if type(p).dequantize_block is PackedWeight.dequantize_block or any(b.device.type != "cpu" for b in p.buffers()):
        return n * k - int(torch.count_nonzero(p.dequantize()))
    rows = max(1, BLOCK // max(k, 1))
    buf = scratch(min(rows, n) * k, torch.float32)
    return n * k - sum(int(torch.count_nonzero(p.dequantize_block(r, min(n, r + rows), buf[: (min(n, r + rows) - r) * k].view(-1, k))))
                       for r in range(0, n, rows))


def trim_heap() -> None:
    """Hand freed heap memory back to the system (glibc keeps freed blocks below its growing
    mmap threshold, so the per-layer temporaries of a long export would pile up in RSS)."""
    if _TRIM is not None:
        _TRIM(0)


def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl): nothing to trim
        return None


_TRIM = _malloc_trim()


def _drop_packed(layer: PackedLayer, first: dict[int, int]) -> None:
    # The copy export froze is its own: once a layer is written, its packed tensors can go. A
    # tied weight keeps its shape and dtype for the entries that point back to it.
    for attr in layer.packed_weights().values():
        p = getattr(layer, attr)
        if id(p) in first:
            for key, b in p._buffers.items():
                if b is not None:
                    p._buffers[key] = b.new_empty(0)


def covered_keys(name: str, layer: PackedLayer, with_bias: dict[str, bool]) -> list[str]:
    """State-dict keys a packed layer's entries hold (``"prefix."`` for whole packed weights);
    every other key of the model is stored as a dense tensor."""
    prefix = f"{name}." if name else ""
    keys = []
    for tensor, attr in layer.packed_weights().items():
        keys.append(f"{prefix}{attr}.")
        if with_bias.get(tensor):
            keys.append(f"{prefix}{layer.bias_names[tensor]}")
    return keys


def _is_covered(key: str, covered: list[str]) -> bool:
    return any(key.startswith(c) if c.endswith(".") else key == c for c in covered)


# ---- reading: checks shared by load and inspect ----------------------------------------------


@dataclass(frozen=True)
class LayerHeader:
    """The checked fields of a manifest layer entry that say what the layer is. ``tied``: the
    index of the entry whose packed weight this one shares (then ``format`` and ``zeros`` are None)."""

    name: str
    tensor: str
    kind: LayerKind
    shape: tuple[int, int]
    dtype: torch.dtype
    format: type[PackedWeight] | None
    zeros: int | None
    tied: int | None
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
    """Check a manifest layer entry's own fields (not its streams): ``name``, ``tensor``,
    ``kind``, ``shape``, ``dtype``, ``format``, ``zeros``, ``tied`` and ``tensors``
    (docs/FORMAT.md, "Layers")."""
    need(isinstance(entry, dict), where, f"a layer entry must be an object, got {brief(entry)}")
    name = entry.get("name")
    need(_is_text(name), where, f"layer name {brief(name)} is not a string of UTF-8 text")
    where = f"layer {brief(name)}"
    tensor = entry.get("tensor", "weight")
    need(_is_text(tensor) and tensor.isidentifier(), where, f"tensor name {brief(tensor)} is not an identifier")
    kind = lookup(LAYER_KINDS, entry.get("kind"))
    need(kind is not None, where, f"unknown layer kind {brief(entry.get('kind'))}; allowed: {', '.join(sorted(LAYER_KINDS))}")
    shape = checked_shape(entry.get("shape"), where)
    need(len(shape) == 2, where, f"weight shape must be [out, in], got {shape}")
    dtype = lookup(DTYPES, entry.get("dtype"))
    need(dtype is not None and dtype.is_floating_point, where,
         f"bad weight dtype {brief(entry.get('dtype'))}; allowed: {', '.join(n for n, d in DTYPES.items() if d.is_floating_point)}")
    tensors = entry.get("tensors")
    need(isinstance(tensors, dict), where, "no tensors (an object of stream entries)")
    tied = entry.get("tied")
    if tied is not None:
        need(type(tied) is int and tied >= 0, where, f"tied {brief(tied)} must be the index of an earlier layer entry")
        need("format" not in entry and set(tensors) <= {"bias"}, where,
             "a tied entry holds no weight of its own: no format, and at most a bias in its tensors")
        return LayerHeader(name, tensor, kind, (shape[0], shape[1]), dtype, None, None, tied, "bias" in tensors)
    fmt = lookup(FORMATS, entry.get("format"))
    need(fmt is not None, where, f"unknown packed format {brief(entry.get('format'))}; allowed: {', '.join(sorted(FORMATS))}")
    zeros = entry.get("zeros")
    need(type(zeros) is int and 0 <= zeros <= shape[0] * shape[1], where,
         f"zeros {brief(zeros)} must count zero weights: an integer in 0..{shape[0] * shape[1]}")
    return LayerHeader(name, tensor, kind, (shape[0], shape[1]), dtype, fmt, zeros, None, "bias" in tensors)


def check_manifest(manifest: dict, n_sections: int, where: str) -> None:
    """The manifest's keys (docs/FORMAT.md, "Manifest keys"): required ones present and typed,
    every layer header valid, no layer tensor listed twice, ties to earlier untied entries of the
    same shape and dtype, section indices in range."""
    need(manifest.get("format") == "torchzip", where, "manifest does not describe a torchzip model (format must be 'torchzip')")
    layers, dense = manifest.get("layers"), manifest.get("dense")
    need(isinstance(layers, list), where, "manifest 'layers' must be a list")
    need(isinstance(dense, dict) and isinstance(dense.get("tensors"), dict), where,
         "manifest 'dense' must be an object with 'section' and 'tensors'")
    seen: set[tuple[str, str]] = set()
    heads: list[LayerHeader] = []
    for entry in layers:
        head = layer_header(entry, where)
        need((head.name, head.tensor) not in seen, where,
             f"layer {head.name!r} is listed twice (tensor {head.tensor!r}); each layer tensor appears once")
        seen.add((head.name, head.tensor))
        if head.tied is not None:
            need(head.tied < len(heads) and heads[head.tied].tied is None, where,
                 f"layer {head.name!r} is tied to entry {head.tied}, which is not an earlier untied layer")
            first = heads[head.tied]
            need((first.shape, first.dtype) == (head.shape, head.dtype), where,
                 f"layer {head.name!r} is tied to {first.name!r} but has another shape or dtype")
        heads.append(head)
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


def _read_bias(src: StreamReader, spec: Any) -> torch.Tensor:
    if not (isinstance(spec, dict) and "scale" in spec):
        bias = src.float_raw(spec, "bias")
    else:
        scale, n = spec.get("scale"), spec.get("n", math.prod(spec.get("shape") or [0]))
        src.need(type(scale) is float and math.isfinite(scale) and scale > 0, f"bad bias scale {brief(scale)}")
        src.need(type(n) is int and n >= 0, f"bad bias length {brief(n)}")
        bias = src.int8(spec, n, "bias").float() * torch.tensor(scale, dtype=torch.float32)
    src.need(bias.dim() == 1, f"a bias is one-dimensional, got shape {list(bias.shape)}")
    return bias


def decode_bias(entry: dict, section: memoryview | Section) -> torch.Tensor | None:
    """The bias stored with a layer entry, if any (tied entries have only this)."""
    src = StreamReader(section, f"layer {brief(entry.get('name'))}")
    return _read_bias(src, entry["tensors"]["bias"]) if "bias" in entry["tensors"] else None


def decode_layer(entry: dict, section: memoryview | Section, device: torch.device | None) -> tuple[PackedWeight, torch.Tensor | None]:
    """The packed weight and bias of one untied manifest layer entry (see docs/FORMAT.md).

    ``section``: the layer's section, or the :class:`Section` every reader of the file shares
    (then its pieces may overlap no other layer's either; call ``check_overlaps`` at the end).
    """
    head = layer_header(entry)
    need(head.format is not None, f"layer {brief(head.name)}", "a tied entry has no weight of its own to decode")
    src = StreamReader(section, f"layer {brief(head.name)}", device)
    packed = head.format.decode(entry, src, head.shape, head.dtype)
    bias = _read_bias(src, entry["tensors"]["bias"]) if head.has_bias else None
    if not isinstance(section, Section):
        src.section.check_overlaps()
    return packed, bias


def decode_dense(manifest: dict, sections: list[Section], device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Every dense tensor of a checked manifest, by ``state_dict`` key. Tied tensors (identical
    entries, stored once) are decoded once and come back as one tensor under each key.
    ``device``: each tensor is moved there as soon as it is read (None: stays on the CPU)."""
    dense = manifest["dense"]
    src = StreamReader(sections[dense["section"]], "dense tensor")
    out: dict[str, torch.Tensor] = {}
    first: dict[str, str] = {}
    for key, spec in dense["tensors"].items():
        same = json.dumps(spec, sort_keys=True)
        if same in first:
            out[key] = out[first[same]]
            continue
        t = src.raw(spec, repr(key))
        out[key] = t if device is None else t.to(device)
        first[same] = key
    return out


# ---- load ---------------------------------------------------------------------------------


@dataclass
class LoadPlan:
    """What ``load`` puts into the skeleton, decoded and checked; the skeleton is not touched.

    ``modules``: qualified name -> the packed layer that replaces that module (a module the
    skeleton lists under several names is replaced under each). ``tensors``: every other
    ``state_dict`` entry, each of the skeleton's own shape and dtype.
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
    kind = kind_of(module)
    if kind is not head.kind:
        cls = head.kind.module_type
        if isinstance(cls, type) and isinstance(module, cls):
            need(False, where, f"layer '{name}' is a {cls.__name__} in the file but a {type(module).__name__} (a subclass of "
                 f"{cls.__name__}) in the skeleton: layer kinds match by exact type, because the packed layer that would "
                 f"replace it cannot keep the subclass's own behaviour; use a plain {cls.__name__} there, or leave "
                 "that layer uncompressed")
        need(False, where, f"layer '{name}' is a {head.kind.name!r} in the file but a {type(module).__name__} in the skeleton")
    names = kind.weights(module)
    need(head.tensor in names, where, f"layer '{name}' has no packable tensor {head.tensor!r}; its kind packs {list(names)}")
    value = getattr(module, head.tensor)
    rows = tuple(kind.view.matrix_shape(value.shape)) if value.dim() else ()
    need(rows == head.shape, where, f"layer '{name}' has shape {list(head.shape)} in the file, {list(rows)} in the skeleton")
    need(value.dtype == head.dtype, where, f"layer '{name}' is {dtype_name(head.dtype)} in the file but {value.dtype} in "
         "the skeleton; build the skeleton in the same dtype")
    bias = getattr(module, names[head.tensor], None) if names[head.tensor] else None
    need(head.has_bias == (bias is not None), where,
         f"layer '{name}' has {'a' if head.has_bias else 'no'} bias in the file but {'a' if bias is not None else 'no'} "
         "bias in the skeleton" + ("; a file written from a BatchNorm-folded model needs a folded skeleton: "
                                   "tz.fold_batchnorm(skeleton), or in a build function"
                                   if head.has_bias and bias is None else ""))
    return module


def _check_ties(targets: list, where: str) -> None:
    """The file's ties (``tied``) are exactly the skeleton's (one tensor shared by layers)."""
    firsts: dict[int, int] = {}
    for i, (_, head, module) in enumerate(targets):
        value = getattr(module, head.tensor)
        if head.tied is not None:
            other = targets[head.tied]
            need(getattr(other[2], other[1].tensor) is value, where,
                 f"the file ties layer '{head.name}' to '{other[1].name}', the skeleton does not")
            continue
        first = firsts.setdefault(id(value), i)
        need(first == i, where, f"the skeleton ties layers '{targets[first][1].name}' and '{head.name}', "
                                "the file stores them separately")


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
               progress: bool | None, dest: torch.device | None = None) -> LoadPlan:
    """Check the file at ``path`` against ``skeleton`` and decode it, touching nothing of the
    skeleton. Every check against the skeleton runs before anything is decoded. ``on``: where
    Huffman streams are decoded (None: the CPU); ``dest``: where each layer's tensors go as
    soon as it is decoded (None: the CPU), so the CPU never holds more than one layer of them."""
    manifest, sections = read_manifest(path)
    where = str(path)
    modules = dict(skeleton.named_modules())
    aliases: dict[int, list[str]] = {}
    for name, m in skeleton.named_modules(remove_duplicate=False):
        aliases.setdefault(id(m), []).append(name)
    targets = []
    for entry in manifest["layers"]:
        head = layer_header(entry)
        targets.append((entry, head, _skeleton_layer(head, modules, where)))
    _check_ties(targets, where)
    by_module: dict[str, list] = {}
    for target in targets:
        by_module.setdefault(target[1].name, []).append(target)
    covered = []
    for name, group in by_module.items():
        module = group[0][2]
        packs = {head.tensor for _, head, _ in group}
        wanted = kind_of(module).weights(module)
        need(packs == set(wanted), where, f"layer '{name}': the file packs {sorted(packs)} of {sorted(wanted)}")
        for alias in aliases[id(module)]:
            prefix = f"{alias}." if alias else ""
            covered += [f"{prefix}{t}" for t in wanted] + [f"{prefix}{b}" for _, h, _ in group if h.has_bias
                                                            for b in [wanted[h.tensor]]]
    expected = {k: v for k, v in skeleton.state_dict().items() if not _is_covered(k, covered)}
    _check_dense(manifest["dense"]["tensors"], expected, where)

    shared = shared_sections(sections)
    decoded: list[PackedWeight] = []
    parts: dict[str, tuple[dict, dict]] = {name: ({}, {}) for name in by_module}  # {tensor: packed}, {tensor: bias}
    for entry, head, module in bar(targets, progress, desc="load", leave=False):
        section = shared[entry["section"]]
        if head.tied is None:
            packed, bias = decode_layer(entry, section, on)
            if dest is not None:  # side tables and CPU-decoded streams: moved now, not with the whole model
                packed = packed.to(dest)
            container.release_pages(sections)  # a mapped file's pages: read once, then let go
            trim_heap()  # and the decoder's freed temporaries, which lie between the kept tensors
        else:
            packed, bias = decoded[head.tied], decode_bias(entry, section)
        if bias is not None and dest is not None:
            bias = bias.to(dest)
        decoded.append(packed)
        if bias is not None:
            want = getattr(module, kind_of(module).weights(module)[head.tensor])
            need(bias.shape == want.shape, where, f"layer '{head.name}': its bias has shape {list(bias.shape)} in the "
                                                  f"file, {list(want.shape)} in the skeleton")
            need(bias.dtype == want.dtype, where, f"layer '{head.name}': its bias is {dtype_name(bias.dtype)} in the file "
                                                  f"but {want.dtype} in the skeleton; build the skeleton in the same dtype")
        parts[head.name][0][head.tensor] = packed
        parts[head.name][1][head.tensor] = bias
    new: dict[str, nn.Module] = {}
    for name, (packs, biases) in parts.items():
        module = by_module[name][0][2]
        layer = build_packed(module, packs, biases)
        for alias in aliases[id(module)]:
            new[alias] = layer
    tensors = decode_dense(manifest, shared, dest)
    for section in shared:
        section.check_overlaps()
    return LoadPlan(new, tensors)


def _commit(skeleton: nn.Module, plan: LoadPlan) -> nn.Module:
    """Put a checked :class:`LoadPlan` into ``skeleton``: swap in the packed layers, then copy
    the dense tensors. Returns the model (the packed layer itself when it replaced the root)."""
    model, swapped = skeleton, []
    try:
        for name, layer in sorted(plan.modules.items(), key=lambda kv: kv[0].count(".") if kv[0] else -1):  # outer first
            if name:
                swapped.append((name, skeleton.get_submodule(name)))
            model = replace_module(model, name, layer)
        # Keys, shapes and dtypes were checked: this copies values and casts nothing. A skeleton
        # built on the meta device has no storage to copy into: the decoded tensors become its own.
        on_meta = any(t.is_meta for t in model.state_dict().values())
        model.load_state_dict(plan.tensors, strict=False, assign=on_meta)
    except BaseException:
        for name, module in reversed(swapped):  # a load hook of the user's model raised: undo the swaps
            replace_module(skeleton, name, module)
        raise
    return model


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Build models with every parameter on the meta device and every buffer real.

    Inside ``with tz.empty_weights():`` a parameter is put on meta as it is registered, so a
    model's weights take no memory, while its buffers (position ids, rotary tables: the tensors a
    ``state_dict``, and so a ``.tzip`` file, may not hold) are computed by its own ``__init__`` as
    usual. Like accelerate's ``init_empty_weights()``, it swaps ``nn.Module.register_parameter``
    while inside: do not build models in other threads meanwhile. A parameter registered under
    two names stays one parameter. Modules create a parameter before registering it, mostly with
    ``torch.empty``, whose pages are never written and so never resident; one made from values
    (``nn.Parameter(torch.ones(n))``) is held for that moment. ``tz.load(path, build)`` builds
    the model this way.
    """
    outer = nn.Module.register_parameter
    moved: dict[int, tuple[weakref.ref, nn.Parameter]] = {}  # id(real parameter) -> (it, its meta twin)

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        lazy = isinstance(param, nn.parameter.UninitializedParameter)  # a lazy module's: no data yet
        if isinstance(param, nn.Parameter) and not param.is_meta and not lazy:
            seen = moved.get(id(param))
            if seen is None or seen[0]() is not param:
                meta = type(param)(param.detach().to("meta"), requires_grad=param.requires_grad)
                meta.__dict__.update(param.__dict__)
                seen = moved[id(param)] = (weakref.ref(param), meta)
            param = seen[1]
        outer(module, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = outer  # type: ignore[method-assign]


@torch.no_grad()
def load(path: str | os.PathLike, model_skeleton: nn.Module | Callable[[], nn.Module], *,
         device: str | torch.device | None = None, decode: str = "auto", progress: bool | None = None) -> nn.Module:
    """Load a ``.tzip`` file into ``model_skeleton`` (a freshly built, uncompressed model), or
    into the model that ``model_skeleton()`` builds when it is a function of no arguments.

    Compressed layers are replaced by packed layers restored bit for bit; every other tensor is
    loaded into the skeleton. Returns the model (on ``device``). A function is called inside
    :func:`empty_weights`: its parameters take no memory until the file's tensors replace them,
    and its buffers are its own, so nothing is left empty (the way to load a big model). A
    skeleton built on the meta device takes the decoded tensors as its own; tensors the file does
    not hold (non-persistent buffers) stay on meta: ``load`` warns, naming them, and running the
    model raises :class:`torchzip.MetaTensorError` until they are set.

    ``decode``: where Huffman streams of values and indices are decoded — ``"auto"`` (the Triton
    decoder on ``device`` when it is CUDA, so only the compressed bytes cross to the GPU; else
    the CPU), ``"cpu"``, or ``"triton"`` (on ``device``, or the CPU under ``TRITON_INTERPRET=1``).
    The result is bit-identical either way. With a ``device`` other than the CPU, each layer's
    tensors (and each dense tensor) move there as soon as they are decoded, so the CPU holds one
    layer at a time. ``progress``: a bar per layer (None: only on a terminal).

    All or nothing: raises :class:`torchzip.FormatError` for a damaged or hostile file, or a
    skeleton whose layer names, types (matched exactly: not subclasses), shapes or dtypes do not
    match, and then the skeleton is exactly as it was.
    """
    if not isinstance(model_skeleton, nn.Module) and not callable(model_skeleton):
        raise TorchzipError(f"load needs a model skeleton (an nn.Module) or a function of no arguments that builds one, "
                            f"got {type(model_skeleton).__name__}")
    if decode not in ("auto", "cpu", "triton"):
        raise TorchzipError(f"decode must be 'auto', 'cpu' or 'triton', got {decode!r}")
    try:
        target = torch.device(device) if device is not None else torch.device("cpu")
    except (RuntimeError, TypeError) as err:
        raise TorchzipError(f"bad device {device!r}: {err}") from None
    if not isinstance(model_skeleton, nn.Module):
        with empty_weights():
            built = model_skeleton()
        if not isinstance(built, nn.Module):
            raise TorchzipError(f"the function given to load must return the model (an nn.Module), got {type(built).__name__}")
        model_skeleton = built
    on = target if decode == "triton" or (decode == "auto" and target.type == "cuda") else None
    moved = target if device is not None and target.type != "cpu" else None
    model = _commit(model_skeleton, _plan_load(path, model_skeleton, on, progress, moved))
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:  # stacklevel 3: the caller, past no_grad's wrapper
        warnings.warn(f"load: {len(left)} tensor(s) of the skeleton are not in the file and stay on the meta device "
                      f"({_shown(left)}); running the model raises MetaTensorError until they are set. Pass load a "
                      "function that builds the model (tz.load(path, lambda: Model(...))), or build the skeleton under "
                      "tz.empty_weights(): both put only parameters on meta and keep buffers real", stacklevel=3)
        _guard_meta(model, left)
    if device is None:
        return model
    # Module.to cannot copy out of meta (it would raise after the commit): what is left there stays.
    return model._apply(lambda t: t if t.is_meta else t.to(device)) if left else model.to(device)


def _shown(names: list[str]) -> str:
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")


class _MetaGuard:
    """A forward pre-hook that raises :class:`MetaTensorError` while any of ``names`` (relative to
    the module it hooks) is a meta tensor, and removes itself once none is. Without it, a model
    with meta buffers may run: ``F.embedding`` of meta indices (BERT's position ids) returns
    uninitialised memory, so the model computes garbage instead of failing."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.handle: Any = None

    def __call__(self, module: nn.Module, args: Any) -> None:
        still = [n for n in self.names if _is_meta(module, n)]
        if still:
            raise MetaTensorError(
                f"{len(still)} tensor(s) of {type(module).__name__} are still on the meta device, with no values: "
                f"{_shown(still)}. They were not in the file (a state_dict holds no non-persistent buffers, such as "
                "position ids or rotary tables); pass load a function that builds the model (tz.load(path, lambda: "
                "Model(...))) or build the skeleton under tz.empty_weights(), or set them before running the model")
        self.handle.remove()


def _is_meta(module: nn.Module, name: str) -> bool:
    owner, _, attr = name.rpartition(".")
    try:
        t = getattr(module.get_submodule(owner), attr, None)
    except AttributeError:  # the user replaced or removed the module that held it
        return False
    return isinstance(t, torch.Tensor) and t.is_meta


def _guard_meta(model: nn.Module, left: list[str]) -> None:
    """Hook the model, and each module that holds one of ``left``, so that running either while
    a tensor of ``left`` is still on meta raises (calling a submodule alone skips the root's hooks)."""
    guards: dict[str, list[str]] = {"": left}
    for name in left:
        owner, _, attr = name.rpartition(".")
        if owner:
            guards.setdefault(owner, []).append(attr)
    for owner, names in guards.items():
        guard = _MetaGuard(names)
        guard.handle = model.get_submodule(owner).register_forward_pre_hook(guard, prepend=True)
