"""Confusion-matrix figure and per-class table for probe results.

Figures are built on :class:`matplotlib.figure.Figure` with an Agg canvas, never through pyplot,
so no global figure state is created or leaked and this works headless and in worker processes.
Save with ``fig.savefig(path)``.
"""

from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vitdistill.errors import DataError
from vitdistill.probes.metrics import per_class_precision, per_class_recall

ANNOTATE_MAX_CLASSES = 20  # above this, cell text would be unreadable
TICK_LABELS_MAX_CLASSES = 60  # above this, class-name ticks are dropped


def check_confusion(confusion: object, class_names: list[str]) -> np.ndarray:
    """(C, C) non-negative counts matching ``class_names``, else DataError."""
    cm = np.asarray(confusion)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0:
        raise DataError(f"confusion: shape {cm.shape}; expected a square (C, C) matrix with C >= 1")
    if not np.isfinite(cm).all() or (cm < 0).any():
        raise DataError("confusion: has negative or non-finite entries; expected non-negative counts")
    if len(class_names) != cm.shape[0]:
        raise DataError(f"class_names: {len(class_names)} names; expected {cm.shape[0]} to match the confusion matrix")
    return cm


def row_normalize(confusion: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (recall per cell); rows with no samples stay zero."""
    support = confusion.sum(axis=1, keepdims=True)  # (C, 1)
    return np.divide(confusion, support, out=np.zeros(confusion.shape), where=support > 0)  # (C, C)


def confusion_figure(confusion: np.ndarray, class_names: list[str], title: str) -> Figure:
    """Row-normalised confusion matrix (rows true, columns predicted); cells annotated when C <= 20."""
    cm = check_confusion(confusion, class_names)
    norm = row_normalize(cm.astype(np.float64))
    c = cm.shape[0]
    side = float(np.clip(2.5 + 0.35 * c, 4.0, 16.0))
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of true class")
    ax.set_title(title)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if c <= TICK_LABELS_MAX_CLASSES:
        ax.set_xticks(range(c), labels=class_names, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(c), labels=class_names)
    if c <= ANNOTATE_MAX_CLASSES:
        for i in range(c):
            for j in range(c):
                colour = "white" if norm[i, j] > 0.5 else "black"
                ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", color=colour, fontsize=8)
    return fig


def per_class_table(confusion: np.ndarray, class_names: list[str]) -> list[dict]:
    """One row per class: name, support (true count), recall and precision (NaN where undefined)."""
    cm = check_confusion(confusion, class_names)
    recall, precision = per_class_recall(cm), per_class_precision(cm)
    support = cm.sum(axis=1)
    return [
        {"class": name, "support": int(support[i]), "recall": float(recall[i]), "precision": float(precision[i])}
        for i, name in enumerate(class_names)
    ]
