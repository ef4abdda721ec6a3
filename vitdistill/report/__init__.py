"""``vitdistill report``: a finished pipeline run, read back from MLflow, as one HTML page that puts
teacher and student side by side across every evaluation, with the other stages' numbers, curves
and figures beside them.

    from vitdistill.report import build_report
    result = build_report(tracker, run_id=None, out_dir="reports")   # latest finished run
    result.html_path       # reports/<run_id>/report.html, self-contained (figures inlined)
    result.artifact_uri    # runs:/<run_id>/report/report.html, logged on the parent run

The page, ``report.json`` (the comparison rows) and the report's figures are logged on the run's
parent MLflow run under ``report/``; the caller (the Prefect task) publishes ``result.markdown``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from vitdistill.cache import fs
from vitdistill.report import plots
from vitdistill.report.compare import Row, compare, describe, tally
from vitdistill.report.gather import PipelineRun, StageRun, find_parent_run_id, gather_run
from vitdistill.report.render import headline_text, render_html, render_markdown, verdict
from vitdistill.report.teachers import teacher_rows, teachers_figure
from vitdistill.tracking import Tracker, figure_png

ARTIFACT_DIR = "report"


@dataclass
class ReportResult:
    run_id: str
    run_name: str
    html_path: str  # local path or s3:// URL
    artifact_uri: str  # runs:/<run_id>/report/report.html
    headline: str
    verdict: str
    markdown: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    wins: dict[str, int] = field(default_factory=dict)
    run_url: str | None = None
    teachers: list[dict[str, Any]] = field(default_factory=list)  # several teachers: one row each

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "markdown"}


def draw_figures(run: PipelineRun, rows: list[Row]) -> dict[str, Any]:
    """Every report figure (``None`` where the run has nothing to draw), redrawn from the metrics."""
    ev = run.stages["evaluate"]
    figures = {"headline": plots.headline_figure(rows)}
    for drawn in plots.evaluator_figures(ev.metrics, ev.tables).values():
        figures.update(drawn)  # each evaluator's declared plots, by plot name
    distill = run.stages.get("distill")
    if distill is not None and "distill_data_efficiency" in distill.tables:
        figures["data_efficiency"] = plots.data_efficiency_figure(distill.tables["distill_data_efficiency"])
    for name, stage in run.stages.items():
        figures[f"curves/{name}"] = plots.curves_figure(name, stage.curves)
    if run.teachers:
        figures["teachers"] = teachers_figure(teacher_rows(run))
    return figures


def build_report(tracker: Tracker, run_id: str | None = None, out_dir: str = "reports",
                 stage_figures: bool = True) -> ReportResult:
    """Gather ``run_id`` (a pipeline run or one of its stages; None: the latest finished run with an
    evaluate stage), render it, write ``<out_dir>/<run_id>/report.html`` and log it to MLflow."""
    run = gather_run(tracker, run_id, figures=stage_figures)
    rows = compare(run.stages["evaluate"].metrics)
    figures = {name: figure_png(fig) for name, fig in draw_figures(run, rows).items() if fig is not None}
    page = render_html(run, rows, figures)
    out_dir = out_dir if fs.is_remote(out_dir) else os.path.abspath(out_dir)
    html_path = fs.join(out_dir, run.run_id, "report.html")
    artifact_uri = f"runs:/{run.run_id}/{ARTIFACT_DIR}/report.html"
    where = {"HTML report": html_path, "MLflow artifact": artifact_uri}
    if run.run_url:
        where["MLflow UI"] = run.run_url
    summary = {"run_id": run.run_id, "run_name": run.name, "verdict": verdict(rows), "wins": tally(rows),
               "rows": [r.to_dict() for r in rows]}
    if run.teachers:
        summary["teacher"] = run.teacher  # whose stages the teacher-vs-student sections show
        summary["teachers"] = teacher_rows(run)
    fs.write_bytes_atomic(html_path, page.encode("utf-8"))
    fs.write_json_atomic(fs.join(out_dir, run.run_id, "report.json"), summary)
    tracker.log_text(run.run_id, page, f"{ARTIFACT_DIR}/report.html")
    tracker.log_dict(run.run_id, summary, f"{ARTIFACT_DIR}/report.json")
    for name, png in figures.items():
        tracker.log_bytes(run.run_id, png, f"{ARTIFACT_DIR}/{name.replace('/', '_')}.png")
    tracker.set_tags(run.run_id, {"vitdistill.report": artifact_uri})
    return ReportResult(run.run_id, run.name, html_path, artifact_uri, headline_text(rows), summary["verdict"],
                        render_markdown(run, rows, where), summary["rows"], summary["wins"], run.run_url,
                        summary.get("teachers", []))


__all__ = [
    "PipelineRun", "ReportResult", "Row", "StageRun", "build_report", "compare", "describe", "draw_figures",
    "find_parent_run_id", "gather_run", "tally",
]
