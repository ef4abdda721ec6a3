"""Turn a dataset into image shards, or resolve existing shards: the extraction's inputs.

``ingest`` writes ``{cache.root}/images/{dataset}-{fingerprint}/shard-NNNNN.tar`` (members
``{key}.png|jpg|webp``, ``{key}.cls``, ``{key}.txt``, ``{key}.json``), each staged and published
atomically, and ``manifest.json`` last. A finished ingest with the same fingerprint is reused.
``resolve_inputs`` returns the list of input shards whatever the source.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass

from braceexpand import braceexpand

from vitdistill.cache import fs
from vitdistill.cache.tario import TarShardWriter
from vitdistill.config import VitdistillConfig
from vitdistill.data.datasets import RawSample, create_dataset
from vitdistill.errors import DataError
from vitdistill.progress import progress_bar
from vitdistill.textfile import decode_text

INGEST_FORMAT = 1


@dataclass
class InputSet:
    """What the extraction maps over: shard URLs plus what identifies their content."""

    source: str
    shards: list[str]
    classes: list[str] | None
    fingerprint: str
    manifest: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _sample_fields(s: RawSample) -> dict[str, bytes]:
    fields = {s.ext: s.image}
    if s.cls is not None:
        fields["cls"] = str(s.cls).encode()
    if s.txt is not None:
        fields["txt"] = s.txt.encode()
    if s.meta:
        fields["json"] = json.dumps(s.meta, sort_keys=True).encode()
    return fields


def _finished(manifest_url: str, fingerprint: str) -> dict | None:
    try:
        m = fs.read_json(manifest_url)
    except (FileNotFoundError, DataError):
        return None
    if m.get("fingerprint") != fingerprint or m.get("format") != INGEST_FORMAT:
        return None
    base = manifest_url.rsplit("/", 1)[0]
    for sh in m["shards"]:
        if fs.size(fs.join_inside(base, sh["name"], where=manifest_url)) != sh["bytes"]:
            return None
    return m


def ingest(cfg: VitdistillConfig, progress: bool = True) -> InputSet:
    """Write (or reuse) image shards for a built-in or folder dataset."""
    ds = create_dataset(cfg.data)
    fingerprint = hashlib.sha256(
        f"{ds.fingerprint()}/{cfg.data.shard_samples}/{INGEST_FORMAT}".encode()
    ).hexdigest()
    out_dir = fs.join(cfg.cache.root, "images", f"{ds.name}-{fingerprint[:16]}")
    manifest_url = fs.join(out_dir, "manifest.json")
    done = _finished(manifest_url, fingerprint)
    if done is None:
        done = _write_shards(ds, out_dir, cfg.data.shard_samples, fingerprint, progress)
        fs.write_json_atomic(manifest_url, done)
    return InputSet(
        source=ds.name,
        shards=[fs.join_inside(out_dir, sh["name"], where=manifest_url) for sh in done["shards"]],
        classes=done["classes"],
        fingerprint=fingerprint,
        manifest=manifest_url,
    )


def _write_shards(ds, out_dir: str, per_shard: int, fingerprint: str, progress: bool) -> dict:
    fs.makedirs(out_dir)
    shards: list[dict] = []
    bar = progress_bar(progress, desc=f"ingest {ds.name}", unit="img", leave=False)
    samples = iter(ds)
    index = 0
    while True:
        batch = []
        for s in samples:
            batch.append(s)
            if len(batch) == per_shard:
                break
        if not batch:
            break
        name = f"shard-{index:05d}.tar"
        url = fs.join(out_dir, name)
        with fs.staged(url) as tmp:
            writer = TarShardWriter(tmp)
            for s in batch:
                writer.write(s.key, _sample_fields(s))
            writer.close()
            record = {
                "name": name,
                "count": writer.count,
                "bytes": writer.bytes_written,
                "sha256": fs.sha256_file(tmp),
                "first_key": writer.first_key,
                "last_key": writer.last_key,
            }
        shards.append(record)
        bar.update(len(batch))
        index += 1
    bar.close()
    if not shards:
        raise DataError(f"dataset {ds.name!r} yielded no samples")
    return {
        "format": INGEST_FORMAT,
        "kind": "images",
        "dataset": ds.name,
        "fingerprint": fingerprint,
        "classes": ds.classes,
        "num_samples": sum(s["count"] for s in shards),
        "shards": shards,
    }


def _same_file(url: str) -> str:
    """What identifies a shard's file: the real path of a local one (``./a.tar``, ``d/../a.tar`` and a
    symlink to ``a.tar`` are ``a.tar``), the URL of a remote one."""
    if fs.is_remote(url):
        return url
    return os.path.realpath(os.path.expanduser(url.removeprefix("file://")))


def expand_pattern(pattern: str) -> list[str]:
    """``"s3://b/train-{000..009}.tar"`` -> ten URLs; several patterns may be joined with ``::``.

    An empty part (``a.tar::``) and a shard listed twice (also under another name: ``a.tar::./a.tar``,
    or a symlink to it) are errors: either would silently change what the extraction reads. A copy under
    another name holds the same keys: the extraction refuses that (:func:`vitdistill.extract.finalize_cache`)."""
    urls: list[str] = []
    seen: dict[str, str] = {}
    for i, part in enumerate(pattern.split("::")):
        if not part.strip():
            raise DataError(f"data.path {pattern!r}: part {i + 1} of the '::'-separated list is empty")
        for url in braceexpand(part.strip()):
            file = _same_file(url)
            if file in seen:
                first = seen[file]
                again = "" if first == url else f" ({first} is the same file, {file})"
                raise DataError(f"data.path: shard {url} is listed twice{again}; each shard may appear once")
            seen[file] = url
            urls.append(url)
    return urls


def resolve_inputs(cfg: VitdistillConfig, progress: bool = True) -> InputSet:
    """Input shards for the extraction: existing ``wds`` shards, or the ingested dataset."""
    if cfg.data.source != "wds":
        return ingest(cfg, progress=progress)
    urls = expand_pattern(cfg.data.path or "")
    infos = []
    for url in urls:
        fsys, path = fs.get_fs(url)
        try:
            info = fsys.info(path)
        except FileNotFoundError:
            raise DataError(f"data.path: shard {url} not found") from None
        if info.get("type") == "directory":
            raise DataError(f"data.path: shard {url} is a directory, expected a tar file")
        if info.get("type") not in (None, "file"):  # a FIFO or device would block or never end: read files only
            raise DataError(f"data.path: shard {url} is not a regular file ({info.get('type')}), expected a tar file")
        infos.append([url, info.get("size"), str(info.get("ETag") or info.get("mtime") or info.get("LastModified"))])
    fingerprint = hashlib.sha256(json.dumps(infos, sort_keys=True).encode()).hexdigest()
    return InputSet(source="wds", shards=urls, classes=_wds_classes(urls[0]), fingerprint=fingerprint)


def _wds_classes(first_url: str) -> list[str] | None:
    """Class names for existing shards from an optional ``classes.txt`` beside them."""
    url = fs.join(first_url.rsplit("/", 1)[0], "classes.txt") if "/" in first_url else "classes.txt"
    try:
        names = [ln.strip() for ln in decode_text(fs.read_bytes(url), url).splitlines() if ln.strip()]
    except FileNotFoundError:
        return None
    return names or None
