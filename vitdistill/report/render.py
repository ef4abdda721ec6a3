"""The report as one self-contained HTML page (figures inlined as PNG), and its gist as markdown.

Nothing here reads MLflow: it renders a :class:`~vitdistill.report.gather.PipelineRun`, the
comparison rows and the figures already drawn.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import math
from typing import Any

from vitdistill.report.compare import MODELS, Row, tally
from vitdistill.report.gather import PipelineRun, StageRun

# The numbers that summarise each stage in the overview table, when the stage logged them.
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "extract": ("samples", "shards", "images_per_s", "skipped_samples"),
    "probe": ("linear_top1", "linear_mean_per_class_recall", "fewshot_10shot_top1", "knn10_top1"),
    "lit": ("zeroshot_top1", "chance_top1", "retrieval_i2t_r1", "retrieval_t2i_r1"),
    "distill": ("student_top1", "teacher_top1", "agreement", "student_params", "teacher_params"),
    "evaluate": (),
}
EVALUATOR_TITLES = {
    "calibration": "Calibration",
    "robustness": "Robustness to corruptions, occlusion and patch shuffling",
    "subgroup": "Subgroup gaps",
    "shape_bias": "Shape bias on cue-conflict images",
}
CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:13px} th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f4f4f4} td:first-child,th:first-child,td.text{text-align:left} td{white-space:nowrap} td.text{white-space:normal}
.meta{color:#555} .teacher{color:#1f77b4;font-weight:600} .student{color:#ff7f0e;font-weight:600}
.win-teacher{background:#e8f1fa} .win-student{background:#fff1e3} .muted{color:#888}
img{max-width:100%;border:1px solid #eee;margin:.4em 0} pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:12px}
.verdict{font-size:1.1em;background:#f7f7f7;padding:.6em .9em;border-left:4px solid #888}
details{margin:.5em 0} summary{cursor:pointer;font-weight:600}
"""


def fmt(v: Any) -> str:
    """Numbers for people: NaN as '-', counts with separators, large values in M/k, else 4 significant digits."""
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "-"
    v = float(v)
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
    """A short line for terminals and Prefect descriptions: the tally, then student vs teacher."""
    t = tally(rows)
    parts = [f"student better on {t['student']}/{sum(t.values())} headline metrics, teacher on {t['teacher']}"]
    for key, short in (("calibration/accuracy", "top-1"), ("calibration/ece", "ECE"),
                       ("robustness/mean_relative_drop", "corruption drop"), ("shape_bias/shape_bias", "shape bias")):
        row = next((r for r in rows if r.key == key), None)
        if row is not None:
            parts.append(f"{short} {row.student:.3f} vs {row.teacher:.3f}")
    return "; ".join(parts)


def _table(header: list[str], body: list[list[str]], classes: list[str] | None = None, text: tuple[int, ...] = ()) -> str:
    """An HTML table of already-escaped cells; columns in ``text`` are left-aligned prose."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = []
    for i, cells in enumerate(body):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        tds = "".join(f'<td class="text">{c}</td>' if j in text else f"<td>{c}</td>" for j, c in enumerate(cells))
        rows.append(f"<tr{cls}>{tds}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _comparison_table(rows: list[Row]) -> str:
    body, classes = [], []
    for r in rows:
        better = {"higher": "&uarr; higher", "lower": "&darr; lower"}.get(r.better or "", '<span class="muted">-</span>')
        winner = f'<span class="{r.winner}">{r.winner}</span>' if r.winner in MODELS else (r.winner or "-")
        body.append([html.escape(r.label), fmt(r.teacher), fmt(r.student), fmt_delta(r), better, winner])
        classes.append(f"win-{r.winner}" if r.winner in MODELS else "")
    return _table(["metric", "teacher", "student", "student - teacher", "better", "winner"], body, classes)


def _img(png: bytes | None, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="{png_data_uri(png)}">' if png is not None else ""


def _stage_overview(run: PipelineRun) -> str:
    body = []
    for name, s in run.stages.items():
        keys = [k for k in STAGE_KEYS.get(name, ()) if k in s.metrics]
        summary = ", ".join(f"{k} {fmt(s.metrics[k])}" for k in keys) or f"{len(s.metrics)} metrics"
        body.append([html.escape(name), html.escape(s.status), f"{s.seconds:.1f} s" if s.seconds else "-",
                     html.escape(summary), f"<code>{s.run_id}</code>"])
    return _table(["stage", "status", "time", "key numbers", "MLflow run"], body, text=(3,))


def _stage_metrics(s: StageRun) -> str:
    body = [[html.escape(k), fmt(v)] for k, v in sorted(s.metrics.items())]
    return _table(["metric", "value"], body)


def render_html(run: PipelineRun, rows: list[Row], figures: dict[str, bytes]) -> str:
    """The whole report page. ``figures`` (PNG bytes, each optional): ``headline``, ``reliability``,
    ``robustness``, ``subgroup``, ``shape_bias`` and ``curves/<stage>``."""
    params = run.params
    title = f"vitdistill report: {run.name}"
    flow = run.tags.get("prefect.flow_run_name")
    meta = [
        f"MLflow run <code>{run.run_id}</code> ({html.escape(run.status)}) in experiment "
        f"<b>{html.escape(run.experiment_name)}</b> at <code>{html.escape(run.tracking_uri)}</code>",
        f"started {when(run.start_ms)}, took {run.seconds or 0:.1f} s"
        + (f"; Prefect flow run <b>{html.escape(flow)}</b> (<code>{html.escape(run.tags.get('prefect.flow_run_id', ''))}</code>)" if flow else ""),
        f"teacher <b>{html.escape(params.get('teacher.name', '?'))}</b>, student <b>{html.escape(params.get('student.name', '?'))}</b>, "
        f"data <b>{html.escape(params.get('data.source', '?'))}</b>",
    ]
    if run.run_url:
        meta.append(f'<a href="{html.escape(run.run_url)}">open the run in the MLflow UI</a>')
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>", "<p class='meta'>" + "<br>".join(meta) + "</p>",
             f"<p class='verdict'>{html.escape(verdict(rows))}</p>",
             "<h2>Stages</h2>", _stage_overview(run),
             "<h2>Teacher vs student: headline metrics</h2>",
             "<p>The teacher is measured through a linear probe on its frozen features (penalty chosen on val), "
             "the student through its own head, on the same test images.</p>",
             _comparison_table([r for r in rows if r.headline]), _img(figures.get("headline"), "headline metrics")]
    extra_fig = {"calibration": "reliability", "robustness": "robustness", "subgroup": "subgroup", "shape_bias": "shape_bias"}
    for evaluator in dict.fromkeys(r.evaluator for r in rows):
        ev_rows = [r for r in rows if r.evaluator == evaluator]
        parts.append(f"<h2>{html.escape(EVALUATOR_TITLES.get(evaluator, evaluator))}</h2>")
        parts.append(_img(figures.get(extra_fig.get(evaluator, "")), evaluator))
        main = [r for r in ev_rows if r.headline or not r.key.startswith("robustness/accuracy/")]
        parts.append(_comparison_table(main))
        rest = [r for r in ev_rows if r not in main]
        if rest:
            parts.append(f"<details><summary>all {len(rest)} per-severity numbers</summary>{_comparison_table(rest)}</details>")
    if figures.get("data_efficiency"):
        rows_de = run.stages["distill"].tables.get("distill_data_efficiency", [])
        parts.append("<h2>Data efficiency</h2><p>Student test top-1 with a share of the training labels, at the "
                     "same training budget: the labels-only student trained on that share, and the distilled student "
                     "(its probe head fitted on that share).</p>")
        parts.append(_img(figures["data_efficiency"], "data efficiency"))
        parts.append(_table(["labels", "train labels", "labels only", "distilled", "teacher probe"],
                            [[f"{100 * r['label_fraction']:g}%", fmt(r.get("train_labels")), fmt(r.get("labels_only_top1")),
                              fmt(r.get("distilled_top1")), fmt(r.get("teacher_top1"))] for r in rows_de]))
    parts.append("<h2>The other stages</h2>")
    for name, s in run.stages.items():
        if name == "evaluate":
            continue
        parts.append(f"<h3>{html.escape(name)} <span class='muted'>({html.escape(s.status)}, run <code>{s.run_id}</code>)</span></h3>")
        parts.append(_img(figures.get(f"curves/{name}"), f"{name} curves"))
        parts.append(f"<details><summary>{len(s.metrics)} metrics</summary>{_stage_metrics(s)}</details>")
    logged = [(name, path, png) for name, s in run.stages.items() for path, png in sorted(s.figures.items())]
    if logged:
        parts.append("<h2>Figures the stages logged</h2>")
        for name in dict.fromkeys(n for n, _, _ in logged):
            imgs = "".join(f"<p><b>{html.escape(path)}</b><br>{_img(png, path)}</p>" for n, path, png in logged if n == name)
            parts.append(f"<details><summary>{html.escape(name)}</summary>{imgs}</details>")
    if run.config_yaml:
        parts.append("<h2>Config</h2><details><summary>the resolved config of this run (config.yaml)</summary>"
                     f"<pre>{html.escape(run.config_yaml)}</pre></details>")
    parts.append("</body></html>")
    return "\n".join(part for part in parts if part)


def render_markdown(run: PipelineRun, rows: list[Row], where: dict[str, str]) -> str:
    """The gist for a Prefect artifact: verdict, headline table and where the full report is."""
    lines = [f"# vitdistill report: {run.name}", "", verdict(rows), "",
             "| metric | teacher | student | student - teacher | winner |", "|---|---|---|---|---|"]
    for r in rows:
        if r.headline:
            lines.append(f"| {r.label} | {fmt(r.teacher)} | {fmt(r.student)} | {fmt_delta(r)} | {r.winner or '-'} |")
    lines += ["", f"MLflow run `{run.run_id}` (experiment {run.experiment_name}, `{run.tracking_uri}`)."]
    lines += [f"- {k}: `{v}`" for k, v in where.items()]
    return "\n".join(lines)
