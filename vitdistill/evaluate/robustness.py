"""Accuracy under corruption: per corruption and severity, averaged, and relative to clean."""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
from matplotlib.figure import Figure

from vitdistill.errors import ConfigError
from vitdistill.evaluate.base import (
    EVALUATORS,
    Classifier,
    Evaluator,
    Metric,
    Plot,
    accuracy,
    labelled_logits,
    predict_logits,
)
from vitdistill.evaluate.corruptions import SEVERITY_LEVELS, corrupt, list_corruptions
from vitdistill.evaluate.plotting import COLOURS, grid


def relative_drop(corrupted_accuracy: float, clean_accuracy: float) -> float:
    """``1 - corrupted / clean``: 0 when nothing is lost, 1 when all is; NaN when clean accuracy is 0."""
    return 1.0 - corrupted_accuracy / clean_accuracy if clean_accuracy > 0 else float("nan")


ACCURACY = Metric("accuracy/{corruption}/{severity:int}", "accuracy: {corruption}, severity {severity}", "higher",
                  detail=True, description="top-1 accuracy on the test images under one corruption and severity")


def accuracy_by_severity(metrics: dict[str, dict[str, float]], tables: dict[str, dict]) -> Figure | None:
    """Accuracy against corruption severity (0 = clean), one panel per corruption."""
    curves: dict[str, dict[str, dict[int, float]]] = {}  # corruption -> model -> severity -> accuracy
    for model, values in metrics.items():
        for key, v in values.items():
            fields = ACCURACY.match(key)
            if fields:
                curves.setdefault(fields["corruption"], {}).setdefault(model, {})[int(fields["severity"])] = v
    if not curves:
        return None
    names = sorted(curves)
    fig, axes = grid(len(names), 3, 3.6, 2.8)
    for i, (name, ax) in enumerate(zip(names, axes)):
        for model, by_sev in curves[name].items():
            clean = metrics[model].get("clean_accuracy")
            sev = sorted(by_sev)
            start = ([0], [clean]) if clean is not None else ([], [])  # severity 0: the clean accuracy
            xs, ys = start[0] + sev, start[1] + [by_sev[s] for s in sev]
            ax.plot(xs, ys, "o-", color=COLOURS.get(model, "grey"), label=model, markersize=3)
        ax.set(title=name, xlabel="severity", ylabel="accuracy", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


@EVALUATORS.register("robustness")
class RobustnessEvaluator(Evaluator):
    """Yields ``clean_accuracy``; per corruption ``c`` and severity ``s`` ``accuracy/c/s``; per corruption
    ``mean_accuracy/c`` (over severities) and ``relative_drop/c``; and their means over corruptions,
    ``mean_corruption_accuracy`` and ``mean_relative_drop``.
    """

    title = "Robustness to corruptions, occlusion and patch shuffling"
    inputs = ("test_images", "labels")
    config = {"severities": "evaluate.severities", "seed": "data.seed"}
    metrics = (
        Metric("clean_accuracy", "clean accuracy", "higher", description="top-1 accuracy on the uncorrupted images"),
        Metric("mean_corruption_accuracy", "mean accuracy under corruptions", "higher", headline=True,
               description="accuracy averaged over corruptions and severities"),
        Metric("mean_relative_drop", "mean relative accuracy drop", "lower", headline=True, short="corruption drop",
               description="1 - corrupted / clean accuracy, averaged over corruptions"),
        *(Metric(f"relative_drop/{c}", f"relative drop: {c}", "lower", headline=True,
                 description=f"1 - {c} / clean accuracy (mean over severities); structural, not a pixel statistic")
          for c in ("occlusion", "patch_shuffle")),
        Metric("relative_drop/{corruption}", "relative drop: {corruption}", "lower",
               description="1 - corrupted / clean accuracy for one corruption (mean over severities)"),
        Metric("mean_accuracy/{corruption}", "accuracy: {corruption} (mean over severities)", "higher",
               description="accuracy under one corruption, averaged over severities"),
        ACCURACY,
    )
    plots = (Plot("robustness", accuracy_by_severity),)

    def __init__(
        self,
        corruptions: Sequence[str] | None = None,  # None: every registered corruption
        severities: Sequence[int] = SEVERITY_LEVELS,
        seed: int = 0,
        batch_size: int | None = None,
    ) -> None:
        valid = list_corruptions()
        self.corruptions = list(valid if corruptions is None else corruptions)
        for name in self.corruptions:
            if name not in valid:
                raise ConfigError(f"unknown corruption {name!r}; valid corruptions: {', '.join(valid)}")
        bad = [s for s in severities if s not in SEVERITY_LEVELS]
        if bad or not severities:
            raise ConfigError(f"severities {list(severities)}; expected a non-empty subset of {list(SEVERITY_LEVELS)}")
        self.severities = list(severities)
        self.seed = seed
        self.batch_size = batch_size

    def run(
        self, classifier: Classifier, images: np.ndarray, labels: np.ndarray, **extra: Any
    ) -> Iterator[tuple[str, float]]:
        images, labels, logits = labelled_logits(classifier, images, labels, self.batch_size)  # logits (N, C)
        clean = accuracy(logits, labels)
        yield "clean_accuracy", clean
        means, drops = [], []
        for name in self.corruptions:
            accs = []
            for severity in self.severities:
                corrupted = corrupt(images, name, severity, self.seed)
                accs.append(accuracy(predict_logits(classifier, corrupted, self.batch_size), labels))
                yield f"accuracy/{name}/{severity}", accs[-1]
            means.append(float(np.mean(accs)))
            drops.append(relative_drop(means[-1], clean))
            yield f"mean_accuracy/{name}", means[-1]
            yield f"relative_drop/{name}", drops[-1]
        yield "mean_corruption_accuracy", float(np.mean(means))
        yield "mean_relative_drop", float(np.mean(drops))
