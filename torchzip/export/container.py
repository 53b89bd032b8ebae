"""The ``.tzip`` container: header, JSON manifest, 64-byte-aligned sections with CRC32s.

Layout (little-endian; see docs/FORMAT.md):

    0   magic     8 bytes  b"TZIP\\r\\n\\x1a\\n"
    8   version   uint32   3 (2 is read too)
    12  crc32     uint32   of the (compressed) manifest bytes
    16  length    uint64   compressed manifest length in bytes
    24  manifest  UTF-8 JSON, zlib-compressed (bounded once inflated: see ``manifest_limit``)
        sections  each starting at a multiple of 64, zero padding between

The manifest's ``sections`` list holds ``[offset, length, crc32]`` for each section, and
``file_size`` the exact size of the file. Nothing is ever unpickled or executed, and what a
reader spends (time, memory, bytes read) is bounded by the file's real size.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import re
import reprlib
import secrets
import stat
import struct
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable

import numpy as np

from torchzip.errors import FormatError, TorchzipError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows
    fcntl = None

MAGIC = b"TZIP\r\n\x1a\n"
# 2: Huffman streams deal codes round-robin to lanes and may group symbols; 3: a layer entry may
# name its tensor ("tensor") and share an earlier entry's packed weight ("tied"). Version 2 files
# are version 3 files without those keys, so both are read.
VERSION = 3
READS = (2, 3)
HEADER = struct.Struct("<8sIIQ")
ALIGN = 64
# Limits on the manifest (docs/FORMAT.md, "Limits"): what honest files need, with a wide margin.
MAP_AT_LEAST = 1 << 20  # regular files this large are memory-mapped by read()
MAX_MANIFEST = 64 << 20  # inflated bytes, whatever the file's size...
MANIFEST_BASE, MANIFEST_PER_BYTE = 1 << 20, 16  # ...and at most 1 MiB + 16 bytes per byte of the file
MAX_DEPTH = 32  # nesting of arrays and objects (a writer uses 6)
MAX_JSON_ITEMS = 1 << 22  # '[', '{', ',' and ':' outside strings: about one per array element or member
MAX_NUMBER_CHARS = 40  # characters of one number (offsets and CRCs take at most 20)


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


def check_destination(path: str | os.PathLike) -> Path:
    """The file ``path`` names, checked before any work is done for it (``export`` and the CLI
    call this first): no trailing separator, not a directory, in a directory that exists.

    Raises :class:`TorchzipError`, or ``FileNotFoundError`` / ``NotADirectoryError`` naming the
    path as given (never a temporary name).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TorchzipError(f"a .tzip destination is a file path (str or os.PathLike), got {type(path).__name__}")
    text = os.fsdecode(os.fspath(path))
    if not text:
        raise TorchzipError("the destination path is empty; give a file path such as 'model.tzip'")
    if text.endswith(_SEPARATORS):
        raise TorchzipError(f"{text!r} ends with a path separator, so it names a directory; a .tzip destination is a "
                            f"file path such as {text.rstrip(''.join(_SEPARATORS)) or 'model.tzip'!r}")
    dest = Path(text)
    if dest.is_dir():
        raise TorchzipError(f"{text} is a directory; give a file path such as {dest / 'model.tzip'}")
    parent = dest.parent
    if not parent.exists():
        raise FileNotFoundError(errno.ENOENT, f"No such file or directory (the directory {str(parent)!r} does not exist)", text)
    if not parent.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"Not a directory ({str(parent)!r} is a file)", text)
    return dest


def write(path: str | os.PathLike, manifest: dict, sections: list[bytes]) -> int:
    """Write the file atomically; returns its size.

    The bytes go to a temporary file that nobody sees (``O_TMPFILE`` where the system has it),
    are fsynced, and the file is renamed over ``path``: a crash leaves ``path`` as it was. Where
    a named temporary is needed (``.<name>.<16 hex digits>.tzip-tmp``, locked while written), the
    next write to the same path removes one a crash left behind. The file gets the mode of any
    new file (``0o666`` less the umask).
    """
    check_destination(path)
    if not sections:
        raise ValueError("a .tzip file has at least one section")
    _layout(path, manifest, [len(s) for s in sections], [zlib.crc32(s) for s in sections])  # refused before a temporary exists
    return write_streamed(path, iter(sections), lambda: manifest)


def write_streamed(path: str | os.PathLike, sections: Iterable[bytes | SectionWriter], manifest: Callable[[], dict]) -> int:
    """:func:`write` for sections made one at a time: each goes to the temporary file as
    ``sections`` yields it (nothing holds them all), and ``manifest()`` is asked after the last.
    A section may be a :class:`SectionWriter`, whose pieces are written as they are (never
    joined into one more copy of the section).
    The file is byte for byte what :func:`write` makes of the same sections and manifest: the
    sections are moved into place, in the file, once the manifest's length is known."""
    dest = check_destination(path)
    size = 0

    def emit(f: BinaryIO) -> None:
        nonlocal size
        start = at = _align(HEADER.size + 1)  # provisional: the manifest's length is not known yet
        f.seek(start)
        lengths, crcs = [], []
        for data in sections:
            f.write(b"\0" * (_align(at) - at))
            at = _align(at)
            crc, length = 0, 0
            for part in data.parts if isinstance(data, SectionWriter) else (data,):
                f.write(part)
                crc, length = zlib.crc32(part, crc), length + len(part)
            at += length
            lengths.append(length)
            crcs.append(crc)
        if not lengths:
            raise ValueError("a .tzip file has at least one section")
        first, raw, size = _layout(path, manifest(), lengths, crcs)
        f.flush()
        _move(f.fileno(), start, at, first)
        f.seek(0)
        f.write(HEADER.pack(MAGIC, VERSION, zlib.crc32(raw), len(raw)))
        f.write(raw)
        f.write(b"\0" * (first - HEADER.size - len(raw)))
        f.flush()

    try:
        _write_atomically(dest, emit)
    except OSError as err:
        if err.errno is None:
            raise
        raise OSError(err.errno, err.strerror, str(path)) from None  # named as given, not the temporary
    return size


def _layout(path, manifest: dict, lengths: list[int], crcs: list[int]) -> tuple[int, bytes, int]:
    """``(first section's offset, compressed manifest, file size)``; raises ``TorchzipError`` for
    a manifest readers would refuse."""
    # Section offsets depend on the manifest's length, which depends on the offsets. Moving the
    # first section only ever later makes this settle (the gap is zero padding).
    start = _align(HEADER.size + 1)
    while True:
        table, offset = [], start
        for i, (length, crc) in enumerate(zip(lengths, crcs)):
            table.append([offset, length, crc])
            offset += length if i == len(lengths) - 1 else _align(length)
        body = dict(manifest, sections=table, file_size=offset)
        text = json.dumps(body, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
        raw = zlib.compress(text, 9)
        if HEADER.size + len(raw) <= start:
            size = offset
            break
        start = _align(HEADER.size + len(raw))
    # A file readers would refuse is never written (a model of millions of tiny tensors could).
    items, depth = _structure(text)
    if len(text) > manifest_limit(size) or items > MAX_JSON_ITEMS or depth > MAX_DEPTH:
        raise TorchzipError(f"cannot write {path}: its manifest ({len(text)} bytes, {items} JSON items) exceeds what a "
                            f"reader accepts for a {size}-byte file (docs/FORMAT.md, Limits); nothing was written")
    return start, raw, size


def _move(fd: int, start: int, end: int, to: int, chunk: int = 8 << 20) -> None:
    """Move the bytes ``start:end`` of the file to offset ``to``, a chunk at a time."""
    delta = to - start
    if delta == 0:
        return
    spans = range(start, end, chunk)
    for at in (reversed(spans) if delta > 0 else spans):  # never overwrite bytes still to be moved
        data = os.pread(fd, min(chunk, end - at), at)
        os.pwrite(fd, data, at + delta)
    if delta < 0:
        os.ftruncate(fd, end + delta)


# ---- atomic writes -------------------------------------------------------------------------

_SEPARATORS = tuple(s for s in (os.sep, os.altsep) if s)
_TEMP_SUFFIX = ".tzip-tmp"
_ANONYMOUS = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")  # Linux: name an fd via /proc
# Read and write: write_streamed moves the sections into place within the file.
_OPEN_FLAGS = os.O_RDWR | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def _temp_path(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.{secrets.token_hex(8)}{_TEMP_SUFFIX}"


def _try_lock(fd: int) -> bool | None:
    """Take an exclusive lock on ``fd`` without waiting: True, False (someone holds it), or None
    where files cannot be locked. The kernel drops it when the process dies, which is how a
    stale temporary is told apart from one being written."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _remove_stale(dest: Path) -> None:
    """Remove temporaries of earlier writes to ``dest`` whose writer died (no one holds their lock)."""
    if fcntl is None:
        return  # without locks a live writer's temporary cannot be told from a stale one
    pattern = re.compile(re.escape(f".{dest.name}.") + r"[0-9a-f]{16}" + re.escape(_TEMP_SUFFIX))
    try:
        names = [n for n in os.listdir(dest.parent) if pattern.fullmatch(n)]
    except OSError:
        return
    for name in names:
        path = dest.parent / name
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            if _try_lock(fd) and _same_file(fd, path):
                os.unlink(path)
        except OSError:
            pass
        finally:
            os.close(fd)


def _open_temp(dest: Path) -> tuple[int, Path | None]:
    """A new, locked, writable file beside ``dest``: anonymous (None) where possible, else named."""
    if _ANONYMOUS:
        try:
            fd = os.open(dest.parent, os.O_TMPFILE | _OPEN_FLAGS, 0o666)
        except OSError as err:  # the file system has no O_TMPFILE: use a named temporary
            if err.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                raise
        else:
            _try_lock(fd)  # held once it gets a name, until it is renamed over dest
            return fd, None
    for _ in range(100):
        temp = _temp_path(dest)
        try:
            fd = os.open(temp, os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o666)
        except FileExistsError:
            continue
        # A cleanup may have taken the file between its creation and our lock: then try another.
        if _try_lock(fd) is not False and _same_file(fd, temp):
            return fd, temp
        os.close(fd)
    raise FileExistsError(errno.EEXIST, "could not create a temporary file", str(dest))


def _name_anonymous(fd: int, dest: Path) -> Path:
    """Link the anonymous file ``fd`` under a temporary name beside ``dest`` (renamed next)."""
    dir_fd = os.open(dest.parent, os.O_RDONLY)
    try:
        for _ in range(100):
            temp = _temp_path(dest)
            try:
                # With dst_dir_fd, Python calls linkat(AT_SYMLINK_FOLLOW); plain link() would try
                # to link the /proc symlink itself and fail.
                os.link(f"/proc/self/fd/{fd}", temp.name, dst_dir_fd=dir_fd, follow_symlinks=True)
                return temp
            except FileExistsError:
                continue
        raise FileExistsError(errno.EEXIST, "could not name the temporary file", str(dest))
    finally:
        os.close(dir_fd)


def _write_atomically(dest: Path, emit: Callable[[BinaryIO], None]) -> None:
    _remove_stale(dest)
    fd, temp = _open_temp(dest)
    try:
        with open(fd, "wb", closefd=False) as f:
            emit(f)
        os.fsync(fd)
        if temp is None:
            temp = _name_anonymous(fd, dest)
        os.replace(temp, dest)
        temp = None
    finally:
        if temp is not None:
            try:
                os.unlink(temp)
            except OSError:
                pass
        os.close(fd)  # drops the lock
    try:  # make the rename itself durable
        dir_fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


# ---- reading -------------------------------------------------------------------------------


def manifest_limit(file_size: int) -> int:
    """Most bytes the manifest of a file of ``file_size`` bytes may inflate to."""
    return min(MAX_MANIFEST, MANIFEST_BASE + MANIFEST_PER_BYTE * file_size)


def read(path: str | os.PathLike) -> tuple[dict, list[memoryview]]:
    """Read and check a file: magic, version, manifest CRC and limits, every section's bounds and CRC.

    Reads no more than the header and manifest declare: the manifest is checked against the
    file's real size before the sections are read, and a device or pipe (``/dev/zero``) is read
    only up to the ``file_size`` its manifest declares, then must end.
    """
    name = str(path)
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if stat.S_ISREG(st.st_mode):
                return _read_regular(f, st.st_size, name)
            return parse(_read_stream(f, name), name)
    except OSError as err:
        raise FormatError(f"cannot read {path}: {err.strerror or err}") from None


def _read_regular(f: BinaryIO, size: int, name: str) -> tuple[dict, list[memoryview]]:
    head = f.read(HEADER.size)
    crc, length = _header(head, name, size)
    raw = f.read(length)
    manifest = _manifest(raw, crc, name, size)
    if size >= MAP_AT_LEAST and hasattr(mmap, "MADV_DONTNEED"):
        # Large files are mapped, not read: sections are read where they lie, and the pages
        # looked at are handed back (release_pages) so the file never sits in memory whole.
        try:
            data = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            data = None
        if data is not None:
            return manifest, _sections(manifest, data, length, name)
    data = bytearray(size)
    data[: HEADER.size] = head
    data[HEADER.size: HEADER.size + length] = raw
    _read_into(f, memoryview(data)[HEADER.size + length:], name)
    return manifest, _sections(manifest, data, length, name)


def release_pages(sections: list[memoryview]) -> None:
    """Drop the pages of a mapped file that reading has touched from this process's memory (the
    page cache keeps them; touching them again maps them back). Nothing for a file in memory."""
    owner = sections[0].obj if sections else None
    if isinstance(owner, mmap.mmap):
        owner.madvise(mmap.MADV_DONTNEED)


def _read_stream(f: BinaryIO, name: str) -> bytearray:
    """All bytes of a non-regular file, reading no further than its manifest's ``file_size``."""
    head = f.read(HEADER.size)
    crc, length = _header(head, name, None)
    raw = f.read(length)
    size = _manifest(raw, crc, name, None)["file_size"]
    data = bytearray(head + raw)
    while len(data) < size:  # in chunks: memory grows only with what really arrives
        chunk = f.read(min(size - len(data), 1 << 20))
        if not chunk:
            break
        data += chunk
    if len(data) == size and f.read(1):
        raise FormatError(f"{name}: holds more than the {size} bytes its manifest declares")
    return data  # parse() checks the size rule and a short read


def _read_into(f: BinaryIO, view: memoryview, name: str) -> None:
    while view:
        n = f.readinto(view)
        if not n:
            raise FormatError(f"{name}: file ended while being read (changed on disk?)")
        view = view[n:]
    if f.read(1):
        raise FormatError(f"{name}: file grew while being read (changed on disk?)")


def parse(data: bytes | bytearray, name: str = "artifact") -> tuple[dict, list[memoryview]]:
    """:func:`read` on bytes in memory."""
    crc, length = _header(bytes(data[: HEADER.size]), name, len(data))
    manifest = _manifest(bytes(data[HEADER.size: HEADER.size + length]), crc, name, len(data))
    return manifest, _sections(manifest, data, length, name)


def _header(head: bytes, name: str, size: int | None) -> tuple[int, int]:
    """``(manifest crc, manifest length)``; ``size``: the file's real size (None: not known)."""
    if len(head) < HEADER.size:
        raise FormatError(f"{name}: {len(head)} bytes is too short for a .tzip file (header is {HEADER.size})")
    magic, version, crc, length = HEADER.unpack(head)
    if magic != MAGIC:
        raise FormatError(f"{name}: not a .tzip file (bad magic {magic!r})")
    if version not in READS:
        raise FormatError(f"{name}: format version {version} is not supported (this torchzip reads versions "
                          f"{', '.join(map(str, READS))})")
    room = MAX_MANIFEST if size is None else min(MAX_MANIFEST, size - HEADER.size)
    if length > room:
        raise FormatError(f"{name}: manifest length {length} exceeds the file ({size} bytes) or the {MAX_MANIFEST}-byte limit")
    return crc, length


def _manifest(raw: bytes, crc: int, name: str, size: int | None) -> dict:
    """The checked manifest; ``size``: the file's real size, which bounds it (None: not known yet)."""
    if zlib.crc32(raw) != crc:
        raise FormatError(f"{name}: manifest checksum mismatch (file corrupted or cut short)")
    limit = MAX_MANIFEST if size is None else manifest_limit(size)
    try:
        inflate = zlib.decompressobj()
        text = inflate.decompress(raw, limit)  # bounded: a small file cannot inflate without limit
    except zlib.error as err:
        raise FormatError(f"{name}: manifest is not zlib data: {err}") from None
    if inflate.unconsumed_tail or not inflate.eof:
        raise FormatError(f"{name}: manifest inflates past {limit} bytes (the limit for a {size}-byte file: "
                          f"min({MAX_MANIFEST}, {MANIFEST_BASE} + {MANIFEST_PER_BYTE} * file size)) or is cut short")
    manifest = parse_json(text, name)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("sections"), list):
        raise FormatError(f"{name}: manifest has no section table")
    declared = manifest.get("file_size")
    if type(declared) is not int or declared < HEADER.size + len(raw):
        raise FormatError(f"{name}: manifest file_size {declared!r} is not the size of a file holding it")
    if size is not None and declared != size:
        raise FormatError(f"{name}: file is {size} bytes but its manifest says {declared} (truncated or padded)")
    return manifest


def _sections(manifest: dict, data: bytes | bytearray, length: int, name: str) -> list[memoryview]:
    view = memoryview(data)
    sections = []
    end = HEADER.size + length
    for i, entry in enumerate(manifest["sections"]):
        if not (isinstance(entry, list) and len(entry) == 3 and all(type(v) is int for v in entry)):
            raise FormatError(f"{name}: section {i} entry {brief(entry)} is not [offset, length, crc32]")
        off, size, sec_crc = entry
        if off % ALIGN or off < end or size < 0 or off + size > len(data):
            raise FormatError(f"{name}: section {i} at {off}+{size} is misaligned, overlapping or outside the file")
        section = view[off: off + size]
        if zlib.crc32(section) != sec_crc:
            raise FormatError(f"{name}: section {i} checksum mismatch (file corrupted)")
        release_pages(sections or [section])
        sections.append(section)
        end = off + size
    return sections


# ---- bounded, strict JSON ------------------------------------------------------------------

_SLAB = 1 << 20
_BRIEF = reprlib.Repr()
_BRIEF.maxlist = _BRIEF.maxdict = _BRIEF.maxtuple = 6
_BRIEF.maxstring = _BRIEF.maxother = 200
_BRIEF.maxlong = 40


def brief(value: Any) -> str:
    """``repr(value)`` cut short, for error messages about (possibly huge) manifest values."""
    return _BRIEF.repr(value)


def _structure(text: bytes) -> tuple[int, int]:
    """``(items, depth)`` of JSON text: how many of ``[ { , :`` lie outside strings, and the
    deepest nesting of arrays and objects. Exact for valid JSON; a parser stops at the first
    error anyway. Linear time, memory of one slab beyond the text."""
    # Drop escaped backslashes, then escaped quotes: every '"' left opens or closes a string.
    # ('"' and '\\' never occur inside a UTF-8 sequence, so bytes can be scanned as they are.)
    bare = text.replace(b"\\\\", b"").replace(b'\\"', b"")
    items = depth = top = 0
    in_string = np.uint8(0)
    for i in range(0, len(bare), _SLAB):
        b = np.frombuffer(bare, np.uint8, count=min(_SLAB, len(bare) - i), offset=i)
        inside = np.bitwise_xor.accumulate((b == ord('"')).view(np.uint8)) ^ in_string
        in_string = inside[-1]
        out = b[inside == 0]
        opens = (out == ord("[")) | (out == ord("{"))
        items += int(opens.sum()) + int(((out == ord(",")) | (out == ord(":"))).sum())
        run = np.cumsum(opens.astype(np.int64) - ((out == ord("]")) | (out == ord("}")))) + depth
        if run.size:
            top, depth = max(top, int(run.max())), int(run[-1])
    return items, top


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise FormatError(f"has the key {brief(dup)} twice in one object; keys must be unique")
    return out


def _no_constant(token: str) -> Any:
    raise FormatError(f"holds {token}, which is not JSON (numbers must be finite)")


def _bounded_int(token: str) -> int:
    if len(token) > MAX_NUMBER_CHARS:
        raise FormatError(f"has a number of {len(token)} characters; at most {MAX_NUMBER_CHARS} are allowed")
    return int(token)


def _finite_float(token: str) -> float:
    if len(token) > MAX_NUMBER_CHARS:
        raise FormatError(f"has a number of {len(token)} characters; at most {MAX_NUMBER_CHARS} are allowed")
    value = float(token)
    if not math.isfinite(value):
        raise FormatError(f"holds the number {token[:40]}, which overflows a float (numbers must be finite)")
    return value


def parse_json(text: bytes, name: str = "manifest") -> Any:
    """Strict, bounded JSON (docs/FORMAT.md, "Limits"): UTF-8, at most :data:`MAX_DEPTH` levels
    of nesting, :data:`MAX_JSON_ITEMS` items, numbers of at most :data:`MAX_NUMBER_CHARS`
    characters, finite numbers only, no key twice in one object. Items and depth are counted on
    the text before anything is built, numbers as they are parsed."""
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError as err:
        raise FormatError(f"{name}: manifest is not UTF-8: {err}") from None
    items, depth = _structure(text)
    if items > MAX_JSON_ITEMS:
        raise FormatError(f"{name}: manifest has more than {MAX_JSON_ITEMS} JSON items ({items} of '[', '{{', ',' "
                          "and ':' outside strings)")
    if depth > MAX_DEPTH:
        raise FormatError(f"{name}: manifest nests {depth} levels deep; at most {MAX_DEPTH} are allowed")
    try:
        return json.loads(decoded, object_pairs_hook=_unique_keys, parse_constant=_no_constant, parse_float=_finite_float,
                          parse_int=_bounded_int)
    except FormatError as err:
        raise FormatError(f"{name}: manifest {err}") from None
    except (json.JSONDecodeError, RecursionError) as err:
        raise FormatError(f"{name}: manifest is not valid JSON: {err}") from None
