"""Per-layer report of a ``.tzip`` file, read from its manifest (nothing is decoded)."""

from __future__ import annotations

import math
import os
from typing import Any

from torchzip.errors import FormatError
from torchzip.export.artifact import read_manifest
from torchzip.export.codec import ITEM_BYTES
from torchzip.packed.base import FORMATS


def _piece_bytes(spec: dict) -> int:
    if spec.get("codec") == "raw":
        return spec["at"][1]
    return sum(spec[key][1] for key in ("lengths", "chunks", "payload"))


def _section_share(specs) -> int:
    # Layers may share a section: count the bytes of their own pieces.
    return sum(_piece_bytes(s) for s in specs)


def inspect_file(path: str | os.PathLike) -> dict[str, Any]:
    """See :func:`_inspect`; a manifest that passes its checksum but is malformed raises
    :class:`FormatError` (``load`` checks it fully; a report only needs it readable)."""
    try:
        return _inspect(path)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        if isinstance(err, FormatError):
            raise
        raise FormatError(f"{path}: malformed manifest ({type(err).__name__}: {err})") from None


def _inspect(path: str | os.PathLike) -> dict[str, Any]:
    """Rows (one per compressed layer, one for the dense rest) and totals for the file at ``path``.

    Bytes are those of each layer's own pieces in the file (headers, manifest and alignment
    are in the file total only); ``fp32_bytes`` is what the same tensors take as float32.
    """
    manifest, _ = read_manifest(path)
    rows = []
    for entry in manifest["layers"]:
        n, k = entry["shape"]
        tensors = entry["tensors"]
        bias = tensors.get("bias")
        bias_n = (bias.get("n") or math.prod(bias.get("shape", [n]))) if bias else 0
        weight_bytes = sum(_piece_bytes(s) for name, s in tensors.items() if name != "bias")
        name = entry["name"] + (f".{entry['tensor']}" if "tensor" in entry else "")
        if "tied" in entry:  # the weight is counted with the entry it shares
            tied = manifest["layers"][entry["tied"]]
            rows.append({"name": name, "kind": entry["kind"], "shape": [n, k], "codec": f"tied to {tied['name']}",
                         "params": bias_n, "sparsity": 0.0, "bits_per_weight": 0.0,
                         "bytes": _section_share(tensors.values()), "fp32_bytes": 4 * bias_n})
            continue
        fmt = FORMATS.get(entry["format"])
        if fmt is None:
            raise FormatError(f"{path}: layer {entry['name']!r} has unknown packed format {entry['format']!r}; "
                              f"allowed: {', '.join(sorted(FORMATS))}")
        rows.append({
            "name": name, "kind": entry["kind"], "shape": [n, k], "codec": fmt.label_of(entry),
            "params": n * k + bias_n, "sparsity": entry["zeros"] / (n * k) if n * k else 0.0,
            "bits_per_weight": weight_bytes * 8 / (n * k) if n * k else 0.0,
            "bytes": _section_share(tensors.values()), "fp32_bytes": 4 * (n * k + bias_n),
        })
    dense = manifest["dense"]["tensors"]
    dense_fp32 = sum(math.prod(s["shape"]) * (4 if s["dtype"].startswith(("float", "bfloat")) else ITEM_BYTES[s["dtype"]])
                     for s in dense.values())
    rows.append({"name": "(dense tensors)", "kind": "", "shape": [], "codec": "raw", "params": sum(
        math.prod(s["shape"]) for s in dense.values() if s["dtype"].startswith(("float", "bfloat"))),
        "sparsity": 0.0, "bits_per_weight": 0.0, "bytes": _section_share(dense.values()), "fp32_bytes": dense_fp32})
    for r in rows:
        r["ratio"] = r["fp32_bytes"] / r["bytes"] if r["bytes"] else float("inf")
    size = manifest["file_size"]
    fp32 = sum(r["fp32_bytes"] for r in rows)
    return {"path": str(path), "rows": rows, "file_bytes": size, "fp32_bytes": fp32, "ratio": fp32 / size,
            "version": manifest.get("torchzip_version")}


def format_report(report: dict[str, Any]) -> str:
    """The report as a table."""
    head = f"{'layer':<28} {'kind':<9} {'shape':<12} {'codec':<15} {'sparsity':>8} {'bits/w':>7} {'bytes':>10} {'ratio':>8}"
    lines = [head, "-" * len(head)]
    for r in report["rows"]:
        shape = "x".join(map(str, r["shape"]))
        ratio = f"{r['ratio']:>7.2f}x" if r["bytes"] else f"{'-':>8}"
        lines.append(f"{r['name'][:28]:<28} {r['kind']:<9} {shape:<12} {r['codec']:<15} {r['sparsity']:>8.1%} "
                     f"{r['bits_per_weight']:>7.2f} {r['bytes']:>10,} {ratio}")
    lines.append("-" * len(head))
    lines.append(f"{'file (headers and manifest included)':<75} {report['file_bytes']:>10,} {report['ratio']:>7.2f}x")
    return "\n".join(lines)
