"""Reading and writing webdataset-layout tar shards, safely.

Layout (webdataset's convention): a sample is the run of consecutive members sharing a key,
``{key}.{field}``; the key is the member path up to the first dot of its base name.

Reading never unpickles: members whose field ends in a pickle format (``.pth``, ``.pyd``,
``.pickle``, ``.pkl``) are refused, ``.npy`` is loaded with ``allow_pickle=False``, and member
names that are absolute or climb out with ``..`` are rejected. Writing is deterministic (fixed
mtime, owner and mode), so the same samples always give the same bytes and the same sha256.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import re
import tarfile
import zlib
from typing import IO, Iterator

import numpy as np

from vitdistill.errors import DataError


class UnreadableShardError(DataError):
    """A shard that is truncated or not a tar at all (the ``on_error`` policy applies)."""


_CORRUPT = (tarfile.ReadError, gzip.BadGzipFile, zlib.error, lzma.LZMAError)
UNSAFE_FIELDS = (".pth", ".pyd", ".pickle", ".pkl", ".pt")
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def split_member_name(name: str) -> tuple[str, str] | None:
    """``"dir/abc.emb.npy"`` -> ``("dir/abc", "emb.npy")``; None for names without a field."""
    m = _KEY_RE.match(name)
    return (m.group(1), m.group(2)) if m else None


def check_member_name(name: str, shard: str) -> None:
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or ".." in parts or re.match(r"^[A-Za-z]:", name):
        raise DataError(f"{shard}: member {name!r} has an unsafe path (absolute or '..'); refusing the shard")


class _TailReader:
    """A read-only stream that remembers its most recent bytes, so the end-of-archive marker can be
    checked after ``tarfile`` stops (it treats a cut at a header boundary as a normal end)."""

    _KEEP = 1 << 16  # > tarfile's read-ahead (one 10 KiB record) plus the two end blocks

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._tail = bytearray()
        self.pos = 0  # bytes handed out so far

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self.pos += len(data)
        self._tail += data
        if len(self._tail) > self._KEEP:
            del self._tail[: len(self._tail) - self._KEEP]
        return data

    def block_at(self, offset: int, size: int) -> bytes | None:
        """The ``size`` bytes from stream offset ``offset`` (reading on if needed); None if out of reach."""
        while self.pos < offset + size and self.read(_RECORD):
            pass
        start = offset - (self.pos - len(self._tail))
        if start < 0:
            return None
        return bytes(self._tail[start : start + size])


def _decompressed(fileobj: IO[bytes]) -> IO[bytes]:
    """The tar stream inside ``fileobj``: as is, or through gzip / bz2 / xz by magic number."""
    head = fileobj.read(6)
    raw = _Prefixed(head, fileobj)
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if head.startswith(b"BZh"):
        return bz2.BZ2File(raw)
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(raw)
    return raw


class _Prefixed:
    """``head`` (already read from ``rest``) followed by the remainder of ``rest``."""

    def __init__(self, head: bytes, rest: IO[bytes]) -> None:
        self._head, self._rest = head, rest

    def read(self, n: int = -1) -> bytes:
        if not self._head:
            return self._rest.read(n)
        if n is None or n < 0:
            out, self._head = self._head + self._rest.read(), b""
            return out
        out, self._head = self._head[:n], self._head[n:]
        return out + (self._rest.read(n - len(out)) if len(out) < n else b"")


def iter_tar_samples(fileobj: IO[bytes], shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {field: bytes})`` for each sample of a tar stream (plain, gzip, bz2 or xz).

    Raises :class:`DataError` naming the shard (and key) for a truncated or non-tar stream,
    an unsafe member name, a pickle-format field or a key that appears twice. A shard is whole only
    if the end-of-archive marker (two zero 512-byte blocks) follows the last member: ``tarfile``
    alone takes a cut at a header boundary for the end and would silently return fewer samples.
    """
    seen: set[str] = set()
    key: str | None = None
    fields: dict[str, bytes] = {}

    def unreadable(what: str, detail: str = "") -> UnreadableShardError:
        after = f" after key {key!r}" if key else ""
        return UnreadableShardError(f"{shard}: {what}{after}{f' ({detail})' if detail else ''}")

    try:
        for name, is_file, data in _members(_decompressed(fileobj), shard, unreadable):
            check_member_name(name, shard)
            if not is_file:
                continue
            parsed = split_member_name(name)
            if parsed is None:
                continue  # e.g. a README or __index__ without a field: not a sample member
            k, field = parsed
            if ("." + field.lower()).endswith(UNSAFE_FIELDS):
                raise DataError(
                    f"{shard}: sample {k!r} has field {field!r}, a pickle format that is never loaded "
                    "from data; store arrays as .npy and metadata as .json"
                )
            if k != key:
                if key is not None:
                    yield key, fields
                if k in seen:
                    raise DataError(f"{shard}: duplicate key {k!r} (keys must be unique and contiguous)")
                seen.add(k)
                key, fields = k, {}
            fields[field] = data
    except _CORRUPT as e:
        raise unreadable("not a readable tar shard", str(e)) from None
    except EOFError:
        raise unreadable("truncated tar shard") from None
    except OSError as e:
        if type(e) is not OSError or e.errno is not None:  # bz2's "Invalid data stream" has no errno; an object
            raise  # store's failure (s3fs: OSError(EBUSY), EIO ...) or a network error is no shard's fault
        raise unreadable("not a readable tar shard", str(e)) from None
    if key is not None:
        yield key, fields


_ZERO_BLOCK = bytes(512)
_FILE_TYPES = (b"0", b"\0", b"7")  # regular, old regular, contiguous: what tarfile's isfile() accepts
_PLAIN_TYPES = (*_FILE_TYPES, b"1", b"2", b"3", b"4", b"5", b"6")  # no extended header, no sparse map


def _read_exact(stream: IO[bytes], n: int) -> bytes:
    out = stream.read(n)
    while len(out) < n:
        more = stream.read(n - len(out))
        if not more:
            break
        out += more
    return out


def _octal(field: bytes) -> int:
    """A USTAR numeric field as tarfile reads it (NUL-terminated, space-padded octal); ValueError otherwise."""
    text = field.split(b"\0", 1)[0].strip()
    return int(text or b"0", 8)


def _members(stream: IO[bytes], shard: str, unreadable) -> Iterator[tuple[str, bool, bytes]]:
    """``(name, is_file, data)`` for each member of a tar stream, parsed here for plain USTAR/GNU headers
    (what webdataset, ``tar`` and our writer produce; tarfile's pure-Python parser cost ~1 ms a sample),
    handed to ``tarfile`` from the first member it would have to interpret (PAX or GNU long names, base-256
    sizes, sparse files). Headers are checked as tarfile checks them (checksum, numeric fields): a bad first
    header is not a tar; a bad later one ends the archive, and then, as a cut would, fails the end-of-archive
    check. A shard is whole only if two zero blocks follow its last member."""
    offset = 0
    while True:
        header = _read_exact(stream, _BLOCK)
        if header == _ZERO_BLOCK:
            if _read_exact(stream, _BLOCK) != _ZERO_BLOCK:
                raise unreadable("truncated tar shard", f"no end-of-archive marker at byte {offset}")
            return
        if len(header) < _BLOCK:
            if offset == 0:
                raise unreadable("not a readable tar shard", "empty file" if not header else "truncated header")
            raise unreadable("truncated tar shard", f"no end-of-archive marker at byte {offset}")
        kind = header[156:157]
        try:
            checksum = _octal(header[148:156])
            body = header[:148] + b"        " + header[156:]
            valid = checksum == sum(body) or checksum == sum(b - 256 if b > 127 else b for b in body)  # as tarfile
            size = _octal(header[124:136]) if not header[124] & 0x80 else None
        except ValueError:
            valid, size = False, None
        if not valid:
            if offset == 0:
                raise unreadable("not a readable tar shard", "bad checksum" if header.strip(b"\0") else "empty file")
            raise unreadable("truncated tar shard", f"no end-of-archive marker at byte {offset}")
        if size is None or kind not in _PLAIN_TYPES:  # an extended header or an exotic member: tarfile goes on
            yield from _tarfile_members(_Prefixed(header, stream), shard, unreadable, offset)
            return
        name = header[:100].split(b"\0", 1)[0]
        if header[257:263] == b"ustar\x00":  # POSIX ustar: a path prefix may hold the leading directories
            prefix = header[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix + b"/" + name
        padded = size + (-size) % _BLOCK
        data = _read_exact(stream, padded)
        if len(data) < padded:
            raise unreadable("truncated tar shard", f"member ends past byte {offset + _BLOCK + len(data)}")
        yield name.decode("utf-8", "surrogateescape"), kind in _FILE_TYPES, data[:size]
        offset += _BLOCK + padded


def _tarfile_members(stream: IO[bytes], shard: str, unreadable, base: int) -> Iterator[tuple[str, bool, bytes]]:
    """The rest of a tar stream through ``tarfile`` (``base``: where it starts in the shard)."""
    tail = _TailReader(stream)
    with tarfile.open(fileobj=tail, mode="r|") as tar:
        for member in tar:
            data = tar.extractfile(member) if member.isfile() else None
            yield member.name, member.isfile(), data.read() if data is not None else b""
        if tail.block_at(tar.offset, 2 * _BLOCK) != bytes(2 * _BLOCK):
            raise unreadable("truncated tar shard", f"no end-of-archive marker at byte {base + tar.offset}")


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], str, int]] = {}  # header -> dtype, shape, order, bytes


def load_npy(data: bytes, where: str) -> np.ndarray:
    """A ``.npy`` array from its bytes, never unpickling (object arrays are refused). The header of each
    distinct (dtype, shape) is parsed once (``np.load`` parses it with ``ast`` every time: ~0.15 ms a field);
    anything unusual goes through ``np.load(allow_pickle=False)``."""
    head = data[:10]
    if head[:6] == b"\x93NUMPY" and head[6:7] == b"\x01" and len(head) == 10:
        end = 10 + int.from_bytes(head[8:10], "little")
        header = data[10:end]
        parsed = _NPY_HEADERS.get(header)
        if parsed is None and len(_NPY_HEADERS) < 4096:
            try:
                meta = np.lib.format.read_array_header_1_0(io.BytesIO(data[8:end]))
            except ValueError:
                meta = None
            if meta is not None and not meta[2].hasobject:
                shape, dtype = tuple(meta[0]), meta[2]
                nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                parsed = _NPY_HEADERS[header] = (dtype, shape, "F" if meta[1] else "C", nbytes)
        if parsed is not None:
            dtype, shape, order, nbytes = parsed
            if len(data) - end == nbytes:
                return np.frombuffer(data, dtype=dtype, offset=end).reshape(shape, order=order).copy(order="K")
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, EOFError) as e:
        raise DataError(f"{where}: not a plain .npy array ({e})") from None


def dump_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


_BLOCK = 512
_RECORD = 20 * _BLOCK  # tarfile pads archives to whole records; so do we, for byte-identical output
_OWNER = b"vitdistill"


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header tarfile writes for a regular file (mode 644, mtime 0, owner vitdistill),
    built directly: tarfile's pure-Python header code cost ~2% of CPU extraction time."""
    raw = name.encode("utf-8")
    if len(raw) > 100:  # tarfile's prefix split where USTAR can hold the name, else a PAX header
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o644, "vitdistill", "vitdistill"
        try:
            return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
        except ValueError:
            return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    h = bytearray(_BLOCK)
    h[0 : len(raw)] = raw
    h[100:108] = b"0000644\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"00000000000\0"
    h[148:156] = b"        "  # checksum field counts as spaces while summing
    h[156:157] = b"0"
    h[257:265] = b"ustar\x0000"
    h[265 : 265 + len(_OWNER)] = _OWNER
    h[297 : 297 + len(_OWNER)] = _OWNER
    h[148:155] = b"%06o\0" % sum(h)
    return bytes(h)


class TarShardWriter:
    """Write samples to one tar file deterministically; counts bytes written.

    The output is byte-identical to ``tarfile`` in USTAR format with fixed mtime, owner and mode, so
    the same samples always give the same sha256, and any tar reader (webdataset too) opens it."""

    def __init__(self, path: str) -> None:
        self._fh = open(path, "wb")
        self.count = 0
        self.first_key: str | None = None
        self.last_key: str | None = None
        self._closed_size: int | None = None

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        if "." in key.rsplit("/", 1)[-1]:
            raise DataError(f"key {key!r} contains a dot; webdataset would split it into a wrong field")
        parts = []
        for field, data in fields.items():
            parts.append(ustar_header(f"{key}.{field}", len(data)))
            parts.append(data)
            pad = -len(data) % _BLOCK
            if pad:
                parts.append(b"\0" * pad)
        self._fh.write(b"".join(parts))
        self.count += 1
        self.first_key = self.first_key or key
        self.last_key = key

    @property
    def bytes_written(self) -> int:
        return self._closed_size if self._closed_size is not None else self._fh.tell()

    def discard(self) -> None:
        """Close the file without finishing it (the caller deletes it): never writes, so it works on a full disk."""
        try:
            self._fh.close()
        except OSError:  # the buffered tail could not be flushed (ENOSPC): the file is being deleted anyway
            pass

    def close(self) -> None:
        end = self._fh.tell() + 2 * _BLOCK
        self._fh.write(b"\0" * (2 * _BLOCK + (-end % _RECORD)))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._closed_size = self._fh.tell()
        self._fh.close()
