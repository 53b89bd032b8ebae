"""Per-layer report of a ``.tzip`` file.

The file is checked by the same code as ``load`` (the manifest checks, then every layer and
tensor decoded and dropped), so a file ``inspect`` accepts is one ``load`` accepts, given a
skeleton that matches it.
"""

from __future__ import annotations

import math
import os
from typing import Any

from torchzip.export.artifact import (decode_bias, decode_dense, decode_layer, layer_header, read_manifest,
                                      shared_sections)
from torchzip.export.codec import piece_bytes


def _fp32_bytes(t) -> int:
    return t.numel() * (4 if t.is_floating_point() else t.element_size())


def inspect_file(path: str | os.PathLike) -> dict[str, Any]:
    """Rows (one per compressed layer, one for the dense rest) and totals for the file at ``path``.

    Bytes are those of each layer's own pieces in the file (headers, manifest and alignment
    are in the file total only); ``fp32_bytes`` is what the same tensors take as float32;
    ``ratio`` is None for a row that stores no bytes. Raises :class:`torchzip.FormatError` for
    any file ``load`` would reject.
    """
    manifest, sections = read_manifest(path)
    shared = shared_sections(sections)
    rows = []
    for entry in manifest["layers"]:
        head = layer_header(entry)
        section = shared[entry["section"]]
        before = section.bytes_taken
        name = head.name + ("" if head.tensor == "weight" else f".{head.tensor}")
        n, k = head.shape
        if head.tied is not None:  # the weight is counted with the entry it shares
            bias = decode_bias(entry, section)
            bias_n = 0 if bias is None else bias.numel()
            rows.append({"name": name, "kind": head.kind.name, "shape": [n, k],
                         "codec": f"tied to {manifest['layers'][head.tied]['name']}", "params": bias_n, "sparsity": 0.0,
                         "bits_per_weight": 0.0, "bytes": section.bytes_taken - before, "fp32_bytes": 4 * bias_n})
            continue
        packed, bias = decode_layer(entry, section, None)
        stored = section.bytes_taken - before
        bias_n = 0 if bias is None else bias.numel()
        weight_bytes = stored - (0 if bias is None else piece_bytes(entry["tensors"]["bias"]))
        rows.append({
            "name": name, "kind": head.kind.name, "shape": [n, k], "codec": packed.label,
            "params": n * k + bias_n, "sparsity": head.zeros / (n * k) if n * k else 0.0,
            "bits_per_weight": weight_bytes * 8 / (n * k) if n * k else 0.0,
            "bytes": stored, "fp32_bytes": 4 * (n * k + bias_n),
        })
    section = shared[manifest["dense"]["section"]]
    before = section.bytes_taken
    dense = list({id(t): t for t in decode_dense(manifest, shared).values()}.values())  # tied: once
    for s in shared:
        s.check_overlaps()
    rows.append({"name": "(dense tensors)", "kind": "", "shape": [], "codec": "raw",
                 "params": sum(t.numel() for t in dense if t.is_floating_point()), "sparsity": 0.0,
                 "bits_per_weight": 0.0, "bytes": section.bytes_taken - before,
                 "fp32_bytes": sum(_fp32_bytes(t) for t in dense)})
    for r in rows:
        r["ratio"] = r["fp32_bytes"] / r["bytes"] if r["bytes"] else None
    size = manifest["file_size"]
    fp32 = sum(r["fp32_bytes"] for r in rows)
    return {"path": str(path), "rows": rows, "file_bytes": size, "fp32_bytes": fp32, "ratio": fp32 / size,
            "version": manifest.get("torchzip_version")}


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None, so that it is valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def format_report(report: dict[str, Any]) -> str:
    """The report as a table."""
    head = f"{'layer':<28} {'kind':<9} {'shape':<12} {'codec':<15} {'sparsity':>8} {'bits/w':>7} {'bytes':>10} {'ratio':>8}"
    lines = [head, "-" * len(head)]
    for r in report["rows"]:
        shape = "x".join(map(str, r["shape"]))
        ratio = f"{r['ratio']:>7.2f}x" if r["ratio"] is not None else f"{'-':>8}"
        lines.append(f"{r['name'][:28]:<28} {r['kind']:<9} {shape:<12} {r['codec']:<15} {r['sparsity']:>8.1%} "
                     f"{r['bits_per_weight']:>7.2f} {r['bytes']:>10,} {ratio}")
    lines.append("-" * len(head))
    lines.append(f"{'file (headers and manifest included)':<75} {report['file_bytes']:>10,} {report['ratio']:>7.2f}x")
    return "\n".join(lines)
