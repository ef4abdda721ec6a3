"""The report's figures, redrawn from MLflow metrics so teacher and student share every axis.

Built on :class:`matplotlib.figure.Figure` with an Agg canvas, never pyplot (thread-safe, no
display). Each function returns None when the run has nothing to draw for it. The headline, the
stages' curves and data efficiency are drawn here; each evaluator's own figures come from its
declared :class:`~vitdistill.evaluate.base.Plot` (:func:`evaluator_figures`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from vitdistill.evaluate.base import EVALUATORS, MODELS, evaluator_class
from vitdistill.evaluate.plotting import COLOURS, grid, new_figure
from vitdistill.report.compare import Row, split_key


def evaluator_figures(metrics: dict[str, float], tables: dict[str, Any]) -> dict[str, dict[str, Figure | None]]:
    """``{evaluator: {plot name: Figure or None}}`` for every registered evaluator in ``metrics`` (the evaluate
    stage's ``<model>/<evaluator>/<metric>``), each drawn from its models' metrics and tables
    (``<model>_<evaluator>_<table>``)."""
    by_evaluator: dict[str, dict[str, dict[str, float]]] = {}  # evaluator -> model -> metric -> value
    for key, value in metrics.items():
        parts = split_key(key)
        if parts:
            evaluator, metric = parts[1].split("/", 1)
            by_evaluator.setdefault(evaluator, {m: {} for m in MODELS})[parts[0]][metric] = value
    out = {}
    for evaluator, by_model in sorted(by_evaluator.items()):
        if evaluator not in EVALUATORS:
            continue  # logged by an evaluator this version does not have: its rows only
        cls = evaluator_class(evaluator)
        used = {m: v for m, v in by_model.items() if v}
        own = {m: {k.removeprefix(f"{m}_{evaluator}_"): rows for k, rows in tables.items()
                   if k.startswith(f"{m}_{evaluator}_")} for m in used}
        out[evaluator] = {plot.name: plot.draw(used, own) for plot in cls.plots}
    return out


def _models(rows: list[Row]) -> list[str]:
    return [m for m in MODELS if any(not np.isnan(getattr(r, m)) for r in rows)]


def headline_figure(rows: list[Row]) -> Figure | None:
    """Grouped bars of the headline metrics: one panel where higher is better, one where lower is."""
    panels = [(d, [r for r in rows if r.headline and r.better == d]) for d in ("higher", "lower")]
    panels = [(d, rs) for d, rs in panels if rs]
    if not panels:
        return None
    models = _models(rows)
    fig = new_figure(11, 0.45 * max(len(rs) for _, rs in panels) + 1.6)
    for i, (direction, rs) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        y = np.arange(len(rs))
        h = 0.8 / len(models)
        for j, m in enumerate(models):
            vals = [getattr(r, m) for r in rs]
            ax.barh(y + (j - (len(models) - 1) / 2) * h, vals, height=h, color=COLOURS[m], label=m)
            for yy, v in zip(y + (j - (len(models) - 1) / 2) * h, vals):
                if not np.isnan(v):
                    ax.text(v, yy, f" {v:.3f}", va="center", fontsize=7)
        ax.set_yticks(y, [r.label for r in rs], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{direction} is better")
        ax.margins(x=0.18)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(models), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return fig


def curves_figure(stage: str, curves: dict[str, list[tuple[int, float]]]) -> Figure | None:
    """A stage's per-epoch curves (losses, accuracies, temperature...), one small panel each."""
    if not curves:
        return None
    names = sorted(curves)
    fig, axes = grid(len(names), 4, 3.2, 2.3)
    for name, ax in zip(names, axes):
        steps, values = zip(*curves[name])
        ax.plot(steps, values, "o-", markersize=2, color="tab:purple")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{stage}: per-epoch curves", fontsize=10)
    fig.tight_layout()
    return fig


def data_efficiency_figure(rows: list[dict]) -> Figure | None:
    """Student test top-1 against the share of training labels: distilled vs labels only, teacher dashed."""
    rows = [r for r in rows if r.get("labels_only_top1") is not None and r.get("distilled_top1") is not None]
    if not rows:
        return None
    fig = new_figure(5.0, 3.2)
    ax = fig.add_subplot()
    x = [100 * r["label_fraction"] for r in rows]
    ax.plot(x, [r["distilled_top1"] for r in rows], "o-", color=COLOURS["student"], label="distilled student")
    ax.plot(x, [r["labels_only_top1"] for r in rows], "s--", color="tab:gray", label="labels only")
    teacher = rows[0].get("teacher_top1")
    if teacher is not None:
        ax.axhline(teacher, color=COLOURS["teacher"], linestyle=":", label="teacher probe")
    ax.set_xscale("log")
    ax.set_xticks(x, [f"{v:g}%" for v in x])
    ax.set(xlabel="training labels used", ylabel="test top-1", title="data efficiency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
