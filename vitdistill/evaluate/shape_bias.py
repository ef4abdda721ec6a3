"""Shape bias on cue-conflict images (Geirhos et al.), scored by :func:`vitdistill.data.shapes.shape_bias`."""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from vitdistill.data.shapes import generate_cue_conflict, shape_bias
from vitdistill.evaluate.base import (
    EVALUATORS,
    Classifier,
    Evaluator,
    check_images,
    check_labels,
    predict_logits,
)


def cue_conflict_arrays(
    n: int, seed: int = 0, size: int = 64, start: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cue-conflict samples as arrays: images (n, size, size, 3) uint8, shape_labels (n,), texture_labels (n,).

    A multiple of 36 for ``n`` covers every (shape, texture) pair equally often.
    """
    samples = list(generate_cue_conflict(n, seed=seed, size=size, start=start))
    images = np.stack([np.asarray(s.image, dtype=np.uint8) for s in samples])  # (n, size, size, 3)
    shape_labels = np.array([s.shape_label for s in samples], dtype=np.int64)
    texture_labels = np.array([s.texture_label for s in samples], dtype=np.int64)
    return images, shape_labels, texture_labels


@EVALUATORS.register("shape_bias")
class ShapeBiasEvaluator(Evaluator):
    """``run(classifier, images, shape_labels, texture_labels=...)`` yields ``shape_bias``, ``shape_match``,
    ``texture_match``, ``n_used`` and ``n_conflict`` (congruent images are excluded, as in model-vs-human).
    """

    def __init__(self, batch_size: int | None = None) -> None:
        self.batch_size = batch_size

    def run(
        self,
        classifier: Classifier,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        texture_labels: np.ndarray,
        **extra: Any,
    ) -> Iterator[tuple[str, float]]:
        images = check_images(images)
        shape_labels = check_labels(labels, images.shape[0], "shape_labels")
        texture_labels = check_labels(texture_labels, images.shape[0], "texture_labels")
        pred = predict_logits(classifier, images, self.batch_size).argmax(axis=1)  # (N,)
        scores = shape_bias(pred, shape_labels, texture_labels)
        for key in ("shape_bias", "shape_match", "texture_match", "n_used", "n_conflict"):
            yield key, float(scores[key])
