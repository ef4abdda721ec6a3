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
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from vitdistill.cache import fs
from vitdistill.cache.tario import TarShardWriter, dump_npy, iter_tar_samples
from vitdistill.config import TeacherConfig, VitdistillConfig
from vitdistill.data.ingest import InputSet
from vitdistill.data.shards import PASS_THROUGH, SplitRule, decode_image, read_shard, skip_record
from vitdistill.data.splits import SPLITS
from vitdistill.errors import CacheError, DataError
from vitdistill.models.identity import forget, memo_url, teacher_identity
from vitdistill.progress import progress_bar

if TYPE_CHECKING:  # torch and the teachers are imported by the shard tasks only: a finished cache needs neither
    import torch

    from vitdistill.models.teachers import Teacher

log = logging.getLogger(__name__)

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
    teacher_memo: str | None = None  # the memo the teacher's identity came from (vitdistill.models.identity)


def plan_extraction(cfg: VitdistillConfig, inputs: InputSet) -> ExtractionPlan:
    """The plan of ``cfg``'s extraction; the teacher's identity comes from its memo when that is valid
    (a re-run over a finished cache then builds no teacher and imports no torch)."""
    teacher = teacher_identity(cfg.teacher, cfg.cache.root)
    split = SplitRule.from_config(cfg.data).to_dict()
    address = {
        "format": FORMAT_VERSION,
        "teacher": teacher["fingerprint"],
        "preprocessing": teacher["data_config"],
        "dataset": inputs.fingerprint,
        "split": split,
        "dtype": cfg.cache.dtype,
        "logits_topk": cfg.cache.logits_topk,
        "shard_bytes": cfg.cache.shard_bytes,
        "on_error": cfg.data.on_error,
    }
    digest = hashlib.sha256(json.dumps(address, sort_keys=True).encode()).hexdigest()
    return ExtractionPlan(
        cache_dir=fs.join(cfg.cache.root, "features", f"{teacher['slug']}-{digest[:16]}"),
        inputs=list(inputs.shards),
        classes=inputs.classes,
        teacher_cfg=cfg.teacher.model_dump(mode="json"),
        teacher=teacher["fingerprint"],
        preprocessing=teacher["data_config"],
        dataset={"source": inputs.source, "fingerprint": inputs.fingerprint, "manifest": inputs.manifest},
        split=split,
        dtype=cfg.cache.dtype,
        logits_topk=cfg.cache.logits_topk,
        shard_bytes=cfg.cache.shard_bytes,
        on_error=cfg.data.on_error,
        verify=cfg.cache.verify,
        teacher_memo=memo_url(cfg.teacher, cfg.cache.root),
    )


# --------------------------------------------------------------------------- per shard


def _is_count(x: Any) -> bool:
    return type(x) is int and x >= 0


def _record_is_valid(plan: ExtractionPlan, index: int, record: dict) -> bool:
    """Whether input shard ``index``'s record can be trusted, so that its shard is reused. Its counts must
    agree (the record's ``count`` is the sum of its parts' counts, of its ``split_counts``, one per split,
    and the length of its ``keys``), and each part must be in the cache with the recorded size; with
    ``cache.verify`` each part is also read once, its sha256, sample count, keys and splits compared with
    the record. Anything else (an edited or malformed record) is not trusted: the shard is redone."""
    try:
        if record["index"] != index or record.get("input") != plan.inputs[index]:
            return False
        parts, splits, keys = record["parts"], record["split_counts"], record.get("keys")
        if not isinstance(record["skipped"], list) or not _is_count(record["count"]):
            return False
        if sorted(splits) != sorted(SPLITS) or not all(_is_count(v) for v in splits.values()):
            return False
        if not all(_is_count(p["count"]) for p in parts):
            return False
        if sum(p["count"] for p in parts) != record["count"] or sum(splits.values()) != record["count"]:
            return False
        if keys is not None and (len(keys) != record["count"] or not all(isinstance(k, str) for k in keys)):
            return False
        read_keys: list[str] = []
        read_splits: list[str] = []
        for part in parts:
            try:
                url = fs.join_inside(plan.cache_dir, part["name"], where=plan.record_url(index))
            except CacheError:  # an edited record: redo the shard rather than follow it outside the cache
                return False
            if fs.size(url) != part["bytes"]:
                return False
            if plan.verify:
                scanned = _scan_part(url)
                if scanned is None or scanned[0] != part["sha256"] or len(scanned[1]) != part["count"]:
                    return False
                if scanned[1][:1] != [part["first_key"]] or scanned[1][-1:] != [part["last_key"]]:
                    return False
                read_keys += scanned[1]
                read_splits += scanned[2]
        if plan.verify:
            if {s: read_splits.count(s) for s in SPLITS} != splits or len(read_splits) != record["count"]:
                return False
            if keys is not None and keys != read_keys:
                return False
        return True
    except (KeyError, TypeError, AttributeError, IndexError):
        return False


def _scan_part(url: str) -> tuple[str, list[str], list[str]] | None:
    """A published part read once: (sha256, its samples' keys, their splits); None if it is unreadable."""
    keys: list[str] = []
    splits: list[str] = []
    try:
        with fs.open_read(url) as f:
            stream = fs.Sha256Reader(f)
            for key, fields in iter_tar_samples(stream, url):
                keys.append(key)
                splits.append(fields.get("split.txt", b"").decode("utf-8", "replace"))
            return stream.hexdigest(), keys, splits
    except DataError:
        return None


def load_record(plan: ExtractionPlan, index: int) -> dict | None:
    url = plan.record_url(index)
    try:
        record = fs.read_json(url)
    except (FileNotFoundError, DataError):
        return None
    if not isinstance(record, dict) or not _record_is_valid(plan, index, record):
        return None
    if "keys" not in record:  # written before records listed their keys: read them from the parts, once
        keys = []
        for part in record["parts"]:
            scanned = _scan_part(fs.join_inside(plan.cache_dir, part["name"], where=url))
            if scanned is None:
                return None
            keys += scanned[1]
        if len(keys) != record["count"]:
            return None
        record = {**record, "keys": keys}
        try:
            fs.write_json_atomic(url, record)
        except (OSError, CacheError) as e:  # a read-only cache: read them again next time
            log.debug("record %s not updated with its keys: %s", url, e)
    return record


def finished_records(plan: ExtractionPlan) -> list[dict] | None:
    """Every input shard's valid record (each marked reused) when the cache already has them all, else
    None: a re-run over a finished cache then needs no shard tasks at all."""
    records = []
    for i in range(len(plan.inputs)):
        record = load_record(plan, i)
        if record is None:
            return None
        records.append({**record, "reused": True})
    return records


@dataclass
class _Batch:
    keys: list[str]
    pixels: torch.Tensor  # (B, H, W, 3) uint8
    extras: list[dict[str, bytes]]  # cls / txt / json per sample, passed through


def _raw_groups(shard: str, size: int, on_error: str, skipped: list[dict]) -> Iterator[list[tuple[str, dict]]]:
    """The shard's samples, still encoded, in groups of ``size``."""
    group: list[tuple[str, dict]] = []
    for item in read_shard(shard, on_error, skipped):
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def decode_group(group: list[tuple[str, dict]], shard: str, pil_transform, on_error: str, decode_map=map
                 ) -> tuple[_Batch | None, list[dict]]:
    """One group of encoded samples -> a batch of pixels (None if every sample was skipped), and the skips."""
    import torch

    def decode(item: tuple[str, dict]) -> np.ndarray | DataError:
        try:
            return decode_image(item[0], item[1], shard, pil_transform)
        except DataError as e:
            return e

    keys: list[str] = []
    pixels: list[np.ndarray] = []
    extras: list[dict[str, bytes]] = []
    skipped: list[dict] = []
    for (key, fields), x in zip(group, decode_map(decode, group)):
        if isinstance(x, DataError):
            if on_error == "error":
                raise x
            skipped.append(skip_record(shard, key, x))
            continue
        keys.append(key)
        pixels.append(x)
        extras.append({k: v for k, v in fields.items() if k in PASS_THROUGH})
    return (_Batch(keys, torch.from_numpy(np.stack(pixels)), extras) if keys else None), skipped


def _batches(
    shard: str, pil_transform, batch_size: int, on_error: str, skipped: list[dict], pool: ThreadPoolExecutor
) -> Iterator[_Batch]:
    """Decoded batches. Each group is decoded by ``pool`` between forward passes: PIL releases the
    GIL, so both cores decode while the teacher waits, instead of one decoding while the other idles."""
    for group in _raw_groups(shard, batch_size, on_error, skipped):
        batch, bad = decode_group(group, shard, pil_transform, on_error, pool.map)
        skipped.extend(bad)
        if batch is not None:
            yield batch


def _worker_batches(shard: str, pil_transform, batch_size: int, on_error: str, skipped: list[dict],
                    num_workers: int, pin_memory: bool) -> Iterator[_Batch]:
    """Decoded batches from ``num_workers`` DataLoader processes (group g is decoded by worker g % W), in
    shard order, pinned for ``non_blocking`` copies: the GPU path, where decoding must keep up with the GPU."""
    import torch.utils.data as tud

    from vitdistill.data.loader import ShardGroups, unwrap

    loader = tud.DataLoader(ShardGroups(shard, batch_size, pil_transform, on_error, decode_group, _raw_groups),
                            batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                            prefetch_factor=4, multiprocessing_context="forkserver")  # no fork of a threaded process
    pending: dict[int, tuple] = {}
    nxt = 0
    for item in loader:
        g, batch, bad, end = unwrap(item)
        pending[g] = (batch, bad, end)
        while nxt in pending:
            batch, bad, end = pending.pop(nxt)
            skipped.extend(bad)
            nxt += 1
            if batch is not None:
                yield batch
            skipped.extend(end)


def _check_features(emb: torch.Tensor, logits: torch.Tensor | None, keys: list[str], shard: str,
                    layers: torch.Tensor | None = None) -> None:
    import torch

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
            with fs.writing(url):
                tmp = os.path.join(fs.local_tmp_dir(url), f".tmp-{name}.{uuid.uuid4().hex[:8]}")
                self._staged.append((tmp, name))
                self._writer = TarShardWriter(tmp)
        with fs.writing(fs.join(self.plan.cache_dir, self._staged[-1][1])):  # ENOSPC: one line, see abort
            self._writer.write(key, fields)
        if self._writer.bytes_written >= self.plan.shard_bytes:
            self._close_current()

    def _close_current(self) -> None:
        w = self._writer
        if w is None:
            return
        with fs.writing(fs.join(self.plan.cache_dir, self._staged[-1][1])):
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
        """Delete every staged part (a full disk, a failed upload, an interrupt): nothing half-written stays."""
        if self._writer is not None:
            self._writer.discard()
            self._writer = None
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
    out["split.txt"] = SplitRule.from_dict(plan.split).of(key).encode()
    return out


def decode_workers(teacher_cfg: dict, device: torch.device) -> int:
    """``teacher.num_workers``; by default 0 on CPU, and on GPU up to 8 decoding processes (one core kept free)."""
    n = teacher_cfg.get("num_workers")
    if n is not None:
        return int(n)
    return min(8, max(1, (os.cpu_count() or 2) - 1)) if device.type == "cuda" else 0


def extract_shard(plan: ExtractionPlan, index: int, progress: bool = True) -> dict:
    """Extract input shard ``index``; returns its record (reused if already done, see ``build_once``)."""
    return plan.build_once(index, lambda i: load_record(plan, i), lambda i: _extract_shard(plan, i, progress))


def _extract_shard(plan: ExtractionPlan, index: int, progress: bool) -> dict:
    import torch

    from vitdistill.models.teachers import create_teacher

    shard = plan.inputs[index]
    teacher: Teacher = create_teacher(TeacherConfig.model_validate(plan.teacher_cfg))
    _check_identity(plan, teacher)
    transform = teacher.pil_transform()
    batch_size = int(plan.teacher_cfg["batch_size"])
    skipped: list[dict] = []
    writer = _PartWriter(plan, index)
    split_counts = dict.fromkeys(SPLITS, 0)
    fs.makedirs(plan.cache_dir)
    t0 = time.perf_counter()
    count = 0
    keys: list[str] = []
    bar = progress_bar(progress, desc=shard.rsplit("/", 1)[-1], unit="img", leave=False)
    pool = ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()), thread_name_prefix="decode")
    try:
        workers = decode_workers(plan.teacher_cfg, teacher.device)
        if workers:  # GPU: DataLoader processes decode into pinned memory while the GPU runs
            batches = _worker_batches(shard, transform, batch_size, plan.on_error, skipped, workers,
                                      pin_memory=teacher.device.type == "cuda")
        else:  # CPU: decode each batch on all cores between forward passes (measured fastest on CPU)
            batches = _batches(shard, transform, batch_size, plan.on_error, skipped, pool)
        for batch in batches:
            out = teacher.forward(teacher.normalize_uint8(batch.pixels))  # (B, D), (B, C) | None, (B, L) | None
            emb, logits = out.emb, out.logits
            _check_features(emb, logits, batch.keys, shard, out.layers)
            emb_np = emb.cpu().numpy()
            logits_np = logits.cpu().numpy() if logits is not None else None
            layers_np = out.layers.cpu().numpy() if out.layers is not None else None
            for i, key in enumerate(batch.keys):
                keys.append(key)
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
        "keys": keys,  # in shard order; finalize_cache checks that no key is in two input shards
    }
    fs.write_json_atomic(plan.record_url(index), record)
    log.info("extracted %s: %d samples in %.1f s (%d skipped)", shard.rsplit("/", 1)[-1], count, seconds, len(skipped))
    return record


def _check_identity(plan: ExtractionPlan, teacher: Teacher) -> None:
    """The teacher that extracts is the one the cache is addressed by: a memo that went stale (weights
    rewritten with the same size and mtime) or weights that changed since the plan fail here, before any
    feature is written, and the memo is deleted so that the next run builds the teacher and re-plans."""
    if teacher.fingerprint() == plan.teacher and teacher.data_config == plan.preprocessing:
        return
    if plan.teacher_memo:
        forget(plan.teacher_memo)
    raise CacheError(f"{plan.cache_dir}: teacher {teacher.name!r} is not the one this cache is addressed by (its "
                     f"weights sha256 {teacher.weights_sha256[:12]}, the plan's {plan.teacher['weights_sha256'][:12]}); "
                     "its identity memo is removed: run the command again")


# --------------------------------------------------------------------------- manifest


def _check_unique_keys(records: list[dict]) -> None:
    """A sample key in two input shards (a copy of a shard under another name, shards that overlap) would
    be cached, split and probed twice: an error naming the key and both shards, whatever ``data.on_error``
    says (it is no bad sample to skip but a wrong list of inputs). Holds every key once in a set: O(N)
    strings, ~110 bytes a key with the records' lists (11 MB measured for 100,000 keys of 15 characters)."""
    first: dict[str, int] = {}
    for r in records:
        for key in r["keys"]:
            j = first.setdefault(key, r["index"])
            if j != r["index"]:
                raise DataError(f"data.path: key {key!r} is in two input shards, {records[j]['input']} and {r['input']}; "
                                "sample keys must be unique across shards (is one a copy of the other?)")


def finalize_cache(plan: ExtractionPlan, records: list[dict]) -> dict:
    """Write ``manifest.json`` (last) from the shard records; returns it."""
    records = plan.ordered_records(records, "the extraction")
    _check_unique_keys(records)
    shards = [{**p, "input": r["input"]} for r in records for p in r["parts"]]
    skipped = [s for r in records for s in r["skipped"]]
    split_counts = {s: sum(r["split_counts"][s] for r in records) for s in SPLITS}
    num = sum(r["count"] for r in records)
    if num == 0:
        raise CacheError(f"{plan.cache_dir}: no sample could be extracted ({len(skipped)} skipped)")
    fresh = [r for r in records if not r.get("reused")]
    log.info("feature cache %s: %d samples in %d shards (%d extracted, %d reused, %d skipped samples)",
             plan.cache_dir, num, len(shards), len(fresh), len(records) - len(fresh), len(skipped))
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
