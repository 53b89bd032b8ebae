"""The ``.tzip`` container: header, JSON manifest, 64-byte-aligned sections with CRC32s.

Layout (little-endian; see docs/FORMAT.md):

    0   magic     8 bytes  b"TZIP\\r\\n\\x1a\\n"
    8   version   uint32   3 (2 is read too)
    12  crc32     uint32   of the (compressed) manifest bytes
    16  length    uint64   compressed manifest length in bytes
    24  manifest  UTF-8 JSON, zlib-compressed (at most 64 MiB once inflated)
        sections  each starting at a multiple of 64, zero padding between

The manifest's ``sections`` list holds ``[offset, length, crc32]`` for each section, and
``file_size`` the exact size of the file. Nothing is ever unpickled or executed.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import zlib
from pathlib import Path

from torchzip.errors import FormatError

MAGIC = b"TZIP\r\n\x1a\n"
# 2: Huffman streams deal codes round-robin to lanes and may group symbols; 3: a layer entry may
# name its tensor ("tensor") and share an earlier entry's packed weight ("tied"). Version 2 files
# are version 3 files without those keys, so both are read.
VERSION = 3
READS = (2, 3)
HEADER = struct.Struct("<8sIIQ")
ALIGN = 64
MAX_MANIFEST = 64 << 20


class SectionWriter:
    """Collects the byte pieces of one section; returns where each piece sits in it."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, data: bytes) -> list[int]:
        """Append ``data``; return ``[offset, length]`` within the section."""
        ref = [self.size, len(data)]
        self.parts.append(data)
        self.size += len(data)
        return ref

    def getvalue(self) -> bytes:
        return b"".join(self.parts)


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def write(path: str | os.PathLike, manifest: dict, sections: list[bytes]) -> int:
    """Write the file atomically (temporary file, fsync, rename). Returns its size."""
    path = Path(path)
    if not sections:
        raise ValueError("a .tzip file has at least one section")
    # Section offsets depend on the manifest's length, which depends on the offsets. Moving the
    # first section only ever later makes this settle (the gap is zero padding).
    start = _align(HEADER.size + 1)
    while True:
        table, offset = [], start
        for i, s in enumerate(sections):
            table.append([offset, len(s), zlib.crc32(s)])
            offset += len(s) if i == len(sections) - 1 else _align(len(s))
        body = dict(manifest, sections=table, file_size=offset)
        raw = zlib.compress(json.dumps(body, separators=(",", ":"), sort_keys=True).encode(), 9)
        if HEADER.size + len(raw) <= start:
            size = offset
            break
        start = _align(HEADER.size + len(raw))
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(HEADER.pack(MAGIC, VERSION, zlib.crc32(raw), len(raw)))
            f.write(raw)
            for (off, _, _), s in zip(table, sections):
                f.write(b"\0" * (off - f.tell()))
                f.write(s)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent or ".", os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return size


def read(path: str | os.PathLike) -> tuple[dict, list[memoryview]]:
    """Read and check a file: magic, version, manifest CRC, every section's bounds and CRC."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise FormatError(f"cannot read {path}: {err.strerror}") from None
    return parse(data, str(path))


def parse(data: bytes, name: str = "artifact") -> tuple[dict, list[memoryview]]:
    """:func:`read` on bytes in memory."""
    if len(data) < HEADER.size:
        raise FormatError(f"{name}: {len(data)} bytes is too short for a .tzip file (header is {HEADER.size})")
    magic, version, crc, length = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise FormatError(f"{name}: not a .tzip file (bad magic {magic!r})")
    if version not in READS:
        raise FormatError(f"{name}: format version {version} is not supported (this torchzip reads versions "
                          f"{', '.join(map(str, READS))})")
    if length > min(MAX_MANIFEST, len(data) - HEADER.size):
        raise FormatError(f"{name}: manifest length {length} exceeds the file ({len(data)} bytes) or the {MAX_MANIFEST}-byte limit")
    raw = data[HEADER.size : HEADER.size + length]
    if zlib.crc32(raw) != crc:
        raise FormatError(f"{name}: manifest checksum mismatch (file corrupted)")
    try:
        inflate = zlib.decompressobj()
        text = inflate.decompress(raw, MAX_MANIFEST)  # bounded: a small file cannot inflate without limit
        if inflate.unconsumed_tail or not inflate.eof:
            raise FormatError(f"{name}: manifest inflates past {MAX_MANIFEST} bytes or is cut short")
        manifest = json.loads(text)
    except zlib.error as err:
        raise FormatError(f"{name}: manifest is not zlib data: {err}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise FormatError(f"{name}: manifest is not valid JSON: {err}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("sections"), list):
        raise FormatError(f"{name}: manifest has no section table")
    if manifest.get("file_size") != len(data):
        raise FormatError(f"{name}: file is {len(data)} bytes but its manifest says {manifest.get('file_size')!r} (truncated or padded)")
    view = memoryview(data)
    sections = []
    end = HEADER.size + length
    for i, entry in enumerate(manifest["sections"]):
        if not (isinstance(entry, list) and len(entry) == 3 and all(type(v) is int for v in entry)):
            raise FormatError(f"{name}: section {i} entry {entry!r} is not [offset, length, crc32]")
        off, size, sec_crc = entry
        if off % ALIGN or off < end or size < 0 or off + size > len(data):
            raise FormatError(f"{name}: section {i} at {off}+{size} is misaligned, overlapping or outside the file")
        section = view[off : off + size]
        if zlib.crc32(section) != sec_crc:
            raise FormatError(f"{name}: section {i} checksum mismatch (file corrupted)")
        sections.append(section)
        end = off + size
    return manifest, sections
