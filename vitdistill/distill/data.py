"""The distillation data: decoded images from the input shards, and batches of views with targets.

    images = load_images(inputs, split_params(cfg.data), on_error="error")
    data = OnlineBatches(images, images.indices("train"), per_rank_batch, seed, student_spec,
                         teacher=teacher, teacher_spec=teacher_spec, view_params=(scale, ratio, hflip))
    for batch in data.batches(epoch=0):    # {"input", "label", "teacher_logits", "teacher_emb"}
        ...

Images are read from the same image shards as the feature cache (``resolve_inputs``) and split by
the same key hash, so train/val/test agree with every other stage. They are held decoded in
memory (small datasets on a CPU; the view cache is what scales). A batch is a pure function of
(seed, epoch, position, rank): resuming at a position replays exactly the batches that were left.
"""

from __future__ import annotations

import io
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from vitdistill.cache import fs
from vitdistill.cache.tario import UnreadableShardError, iter_tar_samples
from vitdistill.config import DataConfig
from vitdistill.data.datasets import IMAGE_FIELDS
from vitdistill.data.ingest import InputSet
from vitdistill.data.splits import assign_split
from vitdistill.distill.views import InputSpec, View, render_batch, sample_view, view_rng
from vitdistill.errors import DataError
from vitdistill.models.teachers import Teacher

Batch = dict[str, torch.Tensor]


def split_params(data: DataConfig) -> dict:
    """The split recorded in every cache: ``assign_split(key, seed, val_fraction, test_fraction)``."""
    return {"method": "sha1(seed/key)", "seed": data.seed, "val_fraction": data.val_fraction,
            "test_fraction": data.test_fraction}


def decode_image(key: str, fields: dict[str, bytes], shard: str) -> torch.Tensor:
    """A sample's encoded image -> (3, H, W) uint8 RGB."""
    field = next((f for f in IMAGE_FIELDS if f in fields), None)
    if field is None:
        raise DataError(f"{shard}: sample {key!r} has no image (expected one of {', '.join(IMAGE_FIELDS)})")
    try:
        with Image.open(io.BytesIO(fields[field])) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise DataError(f"{shard}: sample {key!r}: cannot decode {field} image ({type(e).__name__}: {e})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def parse_label(key: str, fields: dict[str, bytes], shard: str) -> int:
    """The ``cls`` field as an int; -1 when the sample has none."""
    if "cls" not in fields:
        return -1
    try:
        return int(fields["cls"].decode().strip())
    except ValueError:
        raise DataError(f"{shard}: sample {key!r}: cls is {fields['cls'][:20]!r}, expected an integer") from None


def iter_shard_images(shard: str, on_error: str) -> Iterator[tuple[str, torch.Tensor, int]]:
    """(key, (3, H, W) uint8, label) per readable sample of one image shard, under the on_error policy."""
    try:
        with fs.open_read(shard) as f:
            for key, fields in iter_tar_samples(f, shard):
                try:
                    yield key, decode_image(key, fields, shard), parse_label(key, fields, shard)
                except DataError:
                    if on_error == "error":
                        raise
    except FileNotFoundError:
        raise DataError(f"{shard}: input shard not found") from None
    except UnreadableShardError:
        if on_error == "error":
            raise


@dataclass
class ImageSet:
    keys: list[str]
    images: list[torch.Tensor]  # each (3, H, W) uint8
    labels: np.ndarray  # (N,) int64, -1 where a sample has no label
    splits: np.ndarray  # (N,) "train" | "val" | "test"
    classes: list[str] | None

    def __len__(self) -> int:
        return len(self.keys)

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.splits == split)

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else int(self.labels.max()) + 1

    @property
    def has_labels(self) -> bool:
        return bool((self.labels >= 0).any())


def load_images(inputs: InputSet, split: dict, on_error: str = "error") -> ImageSet:
    keys, images, labels = [], [], []
    for shard in inputs.shards:
        for key, img, label in iter_shard_images(shard, on_error):
            keys.append(key)
            images.append(img)
            labels.append(label)
    if not keys:
        raise DataError(f"{inputs.source}: no readable image in {len(inputs.shards)} shard(s)")
    splits = np.array([assign_split(k, split["seed"], split["val_fraction"], split["test_fraction"]) for k in keys])
    return ImageSet(keys, images, np.array(labels, dtype=np.int64), splits, inputs.classes)


def epoch_order(n: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """This rank's positions for one epoch, DistributedSampler style: one seeded permutation of
    ``range(n)``, padded by wrapping to a multiple of ``world``, rank r takes every world-th. (ceil(n / world),)"""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).numpy()
    total = math.ceil(n / world) * world
    return np.resize(perm, total)[rank::world]


class ViewBatches(ABC):
    """Batches of one rank: ``len()`` per epoch, ``batches(epoch, start)`` from position ``start``."""

    def __init__(self, images: ImageSet, indices: np.ndarray, batch_size: int, seed: int, student: InputSpec,
                 rank: int = 0, world: int = 1) -> None:
        if len(indices) == 0:
            raise DataError("the training split is empty; lower data.val_fraction/test_fraction or add data")
        self.images, self.indices, self.batch_size = images, np.asarray(indices), batch_size
        self.seed, self.student, self.rank, self.world = seed, student, rank, world

    def __len__(self) -> int:
        return math.ceil(math.ceil(len(self.indices) / self.world) / self.batch_size)

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        order = epoch_order(len(self.indices), self.seed, epoch, self.rank, self.world)
        for b in range(start, len(self)):
            idx = self.indices[order[b * self.batch_size:(b + 1) * self.batch_size]]
            yield self.make_batch(idx, epoch)

    @abstractmethod
    def views(self, idx: np.ndarray, epoch: int) -> list[View]:
        """The view of each image of the batch in this epoch."""

    @abstractmethod
    def targets(self, idx: np.ndarray, epoch: int, views: list[View]) -> Batch:
        """The teacher's outputs on those views: ``teacher_emb`` (B, Dt), ``teacher_logits`` (B, Ct)."""

    def make_batch(self, idx: np.ndarray, epoch: int) -> Batch:
        views = self.views(idx, epoch)
        batch = {
            "input": render_batch([self.images.images[i] for i in idx], views, self.student),  # (B, 3, S, S)
            "label": torch.from_numpy(self.images.labels[idx]),  # (B,)
        }
        batch.update(self.targets(idx, epoch, views))
        return batch


class OnlineBatches(ViewBatches):
    """The teacher runs on every batch, on exactly the student's view (rendered at its own size)."""

    def __init__(self, images: ImageSet, indices: np.ndarray, batch_size: int, seed: int, student: InputSpec, *,
                 teacher: Teacher, teacher_spec: InputSpec, view_params: tuple, rank: int = 0, world: int = 1) -> None:
        super().__init__(images, indices, batch_size, seed, student, rank, world)
        self.teacher, self.teacher_spec = teacher, teacher_spec
        self.scale, self.ratio, self.hflip = view_params

    def views(self, idx: np.ndarray, epoch: int) -> list[View]:
        imgs, keys = self.images.images, self.images.keys
        return [sample_view(view_rng(self.seed, epoch, keys[i]), imgs[i].shape[1], imgs[i].shape[2],
                            self.scale, self.ratio, self.hflip) for i in idx]

    def targets(self, idx: np.ndarray, epoch: int, views: list[View]) -> Batch:
        x = render_batch([self.images.images[i] for i in idx], views, self.teacher_spec)  # (B, 3, T, T)
        emb, logits = self.teacher(x)  # (B, Dt), (B, Ct) | None
        out = {"teacher_emb": emb.clone()}  # clone: leave inference mode's tensors behind
        if logits is not None:
            out["teacher_logits"] = logits.clone()
        return out


class CachedBatches(ViewBatches):
    """FKD: replay stored view ``epoch % K`` of each image with the teacher outputs stored for it."""

    def __init__(self, images: ImageSet, indices: np.ndarray, batch_size: int, seed: int, student: InputSpec, *,
                 cache, rank: int = 0, world: int = 1) -> None:
        super().__init__(images, indices, batch_size, seed, student, rank, world)
        self.cache = cache
        row = {k: r for r, k in enumerate(cache.keys)}
        missing = [images.keys[i] for i in self.indices if images.keys[i] not in row]
        if missing:
            raise DataError(f"view cache has no entry for {len(missing)} training image(s), e.g. {missing[0]!r}")
        self.rows = np.array([row.get(k, -1) for k in images.keys])  # image index -> cache row

    def views(self, idx: np.ndarray, epoch: int) -> list[View]:
        k = epoch % self.cache.num_views
        return [View.from_list(v) for v in self.cache.views[self.rows[idx], k].tolist()]

    def targets(self, idx: np.ndarray, epoch: int, views: list[View]) -> Batch:
        rows, k = self.rows[idx], epoch % self.cache.num_views
        out = {"teacher_emb": torch.from_numpy(self.cache.emb[rows, k])}
        if self.cache.logits is not None:
            out["teacher_logits"] = torch.from_numpy(self.cache.logits[rows, k])
        return out
