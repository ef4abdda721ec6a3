"""The report as one self-contained HTML page (figures inlined as PNG), and its gist as markdown.

Nothing here reads MLflow: it renders a :class:`~vitdistill.report.gather.PipelineRun`, the
comparison rows and the figures already drawn. The page is the jinja2 template
``templates/report.html.j2`` (packaged with this module), rendered with autoescape on, so a run
name, class name or config value holding markup shows as text. Section titles, the figures of
each evaluator and the short names in the headline come from the evaluator registry.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import math
from typing import Any

import jinja2

from vitdistill.evaluate.base import EVALUATORS, MODELS, describe_metric, evaluator_class
from vitdistill.report.compare import Row, tally
from vitdistill.report.gather import PipelineRun
from vitdistill.report.teachers import shown_columns, teacher_rows
from vitdistill.stages import STAGES  # each stage's headline_keys: the numbers of its row in the overview



def fmt(v: Any, spec: str | None = None) -> str:
    """Numbers for people: None and NaN as '-'; else ``format(v, spec)`` when a metric declares a format
    ``spec``; else counts with separators, millions as M, anything else to 4 significant digits."""
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "-"
    v = float(v)
    if spec is not None:
        return format(v, spec)
    if abs(v) >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v.is_integer() and abs(v) < 1e6:
        return f"{int(v):,}"
    return f"{v:.4g}" if abs(v) >= 1e-3 else f"{v:.2e}"


def fmt_delta(row: Row) -> str:
    d = row.delta
    return "-" if math.isnan(d) else f"{d:+.4g}"


def when(ms: int | None) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if ms else "-"


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def verdict(rows: list[Row]) -> str:
    """One sentence: who wins how many headline metrics."""
    t = tally(rows)
    n = sum(t.values())
    if not n:
        return "Only one model was evaluated, so there is nothing to compare."
    lead = "the student" if t["student"] > t["teacher"] else "the teacher" if t["teacher"] > t["student"] else "neither"
    ties = f", {t['tie']} tied" if t["tie"] else ""
    return (f"Of {n} headline metrics the student is better on {t['student']} and the teacher (a linear probe on its "
            f"frozen features) on {t['teacher']}{ties}: {lead} comes out ahead.")


def headline_text(rows: list[Row]) -> str:
    """A short line for terminals and Prefect descriptions: the tally, then student vs teacher on the metrics
    their evaluators declare a ``short`` name for."""
    t = tally(rows)
    parts = [f"student better on {t['student']}/{sum(t.values())} headline metrics, teacher on {t['teacher']}"]
    for row in rows:
        found = describe_metric(row.key)
        if found and found[1].short:
            parts.append(f"{found[1].short} {row.student:.3f} vs {row.teacher:.3f}")
    return "; ".join(parts)


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("vitdistill.report", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.filters.update(fmt=fmt, delta=fmt_delta, when=when, data_uri=png_data_uri)
    return env


def _stage_overview(run: PipelineRun) -> list[dict[str, str]]:
    out = []
    for name, s in run.stages.items():
        keys = [k for k in (STAGES.stage(name).headline_keys if name in STAGES else ()) if k in s.metrics]
        summary = ", ".join(f"{k} {fmt(s.metrics[k])}" for k in keys) or f"{len(s.metrics)} metrics"
        out.append({"name": name, "status": s.status, "time": f"{s.seconds:.1f} s" if s.seconds else "-",
                    "summary": summary, "run_id": s.run_id})
    return out


def _evaluator_sections(rows: list[Row], figures: dict[str, bytes]) -> list[dict[str, Any]]:
    """One section per evaluator in ``rows``: its title and figures as it declares them, its main rows and
    the detailed ones (folded away)."""
    out = []
    for evaluator in dict.fromkeys(r.evaluator for r in rows):
        ev_rows = [r for r in rows if r.evaluator == evaluator]
        cls = evaluator_class(evaluator) if evaluator in EVALUATORS else None
        main = [r for r in ev_rows if r.headline or not r.detail]
        out.append({"name": evaluator, "title": (cls.title if cls else "") or evaluator,
                    "figures": [figures[p.name] for p in (cls.plots if cls else ()) if figures.get(p.name)],
                    "main": main, "rest": [r for r in ev_rows if r not in main]})
    return out


def render_html(run: PipelineRun, rows: list[Row], figures: dict[str, bytes]) -> str:
    """The whole report page. ``figures`` (PNG bytes, each optional): ``headline``, each evaluator's declared
    plots by name (``reliability``, ``robustness``, ...), ``data_efficiency`` and ``curves/<stage>``."""
    distill = run.stages.get("distill")
    teachers = teacher_rows(run)
    logged: dict[str, list[tuple[str, bytes]]] = {}
    for name, s in run.stages.items():
        for path, png in sorted(s.figures.items()):
            logged.setdefault(name, []).append((path, png))
    return _environment().get_template("report.html.j2").render(
        run=run, title=f"vitdistill report: {run.name}", flow=run.tags.get("prefect.flow_run_name"),
        verdict=verdict(rows), models=MODELS, stages=_stage_overview(run),
        headline_rows=[r for r in rows if r.headline], evaluators=_evaluator_sections(rows, figures),
        figures=figures, logged=logged,
        data_efficiency=distill.tables.get("distill_data_efficiency", []) if distill and figures.get("data_efficiency")
        else [],
        teachers=teachers, teacher_columns=shown_columns(teachers),
    )


def render_markdown(run: PipelineRun, rows: list[Row], where: dict[str, str]) -> str:
    """The gist for a Prefect artifact: verdict, headline table and where the full report is."""
    lines = [f"# vitdistill report: {run.name}", "", verdict(rows), "",
             "| metric | teacher | student | student - teacher | winner |", "|---|---|---|---|---|"]
    for r in rows:
        if r.headline:
            lines.append(f"| {r.label} | {fmt(r.teacher, r.fmt)} | {fmt(r.student, r.fmt)} | {fmt_delta(r)} | "
                         f"{r.winner or '-'} |")
    teachers = teacher_rows(run)
    if teachers:
        cols = [c for c in shown_columns(teachers) if c not in ("best layer", "best layer top-1")]
        lines += ["", f"## {len(teachers)} teachers (the sections above are {run.teacher})", "",
                  "| teacher | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {t['teacher']} | " + " | ".join(fmt(t[c]) for c in cols) + " |" for t in teachers]
    lines += ["", f"MLflow run `{run.run_id}` (experiment {run.experiment_name}, `{run.tracking_uri}`)."]
    lines += [f"- {k}: `{v}`" for k, v in where.items()]
    return "\n".join(lines)
