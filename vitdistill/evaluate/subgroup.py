"""Accuracy per subgroup (a colour, a class group, ...), the largest gap between groups and the worst group."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
from matplotlib.figure import Figure

from vitdistill.errors import DataError
from vitdistill.evaluate.base import (
    EVALUATORS,
    Classifier,
    Evaluator,
    Metric,
    Plot,
    labelled_logits,
)
from vitdistill.evaluate.plotting import COLOURS, new_figure

GROUP_ACCURACY = Metric("accuracy/{group}", "accuracy of group {group}", "higher",
                        description="top-1 accuracy on the test images of one subgroup")


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


def accuracy_per_group(metrics: dict[str, dict[str, float]], tables: dict[str, dict]) -> Figure | None:
    """Accuracy per subgroup, the models side by side, the worst group of each marked."""
    groups: dict[str, dict[str, float]] = {}  # model -> group -> accuracy
    for model, values in metrics.items():
        for key, v in values.items():
            fields = GROUP_ACCURACY.match(key)
            if fields:
                groups.setdefault(model, {})[fields["group"]] = v
    if not groups:
        return None
    names = sorted({g for by in groups.values() for g in by},
                   key=lambda g: (not g.isdigit(), int(g) if g.isdigit() else g))  # class indices numerically
    x = np.arange(len(names))
    w = 0.8 / len(groups)
    fig = new_figure(max(5.0, 0.5 * len(names) + 2), 3.4)
    ax = fig.add_subplot(1, 1, 1)
    for j, model in enumerate(groups):
        vals = [groups[model].get(g, np.nan) for g in names]
        gap = metrics[model].get("accuracy_gap", np.nan)
        ax.bar(x + (j - (len(groups) - 1) / 2) * w, vals, width=w, color=COLOURS.get(model, "grey"),
               label=f"{model} (gap {gap:.2f})")
        ax.axhline(np.nanmin(vals), color=COLOURS.get(model, "grey"), linestyle=":", linewidth=1)
    ax.set_xticks(x, names)
    ax.set(xlabel="group", ylabel="accuracy", ylim=(0, 1.05), title="accuracy per subgroup (dotted: worst group)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


@EVALUATORS.register("subgroup")
class SubgroupEvaluator(Evaluator):
    """``run(classifier, images, labels, groups=...)`` yields ``accuracy/<group>`` per group, ``accuracy_gap``
    (max - min) and ``worst_group_accuracy``; :func:`subgroup_accuracy` also names the worst group.
    """

    title = "Subgroup gaps"
    inputs = ("test_images", "labels", "groups")
    metrics = (
        Metric("worst_group_accuracy", "worst-group accuracy", "higher", headline=True,
               description="the lowest accuracy over the subgroups (evaluate.group_by)"),
        Metric("accuracy_gap", "largest subgroup accuracy gap", "lower", headline=True,
               description="highest minus lowest subgroup accuracy"),
        GROUP_ACCURACY,
    )
    plots = (Plot("subgroup", accuracy_per_group),)

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
