"""Reading and writing webdataset-layout tar shards, safely.

Layout (webdataset's convention): a sample is the run of consecutive members sharing a key,
``{key}.{field}``; the key is the member path up to the first dot of its base name.

Reading never unpickles: members whose field ends in a pickle format (``.pth``, ``.pyd``,
``.pickle``, ``.pkl``) are refused, ``.npy`` is loaded with ``allow_pickle=False``, and member
names that are absolute or climb out with ``..`` are rejected. Writing is deterministic (fixed
mtime, owner and mode), so the same samples always give the same bytes and the same sha256.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from typing import IO, Iterator

import numpy as np

from vitdistill.errors import DataError



class UnreadableShardError(DataError):
    """A shard that is truncated or not a tar at all (the ``on_error`` policy applies)."""


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


def iter_tar_samples(fileobj: IO[bytes], shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {field: bytes})`` for each sample of a tar stream.

    Raises :class:`DataError` naming the shard (and key) for a truncated or non-tar stream,
    an unsafe member name, a pickle-format field or a key that appears twice.
    """
    seen: set[str] = set()
    key: str | None = None
    fields: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            for member in tar:
                check_member_name(member.name, shard)
                if not member.isfile():
                    continue
                parsed = split_member_name(member.name)
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
                data = tar.extractfile(member)
                fields[field] = data.read() if data is not None else b""
    except tarfile.ReadError as e:
        where = f" after key {key!r}" if key else ""
        raise UnreadableShardError(f"{shard}: not a readable tar shard{where} ({e})") from None
    except EOFError:
        where = f" after key {key!r}" if key else ""
        raise UnreadableShardError(f"{shard}: truncated tar shard{where}") from None
    if key is not None:
        yield key, fields


def load_npy(data: bytes, where: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:
        raise DataError(f"{where}: not a plain .npy array ({e})") from None


def dump_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


class TarShardWriter:
    """Write samples to one tar file deterministically; counts bytes written."""

    def __init__(self, path: str) -> None:
        self._fh = open(path, "wb")
        self._tar = tarfile.open(fileobj=self._fh, mode="w", format=tarfile.USTAR_FORMAT)
        self.count = 0
        self.first_key: str | None = None
        self.last_key: str | None = None
        self._closed_size: int | None = None

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        if "." in key.rsplit("/", 1)[-1]:
            raise DataError(f"key {key!r} contains a dot; webdataset would split it into a wrong field")
        for field, data in fields.items():
            info = tarfile.TarInfo(f"{key}.{field}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uname = info.gname = "vitdistill"
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1
        self.first_key = self.first_key or key
        self.last_key = key

    @property
    def bytes_written(self) -> int:
        return self._closed_size if self._closed_size is not None else self._fh.tell()

    def close(self) -> None:
        self._tar.close()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._closed_size = self._fh.tell()
        self._fh.close()
