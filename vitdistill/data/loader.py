"""The torch side of the shard reader: IterableDatasets that DataLoader worker processes run.

A worker never raises a :class:`VitdistillError` through the DataLoader (which would wrap it in a
multi-line traceback): it hands the error over as data and the consumer re-raises it as it was.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch.utils.data as tud

from vitdistill.errors import VitdistillError


class WorkerError:
    def __init__(self, error: VitdistillError) -> None:
        self.error = error


def unwrap(item: Any) -> Any:
    if isinstance(item, WorkerError):
        raise item.error
    return item


def _worker() -> tuple[int, int]:
    info = tud.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class ReaderDataset(tud.IterableDataset):
    """Worker w runs reader ``base + w`` of a :class:`~vitdistill.data.shards.ShardStream`: (w, r, batch)."""

    def __init__(self, stream, epoch: int, base: int, skips: list[int]) -> None:
        self.stream, self.epoch, self.base, self.skips = stream, epoch, base, skips

    def __iter__(self) -> Iterator:
        w, _ = _worker()
        try:
            for r, batch in self.stream.reader_batches(self.epoch, self.base + w, self.skips[w]):
                yield w, r, batch
        except VitdistillError as e:
            yield WorkerError(e)


class ShardGroups(tud.IterableDataset):
    """Group g of one shard is decoded by worker g % W: (g, batch | None, skips, end-of-shard skips)."""

    def __init__(self, shard: str, size: int, transform, on_error: str, decode_group, raw_groups) -> None:
        self.shard, self.size, self.transform, self.on_error = shard, size, transform, on_error
        self.decode_group, self.raw_groups = decode_group, raw_groups

    def __iter__(self) -> Iterator:
        w, n = _worker()
        end: list[dict] = []
        g = -1
        try:
            for g, group in enumerate(self.raw_groups(self.shard, self.size, self.on_error, end)):
                if g % n == w:
                    batch, bad = self.decode_group(group, self.shard, self.transform, self.on_error)
                    yield g, batch, bad, []
            if w == (g + 1) % n:
                yield g + 1, None, [], end  # the marker that ends the shard (and a truncation, if skipped)
        except VitdistillError as e:
            yield WorkerError(e)
