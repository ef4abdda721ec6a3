"""Calibration: expected and maximum calibration error, NLL and a reliability diagram.

ECE follows Guo et al. ("On Calibration of Modern Neural Networks"): the top-1 confidences are
put in ``num_bins`` equal-width bins ``((m-1)/M, m/M]`` and
``ECE = sum_m |B_m| / N * |acc(B_m) - conf(B_m)|``; MCE is the largest ``|acc - conf|`` over
non-empty bins.
"""

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
    check_label_range,
    check_labels,
    labelled_logits,
)
from vitdistill.evaluate.plotting import COLOURS, new_figure

NUM_BINS = 15  # the usual choice since Guo et al. 2017


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of (N, C) logits, stable for large values."""
    shifted = logits - logits.max(axis=1, keepdims=True)  # (N, C)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin statistics, each ``(num_bins,)``; empty bins have count 0 and NaN accuracy/confidence."""

    edges: np.ndarray  # (num_bins + 1,)
    count: np.ndarray
    accuracy: np.ndarray
    confidence: np.ndarray

    def rows(self) -> list[dict[str, float | None]]:
        """One JSON-ready row per bin; accuracy and confidence are None for empty bins."""
        def num(v: float) -> float | None:
            return None if np.isnan(v) else float(v)

        return [{"lo": float(self.edges[m]), "hi": float(self.edges[m + 1]), "count": int(self.count[m]),
                 "accuracy": num(self.accuracy[m]), "confidence": num(self.confidence[m])}
                for m in range(len(self.count))]


def check_probabilities(probs: object, labels: object) -> tuple[np.ndarray, np.ndarray]:
    """``probs`` (N, C) rows on the simplex and ``labels`` (N,) in range, else DataError."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0:
        raise DataError(f"probs: shape {p.shape}; expected (N, C) with N >= 1")
    if not np.isfinite(p).all() or (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-6):
        raise DataError("probs: rows are not probability vectors; expected non-negative rows summing to 1")
    y = check_labels(labels, p.shape[0])
    check_label_range(y, p.shape[1])
    return p, y


def reliability_bins(probs: np.ndarray, labels: np.ndarray, num_bins: int = NUM_BINS) -> ReliabilityBins:
    """Bin top-1 confidence into ``num_bins`` equal-width bins ``((m-1)/M, m/M]``."""
    probs, labels = check_probabilities(probs, labels)
    confidence = probs.max(axis=1)  # (N,)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)  # (N,)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, num_bins - 1)  # (N,)
    count = np.bincount(index, minlength=num_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(index, weights=correct, minlength=num_bins) / count
        conf = np.bincount(index, weights=confidence, minlength=num_bins) / count
    return ReliabilityBins(edges=edges, count=count, accuracy=acc, confidence=conf)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, num_bins: int = NUM_BINS) -> float:
    """Count-weighted mean of ``|accuracy - confidence|`` over the bins."""
    bins = reliability_bins(probs, labels, num_bins)
    used = bins.count > 0
    gaps = np.abs(bins.accuracy[used] - bins.confidence[used])
    return float(np.sum(bins.count[used] * gaps) / bins.count.sum())


def max_calibration_error(probs: np.ndarray, labels: np.ndarray, num_bins: int = NUM_BINS) -> float:
    """Largest ``|accuracy - confidence|`` over non-empty bins."""
    bins = reliability_bins(probs, labels, num_bins)
    used = bins.count > 0
    return float(np.max(np.abs(bins.accuracy[used] - bins.confidence[used])))


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean ``-log softmax(logits)[label]`` (nats)."""
    logp = log_softmax(np.asarray(logits, dtype=np.float64))  # (N, C)
    return float(-np.mean(logp[np.arange(len(labels)), labels]))


def reliability_figure(bins: ReliabilityBins, title: str = "reliability") -> Figure:
    """Accuracy per confidence bin against the diagonal, with the gap shaded; built without pyplot."""
    fig = new_figure(4.5, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    width = np.diff(bins.edges)  # (M,)
    centres = bins.edges[:-1] + width / 2
    used = bins.count > 0
    ax.bar(centres[used], bins.accuracy[used], width=width[used], edgecolor="black", color="tab:blue", label="accuracy")
    ax.bar(
        centres[used],
        bins.confidence[used] - bins.accuracy[used],
        bottom=bins.accuracy[used],
        width=width[used],
        color="tab:red",
        alpha=0.3,
        label="gap",
    )
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


def reliability_overlay(metrics: dict[str, dict[str, float]], tables: dict[str, dict]) -> Figure | None:
    """Every model's reliability curve (accuracy against confidence per bin) on one diagonal."""
    bins = {model: t["reliability"] for model, t in tables.items() if t.get("reliability")}
    if not bins:
        return None
    fig = new_figure(4.8, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    for model, rows in bins.items():
        used = [r for r in rows if r.get("count") and r.get("accuracy") is not None]
        conf = [r["confidence"] for r in used]
        acc = [r["accuracy"] for r in used]
        size = [12 + 60 * r["count"] / max(x["count"] for x in used) for r in used]
        ax.plot(conf, acc, "-", color=COLOURS.get(model, "grey"), alpha=0.7)
        ax.scatter(conf, acc, s=size, color=COLOURS.get(model, "grey"), label=model, zorder=3)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="confidence (bin mean)", ylabel="accuracy",
           title="reliability (marker size: images in bin)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


@EVALUATORS.register("calibration")
class CalibrationEvaluator(Evaluator):
    """Yields ``ece``, ``mce``, ``nll``, ``accuracy``; ``figures()`` gives ``{"reliability": Figure}``."""

    title = "Calibration"
    inputs = ("test_images", "labels")
    metrics = (
        Metric("accuracy", "clean top-1 accuracy", "higher", headline=True, short="top-1",
               description="share of test images whose top-1 class is the label"),
        Metric("ece", f"expected calibration error ({NUM_BINS} bins)", "lower", headline=True, short="ECE",
               description="count-weighted mean |accuracy - confidence| over equal-width confidence bins"),
        Metric("mce", "maximum calibration error", "lower",
               description="largest |accuracy - confidence| over non-empty bins"),
        Metric("nll", "negative log-likelihood", "lower", headline=True,
               description="mean -log p(label), in nats"),
    )
    plots = (Plot("reliability", reliability_overlay),)

    def __init__(self, num_bins: int = NUM_BINS, batch_size: int | None = None) -> None:
        self.num_bins = num_bins
        self.batch_size = batch_size
        self._figures: dict[str, Figure] = {}
        self._tables: dict[str, list[dict[str, float]]] = {}

    def run(
        self, classifier: Classifier, images: np.ndarray, labels: np.ndarray, **extra: Any
    ) -> Iterator[tuple[str, float]]:
        images, labels, logits = labelled_logits(classifier, images, labels, self.batch_size)  # logits (N, C)
        probs = np.exp(log_softmax(logits))  # (N, C)
        bins = reliability_bins(probs, labels, self.num_bins)
        ece = expected_calibration_error(probs, labels, self.num_bins)
        self._figures = {"reliability": reliability_figure(bins, title=f"reliability (ECE {ece:.3f})")}
        self._tables = {"reliability": bins.rows()}
        yield "ece", ece
        yield "mce", max_calibration_error(probs, labels, self.num_bins)
        yield "nll", negative_log_likelihood(logits, labels)
        yield "accuracy", float(np.mean(probs.argmax(axis=1) == labels))

    def figures(self) -> dict[str, Figure]:
        return dict(self._figures)

    def tables(self) -> dict[str, list[dict[str, float]]]:
        """``{"reliability": ReliabilityBins.rows()}`` of the last run."""
        return dict(self._tables)
