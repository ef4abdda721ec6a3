"""The one reader of feature caches, used by every stage.

    fc = FeatureCache.open("vitdistill-cache/features/effnet_lite0_imagenet-0123abcd")
    train = fc.load(split="train")      # {"key": [...], "emb": (N, D) float32, "cls": (N,), ...}
    for sample in fc.iter_samples():    # streaming, one dict per sample
        ...

The shards are plain webdataset tars, so ``webdataset.WebDataset(fc.shard_urls())`` reads them
too. This reader is stricter: it checks each sample against the manifest's layout and refuses
pickle-format fields.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import numpy as np

from vitdistill.cache import fs
from vitdistill.cache.tario import iter_tar_samples, load_npy
from vitdistill.errors import CacheError, DataError


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
        how often the manifest was written: a key for results computed from this cache."""
        import hashlib

        m = self.manifest
        blob = json.dumps([m["teacher"], m["preprocessing"], m["dtype"], [s["sha256"] for s in m["shards"]]], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def shard_urls(self) -> list[str]:
        return [fs.join(self.cache_dir, s["name"]) for s in self.manifest["shards"]]

    # ------------------------------------------------------------------ reading
    def iter_samples(self, split: str | None = None) -> Iterator[dict[str, Any]]:
        dim = self.num_features
        for url, shard in zip(self.shard_urls(), self.manifest["shards"]):
            n = 0
            try:
                f = fs.open_read(url)
            except FileNotFoundError:
                raise CacheError(f"{url}: shard listed in the manifest is missing") from None
            with f:
                for key, fields in iter_tar_samples(f, url):
                    n += 1
                    sample = self._decode(key, fields, url, dim)
                    if split is None or sample["split"] == split:
                        yield sample
            if n != shard["count"]:
                raise CacheError(f"{url}: holds {n} samples but the manifest says {shard['count']}")

    def _decode(self, key: str, fields: dict[str, bytes], url: str, dim: int) -> dict[str, Any]:
        where = f"{url}: sample {key!r}"
        if "emb.npy" not in fields:
            raise CacheError(f"{where}: no emb.npy")
        emb = load_npy(fields["emb.npy"], where)
        if emb.shape != (dim,) or emb.dtype.kind != "f":
            raise CacheError(f"{where}: emb.npy has shape {emb.shape} dtype {emb.dtype}, expected ({dim},) float")
        out: dict[str, Any] = {"key": key, "emb": emb, "split": fields.get("split.txt", b"train").decode()}
        if "logits.npy" in fields:
            out["logits"] = load_npy(fields["logits.npy"], where)
        if "logits_topk.npy" in fields:
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

    def load(self, split: str | None = None) -> dict[str, Any]:
        """Materialise a split as arrays: emb (N, D) float32; logits (N, C); cls (N,) int64 or None;
        txt list or None; key list; split list; meta list or None."""
        rows = list(self.iter_samples(split))
        if not rows:
            where = f"split {split!r}" if split else "the cache"
            raise DataError(f"{self.cache_dir}: {where} has no samples")
        out: dict[str, Any] = {
            "key": [r["key"] for r in rows],
            "split": [r["split"] for r in rows],
            "emb": np.stack([r["emb"] for r in rows]).astype(np.float32),
        }
        for name in ("logits", "logits_topk", "logits_idx"):
            out[name] = np.stack([r[name] for r in rows]) if all(name in r for r in rows) else None
        out["cls"] = np.array([r["cls"] for r in rows], dtype=np.int64) if all("cls" in r for r in rows) else None
        out["txt"] = [r["txt"] for r in rows] if all("txt" in r for r in rows) else None
        out["meta"] = [r.get("meta") for r in rows] if any("meta" in r for r in rows) else None
        return out

    def verify(self) -> None:
        """Check every shard's sha256 and sample count against the manifest."""
        for url, shard in zip(self.shard_urls(), self.manifest["shards"]):
            if fs.size(url) is None:
                raise CacheError(f"{url}: shard listed in the manifest is missing")
            digest = fs.sha256_file(url)
            if digest != shard["sha256"]:
                raise CacheError(f"{url}: sha256 {digest[:12]}... does not match the manifest's {shard['sha256'][:12]}...")
        for _ in self.iter_samples():
            pass
