"""Weighted k-nearest-neighbour probe, as DINO's ``eval_knn.py``.

Features are L2-normalised so that the dot product is the cosine similarity. Each test query takes
its k most similar train rows; neighbour j votes for its class with weight exp(sim_j / T), and
classes are ranked by their summed votes. Weights are computed relative to the nearest neighbour,
exp((sim_j - sim_max) / T), which ranks the classes identically and cannot overflow float32 at small
T (exp(1 / T) does below T ~ 0.0113). The train bank is read in chunks of ``bank_chunk`` rows (each
once: read from the features, which may be a float16 memory map, L2-normalised, moved to the
device), each against the queries in chunks of ``chunk_size``, and every query keeps a running
top-k, so memory stays at O(chunk_size * bank_chunk + N_test * k) whatever the sizes; chunking does
not change any result, since each query is scored on its own and the top-k of a union is the top-k
of the parts' top-k. Computation is float32, on the GPU when there is one (``device``), as in DINO.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from vitdistill.errors import ConfigError, DataError
from vitdistill.probes.inputs import (
    check_positive_ints,
    check_split,
    check_splits,
    resolve_num_classes,
    row_chunks,
    unit_rows,
)


@dataclass
class KNNResult:
    top1: dict[int, float]  # k -> test top-1
    top5: dict[int, float]  # k -> test top-min(5, C)
    temperature: float
    num_classes: int
    test_pred: dict[int, np.ndarray] = field(default_factory=dict)  # k -> (N_test,) int64 predictions

    def metrics(self) -> dict[str, float]:
        """Scalar metrics, ready to log."""
        out = {f"knn{k}_top1": v for k, v in self.top1.items()}
        out.update({f"knn{k}_top5": v for k, v in self.top5.items()})
        return out


def merge_topk(
    top: tuple[torch.Tensor, torch.Tensor] | None, sim: torch.Tensor, start: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The running top-k (similarities, bank rows), each (M, K) most similar first, merged with ``sim``
    (M, n), the similarities to bank rows ``start`` to ``start + n``: the top-k of a union is the top-k
    of the parts' top-k."""
    s, i = sim.topk(min(k, sim.shape[1]), dim=1)
    i = i + start
    if top is not None:
        s, order = torch.cat([top[0], s], 1).topk(min(k, top[0].shape[1] + s.shape[1]), dim=1)
        i = torch.cat([top[1], i], 1).gather(1, order)
    return s, i


def weighted_votes(
    top_sim: torch.Tensor, top_idx: torch.Tensor, train_labels: torch.Tensor, ks: tuple[int, ...],
    temperature: float, num_classes: int,
) -> dict[int, torch.Tensor]:
    """k -> (M, C) votes from the sorted neighbours (M, K), the nearest weighing 1 (the softmax-style shift
    by the largest similarity)."""
    weight = torch.exp((top_sim - top_sim[:, :1]) / temperature)  # (M, K) in (0, 1], nearest first
    neighbour_labels = train_labels[top_idx]  # (M, K)
    votes = {}
    for k in ks:
        zeros = torch.zeros(top_sim.shape[0], num_classes, dtype=weight.dtype, device=weight.device)  # (M, C)
        votes[k] = zeros.scatter_add_(1, neighbour_labels[:, :k], weight[:, :k])
    return votes


def knn_votes(
    queries: torch.Tensor,
    train: torch.Tensor,
    train_labels: torch.Tensor,
    ks: tuple[int, ...],
    temperature: float,
    num_classes: int,
    bank_chunk: int | None = None,
) -> dict[int, torch.Tensor]:
    """Temperature-weighted class votes for unit-norm ``queries`` (M, D) against ``train`` (N, D), both
    in memory: k -> (M, C) votes (:func:`weighted_votes`). One top-k search with the largest k serves
    every k, because the neighbours come back sorted by similarity."""
    step, top = bank_chunk or len(train), None
    for start in range(0, len(train), step):
        top = merge_topk(top, queries @ train[start:start + step].T, start, max(ks))  # (M, K) each
    return weighted_votes(*top, train_labels, ks, temperature, num_classes)


def device_rows(x: np.ndarray, rows: slice, dev: torch.device) -> torch.Tensor:
    """Rows of ``x`` L2-normalised (in float64, a sub-chunk of ``row_chunks`` at a time, so the float64
    temporaries stay small whatever ``rows`` spans), as float32 on ``dev``."""
    out = np.empty((rows.stop - rows.start, x.shape[1]), np.float32)  # (n, D)
    for part in row_chunks(len(out), x.shape[1]):
        out[part] = unit_rows(x, slice(rows.start + part.start, rows.start + part.stop))
    return torch.from_numpy(out).to(dev)


def knn_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    ks: tuple[int, ...] = (10, 20),
    temperature: float = 0.07,
    chunk_size: int = 1024,
    bank_chunk: int = 16384,
    num_classes: int | None = None,
    device: str | None = None,
) -> KNNResult:
    """Top-1 and top-5 of the weighted kNN classifier for each k in ``ks`` (``device``: default the GPU
    when there is one, else the CPU).

    The bank is read once, ``bank_chunk`` rows at a time (each normalised and moved to the device on
    its own), and each part is scored against every query chunk, merging into a running top-k per
    query (N_test, K): the features may be memory maps larger than memory or than the device.
    """
    train = check_split("train", x_train, y_train)
    test = check_split("test", x_test, y_test)
    check_splits(train, test)
    num_classes = resolve_num_classes(num_classes, [train], [test])
    ks = check_positive_ints("ks", ks)
    if ks[-1] > len(train.y):
        raise DataError(f"train: {len(train.y)} samples; expected at least k={ks[-1]} for the kNN probe")
    if not temperature > 0:
        raise ConfigError(f"temperature must be positive, got {temperature!r}")
    if chunk_size < 1 or bank_chunk < 1:
        raise ConfigError(f"chunk_size and bank_chunk must be positive integers, got {chunk_size!r}, {bank_chunk!r}")

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bank_labels = torch.from_numpy(train.y).to(dev)  # (N_train,)
    n_train, n = len(train.y), len(test.y)
    query_chunks = [slice(start, min(n, start + chunk_size)) for start in range(0, n, chunk_size)]
    top: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(query_chunks)  # per chunk: (M, K) each
    for start in range(0, n_train, bank_chunk):
        bank = device_rows(train.x, slice(start, min(n_train, start + bank_chunk)), dev)  # (n, D)
        for j, rows in enumerate(query_chunks):
            top[j] = merge_topk(top[j], device_rows(test.x, rows, dev) @ bank.T, start, ks[-1])
        del bank
    y = torch.from_numpy(test.y).to(dev)  # (N_test,)
    top5_k = min(5, num_classes)
    hits1 = dict.fromkeys(ks, 0)
    hits5 = dict.fromkeys(ks, 0)
    preds: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for rows, best in zip(query_chunks, top, strict=True):
        chunk_y = y[rows]  # (M,)
        for k, v in weighted_votes(*best, bank_labels, ks, temperature, num_classes).items():
            ranked = v.topk(top5_k, dim=1).indices  # (M, min(5, C)), best first
            hits1[k] += int((ranked[:, 0] == chunk_y).sum())
            hits5[k] += int((ranked == chunk_y[:, None]).any(dim=1).sum())
            preds[k].append(ranked[:, 0])
    return KNNResult(
        top1={k: hits1[k] / n for k in ks},
        top5={k: hits5[k] / n for k in ks},
        temperature=float(temperature),
        num_classes=num_classes,
        test_pred={k: torch.cat(p).cpu().numpy() for k, p in preds.items()},
    )
