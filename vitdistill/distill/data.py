"""The distillation data: batches of views with the teacher's targets, streamed from the image shards.

    data = StreamBatches.online(inputs, index, cfg, student_spec, teacher, teacher_spec, rank, world)
    data = StreamBatches.cached(inputs, view_cache_manifest, cfg, student_spec, rank, world)
    for batch in data.batches(epoch=0):    # {"input", "label", "teacher_logits", "teacher_emb"}
        ...
    for imgs, labels in eval_batches(inputs.shards, rule, "test", on_error):   # evaluation views
        ...

Images come from the image shards through :mod:`vitdistill.data.shards` (the one reader and split
rule), decoded and rendered in ``distill.num_workers`` DataLoader worker processes; the split is
never held in memory. A batch is a pure function of (seed, epoch, position, rank, world, workers),
so resuming at a position replays exactly the batches that were left.
"""

from __future__ import annotations

import json
from typing import Iterator

import numpy as np
import torch

from vitdistill.cache import fs
from vitdistill.cache.tario import iter_tar_samples, load_npy
from vitdistill.data.ingest import InputSet
from vitdistill.data.shards import RawItem, ShardIndex, ShardStream, SplitRule, decode_sample, iter_samples
from vitdistill.distill.views import InputSpec, View, render_batch, sample_view, view_rng
from vitdistill.errors import CacheError, DataError
from vitdistill.models.teachers import Teacher

Batch = dict[str, torch.Tensor]
EVAL_BATCH = 256


def chw(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()


def _empty(spec: InputSpec) -> torch.Tensor:
    return torch.zeros(0, 3, spec.size, spec.size)


class OnlineRender:
    """``make_batch`` of online mode: each image's view of this epoch, rendered for the student and for
    the teacher (at its own side); the teacher runs in the training process."""

    def __init__(self, student: InputSpec, teacher: InputSpec, view_params: tuple, seed: int, on_error: str) -> None:
        self.student, self.teacher, self.view_params, self.seed, self.on_error = student, teacher, view_params, seed, on_error

    def __call__(self, items: list[RawItem], epoch: int) -> Batch:
        scale, ratio, hflip = self.view_params
        imgs, views, labels = [], [], []
        for it in items:
            s = decode_sample(it.key, it.fields, it.shard, self.on_error)
            if s is None:
                continue
            img = chw(s.image)
            imgs.append(img)
            views.append(sample_view(view_rng(self.seed, epoch, it.key), img.shape[1], img.shape[2], scale, ratio, hflip))
            labels.append(s.label)
        if not imgs:
            return {"input": _empty(self.student), "label": torch.zeros(0, dtype=torch.int64),
                    "teacher_input": _empty(self.teacher)}
        return {"input": render_batch(imgs, views, self.student), "label": torch.tensor(labels, dtype=torch.int64),
                "teacher_input": render_batch(imgs, views, self.teacher)}


class CachedRender:
    """``make_batch`` of cached mode (FKD): stored view ``epoch % K`` of each image, re-rendered from its
    box and flip, with the teacher outputs stored for it. No teacher runs."""

    def __init__(self, student: InputSpec, num_views: int, on_error: str) -> None:
        self.student, self.num_views, self.on_error = student, num_views, on_error

    def __call__(self, items: list[RawItem], epoch: int) -> Batch:
        k = epoch % self.num_views
        imgs, views, labels, embs, logits = [], [], [], [], []
        for it in items:
            s = decode_sample(it.key, it.fields, it.shard, self.on_error)
            if s is None:  # decoded when the views were cached, so only a changed shard gets here
                continue
            rec = parse_view_record(it.key, it.side, it.shard, self.num_views)
            imgs.append(chw(s.image))
            views.append(View.from_list(rec["views"][k]))
            labels.append(s.label)
            embs.append(rec["emb"][k])
            if rec["logits"] is not None:
                logits.append(rec["logits"][k])
        if not imgs:
            return {"input": _empty(self.student), "label": torch.zeros(0, dtype=torch.int64)}
        out = {"input": render_batch(imgs, views, self.student), "label": torch.tensor(labels, dtype=torch.int64),
               "teacher_emb": torch.from_numpy(np.stack(embs).astype(np.float32))}
        if logits:
            out["teacher_logits"] = torch.from_numpy(np.stack(logits).astype(np.float32))
        return out


def parse_view_record(key: str, fields: dict[str, bytes], where: str, num_views: int) -> dict:
    """A view-cache sample: ``views`` (K, 5) ints, ``emb`` (K, D) and ``logits`` (K, C) or None."""
    at = f"{where}: sample {key!r}"
    if "views.json" not in fields or "emb.npy" not in fields:
        raise CacheError(f"{at}: expected views.json and emb.npy")
    try:
        views = json.loads(fields["views.json"])["views"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CacheError(f"{at}: views.json is not {{'views': [[top, left, height, width, flip], ...]}}") from None
    emb = load_npy(fields["emb.npy"], at)
    logits = load_npy(fields["logits.npy"], at) if "logits.npy" in fields else None
    if len(views) != num_views or emb.ndim != 2 or emb.shape[0] != num_views or (
            logits is not None and logits.shape[0] != num_views):
        raise CacheError(f"{at}: views {np.shape(views)} / emb {emb.shape}, expected {num_views} views each")
    return {"views": views, "emb": emb, "logits": logits}


def read_view_shard(url: str) -> dict[str, dict[str, bytes]]:
    """key -> encoded fields of one view-cache shard, in file order (one shard: bounded)."""
    try:
        f = fs.open_read(url)
    except FileNotFoundError:
        raise CacheError(f"{url}: shard listed in the manifest is missing") from None
    with f:
        return dict(iter_tar_samples(f, url))


class StreamBatches:
    """The trainer's batch source: ``len()`` batches per epoch, ``batches(epoch, start)``; runs the
    teacher on each batch in online mode."""

    def __init__(self, stream: ShardStream, num_workers: int, teacher: Teacher | None = None) -> None:
        self.stream, self.num_workers, self.teacher = stream, num_workers, teacher

    def __len__(self) -> int:
        return len(self.stream)

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        for batch in self.stream.batches(epoch, start, self.num_workers):
            if self.teacher is not None:
                x = batch.pop("teacher_input")
                if len(x):
                    emb, logits = self.teacher(x)  # (B, Dt), (B, Ct) | None
                    batch["teacher_emb"] = emb.clone()  # clone: leave inference mode's tensors behind
                    if logits is not None:
                        batch["teacher_logits"] = logits.clone()
            yield batch

    @classmethod
    def online(cls, inputs: InputSet, index: ShardIndex, rule: SplitRule, d, on_error: str, student: InputSpec,
               teacher: Teacher, teacher_input: InputSpec, rank: int = 0, world: int = 1) -> StreamBatches:
        """``d``: the DistillConfig."""
        render = OnlineRender(student, teacher_input, (d.crop_scale, d.crop_ratio, d.hflip), d.seed, on_error)
        stream = ShardStream(inputs.shards, index.split_counts("train"), rule, "train", d.batch_size // world, render,
                             seed=d.seed, on_error=on_error, shuffle_buffer=d.shuffle_buffer, rank=rank, world=world,
                             readers=max(1, d.num_workers))
        return cls(stream, d.num_workers, teacher)

    @classmethod
    def cached(cls, inputs: InputSet, cache_dir: str, manifest: dict, rule: SplitRule, d, on_error: str,
               student: InputSpec, rank: int = 0, world: int = 1) -> StreamBatches:
        shards = manifest["shards"]
        if [s["input"] for s in shards] != list(inputs.shards):
            raise CacheError(f"{cache_dir}: the view cache was built from other input shards")
        render = CachedRender(student, int(manifest["views"]["num_views"]), on_error)
        stream = ShardStream(inputs.shards, [s["count"] for s in shards], rule, "train", d.batch_size // world,
                             render, seed=d.seed, on_error=on_error, shuffle_buffer=d.shuffle_buffer, rank=rank,
                             world=world, readers=max(1, d.num_workers),
                             side_shards=[fs.join(cache_dir, s["name"]) for s in shards], side_reader=read_view_shard)
        return cls(stream, d.num_workers)


def eval_batches(shards: list[str], rule: SplitRule, split: str, on_error: str,
                 batch_size: int = EVAL_BATCH) -> Iterator[tuple[list[torch.Tensor], np.ndarray]]:
    """The images of ``split`` in shard order, ``batch_size`` at a time: ((3, H, W) uint8 list, (B,) labels)."""
    imgs, labels = [], []
    for s in iter_samples(shards, rule, split, on_error):
        imgs.append(chw(s.image))
        labels.append(s.label)
        if len(imgs) == batch_size:
            yield imgs, np.array(labels, dtype=np.int64)
            imgs, labels = [], []
    if imgs:
        yield imgs, np.array(labels, dtype=np.int64)


def num_classes(inputs: InputSet, index: ShardIndex) -> int:
    if inputs.classes:
        return len(inputs.classes)
    if not index.has_labels:
        return 0
    return index.max_label + 1


def check_labels(index: ShardIndex, inputs: InputSet) -> None:
    n = len(inputs.classes) if inputs.classes else None
    if n is not None and index.max_label >= n:
        raise DataError(f"{inputs.source}: a sample has class {index.max_label} but there are {n} classes")
