"""Hostile ``.tzip`` files built from the format itself: every checksum, offset and size right,
the content made to hurt (see docs/FORMAT.md, "What a reader must reject" and "Limits").

``good_file()`` exports a small model that has every kind of piece (Huffman and raw int8
streams, int8 biases with a scale, a raw float bias, a codebook, CSR positions, dense tensors).
Each case in :data:`CASES` edits its manifest and sections and :func:`assemble` writes them back
as a valid container. ``tests/test_hostile.py`` runs every case in a subprocess with a memory
limit and checks that ``load`` and ``inspect`` raise ``FormatError`` within a time and memory
bound, leaving the skeleton unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import json
import math
import os
import random
import struct
import sys
import time
import traceback
import warnings
import zlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

HEADER = struct.Struct("<8sIIQ")
MAGIC, VERSION, ALIGN = b"TZIP\r\n\x1a\n", 2, 64


# ---- the model and skeletons ----------------------------------------------------------------


def skeleton() -> nn.Sequential:
    """The architecture of :func:`good_file`: layers 2 (int8), 5 (codebook), 6 (CSR int8)."""
    return nn.Sequential(nn.Embedding(12, 8), nn.Flatten(), nn.Linear(24, 64), nn.LayerNorm(64), nn.ReLU(),
                         nn.Linear(64, 32), nn.Linear(32, 32))


class LoggingLinear(nn.Linear):
    """A Linear subclass with behaviour of its own, which a packed layer would lose."""

    def forward(self, x):
        return super().forward(x) * 2


def subclass_skeleton() -> nn.Sequential:
    model = skeleton()
    model[5] = LoggingLinear(64, 32)
    return model


def half_bias_skeleton() -> nn.Sequential:
    model = skeleton()
    model[5].bias.data = model[5].bias.data.half()  # the file's bias of layer 5 is float32
    return model


SKELETONS: dict[str, Callable[[], nn.Module]] = {
    "plain": skeleton, "subclass": subclass_skeleton, "half_bias": half_bias_skeleton}


def good_file() -> bytes:
    """A valid file of :func:`skeleton` (deterministic)."""
    import tempfile

    import torchzip as tz

    torch.manual_seed(7)
    recipe = [tz.Prune(sparsity=0.9, targets=["Linear"], exclude=["2", "5"]), tz.Quantize(targets=["Linear"], exclude=["5"]),
              tz.Codebook(bits=3, targets=["Linear"], exclude=["2", "6"]), tz.QuantizeBias(targets=["Linear"], exclude=["5"])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frozen = tz.freeze(tz.compress(skeleton(), recipe, progress=False))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "good.tzip")
        tz.export(frozen, path, progress=False)
        with open(path, "rb") as f:
            return f.read()


# ---- building containers --------------------------------------------------------------------


def split(data: bytes) -> tuple[dict, list[bytearray]]:
    """A file's manifest (without ``sections`` and ``file_size``) and its sections, to edit."""
    _, _, _, length = HEADER.unpack_from(data)
    manifest = json.loads(zlib.decompress(data[HEADER.size: HEADER.size + length]))
    sections = [bytearray(data[off: off + size]) for off, size, _ in manifest.pop("sections")]
    del manifest["file_size"]
    return manifest, sections


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def container(text: bytes, sections: list[bytes] = (), *, length: int | None = None) -> bytes:
    """Header (CRC right; ``length`` overrides the manifest length field), ``zlib(text)``, sections."""
    return _pack(zlib.compress(text, 9), sections, length)


def _pack(raw: bytes, sections: list[bytes], length: int | None = None) -> bytes:
    out = bytearray(HEADER.pack(MAGIC, VERSION, zlib.crc32(raw), len(raw) if length is None else length) + raw)
    for s in sections:
        out += bytes(_align(len(out)) - len(out)) + s
    return bytes(out)


def assemble(manifest: dict, sections: list[bytes], raw: dict[bytes, bytes] | None = None,
             file_size: Callable[[int], object] = lambda n: n) -> bytes:
    """A container whose manifest is ``manifest`` with a right section table and file size.

    ``raw``: replacements in the JSON text, e.g. ``b'"@big@"'`` -> ``b"1" * 5000``, to write what
    ``json.dumps`` cannot (huge integers, NaN, duplicate keys). ``file_size(real size)``: the
    value to declare.
    """
    start = _align(HEADER.size + 1)
    while True:
        table, offset = [], start
        for i, s in enumerate(sections):
            table.append([offset, len(s), zlib.crc32(bytes(s))])
            offset += len(s) if i == len(sections) - 1 else _align(len(s))
        text = json.dumps(dict(manifest, sections=table, file_size=file_size(offset))).encode()
        for marker, value in (raw or {}).items():
            assert marker in text, marker
            text = text.replace(marker, value)
        raw_text = zlib.compress(text, 9)
        if HEADER.size + len(raw_text) <= start:
            break
        start = _align(HEADER.size + len(raw_text))
    data = _pack(raw_text, [bytes(s) for s in sections])
    assert len(data) == offset, "sections were not laid out where the table says"
    return data


def padding(n: int, seed: int = 0) -> bytes:
    """Incompressible bytes: a section that makes a file big enough for its manifest's size."""
    return random.Random(seed).randbytes(n)


# ---- the cases ------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    build: Callable[[bytes], bytes]  # good file -> hostile file
    match: str  # regex the FormatError message of load must match
    inspect: bool = True  # inspect must reject it too (False: only a skeleton tells it is wrong)
    skeleton: str = "plain"
    inspect_match: str | None = None  # regex for inspect's message (default: ``match``)


CASES: dict[str, Case] = {}


def case(match: str, inspect: bool = True, skeleton: str = "plain", inspect_match: str | None = None):
    def register(fn: Callable[[dict, list], bytes]) -> Callable:
        def build(good: bytes) -> bytes:
            manifest, sections = split(good)
            return fn(manifest, sections)

        CASES[fn.__name__] = Case(fn.__name__, build, match, inspect, skeleton, inspect_match)
        return fn

    return register


def layer(manifest: dict, name: str) -> dict:
    return next(e for e in manifest["layers"] if e["name"] == name)


# Reader limits: numbers, size, depth, values.

@case("number of 5000 characters")
def huge_int_file_size(m, s):
    return assemble(m, s, {b'"@big@"': b"9" * 5000}, file_size=lambda n: "@big@")


@case("number of 5000 characters")
def huge_int_shape(m, s):
    layer(m, "2")["shape"] = ["@big@", 24]
    return assemble(m, s, {b'"@big@"': b"1" * 5000})


def _bomb(unit: bytes, size: int) -> bytes:
    return b"[" + unit * ((size - 2) // len(unit)) + unit[:-1] + b"]"


@case("inflates past")
def bomb_lists_64mib(m, s):
    return container(_bomb(b"[],", (64 << 20) - 4096))  # about 65 KB, inflating to just under 64 MiB


@case("inflates past")
def bomb_objects_64mib(m, s):
    return container(_bomb(b"{},", (64 << 20) - 4096))


@case("more than 4194304 JSON items")
def values_past_the_limit(m, s):
    # Big enough a file that the size rule lets the text through: the value count stops it.
    m["layers"] = ["@lists@"]
    return assemble(m, s + [padding(1 << 20)], {b'["@lists@"]': _bomb(b"[],", 13 << 20)})


@case("layer entry must be an object")
def largest_manifest_allowed(m, s):
    # As many items as the limits allow, of the kind that costs a parser the most memory per
    # item (2-character strings: 4M of them, 20 MiB of text, in a 1.3 MiB file): the costliest
    # manifest a reader parses. Then it fails on its content.
    m["layers"] = ["@strings@"]
    return assemble(m, s + [padding(1300 << 10)], {b'["@strings@"]': _bomb(b'"ab",', 5 * ((1 << 22) - 1000))})


@case("nests 100001 levels deep; at most 32")
def deep_nesting(m, s):
    m["junk"] = "@deep@"
    return assemble(m, s, {b'"@deep@"': b"[" * 100000 + b"]" * 100000})


@case("number of 1000 characters")
def long_float(m, s):
    layer(m, "2")["tensors"]["bias"]["scale"] = "@scale@"
    return assemble(m, s, {b'"@scale@"': b"0." + b"1" * 998})


@case("NaN, which is not JSON")
def nan_scale(m, s):
    layer(m, "2")["tensors"]["bias"]["scale"] = "@scale@"
    return assemble(m, s, {b'"@scale@"': b"NaN"})


@case("overflows a float")
def infinite_scale(m, s):
    layer(m, "2")["tensors"]["bias"]["scale"] = "@scale@"
    return assemble(m, s, {b'"@scale@"': b"1e400"})


@case("not UTF-8")
def not_utf8(m, s):
    m["torchzip_version"] = "@v@"
    return assemble(m, s, {b'"@v@"': b'"\xff\xfe"'})


@case("not UTF-8|not valid JSON")
def utf16(m, s):
    return container(json.dumps(dict(m, sections=[], file_size=0)).encode("utf-16"))


@case("not valid JSON: Unexpected UTF-8 BOM")
def utf8_bom(m, s):
    return container(b"\xef\xbb\xbf" + json.dumps(dict(m, sections=[], file_size=0)).encode())


@case("manifest length")
def manifest_length_past_the_file(m, s):
    return container(json.dumps(dict(m, sections=[], file_size=0)).encode(), length=1 << 63)


@case("manifest file_size [0-9]+\\.0 is not")
def file_size_float(m, s):
    return assemble(m, s, file_size=float)


@case("section 0 entry \\[True, 0, 0\\] is not \\[offset, length, crc32\\]")
def section_entry_bool(m, s):
    return assemble(m, s, {b'"sections": [[': b'"sections": [[true, 0, 0], ['})


# Names: duplicates, types, text.

@case("key 'dense' twice|key '3.weight' twice")
def duplicate_dense_key(m, s):
    # JSON keeps the last of two equal keys: the first entry would be silently dropped.
    m["dense"]["tensors"]["@dup@"] = m["dense"]["tensors"].pop("3.weight")
    text = json.dumps(m["dense"]["tensors"]["@dup@"]).encode()
    return assemble(m, s, {b'"@dup@": ' + text: b'"3.weight": ' + text + b', "3.weight": ' + text})


@case("key 'name' twice")
def duplicate_entry_key(m, s):
    layer(m, "2")["name"] = "@name@"
    return assemble(m, s, {b'"@name@"': b'"5", "name": "2"'})


@case("layer '2' is listed twice")
def layer_twice(m, s):
    copy_ = copy.deepcopy(layer(m, "2"))
    m["layers"].append(copy_)
    return assemble(m, s)


@case("layer '2' is listed twice")
def layer_20000_times(m, s):
    m["layers"] += [copy.deepcopy(layer(m, "2")) for _ in range(20000)]
    return assemble(m, s + [padding(600 << 10)])  # enough bytes for the size rule to pass it


# One field of one layer set to a hostile value: (case, layer, key, value, what the error says).
FIELDS = [
    ("lone_surrogate_name", "2", "name", "\ud800", "not a string of UTF-8 text"),
    ("name_int", "2", "name", 5, "layer name 5 is not a string"),
    ("kind_null", "2", "kind", None, "unknown layer kind None"),
    ("format_null", "5", "format", None, "unknown packed format None"),
    ("shape_x_1e9", "2", "shape", ["x", 1e9], "bad shape \\['x', 1000000000.0\\]"),
    ("shape_string_times_2_31", "2", "shape", ["abcdefgh", 2**31], "bad shape \\['abcdefgh', 2147483648\\]"),
    ("shape_absurd", "2", "shape", [2**31, 2**31], "more than 1099511627776 elements"),
    ("zeros_negative", "2", "zeros", -1, "zeros -1 must count"),
    ("zeros_past_the_weight", "6", "zeros", 10000, "zeros 10000 must count"),
    ("section_index_bool", "2", "section", True, "section index True"),
]
for _name, _layer, _key, _value, _match in FIELDS:
    def _set_field(m, s, layer_name=_layer, key=_key, value=_value):
        layer(m, layer_name)[key] = value
        return assemble(m, s)

    _set_field.__name__ = _name
    case(_match)(_set_field)


@case("tensor '3.weight' has shape \\[1, 1, 1, 1, 1, 1, ...\\] in the file, \\[64\\]", inspect_match="bad shape")
def shape_100000_dims(m, s):
    m["dense"]["tensors"]["3.weight"]["shape"] = [1] * 100000
    return assemble(m, s)


# Byte ranges.

@case("overlap")
def overlap_within_a_layer(m, s):
    t = layer(m, "2")["tensors"]
    t["scales"]["at"] = [t["qweight"]["at"][0], t["scales"]["at"][1]]  # scales read from qweight's bytes
    return assemble(m, s)


@case("overlap")
def overlap_across_layers(m, s):
    a, b = layer(m, "2")["tensors"], layer(m, "6")["tensors"]
    b["scales"]["at"] = [a["scales"]["at"][0], b["scales"]["at"][1]]
    return assemble(m, s)


@case("overlap")
def overlap_dense_and_layer(m, s):
    t = m["dense"]["tensors"]["3.weight"]
    t["at"] = [layer(m, "5")["tensors"]["codebook"]["at"][0], t["at"][1]]
    return assemble(m, s)


@case("no module named 'copy0'", inspect_match="hold [0-9]+ bytes, more than its [0-9]+: some overlap")
def one_payload_for_2000_layers(m, s):
    # 2000 differently named layers decoding the same bytes: work out of all proportion to the
    # file. Inspect must stop at the first layer whose bytes are not its own.
    base = layer(m, "5")
    m["layers"] += [dict(copy.deepcopy(base), name=f"copy{i}") for i in range(2000)]
    return assemble(m, s)


# Dtypes of stored tensors.

def retype(sections: list, spec: dict, dtype: str, item_bytes: int) -> None:
    """Store the raw tensor ``spec`` as ``dtype`` instead: that many (zero) bytes, appended to section 0."""
    size = item_bytes * math.prod(spec["shape"])
    spec.update(dtype=dtype, at=[len(sections[0]), size])
    sections[0] += bytes(size)


@case("must be a float tensor, got torch.int8")
def int8_bias_without_scale(m, s):
    del layer(m, "2")["tensors"]["bias"]["scale"]
    return assemble(m, s)


# One tensor of one layer stored in another dtype: (case, layer, tensor, dtype, its bytes, what the error says).
RETYPED = [
    ("int64_bias", "2", "bias", "int64", 8, "is stored as int64; allowed: int8"),  # has a scale: int8 values
    ("int64_bias_without_scale", "5", "bias", "int64", 8, "must be a float tensor, got torch.int64"),
    ("float64_codebook", "5", "codebook", "float64", 8, "is stored as float64; allowed: float32"),
]
for _name, _layer, _tensor, _dtype, _bytes, _match in RETYPED:
    def _retyped(m, s, layer_name=_layer, tensor=_tensor, dtype=_dtype, item_bytes=_bytes):
        retype(s, layer(m, layer_name)["tensors"][tensor], dtype, item_bytes)
        return assemble(m, s)

    _retyped.__name__ = _name
    case(_match)(_retyped)


@case("is stored as int32; allowed: float32")
def int32_scales(m, s):
    layer(m, "2")["tensors"]["scales"]["dtype"] = "int32"  # same 4 bytes each: only the dtype says
    return assemble(m, s)


@case("is stored as float16; allowed: float32")
def float16_scales(m, s):
    scales = layer(m, "6")["tensors"]["scales"]
    scales.update(dtype="float16", at=[scales["at"][0], scales["at"][1] // 2])
    return assemble(m, s)


@case("bad bias scale -1.0")
def negative_bias_scale(m, s):
    layer(m, "2")["tensors"]["bias"]["scale"] = -1.0
    return assemble(m, s)


# Valid files that do not fit the skeleton (inspect accepts them): load must refuse them and
# leave the skeleton as it was, also when the problem shows only after decoding.

@case("tensor '3.weight' is int8 in the file but float32 in the skeleton", inspect=False)
def dense_int8_into_float32(m, s):
    t = m["dense"]["tensors"]["3.weight"]
    t.update(dtype="int8", at=[t["at"][0], t["at"][1] // 4])
    return assemble(m, s)


@case("tensor '3.bias' is int64 in the file but float32 in the skeleton", inspect=False)
def dense_int64_bias(m, s):
    retype(s, m["dense"]["tensors"]["3.bias"], "int64", 8)
    return assemble(m, s)


@case("a subclass of Linear.*match by exact type", inspect=False, skeleton="subclass")
def linear_subclass_in_the_skeleton(m, s):
    return assemble(m, s)


@case("layer '5': its bias is float32 in the file but torch.float16 in the skeleton", inspect=False, skeleton="half_bias")
def bias_dtype_differs(m, s):
    return assemble(m, s)


@case("layer '5' has no bias in the file but a bias in the skeleton", inspect=False)
def bias_missing_from_the_file(m, s):
    del layer(m, "5")["tensors"]["bias"]
    return assemble(m, s)


@case("position count does not match")
def last_layer_fails_after_decoding(m, s):
    # Every skeleton check passes and layers 2 and 5 decode: only the last layer is wrong.
    layer(m, "6")["tensors"]["positions"]["count"] += 1
    return assemble(m, s)


# ---- the child process that runs them -------------------------------------------------------


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _state(model: nn.Module) -> tuple:
    return ([(k, v.dtype, v.detach().clone()) for k, v in model.state_dict().items()],
            [(k, type(m)) for k, m in model.named_modules()])


def _same_state(a: tuple, b: tuple) -> bool:
    return a[1] == b[1] and len(a[0]) == len(b[0]) and all(
        ka == kb and da == db and torch.equal(va, vb) for (ka, da, va), (kb, db, vb) in zip(a[0], b[0]))


def _outcome(call: Callable) -> tuple[str, str, float]:
    import torchzip as tz

    start = time.perf_counter()
    try:
        call()
        kind, text = "ok", ""
    except tz.FormatError as err:
        kind, text = "FormatError", str(err)[:2000]
    except BaseException as err:  # noqa: BLE001 - reported to the test, which fails on it
        kind, text = type(err).__name__, "".join(traceback.format_exception(err))[-3000:]
    return kind, text, time.perf_counter() - start


def run_case(path: str, skeleton_name: str) -> dict:
    """Load (into a fresh skeleton), ``inspect_file`` and ``torchzip inspect --json`` one file;
    what each raised, how long it took, the peak memory above the start, and whether the
    skeleton came through unchanged."""
    import torchzip as tz
    from torchzip.cli import main
    from torchzip.inspect import inspect_file

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM, the peak resident set size
    base = _rss_kb("VmRSS")
    model = SKELETONS[skeleton_name]()
    before = _state(model)
    out: dict = {}
    out["load"] = _outcome(lambda: tz.load(path, model, progress=False))
    out["unchanged"] = _same_state(before, _state(model))
    out["inspect"] = _outcome(lambda: inspect_file(path))
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        out["cli"] = _outcome(lambda: sys.exit(main(["inspect", path, "--json"])))
    out["cli_stdout"], out["cli_stderr"] = stdout.getvalue()[-2000:], stderr.getvalue()[-2000:]
    out["peak_mb"] = (_rss_kb("VmHWM") - base) / 1024
    return out


def main(folder: str, memory_limit_mb: int) -> int:
    """Run every ``<case>.tzip`` in ``folder`` under an address-space limit of the process's
    size plus ``memory_limit_mb``; print the results as JSON."""
    import resource

    import torchzip  # noqa: F401 - imported before the limit is set: the limit is for reading

    limit = _rss_kb("VmSize") * 1024 + (memory_limit_mb << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    results = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".tzip"):
            case_name = name[: -len(".tzip")]
            skel = CASES[case_name].skeleton if case_name in CASES else "plain"
            results[case_name] = run_case(os.path.join(folder, name), skel)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
