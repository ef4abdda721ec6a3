"""Several teachers in one run (``teacher.name`` a list): the ViT-22B scaling story in miniature.

One row per teacher: its size (parameters, GFLOPs per image, from the distill stage), how fast it
extracted, how good its frozen features are (linear probe top-1 and the best layer), how well a text
tower aligns to them (LiT zero-shot top-1), and how good a student distilled from it is. A figure
puts the probe, zero-shot and student top-1 against the teacher's GFLOPs (or parameters).
"""

from __future__ import annotations

from typing import Any

from vitdistill.report.gather import PipelineRun, StageRun


def columns() -> list[tuple[str, str, str]]:
    """(column, stage, metric): what the comparison reads from each teacher's stage runs, from the stage
    registry (each stage's ``teacher_columns``), in registration order."""
    from vitdistill.stages import STAGES

    return [(column, name, metric) for name in STAGES.names() for column, metric in STAGES.stage(name).teacher_columns]


# the top-1 columns drawn against the teacher's cost
SERIES: tuple[tuple[str, str, str], ...] = (("probe linear top-1", "o", "#1f77b4"),
                                            ("LiT zero-shot top-1", "s", "#2ca02c"),
                                            ("student top-1", "^", "#d62728"))


def _value(stages: dict[str, StageRun], stage: str, metric: str) -> float | None:
    s = stages.get(stage)
    return s.metrics.get(metric) if s is not None else None


def teacher_rows(run: PipelineRun) -> list[dict[str, Any]]:
    """One dict per teacher (``teacher``, ``status`` and each of :func:`columns`); [] for a one-teacher run."""
    rows = []
    for teacher, stages in run.teachers.items():
        failed = sorted(n for n, s in stages.items() if s.status != "FINISHED")
        row: dict[str, Any] = {"teacher": teacher, "status": "ok" if not failed else f"{', '.join(failed)} not finished"}
        for column, stage, metric in columns():
            row[column] = _value(stages, stage, metric)
        rows.append(row)
    return rows


def shown_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The columns some teacher has a number for (no best-layer columns without ``teacher.layers``)."""
    return [c for c, _, _ in columns() if any(r[c] is not None for r in rows)]


def teachers_figure(rows: list[dict[str, Any]]):
    """Top-1 of the probe, zero-shot and student against each teacher's GFLOPs (log scale; parameters when
    GFLOPs were not measured); None when fewer than two teachers have both."""
    from vitdistill.evaluate.plotting import new_figure

    xkey = "GFLOPs / image" if sum(r["GFLOPs / image"] is not None for r in rows) >= 2 else "parameters"
    usable = [r for r in rows if r[xkey]]
    if len(usable) < 2 or not any(r[s] is not None for r in usable for s, _, _ in SERIES):
        return None
    fig = new_figure(6.4, 4.0)
    ax = fig.add_subplot()
    for series, marker, colour in SERIES:
        pts = sorted((r[xkey], r[series]) for r in usable if r[series] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=colour, label=series)
    for r in usable:
        ax.annotate(r["teacher"], (r[xkey], max(r[s] for s, _, _ in SERIES if r[s] is not None)),
                    textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel(f"teacher {xkey} (log scale)")
    ax.set_ylabel("test top-1")
    ax.set_title("teachers: feature quality and what a student learns from them")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
