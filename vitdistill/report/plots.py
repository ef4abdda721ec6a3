"""The report's figures, redrawn from MLflow metrics so teacher and student share every axis.

Built on :class:`matplotlib.figure.Figure` with an Agg canvas, never pyplot (thread-safe, no
display). Each function returns None when the run has nothing to draw for it.
"""

from __future__ import annotations

import re

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vitdistill.report.compare import HUMAN_SHAPE_BIAS, MODELS, Row

COLOURS = {"teacher": "tab:blue", "student": "tab:orange"}


def _figure(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def _grid(n: int, cols: int, w: float, h: float) -> tuple[Figure, list]:
    """A figure of ``n`` small panels, ``cols`` per row, each ``w`` x ``h`` inches."""
    cols = min(cols, n)
    rows_n = -(-n // cols)
    fig = _figure(w * cols, h * rows_n)
    return fig, [fig.add_subplot(rows_n, cols, i + 1) for i in range(n)]


def _models(rows: list[Row]) -> list[str]:
    return [m for m in MODELS if any(not np.isnan(getattr(r, m)) for r in rows)]


def headline_figure(rows: list[Row]) -> Figure | None:
    """Grouped bars of the headline metrics: one panel where higher is better, one where lower is."""
    panels = [(d, [r for r in rows if r.headline and r.better == d]) for d in ("higher", "lower")]
    panels = [(d, rs) for d, rs in panels if rs]
    if not panels:
        return None
    models = _models(rows)
    fig = _figure(11, 0.45 * max(len(rs) for _, rs in panels) + 1.6)
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


def robustness_figure(metrics: dict[str, float]) -> Figure | None:
    """Accuracy against corruption severity (0 = clean), one panel per corruption."""
    curves: dict[str, dict[str, dict[int, float]]] = {}  # corruption -> model -> severity -> accuracy
    for key, v in metrics.items():
        m = re.fullmatch(r"(teacher|student)/robustness/accuracy/(.+)/(\d+)", key)
        if m:
            curves.setdefault(m[2], {}).setdefault(m[1], {})[int(m[3])] = v
    if not curves:
        return None
    names = sorted(curves)
    fig, axes = _grid(len(names), 3, 3.6, 2.8)
    for i, (name, ax) in enumerate(zip(names, axes)):
        for model, by_sev in curves[name].items():
            clean = metrics.get(f"{model}/robustness/clean_accuracy")
            sev = sorted(by_sev)
            xs, ys = ([0] if clean is not None else []) + sev, ([clean] if clean is not None else []) + [by_sev[s] for s in sev]
            ax.plot(xs, ys, "o-", color=COLOURS[model], label=model, markersize=3)
        ax.set(title=name, xlabel="severity", ylabel="accuracy", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def reliability_figure(bins: dict[str, list[dict]]) -> Figure | None:
    """Both models' reliability curves (accuracy against confidence per bin) on one diagonal."""
    if not bins:
        return None
    fig = _figure(4.8, 4.6)
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


def subgroup_figure(metrics: dict[str, float]) -> Figure | None:
    """Accuracy per subgroup, teacher and student side by side, worst group of each marked."""
    groups: dict[str, dict[str, float]] = {}
    for key, v in metrics.items():
        m = re.fullmatch(r"(teacher|student)/subgroup/accuracy/(.+)", key)
        if m:
            groups.setdefault(m[1], {})[m[2]] = v
    if not groups:
        return None
    names = sorted({g for by in groups.values() for g in by}, key=lambda g: (not g.isdigit(), int(g) if g.isdigit() else g))
    x = np.arange(len(names))
    w = 0.8 / len(groups)
    fig = _figure(max(5.0, 0.5 * len(names) + 2), 3.4)
    ax = fig.add_subplot(1, 1, 1)
    for j, model in enumerate(m for m in MODELS if m in groups):
        vals = [groups[model].get(g, np.nan) for g in names]
        gap = metrics.get(f"{model}/subgroup/accuracy_gap", np.nan)
        ax.bar(x + (j - (len(groups) - 1) / 2) * w, vals, width=w, color=COLOURS[model],
               label=f"{model} (gap {gap:.2f})")
        ax.axhline(np.nanmin(vals), color=COLOURS[model], linestyle=":", linewidth=1)
    ax.set_xticks(x, names)
    ax.set(xlabel="group", ylabel="accuracy", ylim=(0, 1.05), title="accuracy per subgroup (dotted: worst group)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def shape_bias_figure(metrics: dict[str, float]) -> Figure | None:
    """Shape bias of each model against the human level, with the shape/texture decision split."""
    models = [m for m in MODELS if f"{m}/shape_bias/shape_bias" in metrics]
    if not models:
        return None
    fig = _figure(6.5, 2.8)
    ax = fig.add_subplot(1, 2, 1)
    ax.bar(models, [metrics[f"{m}/shape_bias/shape_bias"] for m in models], color=[COLOURS[m] for m in models])
    ax.axhline(HUMAN_SHAPE_BIAS, color="black", linestyle="--", linewidth=1, label=f"humans ~{HUMAN_SHAPE_BIAS}")
    ax.set(ylim=(0, 1), ylabel="shape / (shape + texture)", title="shape bias")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 2, 2)
    shape = [metrics.get(f"{m}/shape_bias/shape_match", np.nan) for m in models]
    texture = [metrics.get(f"{m}/shape_bias/texture_match", np.nan) for m in models]
    ax.bar(models, shape, color="tab:green", label="shape")
    ax.bar(models, texture, bottom=shape, color="tab:brown", label="texture")
    ax.set(ylim=(0, 1), ylabel="fraction of cue-conflict images", title="decisions")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def curves_figure(stage: str, curves: dict[str, list[tuple[int, float]]]) -> Figure | None:
    """A stage's per-epoch curves (losses, accuracies, temperature...), one small panel each."""
    if not curves:
        return None
    names = sorted(curves)
    fig, axes = _grid(len(names), 4, 3.2, 2.3)
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
    fig = _figure(5.0, 3.2)
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
