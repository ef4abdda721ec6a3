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
from vitdistill.data.splits import split_unit
from vitdistill.distill.views import InputSpec, View, mix_partner, render_batch, sample_view, view_rng
from vitdistill.errors import CacheError, DataError
from vitdistill.models.teachers import Teacher

Batch = dict[str, torch.Tensor]
EVAL_BATCH = 256


def chw(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()


def _empty(spec: InputSpec) -> torch.Tensor:
    return torch.zeros(0, 3, spec.size, spec.size)



class LabelSubset:
    """The fixed share of training labels a run may use: key k keeps its label iff sha1(labels-seed/k) falls
    below ``fraction`` (the same subset in every epoch, mode and process)."""

    def __init__(self, fraction: float, seed: int) -> None:
        self.fraction, self.seed = fraction, seed

    def __call__(self, key: str, label: int) -> int:
        if self.fraction >= 1.0 or label < 0:
            return label
        return label if split_unit(key, f"labels-{self.seed}") < self.fraction else -1


class OnlineRender:
    """``make_batch`` of online mode: each image's view of this epoch, rendered for the student and for
    the teacher (at its own side); the teacher runs in the training process."""

    def __init__(self, student: InputSpec, teacher: InputSpec | None, view_params: tuple, seed: int, on_error: str,
                 labels: LabelSubset) -> None:
        self.student, self.teacher, self.view_params, self.seed, self.on_error = student, teacher, view_params, seed, on_error
        self.labels = labels

    def view(self, key: str, img: torch.Tensor, epoch: int) -> View:
        scale, ratio, hflip = self.view_params
        return sample_view(view_rng(self.seed, epoch, key), img.shape[1], img.shape[2], scale, ratio, hflip)

    def __call__(self, items: list[RawItem], epoch: int) -> Batch:
        rows = Rows()
        for it in items:
            s = decode_sample(it.key, it.fields, it.shard, self.on_error)
            if s is None:
                continue
            img = chw(s.image)
            mix = None
            if it.partner is not None:
                p = decode_sample(it.partner_key, it.partner, it.shard, self.on_error)
                if p is None:
                    continue
                p_img = chw(p.image)
                mix = (p_img, self.view(it.partner_key, p_img, epoch), it.lam, self.labels(it.partner_key, p.label))
            rows.add(img, self.view(it.key, img, epoch), self.labels(it.key, s.label), mix)
        out = rows.batch(self.student)
        if self.teacher is not None:  # None: no loss term reads the teacher (a labels-only run)
            out["teacher_input"] = rows.inputs(self.teacher)
        return out


class Rows:
    """The rows of one batch as they are decoded: images, views, labels and mixup partners."""

    def __init__(self) -> None:
        self.imgs: list[torch.Tensor] = []
        self.views: list[View] = []
        self.labels: list[int] = []
        self.mixes: list[tuple | None] = []

    def add(self, img: torch.Tensor, view: View, label: int, mix: tuple | None = None) -> None:
        self.imgs.append(img)
        self.views.append(view)
        self.labels.append(label)
        self.mixes.append(mix)

    def inputs(self, spec: InputSpec) -> torch.Tensor:
        if not self.imgs:
            return _empty(spec)
        mixes = [m[:3] if m else None for m in self.mixes] if any(self.mixes) else None
        return render_batch(self.imgs, self.views, spec, mixes)  # (B, 3, S, S)

    def batch(self, student: InputSpec) -> Batch:
        """``input``, ``label`` and, with mixup, ``mix_label`` (the partner's) and ``mix_lam`` (B,)."""
        out = {"input": self.inputs(student), "label": torch.tensor(self.labels, dtype=torch.int64)}
        if any(self.mixes):
            out["mix_label"] = torch.tensor([m[3] if m else -1 for m in self.mixes], dtype=torch.int64)
            out["mix_lam"] = torch.tensor([m[2] if m else 1.0 for m in self.mixes], dtype=torch.float32)
        return out


class OnlinePartner:
    """Online mixup: the partner of each sample in this epoch, drawn as the cached mode draws view e's."""

    def __init__(self, seed: int, alpha: float) -> None:
        self.seed, self.alpha = seed, alpha

    def __call__(self, key: str, side, keys: list[str], epoch: int) -> tuple[str, float] | None:
        return mix_partner(self.seed, epoch, key, keys, self.alpha)


class CachedPartner:
    """Cached mixup: the partner and weight stored with view ``epoch % K``."""

    def __init__(self, num_views: int) -> None:
        self.num_views = num_views

    def __call__(self, key: str, side: dict[str, bytes], keys: list[str], epoch: int) -> tuple[str, float] | None:
        mix = parse_view_record(key, side, "view cache", self.num_views)["mix"]
        if mix is None or mix[epoch % self.num_views] is None:
            return None
        partner, _, lam = mix[epoch % self.num_views]
        return partner, float(lam)


class CachedRender:
    """``make_batch`` of cached mode (FKD): stored view ``epoch % K`` of each image, re-rendered from its
    box and flip, with the teacher outputs stored for it. No teacher runs."""

    def __init__(self, student: InputSpec, num_views: int, on_error: str, labels: LabelSubset) -> None:
        self.student, self.num_views, self.on_error, self.labels = student, num_views, on_error, labels

    def __call__(self, items: list[RawItem], epoch: int) -> Batch:
        k = epoch % self.num_views
        rows, embs, logits = Rows(), [], []
        for it in items:
            s = decode_sample(it.key, it.fields, it.shard, self.on_error)
            if s is None:  # decoded when the views were cached, so only a changed shard gets here
                continue
            rec = parse_view_record(it.key, it.side, it.shard, self.num_views)
            mix = None
            if rec["mix"] is not None and rec["mix"][k] is not None:
                p = decode_sample(it.partner_key, it.partner, it.shard, self.on_error)
                if p is None:
                    continue
                _, p_view, lam = rec["mix"][k]
                mix = (chw(p.image), View.from_list(p_view), float(lam), self.labels(it.partner_key, p.label))
            rows.add(chw(s.image), View.from_list(rec["views"][k]), self.labels(it.key, s.label), mix)
            embs.append(rec["emb"][k])
            if rec["logits"] is not None:
                logits.append(rec["logits"][k])
        out = rows.batch(self.student)
        if not embs:
            return out
        out["teacher_emb"] = torch.from_numpy(np.stack(embs).astype(np.float32))
        if logits:
            out["teacher_logits"] = torch.from_numpy(np.stack(logits).astype(np.float32))
        return out


def parse_view_record(key: str, fields: dict[str, bytes], where: str, num_views: int) -> dict:
    """A view-cache sample: ``views`` (K, 5) ints, ``mix`` (K of [partner key, partner view, lambda] or
    None) or None, ``emb`` (K, D) and ``logits`` (K, C) or None."""
    at = f"{where}: sample {key!r}"
    if "views.json" not in fields or "emb.npy" not in fields:
        raise CacheError(f"{at}: expected views.json and emb.npy")
    try:
        doc = json.loads(fields["views.json"])
        views, mix = doc["views"], doc.get("mix")
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise CacheError(f"{at}: views.json is not {{'views': [[top, left, height, width, flip], ...]}}") from None
    if mix is not None and len(mix) != num_views:
        raise CacheError(f"{at}: views.json has {len(mix)} mixes for {num_views} views")
    emb = load_npy(fields["emb.npy"], at)
    logits = load_npy(fields["logits.npy"], at) if "logits.npy" in fields else None
    if len(views) != num_views or emb.ndim != 2 or emb.shape[0] != num_views or (
            logits is not None and logits.shape[0] != num_views):
        raise CacheError(f"{at}: views {np.shape(views)} / emb {emb.shape}, expected {num_views} views each")
    return {"views": views, "mix": mix, "emb": emb, "logits": logits}


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
               teacher: Teacher | None, teacher_input: InputSpec, rank: int = 0, world: int = 1) -> StreamBatches:
        """``d``: the DistillConfig; ``teacher`` None when no loss term reads it."""
        render = OnlineRender(student, teacher_input if teacher is not None else None, (d.crop_scale, d.crop_ratio, d.hflip), d.seed, on_error,
                              LabelSubset(d.label_fraction, d.seed))
        stream = ShardStream(inputs.shards, index.split_counts("train"), rule, "train", d.batch_size // world, render,
                             seed=d.seed, on_error=on_error, shuffle_buffer=d.shuffle_buffer, rank=rank, world=world,
                             readers=max(1, d.num_workers),
                             partner=OnlinePartner(d.seed, d.mixup) if d.mixup > 0 else None)
        return cls(stream, d.num_workers, teacher)

    @classmethod
    def cached(cls, inputs: InputSet, cache_dir: str, manifest: dict, rule: SplitRule, d, on_error: str,
               student: InputSpec, rank: int = 0, world: int = 1) -> StreamBatches:
        shards = manifest["shards"]
        if [s["input"] for s in shards] != list(inputs.shards):
            raise CacheError(f"{cache_dir}: the view cache was built from other input shards")
        k = int(manifest["views"]["num_views"])
        stream = ShardStream(inputs.shards, [s["count"] for s in shards], rule, "train", d.batch_size // world,
                             CachedRender(student, k, on_error, LabelSubset(d.label_fraction, d.seed)), seed=d.seed,
                             on_error=on_error,
                             shuffle_buffer=d.shuffle_buffer, rank=rank, world=world, readers=max(1, d.num_workers),
                             side_shards=[fs.join_inside(cache_dir, s["name"], where=f"{cache_dir}/manifest.json")
                                          for s in shards], side_reader=read_view_shard,
                             partner=CachedPartner(k) if manifest["views"].get("mixup", 0) > 0 else None)
        return cls(stream, d.num_workers)


def eval_batches(shards: list[str], rule: SplitRule, split: str, on_error: str, batch_size: int = EVAL_BATCH,
                 labels_of: LabelSubset | None = None) -> Iterator[tuple[list[torch.Tensor], np.ndarray]]:
    """The images of ``split`` in shard order, ``batch_size`` at a time: ((3, H, W) uint8 list, (B,) labels,
    -1 where a sample has none or ``labels_of`` drops it)."""
    imgs, labels = [], []
    for s in iter_samples(shards, rule, split, on_error):
        imgs.append(chw(s.image))
        labels.append(labels_of(s.key, s.label) if labels_of else s.label)
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
