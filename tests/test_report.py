"""`vitdistill report`: a real evaluate run logged to MLflow, read back and rendered as one HTML page."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from tests.test_evaluate_stage import TinyStudent
from vitdistill.config import TrackingConfig
from vitdistill.data.ingest import resolve_inputs
from vitdistill.errors import ConfigError, RegistryError
from vitdistill.evaluate import EVALUATORS, Evaluator, Metric, Plot
from vitdistill.evaluate.base import labelled_logits, predict_logits
from vitdistill.evaluate.plotting import new_figure
from vitdistill.evaluate.stage import StudentClassifier, TeacherProbe, run_evaluate
from vitdistill.extract import extract
from vitdistill.report import build_report, compare, describe, gather_run, tally
from vitdistill.report.gather import PipelineRun, StageRun
from vitdistill.report.render import fmt, render_html
from vitdistill.tracking import Tracker


def test_compare_knows_directions_winners_and_a_missing_student():
    rows = {r.key: r for r in compare({
        "teacher/calibration/ece": 0.10, "student/calibration/ece": 0.05,
        "teacher/calibration/accuracy": 0.90, "student/calibration/accuracy": 0.80,
        "teacher/robustness/accuracy/jpeg/10": 0.3, "student/robustness/accuracy/jpeg/10": 0.3,
        "teacher/robustness/accuracy/jpeg/2": 0.5, "student/robustness/accuracy/jpeg/2": 0.6,
        "teacher/shape_bias/n_used": 30.0, "student/shape_bias/n_used": 20.0,
        "teacher/subgroup/accuracy_gap": 0.2,  # the student was not evaluated on it
        "other/calibration/ece": 1.0, "teacher_note": 3.0,  # not a model/evaluator/metric key: ignored
    })}
    assert set(rows) == {"calibration/ece", "calibration/accuracy", "robustness/accuracy/jpeg/10",
                         "robustness/accuracy/jpeg/2", "shape_bias/n_used", "subgroup/accuracy_gap"}
    assert rows["calibration/ece"].winner == "student" and rows["calibration/ece"].better == "lower"
    assert rows["calibration/accuracy"].winner == "teacher" and math.isclose(rows["calibration/accuracy"].delta, -0.1)
    assert rows["robustness/accuracy/jpeg/10"].winner == "tie"
    assert rows["robustness/accuracy/jpeg/2"].label == "accuracy: jpeg, severity 2"
    assert rows["shape_bias/n_used"].winner is None  # a count has no better direction
    gap = rows["subgroup/accuracy_gap"]
    assert gap.winner is None and math.isnan(gap.student) and gap.to_dict()["student"] is None
    assert tally(list(rows.values())) == {"teacher": 1, "student": 1, "tie": 0}
    order = [r.key for r in compare({f"{m}/robustness/accuracy/jpeg/{s}": 0.5 for m in ("teacher", "student")
                                     for s in (10, 2, 1)})]
    assert order == [f"robustness/accuracy/jpeg/{s}" for s in (1, 2, 10)]  # severities numerically


def test_fmt_is_for_people():
    assert fmt(float("nan")) == "-" and fmt(None) == "-"
    assert fmt(1797.0) == "1,797" and fmt(4_650_000.0) == "4.65M" and fmt(0.123456) == "0.1235"


def _log_pipeline(tracker: Tracker, stages: dict[str, dict], finish_parent: bool = True) -> tuple[str, dict[str, str]]:
    """A parent run with one child per stage, as the flows log them: ``{stage: {"metrics", "figures", "tables"}}``."""
    parent = tracker.start_run("vitdistill-pipeline", tags={"vitdistill.stage": "vitdistill-pipeline",
                                                            "prefect.flow_run_name": "tiny-<b>frog</b>"})
    tracker.log_params(parent, {"teacher.name": "test_vit", "student.name": "vit22b_tiny", "data.source": "shapes"})
    tracker.log_text(parent, "teacher:\n  name: test_vit\n", "config.yaml")
    children = {}
    for name, logged in stages.items():
        child = tracker.start_run(name, parent_run_id=parent, tags={"vitdistill.stage": name})
        tracker.log_report(child, params={}, metrics=logged["metrics"], history=logged.get("history", ()),
                           figures=logged.get("figures"), tables=logged.get("tables"),
                           table_prefix=logged.get("table_prefix", ""))
        tracker.end_run(child)
        children[name] = child
    if finish_parent:
        tracker.end_run(parent)
    return parent, children


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """The real evaluate stage (teacher probe + a student) on a shapes cache, logged as a pipeline run."""
    from tests.conftest import FAST_TEACHER
    from vitdistill.config import load_config

    tmp = tmp_path_factory.mktemp("report")
    cfg = load_config(None, [f"cache.root={tmp}/cache", f"tracking.uri=sqlite:///{tmp}/mlflow.db", *FAST_TEACHER,
                             "data.source=shapes", "data.num_samples=240", "evaluate.max_images=40",
                             "evaluate.severities=[1,3]", "evaluate.cue_conflict_images=36"])
    plan, _ = extract(cfg, resolve_inputs(cfg, progress=False), progress=False)
    report = run_evaluate(cfg, plan.cache_dir, TinyStudent())
    tracker = Tracker(cfg.tracking)
    history = [{"epoch": e, "train_loss": 2.0 / e, "val_top1": 0.5 + 0.1 * e} for e in (1, 2, 3)]
    parent, children = _log_pipeline(tracker, {
        "extract": {"metrics": {"samples": 240.0, "images_per_s": 100.0}},
        "distill": {"metrics": {"student_top1": 0.5, "teacher_top1": 0.9}, "history": history,
                    "table_prefix": "distill_", "tables": {"data_efficiency": [  # as the distill stage logs it
                        {"label_fraction": 0.1, "labels_only_top1": 0.31, "distilled_top1": 0.62, "teacher_top1": 0.9,
                         "train_labels": 17},
                        {"label_fraction": 1.0, "labels_only_top1": 0.55, "distilled_top1": 0.71, "teacher_top1": 0.9,
                         "train_labels": 168}]}},
        "evaluate": {"metrics": report.metrics, "figures": report.figures, "tables": report.tables},
    })
    return {"tmp": tmp, "cfg": cfg, "tracker": tracker, "parent": parent, "children": children,
            "metrics": report.metrics, "cache_dir": plan.cache_dir}


def test_report_reads_the_run_back_and_compares_every_evaluation(evaluated):
    tracker, parent, metrics, tmp = evaluated["tracker"], evaluated["parent"], evaluated["metrics"], evaluated["tmp"]
    result = build_report(tracker, None, str(tmp / "reports"))  # None: the latest finished run that evaluated
    assert result.run_id == parent and result.html_path == f"{tmp}/reports/{parent}/report.html"

    # every evaluator metric of both models is a row, with the logged values
    rows = {r["key"]: r for r in result.rows}
    assert set(rows) == {k.split("/", 1)[1] for k in metrics}
    for key, row in rows.items():
        assert row["teacher"] == pytest.approx(metrics[f"teacher/{key}"], nan_ok=True)
        assert row["student"] == pytest.approx(metrics[f"student/{key}"], nan_ok=True)
    assert {"calibration", "robustness", "subgroup", "shape_bias"} == {r["evaluator"] for r in result.rows}
    assert sum(result.wins.values()) == sum(1 for r in result.rows if r["headline"] and r["winner"])

    page = open(result.html_path, encoding="utf-8").read()
    assert page.startswith("<!doctype html>") and not re.search(r'(src|href)="(?!data:)', page)  # nothing external
    for key in ("calibration/ece", "robustness/mean_relative_drop", "shape_bias/shape_bias", "subgroup/accuracy_gap"):
        assert fmt(metrics[f"teacher/{key}"]) in page and fmt(metrics[f"student/{key}"]) in page
    assert "tiny-&lt;b&gt;frog&lt;/b&gt;" in page and "<b>frog</b>" not in page  # run metadata is escaped
    # the redrawn figures (reliability from the logged bins, robustness, subgroups, shape bias, distill
    # curves) plus the stages' own figures, all inlined: the page stands alone
    assert page.count("data:image/png;base64,") >= 7 and "<img alt=\"distill curves\"" in page
    assert "<img alt=\"calibration\"" in page  # the teacher/student reliability overlay
    assert "<h2>Data efficiency</h2>" in page and "<img alt=\"data efficiency\"" in page and "0.62" in page
    summary = json.loads(open(f"{tmp}/reports/{parent}/report.json").read())
    assert summary["run_id"] == parent and len(summary["rows"]) == len(result.rows)

    # logged on the parent MLflow run
    client = tracker.client
    logged = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/report.html", "report/report.json", "report/headline.png", "report/reliability.png",
            "report/curves_distill.png"} <= logged
    assert client.get_run(parent).data.tags["vitdistill.report"] == f"runs:/{parent}/report/report.html"
    assert "| metric | teacher | student |" in result.markdown and result.verdict in result.markdown


def test_report_accepts_a_stage_run_id_and_rejects_what_it_cannot_read(evaluated):
    tracker, parent, children, tmp = evaluated["tracker"], evaluated["parent"], evaluated["children"], evaluated["tmp"]
    assert gather_run(tracker, children["evaluate"], figures=False).run_id == parent
    with pytest.raises(ConfigError, match=r"MLflow run 'nope' not found at sqlite:///"):
        gather_run(tracker, "nope")

    probe_only, _ = _log_pipeline(tracker, {"probe": {"metrics": {"linear_top1": 0.9}}})
    with pytest.raises(ConfigError, match=rf"{probe_only} \(vitdistill-pipeline\) has no evaluate stage"):
        build_report(tracker, probe_only, str(tmp / "reports"))
    running, _ = _log_pipeline(tracker, {"evaluate": {"metrics": {"teacher/calibration/ece": 0.1}}}, finish_parent=False)
    with pytest.raises(ConfigError, match=r"is still RUNNING"):
        build_report(tracker, running, str(tmp / "reports"))
    assert not (tmp / "reports" / probe_only).exists() and not (tmp / "reports" / running).exists()

    empty = Tracker(TrackingConfig(uri=f"sqlite:///{tmp}/empty.db"))
    with pytest.raises(ConfigError, match=r"no finished run with an evaluate stage in MLflow experiment 'vitdistill'"):
        build_report(empty, None, str(tmp / "reports"))


def test_report_of_a_teacher_only_run(evaluated):
    """distill disabled: the evaluate stage measured the teacher alone; the report says so and still renders."""
    tracker, tmp = evaluated["tracker"], evaluated["tmp"]
    teacher = {k: v for k, v in evaluated["metrics"].items() if k.startswith("teacher/")}
    parent, _ = _log_pipeline(tracker, {"evaluate": {"metrics": teacher}})
    result = build_report(tracker, parent, str(tmp / "reports"), stage_figures=False)
    assert result.wins == {"teacher": 0, "student": 0, "tie": 0} and "nothing to compare" in result.verdict
    assert all(r["student"] is None for r in result.rows)


def test_report_flow_publishes_a_prefect_artifact(prefect_harness, evaluated):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.pipeline import report_flow

    cfg = evaluated["cfg"].model_copy(update={"report": evaluated["cfg"].report.model_copy(
        update={"out_dir": str(evaluated["tmp"] / "flow-reports")})})
    result = report_flow(cfg, evaluated["children"]["distill"])
    assert result["run_id"] == evaluated["parent"]
    assert (evaluated["tmp"] / "flow-reports" / evaluated["parent"] / "report.html").exists()
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["vitdistill-report"])))
    # the session's other pipelines publish reports too: this flow run's is one of them
    assert any(a.type == "markdown" and result["verdict"] in str(a.data) and result["run_id"] in str(a.data)
               for a in arts)


# ----------------------------------------------------------------------------- a new evaluator is one registration


def _error_bars(metrics, tables):
    fig = new_figure(3, 2)
    fig.add_subplot().bar(list(metrics), [v["error_rate"] for v in metrics.values()])
    return fig


@pytest.fixture
def toy_registry(monkeypatch):
    """The evaluator registry for one test: what a test registers is gone after it."""
    monkeypatch.setattr(EVALUATORS, "_entries", dict(EVALUATORS._entries))


def test_a_registered_evaluator_reaches_the_stage_the_catalogue_and_the_report(evaluated, toy_registry):
    """Two toy evaluators, registered here and nowhere else: a per-model one with one declared metric and a
    plot, and a student-only one that takes the teacher as an input."""
    seen = []

    @EVALUATORS.register("toy_error")
    class ToyError(Evaluator):
        title = "Toy <error> rate"
        metrics = (Metric("error_rate", "top-1 error (toy)", "lower", headline=True, short="toy error",
                          description="1 - top-1 accuracy", fmt=".3f"),)
        plots = (Plot("toy_error_bars", _error_bars),)

        def run(self, classifier, images, labels, **extra):
            _, labels, logits = labelled_logits(classifier, images, labels)
            yield "error_rate", float(np.mean(logits.argmax(1) != labels))

    @EVALUATORS.register("toy_agreement")
    class ToyAgreement(Evaluator):
        title = "Toy agreement"
        inputs = ("test_images", "teacher")
        models = ("student",)
        metrics = (Metric("top1", "top-1 agreement with the teacher", "higher", description="same top-1 class"),)

        def run(self, classifier, images, labels=None, *, teacher, **extra):
            seen.append((classifier, teacher))
            same = predict_logits(classifier, images).argmax(1) == predict_logits(teacher, images).argmax(1)
            yield "top1", float(np.mean(same))

    cfg = evaluated["cfg"].model_copy(update={"evaluate": evaluated["cfg"].evaluate.model_copy(
        update={"evaluators": ["calibration", "toy_error", "toy_agreement"]})})
    report = run_evaluate(cfg, evaluated["cache_dir"], TinyStudent())
    m = report.metrics
    for who in ("teacher", "student"):  # the toy's metric is 1 - the calibration evaluator's accuracy
        assert m[f"{who}/toy_error/error_rate"] == pytest.approx(1 - m[f"{who}/calibration/accuracy"])
    assert "teacher/toy_agreement/top1" not in m and 0 <= m["student/toy_agreement/top1"] <= 1
    assert len(seen) == 1 and isinstance(seen[0][0], StudentClassifier) and isinstance(seen[0][1], TeacherProbe)
    assert "toy error" in report.headline

    assert describe("toy_error/error_rate") == ("top-1 error (toy)", "lower", True)  # the catalogue
    tracker, tmp = evaluated["tracker"], evaluated["tmp"]
    parent, _ = _log_pipeline(tracker, {"evaluate": {"metrics": m, "figures": report.figures, "tables": report.tables}})
    result = build_report(tracker, parent, str(tmp / "reports"), stage_figures=False)
    rows = {r["key"]: r for r in result.rows}
    toy, accuracy = rows["toy_error/error_rate"], rows["calibration/accuracy"]
    assert toy["label"] == "top-1 error (toy)" and toy["better"] == "lower" and toy["headline"]
    assert toy["winner"] == accuracy["winner"] != "tie"  # lower error wins where higher accuracy does
    assert rows["toy_agreement/top1"]["teacher"] is None and rows["toy_agreement/top1"]["winner"] is None
    page = open(result.html_path, encoding="utf-8").read()
    assert "<h2>Toy &lt;error&gt; rate</h2>" in page and "<h2>Toy agreement</h2>" in page
    assert re.search(r'<td title="1 - top-1 accuracy">top-1 error \(toy\)</td><td>'
                     + re.escape(f"{toy['teacher']:.3f}</td><td>{toy['student']:.3f}</td>") + r".*?&darr; lower", page)
    assert '<img alt="toy_error"' in page
    assert "report/toy_error_bars.png" in {a.path for a in tracker.client.list_artifacts(parent, "report")}


def test_the_stage_rejects_unknown_evaluators_and_undeclared_metrics(evaluated, toy_registry):
    @EVALUATORS.register("toy_sloppy")
    class Sloppy(Evaluator):
        title = "sloppy"
        metrics = (Metric("declared", "declared", "higher"),)

        def run(self, classifier, images, labels, **extra):
            yield "declared", 1.0
            yield "undeclared", 0.0

    def with_evaluators(*names):
        return evaluated["cfg"].model_copy(update={"evaluate": evaluated["cfg"].evaluate.model_copy(
            update={"evaluators": list(names)})})

    with pytest.raises(RegistryError, match="did you mean 'calibration'"):
        run_evaluate(with_evaluators("calibraton"), evaluated["cache_dir"])
    with pytest.raises(TypeError, match="'toy_sloppy' yielded 'undeclared', which none of Sloppy.metrics declares"):
        run_evaluate(with_evaluators("toy_sloppy"), evaluated["cache_dir"])


def test_the_page_escapes_markup_from_run_names_class_names_and_config():
    """The template autoescapes: markup in a run name, a group (class) name, a param, a figure path or the
    config shows as text."""
    evil = "<script>alert('x')</script>"
    metrics = {f"{m}/subgroup/accuracy/{evil}": 0.5 for m in ("teacher", "student")}
    evaluate = StageRun("evaluate", "e1", "FINISHED", 1, 2, metrics, {}, figures={f"{evil}.png": b"png"})
    run = PipelineRun(run_id="r1", name=f"run {evil}", status="FINISHED", experiment_id="0",
                      experiment_name=f"exp {evil}", tracking_uri="sqlite:///m.db", run_url=None, start_ms=1,
                      end_ms=2, tags={"prefect.flow_run_name": evil}, params={"teacher.name": evil},
                      config_yaml=f"data:\n  root: {evil}\n", stages={"evaluate": evaluate})
    page = render_html(run, compare(metrics), {})
    assert "<script" not in page and "alert('x')" not in page
    escaped = "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"
    assert f"<title>vitdistill report: run {escaped}</title>" in page
    assert f"accuracy of group {escaped}</td>" in page and f"root: {escaped}" in page
    assert page.count(escaped) >= 7  # title, h1, experiment, flow, teacher, group row, figure path x2, config


def test_a_run_with_several_teachers_gets_a_section_comparing_them(evaluated):
    """`teacher.name: [a, b]`: each teacher's stage runs are tagged with it; the report shows the teacher-vs-
    student sections for the first that evaluated and one row per teacher, with the figure."""
    tracker, tmp, ev = evaluated["tracker"], evaluated["tmp"], evaluated["metrics"]
    parent = tracker.start_run("vitdistill-pipeline", tags={"vitdistill.stage": "vitdistill-pipeline"})
    tracker.log_params(parent, {"teacher.name": "['small_t', 'big_t']", "student.name": "vit22b_tiny"})
    numbers = {"small_t": dict(params=5e6, gflops=0.4, probe=0.71, zs=0.55, student=0.62, ips=300.0),
               "big_t": dict(params=60e6, gflops=4.1, probe=0.88, zs=0.74, student=0.69, ips=80.0)}
    for teacher, n in numbers.items():
        logged = {"extract": {"images_per_s": n["ips"], "samples": 240.0},
                  "probe": {"linear_top1": n["probe"], "best_layer": -2.0, "best_layer_linear_top1": n["probe"] + 0.01},
                  "lit": {"zeroshot_top1": n["zs"]},
                  "distill": {"student_top1": n["student"], "teacher_params": n["params"],
                              "teacher_gflops": n["gflops"], "agreement": 0.8},
                  "evaluate": ev}
        for stage, metrics in logged.items():
            child = tracker.start_run(stage, parent_run_id=parent,
                                      tags={"vitdistill.stage": stage, "vitdistill.teacher": teacher})
            tracker.log_metrics(child, metrics)
            tracker.end_run(child, "FAILED" if (teacher, stage) == ("small_t", "evaluate") else "FINISHED")
    tracker.end_run(parent)

    run = gather_run(tracker, parent)
    assert list(run.teachers) == ["small_t", "big_t"] and run.teacher == "big_t"  # small_t's evaluate failed
    assert run.stages["probe"].metrics["linear_top1"] == 0.88
    result = build_report(tracker, parent, str(tmp / "reports"))
    rows = {r["teacher"]: r for r in result.teachers}
    assert rows["small_t"]["probe linear top-1"] == 0.71 and rows["big_t"]["student top-1"] == 0.69
    assert rows["big_t"]["GFLOPs / image"] == 4.1 and rows["small_t"]["LiT zero-shot top-1"] == 0.55
    assert rows["small_t"]["status"] == "evaluate not finished" and rows["big_t"]["status"] == "ok"
    page = open(result.html_path, encoding="utf-8").read()
    assert "<h2>Teachers compared</h2>" in page and '<img alt="teachers compared"' in page
    section = page.split("<h2>Teachers compared</h2>", 1)[1].split("<h2>", 1)[0]
    table = section.split("<table>", 1)[1]
    assert table.index(">small_t<") < table.index(">big_t<") and "0.88" in table and "0.62" in table
    assert "report/teachers.png" in {a.path for a in tracker.client.list_artifacts(parent, "report")}
    assert "| small_t |" in result.markdown and "sections above are big_t" in result.markdown
    # a one-teacher run has no such section
    one = build_report(tracker, evaluated["parent"], str(tmp / "reports"))
    assert one.teachers == [] and "Teachers compared" not in open(one.html_path, encoding="utf-8").read()
