"""``export`` and ``load``: packed models to and from ``.tzip`` files.

Each packed layer's weight is written by its format (``PackedWeight.encode``, through
:class:`~torchzip.export.codec.StreamWriter`) and read back by it (``decode``); this module only
loops over layers, adds the bias, and stores every other tensor of the model (layers left
dense, norms, buffers) raw and losslessly in one last section.
"""

from __future__ import annotations

import copy
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from torchzip.errors import TorchzipError
from torchzip.export import container
from torchzip.export.codec import DTYPES, StreamReader, StreamWriter, dtype_name, lookup, need
from torchzip.freeze import freeze
from torchzip.packed.base import FORMATS, PackedWeight
from torchzip.packed.layers import LAYER_KINDS, PackedLayer, build_packed, kind_of, replace_module
from torchzip.packed.values import int8_quantize
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
        entry.update({"format": p.format_name, "zeros": int((p.dequantize() == 0).sum())})
        entry.update(p.encode(out))
    bias_name = layer.bias_names.get(tensor)
    bias = getattr(layer, bias_name, None) if bias_name else None
    if bias is not None:
        entry["tensors"]["bias"] = _bias(out, bias.detach().cpu())
    return entry, covered_keys(name, layer, {t: t == tensor and bias is not None for t in layer.packed_weights()})


def export(model: nn.Module, path: str | os.PathLike, *, progress: bool = True) -> int:
    """Write ``model`` to a ``.tzip`` file at ``path``; returns the file size in bytes.

    A trainable compressed model is frozen on a copy first. The write is atomic: a crash never
    leaves a partial file under ``path``. A packed weight several layers share (tied) is stored once.
    """
    if not isinstance(model, nn.Module):
        raise TorchzipError(f"export needs an nn.Module, got {type(model).__name__}")
    if Path(path).is_dir():
        raise TorchzipError(f"{path} is a directory; give a file path such as {Path(path) / 'model.tzip'}")
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        model = freeze(copy.deepcopy(model))
    layers, sections, covered = [], [], []
    first: dict[int, int] = {}
    out = StreamWriter()
    named = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, PackedLayer)]
    for name, layer in tqdm(named, desc="export", disable=not progress, leave=False):
        for tensor in layer.packed_weights():
            if out.section.size >= SECTION_BYTES:
                sections.append(out.section.getvalue())
                out = StreamWriter()
            entry, keys = _encode_weight(name, layer, tensor, out, first, len(layers))
            entry["section"] = len(sections)
            layers.append(entry)
            covered += keys
    dense, stored = {}, {}
    for key, t in model.state_dict().items():
        if _is_covered(key, covered):
            continue
        same = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.numel() else None
        dense[key] = dict(stored[same]) if same in stored else out.raw(t)  # tied tensors: one copy
        if same is not None:
            stored.setdefault(same, dense[key])
    sections.append(out.section.getvalue())
    manifest = {"format": "torchzip", "torchzip_version": __version__, "layers": layers,
                "dense": {"section": len(sections) - 1, "tensors": dense}}
    return container.write(path, manifest, sections)


# ---- reading -------------------------------------------------------------------------------


def _read_bias(src: StreamReader, spec: Any, n: int) -> torch.Tensor:
    if not (isinstance(spec, dict) and "scale" in spec):
        return src.float_raw(spec, "bias")
    scale = spec.get("scale")
    src.need(type(scale) is float and math.isfinite(scale) and scale > 0, f"bad bias scale {scale!r}")
    return src.int8(spec, n, "bias").float() * torch.tensor(scale, dtype=torch.float32)


def decode_weight(entry: dict, src: StreamReader) -> PackedWeight:
    """The packed weight of one manifest layer entry (see docs/FORMAT.md)."""
    shape = src.shape(entry)
    src.need(len(shape) == 2, "weight shape must be [out, in]")
    dtype = lookup(DTYPES, entry.get("dtype"))
    src.need(dtype is not None and dtype.is_floating_point, f"bad weight dtype {entry.get('dtype')!r}")
    src.need(isinstance(entry.get("tensors"), dict), "no tensors")
    fmt = lookup(FORMATS, entry.get("format"))
    src.need(fmt is not None, f"unknown packed format {entry.get('format')!r}; allowed: {', '.join(sorted(FORMATS))}")
    return fmt.decode(entry, src, tuple(shape), dtype)


def decode_bias(entry: dict, src: StreamReader, n: int) -> torch.Tensor | None:
    """The bias stored with a layer entry, if any."""
    tensors = entry.get("tensors")
    src.need(isinstance(tensors, dict), "no tensors")
    if "bias" not in tensors:
        return None
    bias = _read_bias(src, tensors["bias"], n)
    src.need(tuple(bias.shape) == (n,), "bias shape does not match")
    return bias


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


def read_manifest(path: str | os.PathLike) -> tuple[dict, list[memoryview]]:
    """Read and check a ``.tzip`` file; returns its manifest and sections."""
    manifest, sections = container.read(path)
    where = str(path)
    need(manifest.get("format") == "torchzip", where, "manifest does not describe a torchzip model")
    layers, dense = manifest.get("layers"), manifest.get("dense")
    need(isinstance(layers, list) and all(isinstance(e, dict) for e in layers), where, "manifest 'layers' must be a list")
    need(isinstance(dense, dict) and isinstance(dense.get("tensors"), dict), where, "manifest 'dense' is missing")
    for entry in layers + [dense]:
        sec = entry.get("section")
        need(type(sec) is int and 0 <= sec < len(sections), where, f"section index {sec!r} out of range")
    return manifest, sections


@torch.no_grad()
def load(path: str | os.PathLike, model_skeleton: nn.Module, *, device: str | torch.device | None = None,
         decode: str = "auto", progress: bool = True) -> nn.Module:
    """Load a ``.tzip`` file into ``model_skeleton`` (a freshly built, uncompressed model).

    Compressed layers are replaced by packed layers restored bit for bit; every other tensor is
    loaded into the skeleton. Returns the model (on ``device``). ``decode``: where Huffman
    streams of values and indices are decoded — ``"auto"`` (the Triton decoder on ``device``
    when it is CUDA, so only the compressed bytes cross to the GPU; else the CPU), ``"cpu"``, or
    ``"triton"`` (on ``device``, or the CPU under ``TRITON_INTERPRET=1``). The result is
    bit-identical either way. Raises :class:`torchzip.FormatError` for a damaged file or a
    skeleton whose layer names, types or shapes do not match.
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
    manifest, sections = read_manifest(path)
    where = str(path)
    layers = _plan_layers(manifest, sections, model_skeleton, where, on, progress)
    names: dict[int, list[str]] = {}
    for name, m in model_skeleton.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(name)
    model, covered = model_skeleton, []
    for name, (module, packed, biases) in layers.items():
        new = build_packed(module, packed, biases)
        for alias in names[id(module)]:
            model = replace_module(model, alias, new)
            covered += covered_keys(alias, new, {t: b is not None for t, b in biases.items()})
    dense_src = StreamReader(sections[manifest["dense"]["section"]], "dense tensors")
    stored = {key: dense_src.raw(spec, f"'{key}'") for key, spec in manifest["dense"]["tensors"].items()}
    expected = {k: v for k, v in model.state_dict().items() if not _is_covered(k, covered)}
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    need(not missing and not unexpected, where,
         f"skeleton and file disagree: missing from the file {missing[:5]}, not in the skeleton {unexpected[:5]}")
    for key, value in stored.items():
        need(tuple(value.shape) == tuple(expected[key].shape), where,
             f"tensor '{key}' has shape {tuple(value.shape)} in the file, {tuple(expected[key].shape)} in the skeleton")
    model.load_state_dict(stored, strict=False)
    return model.to(device) if device is not None else model


def _plan_layers(manifest: dict, sections: list, skeleton: nn.Module, where: str, on: torch.device | None,
                 progress: bool) -> dict[str, tuple[nn.Module, dict, dict]]:
    """Decode every packed entry and check it against the skeleton, touching nothing: returns
    ``{module name: (module, {tensor: PackedWeight}, {tensor: bias or None})}``."""
    modules = dict(skeleton.named_modules())
    entries = manifest["layers"]
    decoded: list[PackedWeight] = []
    tensors: list[torch.Tensor] = []  # the skeleton tensor of each entry, to compare ties
    out: dict[str, tuple[nn.Module, dict, dict]] = {}
    for i, entry in enumerate(tqdm(entries, desc="load", disable=not progress, leave=False)):
        name = entry.get("name")
        module = modules.get(name) if isinstance(name, str) else None
        need(module is not None, where, f"the skeleton has no module named {name!r}")
        kind, file_kind = kind_of(module), lookup(LAYER_KINDS, entry.get("kind"))
        need(file_kind is not None and kind is file_kind, where,
             f"layer '{name}' is a {entry.get('kind')!r} in the file but a {type(module).__name__} in the skeleton "
             "(layer kinds match by exact type)")
        tensor, names = entry.get("tensor", "weight"), kind.weights(module)
        need(tensor in names, where, f"layer '{name}' has no packable tensor {tensor!r}; its kind packs {list(names)}")
        value = getattr(module, tensor)
        rows = list(kind.view.matrix_shape(value.shape)) if value.dim() else []
        need(rows == entry.get("shape"), where, f"layer '{name}' has shape {entry.get('shape')} in the file, {rows} in the skeleton")
        need(dtype_name(value.dtype) == entry.get("dtype"), where,
             f"layer '{name}' is {entry.get('dtype')} in the file but {value.dtype} in the skeleton; build the skeleton in the same dtype")
        src = StreamReader(sections[entry["section"]], f"layer '{name}'", on)
        tied = entry.get("tied")
        if tied is None:
            packed = decode_weight(entry, src)
        else:
            need(type(tied) is int and 0 <= tied < i and "tied" not in entries[tied], where,
                 f"layer '{name}' is tied to entry {tied!r}, which is not an earlier untied layer")
            need(tensors[tied] is value, where, f"the file ties layer '{name}' to '{entries[tied]['name']}', the skeleton does not")
            packed = decoded[tied]
        bias_name = names[tensor]
        skeleton_bias = getattr(module, bias_name, None) if bias_name else None
        bias = decode_bias(entry, src, skeleton_bias.numel() if skeleton_bias is not None else rows[0])
        need((bias is None) == (skeleton_bias is None), where, f"layer '{name}': bias presence differs")
        decoded.append(packed)
        tensors.append(value)
        _, packs, biases = out.setdefault(name, (module, {}, {}))
        packs[tensor], biases[tensor] = packed, bias
    firsts: dict[int, int] = {}
    for i, value in enumerate(tensors):
        if "tied" not in entries[i]:
            other = firsts.setdefault(id(value), i)
            need(other == i, where, f"the skeleton ties layers '{entries[other]['name']}' and '{entries[i]['name']}', "
                                    "the file stores them separately")
    for name, (module, packs, _) in out.items():
        need(set(packs) == set(kind_of(module).weights(module)), where,
             f"layer '{name}': the file packs {sorted(packs)} of {sorted(kind_of(module).weights(module))}")
    return out
