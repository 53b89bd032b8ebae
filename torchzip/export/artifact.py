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
from torchzip.packed.layers import LAYER_KINDS, PackedLayer, kind_of, replace_module, wrap
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


def _encode_layer(name: str, layer: PackedLayer, out: StreamWriter) -> dict:
    p = layer.packed
    n, k = p.shape
    entry: dict[str, Any] = {"name": name, "kind": layer.kind, "format": p.format_name, "shape": [n, k],
                             "dtype": dtype_name(p.dtype), "zeros": int((p.dequantize() == 0).sum())}
    entry.update(p.encode(out))
    if getattr(layer, "bias", None) is not None:
        entry["tensors"]["bias"] = _bias(out, layer.bias.detach().cpu())
    return entry


def export(model: nn.Module, path: str | os.PathLike, *, progress: bool = True) -> int:
    """Write ``model`` to a ``.tzip`` file at ``path``; returns the file size in bytes.

    A trainable compressed model is frozen on a copy first. The write is atomic: a crash never
    leaves a partial file under ``path``.
    """
    if not isinstance(model, nn.Module):
        raise TorchzipError(f"export needs an nn.Module, got {type(model).__name__}")
    if Path(path).is_dir():
        raise TorchzipError(f"{path} is a directory; give a file path such as {Path(path) / 'model.tzip'}")
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        model = freeze(copy.deepcopy(model))
    layers, sections, skip = [], [], []
    out = StreamWriter()
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, PackedLayer)]
    for name, layer in tqdm(named, desc="export", disable=not progress, leave=False):
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


# ---- reading -------------------------------------------------------------------------------


def _read_bias(src: StreamReader, spec: Any, n: int) -> torch.Tensor:
    if not (isinstance(spec, dict) and "scale" in spec):
        return src.float_raw(spec, "bias")
    scale = spec.get("scale")
    src.need(type(scale) is float and math.isfinite(scale) and scale > 0, f"bad bias scale {scale!r}")
    return src.int8(spec, n, "bias").float() * torch.tensor(scale, dtype=torch.float32)


def decode_layer(entry: dict, section: memoryview, device: torch.device | None) -> tuple[PackedWeight, torch.Tensor | None]:
    """The packed weight and bias of one manifest layer entry (see docs/FORMAT.md)."""
    src = StreamReader(section, f"layer '{entry.get('name')}'", device)
    shape = src.shape(entry)
    src.need(len(shape) == 2, "weight shape must be [out, in]")
    dtype = lookup(DTYPES, entry.get("dtype"))
    src.need(dtype is not None and dtype.is_floating_point, f"bad weight dtype {entry.get('dtype')!r}")
    src.need(isinstance(entry.get("tensors"), dict), "no tensors")
    fmt = lookup(FORMATS, entry.get("format"))
    src.need(fmt is not None, f"unknown packed format {entry.get('format')!r}; allowed: {', '.join(sorted(FORMATS))}")
    packed = fmt.decode(entry, src, tuple(shape), dtype)
    bias = _read_bias(src, entry["tensors"]["bias"], shape[0]) if "bias" in entry["tensors"] else None
    src.need(bias is None or tuple(bias.shape) == (shape[0],), "bias shape does not match")
    return packed, bias


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
    modules = dict(model_skeleton.named_modules())
    model = model_skeleton
    replaced = []
    for entry in tqdm(manifest["layers"], desc="load", disable=not progress, leave=False):
        name = entry.get("name")
        module = modules.get(name) if isinstance(name, str) else None
        need(module is not None, where, f"the skeleton has no module named {name!r}")
        kind, file_kind = kind_of(module), lookup(LAYER_KINDS, entry.get("kind"))
        need(file_kind is not None and kind is file_kind, where,
             f"layer '{name}' is a {entry.get('kind')!r} in the file but a {type(module).__name__} in the skeleton")
        weight = module.weight
        rows = [weight.shape[0], weight[0].numel()] if weight.dim() else []
        need(rows == entry.get("shape"), where, f"layer '{name}' has shape {entry.get('shape')} in the file, {rows} in the skeleton")
        need(dtype_name(weight.dtype) == entry.get("dtype"), where,
             f"layer '{name}' is {entry.get('dtype')} in the file but {weight.dtype} in the skeleton; build the skeleton in the same dtype")
        packed, bias = decode_layer(entry, sections[entry["section"]], on)
        need((bias is None) == (getattr(module, "bias", None) is None), where, f"layer '{name}': bias presence differs")
        model = replace_module(model, name, wrap(module, packed, bias))
        replaced.append(name + "." if name else "")
    dense_src = StreamReader(sections[manifest["dense"]["section"]], "dense tensors")
    stored = {key: dense_src.raw(spec, f"'{key}'") for key, spec in manifest["dense"]["tensors"].items()}
    expected = {k: v for k, v in model.state_dict().items() if not any(k.startswith(s) for s in replaced)}
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    need(not missing and not unexpected, where,
         f"skeleton and file disagree: missing from the file {missing[:5]}, not in the skeleton {unexpected[:5]}")
    for key, value in stored.items():
        need(tuple(value.shape) == tuple(expected[key].shape), where,
             f"tensor '{key}' has shape {tuple(value.shape)} in the file, {tuple(expected[key].shape)} in the skeleton")
    model.load_state_dict(stored, strict=False)
    return model.to(device) if device is not None else model

