"""The evaluate stage as a Prefect task: teacher (probe) and student through every evaluator."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks._common import Progress, artifact_key
from vitdistill.config import VitdistillConfig
from vitdistill.evaluate.stage import log_report, run_evaluate
from vitdistill.stages import StageResult
from vitdistill.tracking import get_tracker


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(config: VitdistillConfig, run_id: str, cache_dir: str, student_uri: str | None) -> dict:
    """Calibration, robustness, subgroup gaps (and shape bias on shapes) for teacher and student."""
    tracker = get_tracker(config.tracking)
    student_uri = config.evaluate.student or student_uri  # evaluate.student, else the one just distilled
    student = tracker.load_student(student_uri) if student_uri else None
    progress = Progress("evaluate-progress", len(config.evaluate.evaluators), "evaluators")
    report = run_evaluate(config, cache_dir, student, on_evaluator=lambda name: progress.advance(note=name))
    log_report(tracker, run_id, report, cache_dir, student_uri)
    for name, rows in report.tables.items():
        create_table_artifact(table=rows, key=artifact_key("evaluate", name), description=report.headline)
    return StageResult("evaluate", "ok", report.headline, report.metrics, {"cache_dir": cache_dir}, run_id).to_dict()


def run_stage(config: VitdistillConfig, run_id: str, upstream: dict[str, dict]) -> StageResult:
    distilled = upstream.get("distill") or {}
    return StageResult(**evaluate(config, run_id, upstream["extract"]["paths"]["cache_dir"],
                                  distilled.get("paths", {}).get("student")))
