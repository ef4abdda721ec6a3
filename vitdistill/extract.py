"""Run a frozen teacher over input shards once and cache its outputs as webdataset shards.

Three steps, each a plain function so that Prefect (or a plain loop) can drive them:

1. :func:`plan_extraction` resolves the teacher and addresses the cache directory by content
   (teacher fingerprint, preprocessing, dataset fingerprint, dtype, split, layout). Changing any
   of them gives a new directory, so stale features are never reused.
2. :func:`extract_shard` turns input shard *i* into feature shard(s) ``feat-iiiii-ppp.tar``:
   written under a temporary name, verified (count, finite and non-zero features), published
   atomically, then recorded in ``records/iiiii.json``. A shard whose record and files are
   already there is skipped, so a re-run after a crash resumes and a finished cache takes seconds.
3. :func:`finalize_cache` writes ``manifest.json`` last.

Sample layout: ``{key}.emb.npy`` (D,), ``{key}.logits.npy`` (C,) (or ``logits_topk.npy`` +
``logits_idx.npy``), ``{key}.cls``, ``{key}.txt``, ``{key}.json`` (attributes), ``{key}.split.txt``;
with ``teacher.layers``, ``{key}.layers.npy`` (sum of D_l,): the chosen blocks' features side by side,
their blocks and widths recorded in the manifest under ``teacher.layers``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from vitdistill.cache import fs
from vitdistill.cache.tario import TarShardWriter, UnreadableShardError, dump_npy, iter_tar_samples
from vitdistill.config import TeacherConfig, VitdistillConfig
from vitdistill.data.datasets import IMAGE_FIELDS
from vitdistill.data.ingest import InputSet
from vitdistill.data.splits import SPLITS, assign_split
from vitdistill.errors import CacheError, DataError
from vitdistill.models.teachers import Teacher, create_teacher
from vitdistill.progress import progress_bar

FORMAT_VERSION = 1


@dataclass
class ExtractionPlan(fs.ShardedCachePlan):
    """Everything a shard task needs; small and JSON-serialisable (tasks pass it, not tensors)."""

    cache_dir: str
    inputs: list[str]
    classes: list[str] | None
    teacher_cfg: dict[str, Any]
    teacher: dict[str, Any]
    preprocessing: dict[str, Any]
    dataset: dict[str, Any]
    split: dict[str, Any]
    dtype: str
    logits_topk: int | None
    shard_bytes: int
    on_error: str
    verify: bool


def plan_extraction(cfg: VitdistillConfig, inputs: InputSet) -> ExtractionPlan:
    teacher = create_teacher(cfg.teacher)
    split = {
        "method": "sha1(seed/key)",
        "seed": cfg.data.seed,
        "val_fraction": cfg.data.val_fraction,
        "test_fraction": cfg.data.test_fraction,
    }
    address = {
        "format": FORMAT_VERSION,
        "teacher": teacher.fingerprint(),
        "preprocessing": teacher.data_config,
        "dataset": inputs.fingerprint,
        "split": split,
        "dtype": cfg.cache.dtype,
        "logits_topk": cfg.cache.logits_topk,
        "shard_bytes": cfg.cache.shard_bytes,
        "on_error": cfg.data.on_error,
    }
    digest = hashlib.sha256(json.dumps(address, sort_keys=True).encode()).hexdigest()
    return ExtractionPlan(
        cache_dir=fs.join(cfg.cache.root, "features", f"{teacher.slug}-{digest[:16]}"),
        inputs=list(inputs.shards),
        classes=inputs.classes,
        teacher_cfg=cfg.teacher.model_dump(mode="json"),
        teacher=teacher.fingerprint(),
        preprocessing=teacher.data_config,
        dataset={"source": inputs.source, "fingerprint": inputs.fingerprint, "manifest": inputs.manifest},
        split=split,
        dtype=cfg.cache.dtype,
        logits_topk=cfg.cache.logits_topk,
        shard_bytes=cfg.cache.shard_bytes,
        on_error=cfg.data.on_error,
        verify=cfg.cache.verify,
    )


# --------------------------------------------------------------------------- per shard


def _record_is_valid(plan: ExtractionPlan, record: dict) -> bool:
    for part in record.get("parts", []):
        url = fs.join(plan.cache_dir, part["name"])
        if fs.size(url) != part["bytes"]:
            return False
        if plan.verify and fs.sha256_file(url) != part["sha256"]:
            return False
    return record.get("input") == plan.inputs[record["index"]]


def load_record(plan: ExtractionPlan, index: int) -> dict | None:
    try:
        record = fs.read_json(plan.record_url(index))
    except (FileNotFoundError, DataError):
        return None
    return record if _record_is_valid(plan, record) else None


@dataclass
class _Batch:
    keys: list[str]
    pixels: torch.Tensor  # (B, H, W, 3) uint8
    extras: list[dict[str, bytes]]  # cls / txt / json per sample, passed through


def _decode(key: str, fields: dict[str, bytes], pil_transform, shard: str) -> np.ndarray:
    """Encoded image -> (H, W, 3) uint8 at the teacher's input size."""
    field = next((f for f in IMAGE_FIELDS if f in fields), None)
    if field is None:
        raise DataError(f"{shard}: sample {key!r} has no image (expected one of {', '.join(IMAGE_FIELDS)})")
    try:
        with Image.open(io.BytesIO(fields[field])) as img:
            return np.asarray(pil_transform(img.convert("RGB")), dtype=np.uint8)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise DataError(f"{shard}: sample {key!r}: cannot decode {field} image ({type(e).__name__}: {e})") from None


def _raw_groups(shard: str, size: int, on_error: str, skipped: list[dict]) -> Iterator[list[tuple[str, dict]]]:
    """The shard's samples, still encoded, in groups of ``size``."""
    group: list[tuple[str, dict]] = []
    last_key = None
    try:
        with fs.open_read(shard) as f:
            for key, fields in iter_tar_samples(f, shard):
                last_key = key
                group.append((key, fields))
                if len(group) == size:
                    yield group
                    group = []
    except FileNotFoundError:
        raise DataError(f"{shard}: input shard not found") from None
    except UnreadableShardError as e:
        if on_error == "error":
            raise
        skipped.append({"shard": shard, "key": last_key, "reason": str(e).split(": ", 1)[-1]})
    if group:
        yield group


def _batches(
    shard: str, pil_transform, batch_size: int, on_error: str, skipped: list[dict], pool: ThreadPoolExecutor
) -> Iterator[_Batch]:
    """Decoded batches. Each group is decoded by ``pool`` between forward passes: PIL releases the
    GIL, so both cores decode while the teacher waits, instead of one decoding while the other idles."""

    def decode(item: tuple[str, dict]) -> np.ndarray | DataError:
        try:
            return _decode(item[0], item[1], pil_transform, shard)
        except DataError as e:
            return e

    for group in _raw_groups(shard, batch_size, on_error, skipped):
        keys: list[str] = []
        pixels: list[np.ndarray] = []
        extras: list[dict[str, bytes]] = []
        for (key, fields), x in zip(group, pool.map(decode, group)):
            if isinstance(x, DataError):
                if on_error == "error":
                    raise x
                skipped.append({"shard": shard, "key": key, "reason": str(x).split(": ", 2)[-1]})
                continue
            keys.append(key)
            pixels.append(x)
            extras.append({k: v for k, v in fields.items() if k in ("cls", "txt", "json")})
        if keys:
            yield _Batch(keys, torch.from_numpy(np.stack(pixels)), extras)


def _prefetch(it: Iterator[_Batch], depth: int = 2) -> Iterator[_Batch]:
    """Decode the next batches in a background thread while the teacher runs on this one."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work() -> None:
        try:
            for item in it:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as e:  # re-raised in the consumer
            q.put(e)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass


def _check_features(emb: torch.Tensor, logits: torch.Tensor | None, keys: list[str], shard: str,
                    layers: torch.Tensor | None = None) -> None:
    for name, t in (("embedding", emb), ("logits", logits), ("layer features", layers)):
        if t is None:
            continue
        bad = ~torch.isfinite(t).all(dim=1)
        if bad.any():
            raise CacheError(f"{shard}: teacher gave non-finite {name} for key {keys[int(bad.nonzero()[0])]!r}")
    zero = emb.abs().amax(dim=1) == 0
    if zero.any():
        raise CacheError(f"{shard}: teacher gave an all-zero embedding for key {keys[int(zero.nonzero()[0])]!r}")


class _PartWriter:
    """Feature shard parts for one input shard, rolled over by size, published at the end."""

    def __init__(self, plan: ExtractionPlan, index: int) -> None:
        self.plan, self.index = plan, index
        self.parts: list[dict] = []
        self._staged: list[tuple[str, str]] = []
        self._writer: TarShardWriter | None = None

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        if self._writer is None:
            name = f"feat-{self.index:05d}-{len(self.parts) + len(self._staged):03d}.tar"
            url = fs.join(self.plan.cache_dir, name)
            tmp = os.path.join(fs.local_tmp_dir(url), f".tmp-{name}.{uuid.uuid4().hex[:8]}")
            self._writer = TarShardWriter(tmp)
            self._staged.append((tmp, name))
        self._writer.write(key, fields)
        if self._writer.bytes_written >= self.plan.shard_bytes:
            self._close_current()

    def _close_current(self) -> None:
        w = self._writer
        if w is None:
            return
        w.close()
        tmp, name = self._staged[-1]
        self.parts.append(
            {"name": name, "count": w.count, "bytes": w.bytes_written, "first_key": w.first_key, "last_key": w.last_key}
        )
        self._writer = None

    def publish(self) -> list[dict]:
        self._close_current()
        for (tmp, name), part in zip(self._staged, self.parts):
            part["sha256"] = fs.sha256_file(tmp)
            fs.publish(tmp, fs.join(self.plan.cache_dir, name))
        self._staged = []
        return self.parts

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
        for tmp, _ in self._staged:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _sample_fields(plan: ExtractionPlan, key: str, emb: np.ndarray, logits: np.ndarray | None, extra: dict,
                   layers: np.ndarray | None = None) -> dict:
    dtype = np.float16 if plan.dtype == "float16" else np.float32
    out = {"emb.npy": dump_npy(emb.astype(dtype))}
    if layers is not None:
        out["layers.npy"] = dump_npy(layers.astype(dtype))
    if logits is not None:
        if plan.logits_topk:
            idx = np.argsort(-logits)[: plan.logits_topk].astype(np.int32)
            out["logits_topk.npy"] = dump_npy(logits[idx].astype(dtype))
            out["logits_idx.npy"] = dump_npy(idx)
        else:
            out["logits.npy"] = dump_npy(logits.astype(dtype))
    out.update(extra)
    out["split.txt"] = assign_split(key, plan.split["seed"], plan.split["val_fraction"], plan.split["test_fraction"]).encode()
    return out


def extract_shard(plan: ExtractionPlan, index: int, progress: bool = True) -> dict:
    """Extract input shard ``index``; returns its record (reused if already done, see ``build_once``)."""
    return plan.build_once(index, lambda i: load_record(plan, i), lambda i: _extract_shard(plan, i, progress))


def _extract_shard(plan: ExtractionPlan, index: int, progress: bool) -> dict:
    shard = plan.inputs[index]
    teacher: Teacher = create_teacher(TeacherConfig.model_validate(plan.teacher_cfg))
    transform = teacher.pil_transform()
    batch_size = int(plan.teacher_cfg["batch_size"])
    skipped: list[dict] = []
    writer = _PartWriter(plan, index)
    split_counts = dict.fromkeys(SPLITS, 0)
    fs.makedirs(plan.cache_dir)
    t0 = time.perf_counter()
    count = 0
    bar = progress_bar(progress, desc=shard.rsplit("/", 1)[-1], unit="img", leave=False)
    pool = ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()), thread_name_prefix="decode")
    try:
        batches = _batches(shard, transform, batch_size, plan.on_error, skipped, pool)
        # On GPU, decode the next batch on the CPU while the GPU runs this one. On CPU, decoding
        # inline is faster: a decode thread would steal a core (and the GIL) from the forward pass.
        for batch in _prefetch(batches) if teacher.device.type == "cuda" else batches:
            out = teacher.forward(teacher.normalize_uint8(batch.pixels))  # (B, D), (B, C) | None, (B, L) | None
            emb, logits = out.emb, out.logits
            _check_features(emb, logits, batch.keys, shard, out.layers)
            emb_np = emb.cpu().numpy()
            logits_np = logits.cpu().numpy() if logits is not None else None
            layers_np = out.layers.cpu().numpy() if out.layers is not None else None
            for i, key in enumerate(batch.keys):
                fields = _sample_fields(plan, key, emb_np[i], None if logits_np is None else logits_np[i], batch.extras[i],
                                        None if layers_np is None else layers_np[i])
                split_counts[fields["split.txt"].decode()] += 1
                writer.write(key, fields)
            count += len(batch.keys)
            bar.update(len(batch.keys))
        parts = writer.publish()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
        pool.shutdown(wait=True)
    seconds = time.perf_counter() - t0
    if sum(p["count"] for p in parts) != count:
        raise CacheError(f"{shard}: wrote {sum(p['count'] for p in parts)} samples, expected {count}")
    record = {
        "index": index,
        "input": shard,
        "parts": parts,
        "count": count,
        "skipped": skipped,
        "split_counts": split_counts,
        "seconds": round(seconds, 3),
        "images_per_s": round(count / seconds, 2) if seconds > 0 else None,
    }
    fs.write_json_atomic(plan.record_url(index), record)
    return record


# --------------------------------------------------------------------------- manifest


def finalize_cache(plan: ExtractionPlan, records: list[dict]) -> dict:
    """Write ``manifest.json`` (last) from the shard records; returns it."""
    records = plan.ordered_records(records, "the extraction")
    shards = [{**p, "input": r["input"]} for r in records for p in r["parts"]]
    skipped = [s for r in records for s in r["skipped"]]
    split_counts = {s: sum(r["split_counts"][s] for r in records) for s in SPLITS}
    num = sum(r["count"] for r in records)
    if num == 0:
        raise CacheError(f"{plan.cache_dir}: no sample could be extracted ({len(skipped)} skipped)")
    fresh = [r for r in records if not r.get("reused")]
    return plan.publish_manifest("features", FORMAT_VERSION, {
        "teacher": plan.teacher,
        "preprocessing": plan.preprocessing,
        "dtype": plan.dtype,
        "logits_topk": plan.logits_topk,
        "dataset": plan.dataset,
        "classes": plan.classes,
        "split": {**plan.split, "counts": split_counts},
        "num_samples": num,
        "num_skipped": len(skipped),
        "skipped": skipped,
        "shards": shards,
        "stats": {
            "shards_extracted": len(fresh),
            "shards_reused": len(records) - len(fresh),
            "samples_extracted": sum(r["count"] for r in fresh),
            "extract_seconds": round(sum(r["seconds"] for r in fresh), 3),
        },
    })


def extract(cfg: VitdistillConfig, inputs: InputSet, progress: bool = True) -> tuple[ExtractionPlan, dict]:
    """The whole extraction in-process, sequentially (the Prefect flow maps shards instead)."""
    plan = plan_extraction(cfg, inputs)
    records = [extract_shard(plan, i, progress=progress) for i in range(len(plan.inputs))]
    return plan, finalize_cache(plan, records)


def extraction_report(plan: ExtractionPlan, manifest: dict, wall_seconds: float) -> tuple[dict, dict, list[dict]]:
    """(params, metrics, per-shard table rows) for tracking and artifacts."""
    params = {
        "teacher": plan.teacher["name"],
        "teacher_weights_sha256": plan.teacher["weights_sha256"],
        "dataset": plan.dataset["source"],
        "dtype": plan.dtype,
        "shard_bytes": plan.shard_bytes,
        "cache_dir": plan.cache_dir,
    }
    stats = manifest["stats"]
    extracted = stats["samples_extracted"]
    metrics = {
        "samples": manifest["num_samples"],
        "skipped_samples": manifest["num_skipped"],
        "shards": len(manifest["shards"]),
        "shards_reused": stats["shards_reused"],
        "wall_seconds": round(wall_seconds, 3),
    }
    if stats["extract_seconds"] > 0 and extracted:
        metrics["images_per_s"] = round(extracted / stats["extract_seconds"], 2)
    rows = [
        {"shard": s["name"], "samples": s["count"], "MB": round(s["bytes"] / 1e6, 2), "sha256": s["sha256"][:12],
         "first_key": s["first_key"], "last_key": s["last_key"]}
        for s in manifest["shards"]
    ]
    return params, metrics, rows
