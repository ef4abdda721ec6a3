"""FKD-style view cache: the teacher's outputs on K augmented views of every training image, stored once.

    plan = plan_view_cache(cfg, inputs)
    records = [build_view_shard(plan, i) for i in range(len(plan.inputs))]   # resumable, one per input shard
    finalize_view_cache(plan, records)                                        # manifest.json last
    data = StreamBatches.cached(inputs, plan.cache_dir, manifest, ...)        # streamed per shard in training

Layout under ``{cache.root}/views/{teacher}-{digest}/``: ``views-iiiii.tar`` per input shard with,
per training image, ``{key}.views.json`` (``{"views": [[top, left, height, width, flip], ...]}``),
``{key}.logits.npy`` (K, C) and ``{key}.emb.npy`` (K, D); ``records/iiiii.json`` per finished
shard; ``manifest.json`` last. The directory is addressed by everything that changes the stored
numbers (teacher fingerprint and input side, dataset, split, view parameters, seed, dtype), so a
changed setting never reuses stale views. A view is re-rendered at train time from its stored box
and flip (:func:`vitdistill.distill.views.render`), and no teacher runs.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from vitdistill.cache import fs
from vitdistill.cache.tario import TarShardWriter, dump_npy
from vitdistill.config import TeacherConfig, VitdistillConfig
from vitdistill.data.ingest import InputSet
from vitdistill.data.shards import SplitRule, iter_samples
from vitdistill.distill.data import chw
from vitdistill.distill.views import InputSpec, Mix, View, mix_partner, render_batch, sample_view, view_rng
from vitdistill.errors import CacheError, DataError
from vitdistill.models.teachers import Teacher, create_teacher
from vitdistill.progress import progress_bar

VIEWS_FORMAT = 1


_ACCEPTS_SIZE: dict[tuple[int, int], bool] = {}


def accepts_size(teacher: Teacher, size: int) -> bool:
    """Whether the teacher runs at ``size`` px (CNNs do; fixed-grid ViTs refuse); tried once per model."""
    key = (id(teacher.model), size)
    if key not in _ACCEPTS_SIZE:
        try:
            teacher(torch.zeros(1, 3, size, size))
            _ACCEPTS_SIZE[key] = True
        except Exception:  # timm raises AssertionError/RuntimeError for a size its grid cannot take
            _ACCEPTS_SIZE[key] = False
    return _ACCEPTS_SIZE[key]


def teacher_spec(teacher: Teacher, size: int | None) -> InputSpec:
    """The teacher's input: its own mean/std, at ``size`` when it accepts that side (else its own)."""
    dc = teacher.data_config
    native = int(dc["input_size"][-1])
    side = size if size and size != native and accepts_size(teacher, size) else native
    return InputSpec(side, tuple(dc["mean"]), tuple(dc["std"]))


@dataclass
class ViewCachePlan(fs.ShardedCachePlan):
    """Everything a shard task needs; small and JSON-serialisable."""

    cache_dir: str
    inputs: list[str]
    teacher_cfg: dict[str, Any]
    teacher: dict[str, Any]
    teacher_input: dict[str, Any]
    dataset: dict[str, Any]
    split: dict[str, Any]
    views: dict[str, Any]
    dtype: str
    on_error: str


    def shard_name(self, index: int) -> str:
        return f"views-{index:05d}.tar"


def plan_view_cache(cfg: VitdistillConfig, inputs: InputSet) -> ViewCachePlan:
    teacher = create_teacher(cfg.teacher)
    d = cfg.distill
    spec = teacher_spec(teacher, d.teacher_size)
    views = {"num_views": d.num_views, "crop_scale": list(d.crop_scale), "crop_ratio": list(d.crop_ratio),
             "hflip": d.hflip, "seed": d.seed, "render": "bilinear-antialias"}
    if d.mixup > 0:  # only then: caches built before mixup existed keep their address
        views["mixup"] = d.mixup
    address = {
        "format": VIEWS_FORMAT,
        "teacher": teacher.fingerprint(),
        "teacher_input": asdict(spec),
        "dataset": inputs.fingerprint,
        "split": SplitRule.from_config(cfg.data).to_dict(),
        "views": views,
        "dtype": cfg.cache.dtype,
        "on_error": cfg.data.on_error,
    }
    digest = hashlib.sha256(json.dumps(address, sort_keys=True).encode()).hexdigest()
    return ViewCachePlan(
        cache_dir=fs.join(cfg.cache.root, "views", f"{teacher.slug}-{digest[:16]}"),
        inputs=list(inputs.shards),
        teacher_cfg=cfg.teacher.model_dump(mode="json"),
        teacher=teacher.fingerprint(),
        teacher_input=asdict(spec),
        dataset={"source": inputs.source, "fingerprint": inputs.fingerprint},
        split=SplitRule.from_config(cfg.data).to_dict(),
        views=views,
        dtype=cfg.cache.dtype,
        on_error=cfg.data.on_error,
    )


def plan_views(plan: ViewCachePlan, key: str, img: torch.Tensor) -> list[View]:
    """The K views of one image: view k is drawn from (seed, k, key), as online epoch k would be."""
    v = plan.views
    return [sample_view(view_rng(v["seed"], k, key), img.shape[1], img.shape[2], tuple(v["crop_scale"]),
                        tuple(v["crop_ratio"]), v["hflip"]) for k in range(v["num_views"])]


def plan_mixes(plan: ViewCachePlan, key: str, images: dict[str, torch.Tensor]
               ) -> list[tuple[str, View, float] | None] | None:
    """With mixup, view k of ``key`` is mixed with view k of a partner from the same shard (``images``: the
    shard's decoded training images), as online epoch k would be: (partner key, its view, lambda) per view;
    None without mixup."""
    v = plan.views
    alpha = v.get("mixup", 0.0)
    if alpha <= 0:
        return None
    out: list[tuple[str, View, float] | None] = []
    for k in range(v["num_views"]):
        mix = mix_partner(v["seed"], k, key, list(images), alpha)
        if mix is not None:
            partner, lam = mix
            mix = (partner, plan_views(plan, partner, images[partner])[k], lam)
        out.append(mix)
    return out


def load_view_record(plan: ViewCachePlan, index: int) -> dict | None:
    try:
        record = fs.read_json(plan.record_url(index))
    except (FileNotFoundError, DataError):
        return None
    try:
        url = fs.join_inside(plan.cache_dir, record.get("name", ""), where=plan.record_url(index))
    except CacheError:  # an edited record: rebuild the shard rather than trust it
        return None
    if record.get("input") != plan.inputs[index] or fs.size(url) != record.get("bytes"):
        return None
    return record


def build_view_shard(plan: ViewCachePlan, index: int, progress: bool = True) -> dict:
    """Teacher outputs for the K views of each training image of input shard ``index``; reused if done
    (``ShardedCachePlan.build_once``: concurrent builders take turns per shard)."""
    return plan.build_once(index, lambda i: load_view_record(plan, i), lambda i: _build_view_shard(plan, i, progress))


def _build_view_shard(plan: ViewCachePlan, index: int, progress: bool) -> dict:
    teacher = create_teacher(TeacherConfig.model_validate(plan.teacher_cfg))
    spec = InputSpec(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in plan.teacher_input.items()})
    batch_views = max(1, int(plan.teacher_cfg["batch_size"]))
    dtype = np.float16 if plan.dtype == "float16" else np.float32
    shard, name = plan.inputs[index], plan.shard_name(index)
    url = fs.join(plan.cache_dir, name)
    fs.makedirs(plan.cache_dir)
    t0 = time.perf_counter()
    teacher_s = 0.0
    pending: list[tuple[str, torch.Tensor, list[View], list | None]] = []
    images: dict[str, torch.Tensor] = {}
    bar = progress_bar(progress, desc=f"views {shard.rsplit('/', 1)[-1]}", unit="img", leave=False)

    def flush(writer: TarShardWriter) -> None:
        nonlocal teacher_s
        imgs = [img for _, img, views, _ in pending for _ in views]
        views = [v for _, _, vs, _ in pending for v in vs]
        mixes: list[Mix | None] = [None if m is None else (images[m[0]], m[1], m[2])
                                   for _, _, vs, ms in pending for m in (ms or [None] * len(vs))]
        t = time.perf_counter()
        emb, logits = teacher(render_batch(imgs, views, spec, mixes))  # (B * K, Dt), (B * K, Ct) | None
        teacher_s += time.perf_counter() - t
        if not torch.isfinite(emb).all() or (logits is not None and not torch.isfinite(logits).all()):
            raise CacheError(f"{shard}: teacher gave non-finite outputs for a view of {pending[0][0]!r}..")
        k = plan.views["num_views"]
        emb_np = emb.cpu().numpy().reshape(len(pending), k, -1)
        logits_np = logits.cpu().numpy().reshape(len(pending), k, -1) if logits is not None else None
        for i, (key, _, vs, ms) in enumerate(pending):
            doc: dict[str, Any] = {"views": [v.to_list() for v in vs]}
            if ms is not None:
                doc["mix"] = [None if m is None else [m[0], m[1].to_list(), m[2]] for m in ms]
            fields = {"views.json": json.dumps(doc).encode(),
                      "emb.npy": dump_npy(emb_np[i].astype(dtype))}
            if logits_np is not None:
                fields["logits.npy"] = dump_npy(logits_np[i].astype(dtype))
            writer.write(key, fields)
        bar.update(len(pending))
        pending.clear()

    rule = SplitRule.from_dict(plan.split)
    with fs.staged(url) as tmp:
        writer = TarShardWriter(tmp)
        try:
            samples = ((s.key, chw(s.image)) for s in iter_samples([shard], rule, "train", plan.on_error))
            if plan.views.get("mixup", 0) > 0:  # partners come from the whole shard: hold its images (bounded)
                images.update(samples)
                samples = iter(images.items())
            # else the images stream through a batch at a time, as in extraction: holding a shard's thousands of
            # small image buffers while the teacher's batches come and go fragmented the heap (peak RSS grew by
            # ~12 MiB per shard built)
            for key, img in samples:
                pending.append((key, img, plan_views(plan, key, img), plan_mixes(plan, key, images)))
                if len(pending) * plan.views["num_views"] >= batch_views:
                    flush(writer)
            if pending:
                flush(writer)
        finally:
            writer.close()
            bar.close()
        record = {"index": index, "input": shard, "name": name, "count": writer.count, "bytes": writer.bytes_written,
                  "sha256": fs.sha256_file(tmp), "seconds": round(time.perf_counter() - t0, 3),
                  "teacher_seconds": round(teacher_s, 3)}
    fs.write_json_atomic(plan.record_url(index), record)
    return record


def finalize_view_cache(plan: ViewCachePlan, records: list[dict]) -> dict:
    """Write ``manifest.json`` (last) from the shard records; returns it."""
    records = plan.ordered_records(records, "the view cache")
    num = sum(r["count"] for r in records)
    if num == 0:
        raise CacheError(f"{plan.cache_dir}: no training image to cache views for")
    fresh = [r for r in records if not r.get("reused")]
    return plan.publish_manifest("views", VIEWS_FORMAT, {
        "teacher": plan.teacher,
        "teacher_input": plan.teacher_input,
        "dataset": plan.dataset,
        "split": plan.split,
        "views": plan.views,
        "dtype": plan.dtype,
        "num_samples": num,
        "shards": [{k: r[k] for k in ("name", "count", "bytes", "sha256", "input")} for r in records],
        "stats": {"shards_built": len(fresh), "shards_reused": len(records) - len(fresh),
                  "seconds": round(sum(r["seconds"] for r in fresh), 3),
                  "teacher_seconds": round(sum(r["teacher_seconds"] for r in fresh), 3)},
    })


def build_view_cache(cfg: VitdistillConfig, inputs: InputSet, progress: bool = True) -> tuple[ViewCachePlan, dict]:
    """The whole view cache in-process, shard after shard (a finished cache is only re-checked)."""
    plan = plan_view_cache(cfg, inputs)
    try:
        manifest = fs.read_json(plan.manifest_url)
        if all(fs.size(fs.join_inside(plan.cache_dir, s["name"], where=plan.manifest_url)) == s["bytes"]
               for s in manifest["shards"]):
            return plan, manifest
    except (FileNotFoundError, DataError):
        pass
    records = [build_view_shard(plan, i, progress=progress) for i in range(len(plan.inputs))]
    return plan, finalize_view_cache(plan, records)
