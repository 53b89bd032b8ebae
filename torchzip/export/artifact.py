"""``export`` and ``load``: packed models to and from ``.tzip`` files.

Each packed layer gets one section holding its pieces: Huffman streams (code lengths, chunk
offsets, payload) for int8 values, codebook indices and sparse positions, and raw little-endian
bytes for scales, codebooks, float values and the bias. Every other tensor of the model (layers
left dense, norms, buffers) is stored raw, losslessly, in one last section.
"""

from __future__ import annotations

import copy
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

import torchzip
from torchzip.errors import FormatError, TorchzipError
from torchzip.export import container, huffman
from torchzip.export.streams import gaps_decode, gaps_encode, pairs24_decode, pairs24_encode
from torchzip.packed import CodebookWeight, CsrWeight, Int8Weight, Sparse24Weight
from torchzip.packed.bits import pack_bits
from torchzip.packed.layers import PackedConv, PackedEmbedding, PackedLinear, wrap
from torchzip.packed.values import int8_quantize

PACKED_LAYERS = (PackedLinear, PackedConv, PackedEmbedding)
DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
KINDS = {"Linear": nn.Linear, "Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Embedding": nn.Embedding}
MAX_ELEMENTS = 1 << 40
# Small layers share a section until it holds about this much: one alignment gap and one CRC per
# section instead of per layer (it matters for tiny models); a big layer fills a section alone.
SECTION_BYTES = 1 << 20

if sys.byteorder != "little":  # pragma: no cover - raw sections are written in host byte order
    raise ImportError("torchzip.export needs a little-endian machine")


# ---- writing -------------------------------------------------------------------------------


def _raw(w: container.SectionWriter, t: torch.Tensor) -> dict:
    t = t.detach().contiguous().cpu()
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return {"codec": "raw", "dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "at": w.add(data)}


MAX_CODE_LEN = 15  # so a code length fits a 4-bit nibble in the stored table


def _encode(symbols: np.ndarray, alphabet: int) -> huffman.HuffmanStream:
    return huffman.encode(np.asarray(symbols, dtype=np.int64).reshape(-1), alphabet, max_len=MAX_CODE_LEN)


def _huffman(w: container.SectionWriter, symbols: np.ndarray | huffman.HuffmanStream, alphabet: int, **extra: Any) -> dict:
    """Write a stream (given as symbols, or already encoded) and return its manifest entry."""
    s = symbols if isinstance(symbols, huffman.HuffmanStream) else _encode(symbols, alphabet)
    chunks, median, rice = huffman.pack_chunks(s.chunk_bits)
    return {
        "codec": "huffman", "n": s.n_symbols, "alphabet": alphabet, "group": s.group, "chunk_size": s.chunk_size,
        "chunk_median": median, "chunk_rice": rice, "lengths": w.add(huffman.pack_lengths(s.lengths)),
        "chunks": w.add(chunks), "payload": w.add(bytes(s.payload)), **extra,
    }


def _int8(w: container.SectionWriter, q: torch.Tensor, **extra: Any) -> dict:
    """An int8 stream: Huffman-coded bytes, or the raw bytes when those are smaller (short streams)."""
    data = q.detach().cpu().numpy().astype(np.int8).reshape(-1)
    stream = _encode(data.view(np.uint8), 256)
    if huffman.stored_bytes(stream) >= data.size:
        return {**_raw(w, torch.from_numpy(data.copy())), **extra}
    return _huffman(w, stream, 256, **extra)


def _bias(w: container.SectionWriter, bias: torch.Tensor) -> dict:
    # A bias that is exactly int8 times one scale (as quantize_bias leaves it) is stored so, losslessly.
    if bias.dtype == torch.float32 and bias.numel():
        q, scale = int8_quantize(bias.reshape(1, -1))
        if torch.equal((q.float() * scale).reshape(bias.shape), bias):
            return _int8(w, q, scale=float(scale))
    return _raw(w, bias)


def _values(w: container.SectionWriter, packed, values: torch.Tensor) -> dict:
    """``values`` (the packed weight's, maybe reordered) coded as its value kind asks."""
    if packed.kind == "int8":
        return _int8(w, values)
    if packed.kind == "codebook":
        return _huffman(w, values.cpu().numpy(), packed.codebook.shape[1])
    return _raw(w, values)


def _encode_layer(name: str, layer: nn.Module, w: container.SectionWriter) -> dict:
    p = layer.packed
    n, k = p.shape
    kind = {PackedLinear: "Linear", PackedEmbedding: "Embedding"}.get(type(layer)) or f"Conv{getattr(layer, 'dims', 2)}d"
    entry: dict[str, Any] = {"name": name, "kind": kind, "format": p.format_name, "shape": [n, k],
                             "dtype": DTYPE_NAMES[p.dtype], "zeros": int((p.dequantize() == 0).sum())}
    t: dict[str, Any] = {}
    if isinstance(p, Int8Weight):
        entry["group_size"] = p.group_size
        t["qweight"] = _int8(w, p.qweight)
        t["scales"] = _raw(w, p.scales)
    elif isinstance(p, CodebookWeight):
        entry["bits"] = p.bits
        t["indices"] = _huffman(w, p.indices().cpu().numpy(), 2**p.bits)
        t["codebook"] = _raw(w, p.codebook)
    else:
        entry["values"] = p.kind
        entry["group_size"] = p.group_size
        values = p.values
        if isinstance(p, Sparse24Weight):
            cols = p.columns().cpu().numpy()
            t["positions"] = _huffman(w, pairs24_encode(cols % 4), 6)
        else:
            rows, cols = p.rows().cpu().numpy(), p.col_idx.long().cpu().numpy()
            # Gaps in row-major or column-major order, whichever codes smaller (e.g. a dead input
            # feature prunes a whole column: one long gap column-major, many row-major).
            order = np.argsort(cols * n + rows, kind="stable")
            options = {"row": (rows * k + cols, None), "col": ((cols * n + rows)[order], order)}
            coded = {}
            for name, (flat, _) in options.items():
                symbols, escape = gaps_encode(flat)
                coded[name] = (_encode(symbols, escape + 1), escape)
            best = min(coded, key=lambda o: huffman.stored_bytes(coded[o][0]))
            stream, escape = coded[best]
            t["positions"] = _huffman(w, stream, escape + 1, escape=escape, count=int(rows.size), order=best)
            if best == "col":  # values follow the positions' order
                values = values[torch.from_numpy(order)]
        t["values"] = _values(w, p, values)
        for side in ("scales", "codebook"):
            if getattr(p, side) is not None:
                t[side] = _raw(w, getattr(p, side))
    if getattr(layer, "bias", None) is not None:
        t["bias"] = _bias(w, layer.bias.detach().cpu())
    entry["tensors"] = t
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
        model = torchzip.freeze(copy.deepcopy(model))
    layers, sections, skip = [], [], []
    w = container.SectionWriter()
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, PACKED_LAYERS)]
    for name, layer in tqdm(named, desc="export", disable=not progress, leave=False):
        if w.size >= SECTION_BYTES:
            sections.append(w.getvalue())
            w = container.SectionWriter()
        entry = _encode_layer(name, layer, w)
        entry["section"] = len(sections)
        layers.append(entry)
        skip.append(name + "." if name else "")
    dense, stored = {}, {}
    for key, t in model.state_dict().items():
        if any(key.startswith(s) for s in skip):
            continue
        same = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.numel() else None
        dense[key] = dict(stored[same]) if same in stored else _raw(w, t)  # tied tensors: one copy
        if same is not None:
            stored.setdefault(same, dense[key])
    sections.append(w.getvalue())
    manifest = {"format": "torchzip", "torchzip_version": torchzip.__version__, "layers": layers,
                "dense": {"section": len(sections) - 1, "tensors": dense}}
    return container.write(path, manifest, sections)


# ---- reading -------------------------------------------------------------------------------


def _lookup(table: dict, key: Any) -> Any:
    """``table[key]`` for a string key, else None (manifest values may be any JSON)."""
    return table.get(key) if isinstance(key, str) else None


def _need(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise FormatError(f"{where}: {what}")


def _piece(section: memoryview, ref: Any, where: str) -> memoryview:
    ok = isinstance(ref, list) and len(ref) == 2 and all(type(v) is int for v in ref)
    _need(ok and ref[0] >= 0 and ref[1] >= 0 and ref[0] + ref[1] <= len(section), where,
          f"byte range {ref!r} lies outside its section ({len(section)} bytes)")
    return section[ref[0] : ref[0] + ref[1]]


def _shape(spec: dict, where: str) -> list[int]:
    shape = spec.get("shape")
    _need(isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape), where, f"bad shape {shape!r}")
    _need(math.prod(shape) <= MAX_ELEMENTS, where, f"shape {shape} is absurdly large")
    return shape


def _read_raw(section: memoryview, spec: Any, where: str) -> torch.Tensor:
    _need(isinstance(spec, dict) and spec.get("codec") == "raw", where, "expected a raw tensor entry")
    dtype = _lookup(DTYPES, spec.get("dtype"))
    _need(dtype is not None, where, f"unknown dtype {spec.get('dtype')!r}; allowed: {sorted(DTYPES)}")
    shape = _shape(spec, where)
    data = _piece(section, spec.get("at"), where)
    size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    _need(len(data) == size, where, f"holds {len(data)} bytes, shape {shape} of {spec['dtype']} needs {size}")
    if not size:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


def _read_huffman(section: memoryview, spec: Any, where: str, alphabet: int | None = None,
                  on: torch.device | None = None) -> torch.Tensor:
    """Decode a Huffman stream to int32 symbols: on the CPU, or with the Triton decoder on ``on``."""
    _need(isinstance(spec, dict) and spec.get("codec") == "huffman", where, "expected a Huffman stream entry")
    n, a, g, chunk = spec.get("n"), spec.get("alphabet"), spec.get("group"), spec.get("chunk_size")
    _need(all(type(v) is int for v in (n, a, g, chunk)) and n >= 0 and 1 <= a <= huffman.MAX_ALPHABET and chunk >= 1,
          where, "stream header (n, alphabet, group, chunk_size) is invalid")
    _need(g == 1 or (g in huffman.GROUPS and a**g <= 256), where,
          f"group {g} is not allowed: 1, or {huffman.GROUPS[1:]} with alphabet**group <= 256")
    _need(alphabet is None or a == alphabet, where, f"alphabet {a} does not match the layer (expected {alphabet})")
    payload = _piece(section, spec.get("payload"), where)
    _need(n <= 8 * g * len(payload), where, f"{n} symbols cannot fit in {len(payload)} payload bytes")
    median, rice = spec.get("chunk_median"), spec.get("chunk_rice")
    _need(type(median) is int and type(rice) is int, where, "chunk table header (chunk_median, chunk_rice) is invalid")
    try:
        full = huffman.unpack_lengths(_piece(section, spec.get("lengths"), where), a**g)
        chunks = huffman.unpack_chunks(_piece(section, spec.get("chunks"), where), huffman.lane_count(n, g, chunk),
                                       median, rice)
    except FormatError as err:
        raise FormatError(f"{where}: {err}") from None
    stream = huffman.HuffmanStream(full, np.frombuffer(payload, np.uint8), chunks, n, chunk, g, a)
    try:
        if on is not None and -(-n // g) < 1 << 31:  # the kernel indexes codes with int32
            from torchzip.kernels.huffman_decode import decode_triton

            return decode_triton(stream, on)
        return torch.from_numpy(huffman.decode(stream).astype(np.int32))
    except FormatError as err:
        raise FormatError(f"{where}: {err}") from None


def _values_of(section, t, kind, count, where, codebook, on):
    if kind == "float":
        values = _read_raw(section, t.get("values"), where + " values")
        _need(values.dtype.is_floating_point and values.numel() == count, where, "float values do not match the positions")
        return values.reshape(-1)
    if kind == "int8":
        values = _read_int8(section, t.get("values"), count, where + " values", on)
    else:
        values = _read_huffman(section, t.get("values"), where + " values", codebook.shape[1], on).to(torch.uint8)
    _need(values.numel() == count, where, f"{values.numel()} values for {count} positions")
    return values


def _side(section, t, kind, g, n, k, where):
    scales = codebook = None
    if kind == "int8":
        scales = _read_raw(section, t.get("scales"), where + " scales").float()
        _need(tuple(scales.shape) == (n, k // g if g else 1), where, f"scales shape {tuple(scales.shape)} does not fit")
    if kind == "codebook":
        codebook = _read_raw(section, t.get("codebook"), where + " codebook").float()
        _need(codebook.dim() == 2 and codebook.shape[0] in (1, n) and 1 <= codebook.shape[1] <= 256, where,
              f"codebook shape {tuple(codebook.shape)} does not fit {n} rows")
    return scales, codebook


def _read_int8(section: memoryview, spec: Any, count: int, where: str, on: torch.device | None = None) -> torch.Tensor:
    """``count`` int8 values, Huffman-coded or raw."""
    if isinstance(spec, dict) and spec.get("codec") == "raw":
        q = _read_raw(section, spec, where)
        _need(q.dtype == torch.int8, where, f"int8 values stored as {q.dtype}")
        q = q.reshape(-1)
    else:
        q = _read_huffman(section, spec, where, 256, on).to(torch.uint8).view(torch.int8)
    _need(q.numel() == count, where, f"{q.numel()} int8 values where {count} are needed")
    return q


def _read_bias(section: memoryview, spec: Any, n: int, where: str) -> torch.Tensor:
    if not (isinstance(spec, dict) and "scale" in spec):
        return _read_raw(section, spec, where)
    scale = spec.get("scale")
    _need(type(scale) is float and math.isfinite(scale) and scale > 0, where, f"bad scale {scale!r}")
    return _read_int8(section, spec, n, where).float() * torch.tensor(scale, dtype=torch.float32)


def _decode_layer(entry: dict, section: memoryview, on: torch.device | None) -> tuple[Any, torch.Tensor | None]:
    where = f"layer '{entry.get('name')}'"
    shape = _shape(entry, where)
    _need(len(shape) == 2, where, "weight shape must be [out, in]")
    n, k = shape
    dtype = _lookup(DTYPES, entry.get("dtype"))
    _need(dtype is not None and dtype.is_floating_point, where, f"bad weight dtype {entry.get('dtype')!r}")
    t = entry.get("tensors")
    _need(isinstance(t, dict), where, "no tensors")
    fmt = entry.get("format")
    _need(fmt in ("int8", "codebook", "sparse24", "csr"), where,
          f"unknown packed format {fmt!r}; allowed: int8, codebook, sparse24, csr")
    kind = fmt if fmt in ("int8", "codebook") else entry.get("values")
    _need(kind in ("float", "int8", "codebook"), where, f"unknown value kind {kind!r}; allowed: float, int8, codebook")
    g = entry.get("group_size", 0)
    _need(type(g) is int and g >= 0 and (g == 0 or k % g == 0), where, f"bad group_size {g!r}")
    scales, codebook = _side(section, t, kind, g, n, k, where)
    if fmt == "int8":
        qweight = _read_int8(section, t.get("qweight"), n * k, where + " qweight", on).reshape(n, k)
        packed = Int8Weight(qweight, scales, g, dtype)
    elif fmt == "codebook":
        bits = entry.get("bits")
        _need(type(bits) is int and 1 <= bits <= 8, where, f"bad bits {bits!r}")
        _need(codebook.shape[1] == 2**bits, where, f"codebook has {codebook.shape[1]} entries, bits={bits} needs {2**bits}")
        idx = _read_huffman(section, t.get("indices"), where + " indices", 2**bits, on)
        _need(idx.numel() == n * k, where, f"{idx.numel()} indices for a {n}x{k} weight")
        packed = CodebookWeight(pack_bits(idx.reshape(n, k), bits), codebook, bits, (n, k), dtype)
    elif fmt == "sparse24":
        _need(k % 4 == 0, where, f"2:4 weight needs in_features divisible by 4, got {k}")
        sym = _read_huffman(section, t.get("positions"), where + " positions", 6).numpy()
        _need(sym.size == n * k // 4, where, f"{sym.size} position pairs for a {n}x{k} weight")
        pos = torch.from_numpy(pairs24_decode(sym).reshape(n, k // 2))
        values = _values_of(section, t, kind, n * k // 2, where, codebook, on).reshape(n, k // 2)
        packed = Sparse24Weight(values, pack_bits(pos, 2), (n, k), dtype, scales, codebook, g)
    elif fmt == "csr":
        spec = t.get("positions")
        _need(isinstance(spec, dict) and type(spec.get("escape")) is int and spec["escape"] >= 1, where, "bad escape")
        _need(spec.get("order", "row") in ("row", "col"), where, f"position order must be 'row' or 'col', got {spec.get('order')!r}")
        sym = _read_huffman(section, spec, where + " positions", spec["escape"] + 1).numpy()
        flat = torch.from_numpy(gaps_decode(sym, spec["escape"], n * k))
        _need(spec.get("count") == flat.numel(), where, "position count does not match")
        values = _values_of(section, t, kind, flat.numel(), where, codebook, on)
        if spec.get("order") == "col":  # back to row-major, values alongside
            flat = (flat % n) * k + flat // n
            flat, perm = torch.sort(flat)
            values = values[perm.to(values.device)]
        rows, cols = flat // k, flat % k
        row_ptr = torch.zeros(n + 1, dtype=torch.int64)
        row_ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
        packed = CsrWeight(row_ptr, cols.to(CsrWeight.index_dtype(k)), values.cpu(), (n, k), dtype, scales, codebook, g)
    bias = _read_bias(section, t["bias"], n, where + " bias") if "bias" in t else None
    _need(bias is None or tuple(bias.shape) == (n,), where, "bias shape does not match")
    return packed, bias


def read_manifest(path: str | os.PathLike) -> tuple[dict, list[memoryview]]:
    """Read and check a ``.tzip`` file; returns its manifest and sections."""
    manifest, sections = container.read(path)
    _need(manifest.get("format") == "torchzip", str(path), "manifest does not describe a torchzip model")
    layers, dense = manifest.get("layers"), manifest.get("dense")
    _need(isinstance(layers, list) and all(isinstance(e, dict) for e in layers), str(path), "manifest 'layers' must be a list")
    _need(isinstance(dense, dict) and isinstance(dense.get("tensors"), dict), str(path), "manifest 'dense' is missing")
    for entry in layers + [dense]:
        sec = entry.get("section")
        _need(type(sec) is int and 0 <= sec < len(sections), str(path), f"section index {sec!r} out of range")
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
    modules = dict(model_skeleton.named_modules())
    model = model_skeleton
    replaced = []
    for entry in tqdm(manifest["layers"], desc="load", disable=not progress, leave=False):
        name = entry.get("name")
        module = modules.get(name) if isinstance(name, str) else None
        _need(module is not None, str(path), f"the skeleton has no module named {name!r}")
        kind = entry.get("kind")
        _need(_lookup(KINDS, kind) is not None and issubclass(parametrize.type_before_parametrizations(module), KINDS[kind]), str(path),
              f"layer '{name}' is a {kind!r} in the file but a {type(module).__name__} in the skeleton")
        weight = module.weight
        rows = [weight.shape[0], weight[0].numel()] if weight.dim() else []
        _need(rows == entry.get("shape"), str(path), f"layer '{name}' has shape {entry.get('shape')} in the file, {rows} in the skeleton")
        _need(DTYPE_NAMES.get(weight.dtype) == entry.get("dtype"), str(path),
              f"layer '{name}' is {entry.get('dtype')} in the file but {weight.dtype} in the skeleton; build the skeleton in the same dtype")
        packed, bias = _decode_layer(entry, sections[entry["section"]], on)
        _need((bias is None) == (getattr(module, "bias", None) is None), str(path), f"layer '{name}': bias presence differs")
        layer = wrap(module, packed, bias)
        if name:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
        else:
            model = layer
        replaced.append(name + "." if name else "")
    dense_sec = sections[manifest["dense"]["section"]]
    stored = {key: _read_raw(dense_sec, spec, f"tensor '{key}'") for key, spec in manifest["dense"]["tensors"].items()}
    expected = {k: v for k, v in model.state_dict().items() if not any(k.startswith(s) for s in replaced)}
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    _need(not missing and not unexpected, str(path),
          f"skeleton and file disagree: missing from the file {missing[:5]}, not in the skeleton {unexpected[:5]}")
    for key, value in stored.items():
        _need(tuple(value.shape) == tuple(expected[key].shape), str(path),
              f"tensor '{key}' has shape {tuple(value.shape)} in the file, {tuple(expected[key].shape)} in the skeleton")
    model.load_state_dict(stored, strict=False)
    return model.to(device) if device is not None else model
