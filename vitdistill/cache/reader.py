"""The one reader of feature caches, used by every stage.

    fc = FeatureCache.open("vitdistill-cache/features/effnet_lite0_imagenet-0123abcd")
    train = fc.load(split="train")      # {"key": [...], "emb": (N, D) float32, "cls": (N,), ...}
    big = fc.load(split="train", spill_dir=tmp)   # the same, arrays as read-only float16 memory maps
    splits = fc.load_splits(("train", "val", "test"))   # split -> the same, in one pass over the shards
    for sample in fc.iter_samples():    # streaming, one dict per sample
        ...

The shards are plain webdataset tars, so ``webdataset.WebDataset(fc.shard_urls())`` reads them
too. This reader is stricter: it checks each sample against the manifest's layout, refuses
pickle-format fields, and hashes every shard as it streams by: a shard whose bytes differ from the
sha256 its manifest states fails the read (after its last sample, before the caller's result exists).
So whatever is computed from a :class:`FeatureCache` comes from exactly the bytes that
:meth:`FeatureCache.content_sha256` names, and results keyed on it (the probe stage's Prefect cache,
the saved teacher probe) can never hold numbers of a corrupted shard.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterator, Sequence

import numpy as np

from vitdistill.cache import fs
from vitdistill.cache.tario import iter_tar_samples, load_npy
from vitdistill.errors import CacheError, DataError


ARRAY_FIELDS = ("emb", "logits", "logits_topk", "logits_idx", "layers")


class FeatureCache:
    def __init__(self, cache_dir: str, manifest: dict[str, Any]) -> None:
        self.cache_dir = cache_dir
        self.manifest = manifest

    @classmethod
    def open(cls, cache_dir: str) -> FeatureCache:
        url = fs.join(cache_dir, "manifest.json")
        try:
            manifest = fs.read_json(url)
        except FileNotFoundError:
            raise CacheError(f"{url}: no manifest; the cache is unfinished or not a feature cache (run `vitdistill extract`)") from None
        if manifest.get("kind") != "features" or "shards" not in manifest:
            raise CacheError(f"{url}: not a feature-cache manifest (expected kind 'features' with a 'shards' list)")
        return cls(cache_dir, manifest)

    # ------------------------------------------------------------------ metadata
    @property
    def classes(self) -> list[str] | None:
        return self.manifest.get("classes")

    @property
    def num_features(self) -> int:
        return int(self.manifest["teacher"]["num_features"])

    @property
    def num_samples(self) -> int:
        return int(self.manifest["num_samples"])

    def content_sha256(self) -> str:
        """Identifies the cached features (teacher, preprocessing, every shard's checksum), not when or
        how often the manifest was written: a key for results computed from this cache. The key is sound
        because the reader checks each shard's bytes against that checksum: a result computed from this
        cache is a result of these bytes (a shard repaired to the same checksum gives the same result)."""
        m = self.manifest
        blob = json.dumps([m["teacher"], m.get("preprocessing"), m.get("dtype"), [s.get("sha256") or [s.get("name"), s.get("count")] for s in m["shards"]]], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def shard_urls(self) -> list[str]:
        where = fs.join(self.cache_dir, "manifest.json")
        return [fs.join_inside(self.cache_dir, s["name"], where=where) for s in self.manifest["shards"]]

    # ------------------------------------------------------------------ reading
    def iter_samples(self, split: str | None = None, arrays: Sequence[str] = ARRAY_FIELDS) -> Iterator[dict[str, Any]]:
        """One dict per sample (of ``split``, None: every one), with the fields of ``arrays`` that it holds
        decoded (``emb`` always)."""
        dim = self.num_features
        for url, shard in zip(self.shard_urls(), self.manifest["shards"]):
            n = 0
            try:
                f = fs.open_read(url)
            except FileNotFoundError:
                raise CacheError(f"{url}: shard listed in the manifest is missing") from None
            with f:
                stream = fs.Sha256Reader(f)
                try:
                    for key, fields in iter_tar_samples(stream, url):
                        n += 1
                        sample = self._decode(key, fields, url, dim, arrays)
                        if split is None or sample["split"] == split:
                            yield sample
                except (CacheError, DataError) as e:  # a changed shard: say so, rather than what broke first
                    self._check_sha256(url, shard, stream.hexdigest(), cause=e)
                    raise
                self._check_sha256(url, shard, stream.hexdigest())
            if n != shard["count"]:
                raise CacheError(f"{url}: holds {n} samples but the manifest says {shard['count']}")

    @staticmethod
    def _check_sha256(url: str, shard: dict, digest: str, cause: Exception | None = None) -> None:
        expected = shard.get("sha256")
        if expected and digest != expected:
            raise CacheError(f"{url}: sha256 {digest[:12]}... does not match the manifest's {expected[:12]}... "
                             "(the shard or the manifest changed after extraction); re-run the extraction with "
                             "--set cache.verify=true to rebuild it") from cause

    def _decode(self, key: str, fields: dict[str, bytes], url: str, dim: int,
                arrays: Sequence[str] = ARRAY_FIELDS) -> dict[str, Any]:
        where = f"{url}: sample {key!r}"
        if "emb.npy" not in fields:
            raise CacheError(f"{where}: no emb.npy")
        emb = load_npy(fields["emb.npy"], where)
        if emb.shape != (dim,) or emb.dtype.kind != "f":
            raise CacheError(f"{where}: emb.npy has shape {emb.shape} dtype {emb.dtype}, expected ({dim},) float")
        out: dict[str, Any] = {"key": key, "emb": emb, "split": fields.get("split.txt", b"train").decode()}
        if "logits.npy" in fields and "logits" in arrays:
            out["logits"] = load_npy(fields["logits.npy"], where)
        if "layers.npy" in fields and "layers" in arrays:  # teacher.layers: the chosen blocks side by side
            out["layers"] = load_npy(fields["layers.npy"], where)
        if "logits_topk.npy" in fields and "logits_topk" in arrays:
            out["logits_topk"] = load_npy(fields["logits_topk.npy"], where)
            out["logits_idx"] = load_npy(fields["logits_idx.npy"], where)
        if "cls" in fields:
            try:
                out["cls"] = int(fields["cls"].decode().strip())
            except ValueError:
                raise CacheError(f"{where}: cls is {fields['cls'][:20]!r}, expected an integer") from None
        if "txt" in fields:
            out["txt"] = fields["txt"].decode("utf-8", errors="replace")
        if "json" in fields:
            try:
                out["meta"] = json.loads(fields["json"])
            except json.JSONDecodeError:
                raise CacheError(f"{where}: json field is not valid JSON") from None
        return out

    def split_size(self, split: str | None) -> int | None:
        """Samples in ``split`` per the manifest (None when it does not say)."""
        if split is None:
            return self.num_samples
        return (self.manifest.get("split") or {}).get("counts", {}).get(split)

    def load(self, split: str | None = None, *, spill_dir: str | None = None,
             arrays: Sequence[str] = ARRAY_FIELDS) -> dict[str, Any]:
        """Materialise a split (None: every sample) as arrays: emb (N, D) float32; logits (N, C); cls (N,)
        int64 or None; txt list (None for a sample without a caption) or None when no sample has one; key
        list; split list; meta list or None. The arrays are filled in place as the shards stream by (sized
        from the manifest's split counts), so the peak is the arrays themselves.

        With ``spill_dir`` (a local directory) the arrays are written there instead, as ``.npy`` files in
        the dtype the cache stores them in (float16 by default: half of float32), and come back as read-only
        memory maps: resident memory stays flat whatever N, and the page cache holds what is being read.
        This is how caches larger than memory are probed and aligned (chunked readers never copy them
        whole). ``arrays`` names the array fields wanted (the others are not decoded and come back None):
        the probes read ``("emb", "layers")``, not the (N, 1000) logits of an ImageNet teacher."""
        return self.load_splits((split,), spill_dir=spill_dir, arrays=arrays)[split]

    def load_splits(self, splits: Sequence[str | None], *, spill_dir: str | None = None,
                    arrays: Sequence[str] = ARRAY_FIELDS) -> dict[str | None, dict[str, Any]]:
        """:meth:`load` of several splits in one pass over the shards: split -> its arrays."""
        sizes = {s: self.split_size(s) for s in splits}
        if spill_dir is not None and None in sizes.values():  # a memory map needs its length up front: count first
            counts: dict[str, int] = {}
            for r in self.iter_samples(arrays=()):
                counts[r["split"]] = counts.get(r["split"], 0) + 1
            sizes = {s: (sum(counts.values()) if s is None else counts.get(s, 0)) for s in splits}
        columns = {s: _SplitColumns(self.cache_dir, s, sizes[s], spill_dir) for s in splits}
        only = splits[0] if len(splits) == 1 else None  # one named split: the reader skips decoding no other
        for r in self.iter_samples(only, arrays):
            for s, c in columns.items():
                if s is None or s == r["split"]:
                    c.add(r)
        return {s: c.finish() for s, c in columns.items()}

    def verify(self) -> None:
        """Check every shard's sha256, sample count and samples against the manifest (a full read: the
        reader checks all of it on every read)."""
        for _ in self.iter_samples():
            pass


def spill_array(spill_dir: str, name: str, dtype: Any, shape: tuple[int, ...]) -> np.memmap:
    """A new writable ``.npy`` memory map ``spill_dir/name.npy``; hand it to :func:`read_only` once filled."""
    return np.lib.format.open_memmap(os.path.join(spill_dir, f"{name}.npy"), mode="w+", dtype=dtype, shape=shape)


def read_only(mm: np.memmap) -> np.ndarray:
    """A filled :func:`spill_array`, flushed and reopened read-only (its written pages leave this process)."""
    mm.flush()
    path = mm.filename
    del mm
    return np.load(path, mmap_mode="r")


class _SplitColumns:
    """One split's fields, filled in place as samples stream by (:meth:`FeatureCache.load`)."""

    def __init__(self, cache_dir: str, split: str | None, n: int | None, spill_dir: str | None) -> None:
        self.cache_dir, self.split, self.n, self.spill_dir = cache_dir, split, n, spill_dir
        self.arrays: dict[str, np.ndarray] = {}
        self.filled: dict[str, int] = {}
        self.lists: dict[str, list] = {"key": [], "split": [], "txt": [], "meta": []}
        self.cls: list[int] = []
        self.has = {"cls": True, "txt": False, "meta": False}
        self.i = 0

    def add(self, r: dict[str, Any]) -> None:
        i, n = self.i, self.n
        for name in ARRAY_FIELDS:
            if name not in r:
                continue
            if self.filled.setdefault(name, 0) != i:  # an earlier sample lacked it: this array is never complete
                continue
            self.filled[name] += 1
            if name not in self.arrays:
                shape = (n if n is not None else 1024, *r[name].shape)
                self.arrays[name] = (spill_array(self.spill_dir, f"{self.split or 'all'}-{name}", r[name].dtype, shape)
                                     if self.spill_dir is not None else
                                     np.empty(shape, np.float32 if name in ("emb", "layers") else r[name].dtype))
            a = self.arrays[name]
            if i >= len(a) and self.spill_dir is not None:
                raise CacheError(f"{self.cache_dir}: split {self.split!r} holds more samples than the manifest's {n}")
            if i >= len(a):  # the manifest gave no count: grow geometrically
                a = self.arrays[name] = np.concatenate([a, np.empty_like(a)])
            a[i] = r[name]
        self.lists["key"].append(r["key"])
        self.lists["split"].append(r["split"])
        self.has["cls"] &= "cls" in r
        self.has["txt"] |= "txt" in r  # partial captions are kept: a consumer decides what a missing one means
        self.has["meta"] |= "meta" in r
        self.cls.append(r.get("cls", -1))
        self.lists["txt"].append(r.get("txt"))
        self.lists["meta"].append(r.get("meta"))
        self.i += 1

    def finish(self) -> dict[str, Any]:
        i = self.i
        if i == 0:
            where = f"split {self.split!r}" if self.split else "the cache"
            raise DataError(f"{self.cache_dir}: {where} has no samples")
        if self.spill_dir is not None and i != self.n:
            raise CacheError(f"{self.cache_dir}: split {self.split!r} holds {i} samples but the manifest says {self.n}")
        out: dict[str, Any] = {"key": self.lists["key"], "split": self.lists["split"]}
        for name in ARRAY_FIELDS:
            if self.spill_dir is not None and name in self.arrays:
                self.arrays[name] = read_only(self.arrays.pop(name))
            out[name] = self.arrays[name][:i] if self.filled.get(name) == i else None
        out["cls"] = np.array(self.cls, dtype=np.int64) if self.has["cls"] else None
        out["txt"] = self.lists["txt"] if self.has["txt"] else None
        out["meta"] = self.lists["meta"] if self.has["meta"] else None
        return out
