"""The evaluator interface: the :class:`Classifier` protocol, input checks and the registry.

An evaluator is a small class built from config (``create_evaluator(name, **kw)``) whose
``run(classifier, images, labels, **extra)`` yields ``(metric_name, float)`` pairs, as in
big_vision. Evaluators that draw keep the figures of their last ``run`` and return them from
``figures()`` as ``{name: matplotlib.figure.Figure}``; those with data behind a figure that a report
may redraw (reliability bins) return it from ``tables()`` as ``{name: rows}``. Both default to ``{}``.
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol, runtime_checkable

import numpy as np
from matplotlib.figure import Figure

from vitdistill.errors import DataError
from vitdistill.registry import Registry


@runtime_checkable
class Classifier(Protocol):
    """Anything that maps uint8 images ``(N, H, W, 3)`` to logits ``(N, C)`` over the dataset's classes."""

    def predict(self, images: np.ndarray) -> np.ndarray: ...


class Evaluator:
    """Base of the evaluators: ``run`` yields ``(name, value)``; ``figures`` returns the last run's figures."""

    def run(
        self, classifier: Classifier, images: np.ndarray, labels: np.ndarray, **extra: Any
    ) -> Iterator[tuple[str, float]]:
        raise TypeError(f"{type(self).__name__} must define run()")

    def figures(self) -> dict[str, Figure]:
        return {}

    def tables(self) -> dict[str, list[dict[str, float]]]:
        return {}


EVALUATORS: Registry[Evaluator] = Registry("evaluator")


def create_evaluator(name: str, **kwargs: Any) -> Evaluator:
    """Build the evaluator registered as ``name`` with its config ``kwargs``."""
    return EVALUATORS.create(name, **kwargs)


def list_evaluators(pattern: str = "*") -> list[str]:
    """Registered evaluator names matching the shell-style ``pattern``."""
    return EVALUATORS.list(pattern)


def check_images(images: object, what: str = "images") -> np.ndarray:
    """``images`` as uint8 ``(N, H, W, 3)`` with N >= 1, else DataError."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        dtype = getattr(images, "dtype", type(images).__name__)
        raise DataError(f"{what}: dtype {dtype}; expected a uint8 numpy array (N, H, W, 3)")
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
        raise DataError(f"{what}: shape {images.shape}; expected (N, H, W, 3) with N >= 1")
    return images


def check_labels(labels: object, n: int, what: str = "labels") -> np.ndarray:
    """``labels`` as a 1-D int64 array of length ``n``, else DataError."""
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise DataError(f"{what}: shape {arr.shape}; expected ({n},), one per image")
    if arr.dtype.kind not in "iu":
        raise DataError(f"{what}: dtype {arr.dtype}; expected integer class indices")
    return arr.astype(np.int64)


def predict_logits(classifier: Classifier, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    """``classifier.predict`` over ``images`` in batches (all at once when None), checked: (N, C) float64."""
    n = images.shape[0]
    step = n if batch_size is None else batch_size
    if step < 1:
        raise DataError(f"batch_size: {batch_size}; expected a positive integer or None")
    parts = [np.asarray(classifier.predict(images[i : i + step]), dtype=np.float64) for i in range(0, n, step)]
    logits = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
    if logits.ndim != 2 or logits.shape[0] != n or logits.shape[1] == 0:
        raise DataError(f"classifier logits: shape {logits.shape}; expected ({n}, C) for {n} images")
    if not np.isfinite(logits).all():
        raise DataError("classifier logits: has NaN or inf; expected finite logits")
    return logits


def check_label_range(labels: np.ndarray, num_classes: int, what: str = "labels") -> None:
    """DataError unless every label indexes one of the classifier's ``num_classes`` logits."""
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f"{what}: range [{labels.min()}, {labels.max()}]; expected indices in [0, {num_classes - 1}]")


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``logits`` (N, C) against ``labels`` (N,)."""
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def labelled_logits(classifier: Classifier, images: object, labels: object,
                    batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checked ``(images (N,H,W,3) uint8, labels (N,), logits (N,C))`` for evaluators scoring against labels."""
    images = check_images(images)
    labels = check_labels(labels, images.shape[0])
    logits = predict_logits(classifier, images, batch_size)  # (N, C)
    check_label_range(labels, logits.shape[1])
    return images, labels, logits
