"""Accuracy per subgroup (a colour, a class group, ...), the largest gap between groups and the worst group."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from vitdistill.errors import DataError
from vitdistill.evaluate.base import (
    EVALUATORS,
    Classifier,
    Evaluator,
    labelled_logits,
)


@dataclass(frozen=True)
class SubgroupResult:
    accuracy: dict[str, float]  # group name (str of the group value) -> accuracy, groups sorted
    count: dict[str, int]
    gap: float  # max - min accuracy over groups
    worst_group: str
    worst_accuracy: float


def subgroup_accuracy(pred: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> SubgroupResult:
    """Accuracy of ``pred`` (N,) against ``labels`` (N,) within each value of ``groups`` (N,)."""
    pred, labels, groups = np.asarray(pred).ravel(), np.asarray(labels).ravel(), np.asarray(groups).ravel()
    if not pred.shape == labels.shape == groups.shape or pred.size == 0:
        raise DataError(
            f"groups: {groups.size} entries for {labels.size} labels and {pred.size} predictions; "
            "expected one group per image (N >= 1)"
        )
    values, index = np.unique(groups, return_inverse=True)  # (G,), (N,)
    correct = (pred == labels).astype(np.float64)
    count = np.bincount(index, minlength=len(values))  # (G,)
    acc = np.bincount(index, weights=correct, minlength=len(values)) / count  # (G,), every group non-empty
    worst = int(np.argmin(acc))
    names = [str(v) for v in values]
    return SubgroupResult(
        accuracy=dict(zip(names, acc.tolist())),
        count=dict(zip(names, count.tolist())),
        gap=float(acc.max() - acc.min()),
        worst_group=names[worst],
        worst_accuracy=float(acc[worst]),
    )


@EVALUATORS.register("subgroup")
class SubgroupEvaluator(Evaluator):
    """``run(classifier, images, labels, groups=...)`` yields ``accuracy/<group>`` per group, ``accuracy_gap``
    (max - min) and ``worst_group_accuracy``; :func:`subgroup_accuracy` also names the worst group.
    """

    def __init__(self, batch_size: int | None = None) -> None:
        self.batch_size = batch_size

    def run(
        self, classifier: Classifier, images: np.ndarray, labels: np.ndarray, *, groups: np.ndarray, **extra: Any
    ) -> Iterator[tuple[str, float]]:
        images, labels, logits = labelled_logits(classifier, images, labels, self.batch_size)  # logits (N, C)
        result = subgroup_accuracy(logits.argmax(axis=1), labels, groups)
        for name, acc in result.accuracy.items():
            yield f"accuracy/{name}", acc
        yield "accuracy_gap", result.gap
        yield "worst_group_accuracy", result.worst_accuracy
