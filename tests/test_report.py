"""`vitdistill report`: a real evaluate run logged to MLflow, read back and rendered as one HTML page."""

from __future__ import annotations

import json
import math
import re

import pytest

from tests.test_evaluate_stage import TinyStudent
from vitdistill.config import TrackingConfig
from vitdistill.data.ingest import resolve_inputs
from vitdistill.errors import ConfigError
from vitdistill.evaluate.stage import run_evaluate
from vitdistill.extract import extract
from vitdistill.report import build_report, compare, gather_run, tally
from vitdistill.report.render import fmt
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
            "metrics": report.metrics}


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
    assert arts and arts[0].type == "markdown" and result["verdict"] in str(arts[0].data)
