"""Weighted k-nearest-neighbour probe, as DINO's ``eval_knn.py``.

Features are L2-normalised so that the dot product is the cosine similarity. Each test query takes
its k most similar train rows; neighbour j votes for its class with weight exp(sim_j / T), and
classes are ranked by their summed votes. Weights are computed relative to the nearest neighbour,
exp((sim_j - sim_max) / T), which ranks the classes identically and cannot overflow float32 at small
T (exp(1 / T) does below T ~ 0.0113). Queries are processed in chunks, and each chunk against the
train bank in chunks of ``bank_chunk`` rows whose top-k are merged, so memory stays at
O(chunk_size * bank_chunk) whatever the sizes; chunking does not change any result, since each
query is scored on its own and the top-k of a union is the top-k of the parts' top-k. Computation
is float32, on the GPU when there is one (``device``), as in DINO.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from vitdistill.errors import ConfigError, DataError
from vitdistill.probes.inputs import check_positive_ints, check_split, check_splits, l2_normalize, resolve_num_classes


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


def knn_votes(
    queries: torch.Tensor,
    train: torch.Tensor,
    train_labels: torch.Tensor,
    ks: tuple[int, ...],
    temperature: float,
    num_classes: int,
    bank_chunk: int | None = None,
) -> dict[int, torch.Tensor]:
    """Temperature-weighted class votes for unit-norm ``queries`` (M, D) against ``train`` (N, D).

    Returns k -> (M, C) votes, scaled so that each query's nearest neighbour weighs 1 (the
    softmax-style shift by the largest similarity). One top-k search with the largest k serves every k, because the
    neighbours come back sorted by similarity.
    """
    k_max, step = max(ks), bank_chunk or len(train)
    top_sim = top_idx = None
    for start in range(0, len(train), step):
        sim = queries @ train[start:start + step].T  # (M, n) cosine similarities against this part of the bank
        s, i = sim.topk(min(k_max, sim.shape[1]), dim=1)
        i = i + start
        if top_sim is not None:  # merge with the best so far: the top-k of the union
            s, order = torch.cat([top_sim, s], 1).topk(min(k_max, top_sim.shape[1] + s.shape[1]), dim=1)
            i = torch.cat([top_idx, i], 1).gather(1, order)
        top_sim, top_idx = s, i  # (M, K), most similar first
    weight = torch.exp((top_sim - top_sim[:, :1]) / temperature)  # (M, K) in (0, 1], nearest first
    neighbour_labels = train_labels[top_idx]  # (M, K)
    votes = {}
    for k in ks:
        zeros = torch.zeros(queries.shape[0], num_classes, dtype=weight.dtype, device=weight.device)  # (M, C)
        votes[k] = zeros.scatter_add_(1, neighbour_labels[:, :k], weight[:, :k])
    return votes


def knn_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    ks: tuple[int, ...] = (10, 20),
    temperature: float = 0.07,
    chunk_size: int = 1024,
    bank_chunk: int = 65536,
    num_classes: int | None = None,
    device: str | None = None,
) -> KNNResult:
    """Top-1 and top-5 of the weighted kNN classifier for each k in ``ks`` (``device``: default the GPU
    when there is one, else the CPU)."""
    train = check_split("train", x_train, y_train)
    test = check_split("test", x_test, y_test)
    check_splits(train, test)
    num_classes = resolve_num_classes(num_classes, [train], [test])
    ks = check_positive_ints("ks", ks)
    if ks[-1] > len(train.y):
        raise DataError(f"train: {len(train.y)} samples; expected at least k={ks[-1]} for the kNN probe")
    if not temperature > 0:
        raise ConfigError(f"temperature must be positive, got {temperature!r}")
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be a positive integer, got {chunk_size!r}")

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bank = torch.from_numpy(l2_normalize(train.x)).float().to(dev)  # (N_train, D)
    bank_labels = torch.from_numpy(train.y).to(dev)  # (N_train,)
    queries = torch.from_numpy(l2_normalize(test.x)).float().to(dev)  # (N_test, D)
    y = torch.from_numpy(test.y).to(dev)  # (N_test,)
    top5_k = min(5, num_classes)
    hits1 = dict.fromkeys(ks, 0)
    hits5 = dict.fromkeys(ks, 0)
    preds: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, len(y), chunk_size):
        chunk_y = y[start : start + chunk_size]  # (M,)
        votes = knn_votes(queries[start : start + chunk_size], bank, bank_labels, ks, temperature, num_classes,
                          bank_chunk)
        for k, v in votes.items():
            ranked = v.topk(top5_k, dim=1).indices  # (M, min(5, C)), best first
            hits1[k] += int((ranked[:, 0] == chunk_y).sum())
            hits5[k] += int((ranked == chunk_y[:, None]).any(dim=1).sum())
            preds[k].append(ranked[:, 0])
    n = len(y)
    return KNNResult(
        top1={k: hits1[k] / n for k in ks},
        top5={k: hits5[k] / n for k in ks},
        temperature=float(temperature),
        num_classes=num_classes,
        test_pred={k: torch.cat(p).cpu().numpy() for k, p in preds.items()},
    )
