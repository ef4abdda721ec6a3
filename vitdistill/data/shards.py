"""The one reader of image shards: decoding under ``data.on_error``, the split rule, and streaming.

    rule = SplitRule.from_config(cfg.data)                  # recorded in every manifest as rule.to_dict()
    for s in iter_samples(inputs.shards, rule, "test", on_error="skip"):
        s.key, s.image, s.label, s.fields                   # (H, W, 3) uint8, int (-1: none), cls/txt/json
    index = index_shards(inputs, rule, on_error, cache_root)   # per-shard split counts, computed once
    stream = ShardStream(shards, counts, rule, "train", batch_size=32, make_batch=renderer, seed=0)
    for batch in stream.batches(epoch=3, start=17, num_workers=2):   # DataLoader workers render batches
        ...

Every stage reads images through this module: extraction, the view cache, distillation, LiT's
inputs and evaluation. Nothing here holds a split in memory: a reader holds one shard's encoded
samples and a bounded shuffle buffer.

**The epoch order** is a pure function of (seed, epoch, world size, readers per rank): the shards
are permuted by (seed, epoch) and dealt to the ``world * readers`` readers (shard-level when there
are enough shards, else every reader takes every R-th sample of each shard); each reader permutes
each shard's samples, passes them through a shuffle buffer seeded by (seed, epoch, reader) and cuts
batches. A rank's batches are its readers' batches in round-robin order, so the position of every
batch is known in advance, a resumed run skips the batches it already trained on without decoding
them, and a DataLoader worker (one per reader) can render them in parallel.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from vitdistill.cache import fs
from vitdistill.cache.tario import UnreadableShardError, iter_tar_samples
from vitdistill.data.splits import SPLITS, assign_split
from vitdistill.errors import DataError

IMAGE_FIELDS = ("jpg", "png", "jpeg", "webp")
PASS_THROUGH = ("cls", "txt", "json")  # fields a stage may carry along with the image
INDEX_FORMAT = 1


# --------------------------------------------------------------------------- the split rule


@dataclass(frozen=True)
class SplitRule:
    """A sample's split is ``sha1(seed/key)`` mapped to [0, 1) and cut at the test and val fractions:
    no global view of the data set is needed, and adding samples never moves the others."""

    seed: int
    val_fraction: float
    test_fraction: float
    method: str = "sha1(seed/key)"

    @classmethod
    def from_config(cls, data) -> SplitRule:  # data: DataConfig
        return cls(data.seed, data.val_fraction, data.test_fraction)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SplitRule:
        if d.get("method", "sha1(seed/key)") != "sha1(seed/key)":
            raise DataError(f"split method {d.get('method')!r} is not known (expected 'sha1(seed/key)')")
        return cls(int(d["seed"]), float(d["val_fraction"]), float(d["test_fraction"]))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "seed": self.seed, "val_fraction": self.val_fraction,
                "test_fraction": self.test_fraction}

    def of(self, key: str) -> str:
        return assign_split(key, self.seed, self.val_fraction, self.test_fraction)


# --------------------------------------------------------------------------- decoding


def image_field(key: str, fields: dict[str, bytes], shard: str) -> str:
    field_ = next((f for f in IMAGE_FIELDS if f in fields), None)
    if field_ is None:
        raise DataError(f"{shard}: sample {key!r} has no image (expected one of {', '.join(IMAGE_FIELDS)})")
    return field_


def decode_image(key: str, fields: dict[str, bytes], shard: str,
                 transform: Callable[[Image.Image], Image.Image] | None = None) -> np.ndarray:
    """A sample's encoded image -> (H, W, 3) uint8 RGB, through ``transform`` (a PIL resize/crop) if given."""
    field_ = image_field(key, fields, shard)
    try:
        with Image.open(io.BytesIO(fields[field_])) as img:
            rgb = img.convert("RGB")
            return np.array(transform(rgb) if transform else rgb, dtype=np.uint8)  # writable: torch may wrap it
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise DataError(f"{shard}: sample {key!r}: cannot decode {field_} image ({type(e).__name__}: {e})") from None


def parse_label(key: str, fields: dict[str, bytes], shard: str) -> int:
    """The ``cls`` field as an int; -1 when the sample has none."""
    if "cls" not in fields:
        return -1
    try:
        return int(fields["cls"].decode().strip())
    except (ValueError, UnicodeDecodeError):
        raise DataError(f"{shard}: sample {key!r}: cls is {fields['cls'][:20]!r}, expected an integer") from None


def skip_record(shard: str, key: str | None, err: Exception) -> dict[str, Any]:
    return {"shard": shard, "key": key, "reason": str(err).split(": ", 2)[-1]}


def read_shard(shard: str, on_error: str = "error", skipped: list[dict] | None = None
               ) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, fields)`` per sample of one image shard, still encoded. A missing shard is an error; a
    truncated or non-tar shard is one under ``on_error=error`` and, under ``skip``, ends the shard
    (recorded in ``skipped``) after the samples read so far."""
    last = None
    try:
        with fs.open_read(shard) as f:
            for key, fields in iter_tar_samples(f, shard):
                last = key
                yield key, fields
    except FileNotFoundError:
        raise DataError(f"{shard}: input shard not found") from None
    except UnreadableShardError as e:
        if on_error == "error":
            raise
        if skipped is not None:
            skipped.append(skip_record(shard, last, e))


@dataclass
class Sample:
    key: str
    image: np.ndarray  # (H, W, 3) uint8
    label: int  # -1: unlabelled
    fields: dict[str, bytes] = field(default_factory=dict)  # the pass-through fields (cls, txt, json)

    @property
    def meta(self) -> dict | None:
        return json.loads(self.fields["json"]) if "json" in self.fields else None


def decode_sample(key: str, fields: dict[str, bytes], shard: str, on_error: str, skipped: list[dict] | None = None,
                  transform: Callable | None = None) -> Sample | None:
    """The decoded sample, or None when it is bad and ``on_error=skip`` (recorded in ``skipped``)."""
    try:
        image = decode_image(key, fields, shard, transform)
        label = parse_label(key, fields, shard)
    except DataError as e:
        if on_error == "error":
            raise
        if skipped is not None:
            skipped.append(skip_record(shard, key, e))
        return None
    return Sample(key, image, label, {k: v for k, v in fields.items() if k in PASS_THROUGH})


def iter_samples(shards: Sequence[str], rule: SplitRule | None = None, split: str | None = None,
                 on_error: str = "error", skipped: list[dict] | None = None,
                 transform: Callable | None = None) -> Iterator[Sample]:
    """Decoded samples of ``split`` (all when None) in shard order, under the ``on_error`` policy."""
    for shard in shards:
        for key, fields in read_shard(shard, on_error, skipped):
            if split is not None and rule.of(key) != split:
                continue
            s = decode_sample(key, fields, shard, on_error, skipped, transform)
            if s is not None:
                yield s


# --------------------------------------------------------------------------- the shard index


@dataclass
class ShardIndex:
    """Per input shard: samples per split and the labels seen, from the keys and ``cls`` fields alone
    (no image is decoded). It fixes the number of batches per epoch before any is read."""

    shards: list[str]
    counts: list[dict[str, int]]  # per shard: {"train": n, "val": n, "test": n}
    max_label: int  # -1: no sample has a label
    labelled: int

    def split_counts(self, split: str) -> list[int]:
        return [c[split] for c in self.counts]

    def total(self, split: str) -> int:
        return sum(self.split_counts(split))

    @property
    def has_labels(self) -> bool:
        return self.labelled > 0


def index_shards(shards: Sequence[str], rule: SplitRule, on_error: str, fingerprint: str | None = None,
                 cache_root: str | None = None) -> ShardIndex:
    """Count every shard's samples per split (read once; stored under ``{cache_root}/index/`` when the
    content has a ``fingerprint``, and reused)."""
    url = None
    if fingerprint and cache_root:
        digest = hashlib.sha256(json.dumps([INDEX_FORMAT, fingerprint, list(shards), rule.to_dict(), on_error],
                                           sort_keys=True).encode()).hexdigest()
        url = fs.join(cache_root, "index", f"{digest[:24]}.json")
        try:
            d = fs.read_json(url)
            return ShardIndex(list(shards), d["counts"], d["max_label"], d["labelled"])
        except (FileNotFoundError, DataError, KeyError, TypeError):
            pass
    counts, max_label, labelled = [], -1, 0
    for shard in shards:
        c = dict.fromkeys(SPLITS, 0)
        for key, fields in read_shard(shard, on_error):
            c[rule.of(key)] += 1
            try:
                label = parse_label(key, fields, shard)
            except DataError:
                if on_error == "error":
                    raise
                label = -1
            if label >= 0:
                labelled += 1
                max_label = max(max_label, label)
        counts.append(c)
    if url:
        fs.write_json_atomic(url, {"counts": counts, "max_label": max_label, "labelled": labelled})
    return ShardIndex(list(shards), counts, max_label, labelled)


# --------------------------------------------------------------------------- streaming batches


@dataclass
class RawItem:
    """One sample on its way to a batch, still encoded; ``side`` is what a joined shard (the view
    cache) holds for it, ``partner`` the encoded fields of the sample ``side`` names as its partner."""

    key: str
    fields: dict[str, bytes]
    shard: str
    side: dict[str, bytes] | None = None
    partner: dict[str, bytes] | None = None
    partner_key: str | None = None
    lam: float | None = None  # the weight of this sample in its mix with the partner


def _rng(*parts: Any) -> np.random.Generator:
    digest = hashlib.sha1("/".join(str(p) for p in parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


class ShardStream:
    """The batches of one split, streamed from shards (see the module docstring for the order).

    ``counts[j]`` is the number of items shard j yields: its samples in ``split`` or, with
    ``side_shards``, the samples its side shard holds (the view cache keeps the train images that
    decoded). ``make_batch(items, epoch)`` turns a list of :class:`RawItem` into a dict of tensors;
    it runs in the DataLoader worker, so it must be picklable (a module-level class). ``partner(key,
    side, shard_keys, epoch)`` may name another item of the same shard and a weight (mixup): the item
    then carries that partner's encoded fields.
    """

    def __init__(self, shards: Sequence[str], counts: Sequence[int], rule: SplitRule, split: str, batch_size: int,
                 make_batch: Callable[[list[RawItem], int], dict], *, seed: int, on_error: str = "error",
                 shuffle_buffer: int = 1024, rank: int = 0, world: int = 1, readers: int = 1,
                 side_shards: Sequence[str] | None = None, side_reader: Callable | None = None,
                 partner: Callable | None = None) -> None:
        if len(shards) != len(counts):
            raise ValueError("one count per shard")
        self.shards, self.counts = list(shards), [int(c) for c in counts]
        self.rule, self.split, self.batch_size, self.make_batch = rule, split, batch_size, make_batch
        self.seed, self.on_error, self.shuffle_buffer = seed, on_error, max(1, shuffle_buffer)
        self.rank, self.world, self.readers = rank, world, max(1, readers)
        self.side_shards, self.side_reader = (list(side_shards) if side_shards else None), side_reader
        self.partner = partner
        if sum(self.counts) == 0:
            raise DataError(f"the {split} split is empty; lower data.val_fraction/test_fraction or add data")

    # ------------------------------------------------------------------ the plan (no I/O)
    @property
    def total_readers(self) -> int:
        return self.world * self.readers

    def shard_order(self, epoch: int) -> list[int]:
        return [int(j) for j in _rng("shards", self.seed, epoch).permutation(len(self.shards))]

    def reader_plan(self, epoch: int, reader: int) -> tuple[list[int], int]:
        """Global reader ``reader``'s shards in order, and how many items it yields (no I/O)."""
        order, r_total = self.shard_order(epoch), self.total_readers
        if len(self.shards) >= r_total:  # shard-level: reader r takes every R-th shard of the epoch
            mine = order[reader::r_total]
            return mine, sum(self.counts[j] for j in mine)
        # too few shards: every reader reads every shard and keeps every R-th item of each
        return order, sum(len(range(reader, self.counts[j], r_total)) for j in order)

    def local_batches(self, epoch: int, rank: int | None = None) -> list[int]:
        """Batches each of this rank's readers yields in ``epoch``."""
        rank = self.rank if rank is None else rank
        return [math.ceil(self.reader_plan(epoch, rank * self.readers + w)[1] / self.batch_size)
                for w in range(self.readers)]

    def steps(self, epoch: int = 0) -> int:
        """Batches per rank per epoch: the smallest rank's count, so DDP ranks step together."""
        return min(sum(self.local_batches(epoch, r)) for r in range(self.world))

    def __len__(self) -> int:
        return self.steps(0)

    def merged_order(self, epoch: int) -> list[tuple[int, int]]:
        """(reader, local batch) of each of this rank's batches: round-robin over its readers."""
        n = self.local_batches(epoch)
        out = [(w, r) for r in range(max(n, default=0)) for w in range(self.readers) if r < n[w]]
        return out[: self.steps(epoch)]

    # ------------------------------------------------------------------ one reader (in a worker)
    def _items(self, epoch: int, reader: int) -> Iterator[RawItem]:
        shards, _ = self.reader_plan(epoch, reader)
        sample_level = len(self.shards) < self.total_readers
        buf: list[RawItem] = []
        rng = _rng("buffer", self.seed, epoch, reader)
        for j in shards:
            items = self._shard_items(j, epoch)
            if sample_level:
                items = items[reader::self.total_readers]
            for i in _rng("shard", self.seed, epoch, j).permutation(len(items)):
                buf.append(items[i])
                if len(buf) >= self.shuffle_buffer:
                    k = int(rng.integers(len(buf)))
                    buf[k], buf[-1] = buf[-1], buf[k]
                    yield buf.pop()
        while buf:
            k = int(rng.integers(len(buf)))
            buf[k], buf[-1] = buf[-1], buf[k]
            yield buf.pop()

    def _shard_items(self, j: int, epoch: int) -> list[RawItem]:
        """Shard j's items in file order (one shard's encoded samples: bounded by the shard size)."""
        shard = self.shards[j]
        if self.side_shards is None:
            raw = {k: f for k, f in read_shard(shard, self.on_error) if self.rule.of(k) == self.split}
            items = [RawItem(k, f, shard) for k, f in raw.items()]
        else:
            side = self.side_reader(self.side_shards[j])  # key -> fields, in the side shard's order
            raw = {k: f for k, f in read_shard(shard, self.on_error) if self.rule.of(k) == self.split}
            missing = [k for k in side if k not in raw]
            if missing:
                raise DataError(f"{shard}: has no sample {missing[0]!r} that {self.side_shards[j]} holds "
                                f"({len(missing)} missing); the input shard changed after the cache was built")
            items = [RawItem(k, raw[k], shard, s) for k, s in side.items()]
        if self.partner is not None:
            keys = [it.key for it in items]
            for it in items:
                mix = self.partner(it.key, it.side, keys, epoch)
                if mix is not None:
                    it.partner_key, it.lam = mix
                    it.partner = raw.get(it.partner_key)
                    if it.partner is None:
                        raise DataError(f"{shard}: sample {it.key!r} is mixed with {it.partner_key!r}, which is not "
                                        f"a {self.split} sample of this shard")
        if len(items) != self.counts[j]:
            raise DataError(f"{shard}: yields {len(items)} {self.split} samples but the index says "
                            f"{self.counts[j]}; the shard changed (clear the cache's index/ to recount)")
        return items

    def reader_batches(self, epoch: int, reader: int, skip: int = 0) -> Iterator[tuple[int, dict]]:
        """(local index, batch) of one reader from local batch ``skip`` on; skipped batches are cut but
        never decoded."""
        items = self._items(epoch, reader)
        r = 0
        while True:
            chunk = [it for _, it in zip(range(self.batch_size), items)]
            if not chunk:
                return
            if r >= skip:
                yield r, self.make_batch(chunk, epoch)
            r += 1

    # ------------------------------------------------------------------ the rank's batches
    def batches(self, epoch: int, start: int = 0, num_workers: int = 0, pin_memory: bool = False) -> Iterator[dict]:
        """This rank's batches of ``epoch`` from position ``start``; ``num_workers`` must equal ``readers``
        or be 0 (then the readers run in this process, one after another per round)."""
        order = self.merged_order(epoch)
        skips = [0] * self.readers
        for w, _ in order[:start]:
            skips[w] += 1
        wanted = order[start:]
        if not wanted:
            return
        base = self.rank * self.readers
        if num_workers == 0:
            its = [self.reader_batches(epoch, base + w, skips[w]) for w in range(self.readers)]
            for w, r in wanted:
                got_r, batch = next(its[w])
                assert got_r == r
                yield batch
            return
        if num_workers != self.readers:
            raise ValueError("num_workers must equal readers (or be 0)")
        import torch.utils.data as tud

        from vitdistill.data.loader import ReaderDataset, unwrap

        loader = tud.DataLoader(ReaderDataset(self, epoch, base, skips), batch_size=None, num_workers=num_workers,
                                pin_memory=pin_memory, multiprocessing_context="forkserver")  # never fork a threaded process
        pending: dict[tuple[int, int], dict] = {}
        it = iter(loader)
        try:
            for want in wanted:
                while want not in pending:
                    w, r, batch = unwrap(next(it))
                    pending[(w, r)] = batch
                yield pending.pop(want)
        finally:
            del it
