"""Classification metrics shared by the probes: top-k accuracy and confusion-derived recall."""

from __future__ import annotations

import numpy as np


def topk_hits(scores: np.ndarray, y: np.ndarray, k: int) -> int:
    """Rows whose true label is among the ``k`` highest scores (k clipped to C)."""
    k = min(k, scores.shape[1])
    topk = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (N, k), unordered
    return int(np.count_nonzero(np.any(topk == y[:, None], axis=1)))


def topk_accuracy(scores: np.ndarray, y: np.ndarray, k: int) -> float:
    """Fraction of rows whose true label is among the ``k`` highest scores (k clipped to C)."""
    return topk_hits(scores, y, k) / len(y)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts; row = true class, column = predicted class."""
    flat = y_true.astype(np.int64) * num_classes + y_pred.astype(np.int64)  # (N,)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_recall(confusion: np.ndarray) -> np.ndarray:
    """(C,) recall per true class; NaN for classes with no samples."""
    support = confusion.sum(axis=1)  # (C,)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(confusion) / support, np.nan)


def per_class_precision(confusion: np.ndarray) -> np.ndarray:
    """(C,) precision per predicted class; NaN for classes that were never predicted."""
    predicted = confusion.sum(axis=0)  # (C,)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(predicted > 0, np.diag(confusion) / predicted, np.nan)


def mean_per_class_recall(confusion: np.ndarray) -> float:
    """Balanced accuracy: recall averaged over the classes that have samples."""
    return float(np.nanmean(per_class_recall(confusion)))
