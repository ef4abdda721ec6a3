"""Shape bias on cue-conflict images (Geirhos et al.), scored by :func:`vitdistill.data.shapes.shape_bias`."""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
from matplotlib.figure import Figure

from vitdistill.data.shapes import generate_cue_conflict, shape_bias
from vitdistill.evaluate.base import (
    EVALUATORS,
    Classifier,
    Evaluator,
    Metric,
    Plot,
    check_images,
    check_labels,
    predict_logits,
)
from vitdistill.evaluate.plotting import COLOURS, new_figure

# Human shape bias on cue-conflict images (Geirhos et al. 2019, model-vs-human): about 0.96.
HUMAN_SHAPE_BIAS = 0.96


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


def shape_bias_panels(metrics: dict[str, dict[str, float]], tables: dict[str, dict]) -> Figure | None:
    """Shape bias of each model against the human level, with the shape/texture decision split."""
    models = [m for m, values in metrics.items() if "shape_bias" in values]
    if not models:
        return None
    colours = [COLOURS.get(m, "grey") for m in models]
    fig = new_figure(6.5, 2.8)
    ax = fig.add_subplot(1, 2, 1)
    ax.bar(models, [metrics[m]["shape_bias"] for m in models], color=colours)
    ax.axhline(HUMAN_SHAPE_BIAS, color="black", linestyle="--", linewidth=1, label=f"humans ~{HUMAN_SHAPE_BIAS}")
    ax.set(ylim=(0, 1), ylabel="shape / (shape + texture)", title="shape bias")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 2, 2)
    shape = [metrics[m].get("shape_match", np.nan) for m in models]
    texture = [metrics[m].get("texture_match", np.nan) for m in models]
    ax.bar(models, shape, color="tab:green", label="shape")
    ax.bar(models, texture, bottom=shape, color="tab:brown", label="texture")
    ax.set(ylim=(0, 1), ylabel="fraction of cue-conflict images", title="decisions")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


@EVALUATORS.register("shape_bias")
class ShapeBiasEvaluator(Evaluator):
    """``run(classifier, images, shape_labels, texture_labels=...)`` yields ``shape_bias``, ``shape_match``,
    ``texture_match``, ``n_used`` and ``n_conflict`` (congruent images are excluded, as in model-vs-human).
    """

    title = "Shape bias on cue-conflict images"
    inputs = ("cue_conflict",)
    metrics = (
        Metric("shape_bias", f"shape bias (humans about {HUMAN_SHAPE_BIAS})", "higher", headline=True,
               short="shape bias", description="shape decisions / (shape + texture decisions) on cue-conflict images"),
        Metric("shape_match", "cue-conflict decisions matching the shape", "higher",
               description="share of cue-conflict images classified as their shape's class"),
        Metric("texture_match", "cue-conflict decisions matching the texture", None,
               description="share of cue-conflict images classified as their texture's class"),
        Metric("n_used", "cue-conflict images (n_used)", None, fmt=",.0f",
               description="cue-conflict images classified as either their shape or their texture"),
        Metric("n_conflict", "cue-conflict images (n_conflict)", None, fmt=",.0f",
               description="cue-conflict images whose shape and texture classes differ"),
    )
    plots = (Plot("shape_bias", shape_bias_panels),)

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
