"""Deterministic train/val/test assignment by key.

A sample's split is a pure function of its key and the seed: ``sha1(seed/key)`` mapped to
[0, 1) and cut at the test and val fractions. It needs no global view of the dataset (so it works
on streamed shards and on any number of workers), is stable when samples are added, and is
recorded in every cached sample and in the cache manifest.
"""

from __future__ import annotations

import hashlib

SPLITS = ("train", "val", "test")


def split_unit(key: str, seed: int) -> float:
    digest = hashlib.sha1(f"{seed}/{key}".encode()).hexdigest()
    return int(digest[:13], 16) / float(1 << 52)


def assign_split(key: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    u = split_unit(key, seed)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"
