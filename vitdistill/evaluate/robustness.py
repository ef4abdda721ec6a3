"""Accuracy under corruption: per corruption and severity, averaged, and relative to clean."""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from vitdistill.errors import ConfigError
from vitdistill.evaluate.base import (
    EVALUATORS,
    Classifier,
    Evaluator,
    accuracy,
    labelled_logits,
    predict_logits,
)
from vitdistill.evaluate.corruptions import SEVERITY_LEVELS, corrupt, list_corruptions


def relative_drop(corrupted_accuracy: float, clean_accuracy: float) -> float:
    """``1 - corrupted / clean``: 0 when nothing is lost, 1 when all is; NaN when clean accuracy is 0."""
    return 1.0 - corrupted_accuracy / clean_accuracy if clean_accuracy > 0 else float("nan")


@EVALUATORS.register("robustness")
class RobustnessEvaluator(Evaluator):
    """Yields ``clean_accuracy``; per corruption ``c`` and severity ``s`` ``accuracy/c/s``; per corruption
    ``mean_accuracy/c`` (over severities) and ``relative_drop/c``; and their means over corruptions,
    ``mean_corruption_accuracy`` and ``mean_relative_drop``.
    """

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
