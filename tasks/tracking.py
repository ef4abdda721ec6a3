"""Tasks that open and close MLflow runs, tagged with the Prefect flow run."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks._common import prefect_tags, retry_on_io_only
from vitdistill.config import VitdistillConfig
from vitdistill.stages import stage_label
from vitdistill.tracking import get_tracker


@task(name="open-mlflow-run", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10],
      retry_condition_fn=retry_on_io_only)
def open_run(config: VitdistillConfig, name: str, parent_run_id: str | None = None, teacher: str | None = None) -> str:
    """A parent run logs the whole resolved config; a child run is tagged with its stage (and, in a run
    with several teachers, with its teacher: ``vitdistill.teacher``, named ``stage[teacher]``)."""
    tracker = get_tracker(config.tracking)
    tags = {**prefect_tags(), "vitdistill.stage": name}
    if teacher:
        tags["vitdistill.teacher"] = teacher
    run_id = tracker.start_run(stage_label(name, teacher), parent_run_id=parent_run_id, tags=tags)
    if parent_run_id is None:
        tracker.log_config(run_id, config)
    return run_id


@task(name="close-mlflow-run", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10],
      retry_condition_fn=retry_on_io_only)
def close_run(config: VitdistillConfig, run_id: str, status: str = "FINISHED") -> None:
    get_tracker(config.tracking).end_run(run_id, status)


@task(name="publish-summary", cache_policy=NO_CACHE)
def publish_summary(result: dict) -> None:
    """A markdown artifact with each stage's headline, and a link artifact to the MLflow run."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    lines = [f"# vitdistill {result['target']}", "", "| stage | status | headline | MLflow run |", "|---|---|---|---|"]
    for s in result["stages"]:
        lines.append(f"| {stage_label(s['stage'], s.get('teacher'))} | {s['status']} | {s['headline'] or s['message']} | {s['run_id'] or '-'} |")
    if result.get("failed"):
        skipped = ", ".join(f"{s} (needs {why})" for s, why in result.get("skipped", {}).items())
        lines += ["", f"**Failed:** {', '.join(result['failed'])}" + (f"; skipped: {skipped}" if skipped else "")]
    if result.get("report"):
        lines += ["", f"Report: `{result['report']['html_path']}` (MLflow artifact `{result['report']['artifact_uri']}`): "
                      f"{result['report']['headline']}"]
    lines += ["", f"MLflow parent run `{result['mlflow_run_id']}` in experiment {result['mlflow_experiment_id']} "
                  f"at `{result['tracking_uri']}`.", "", f"Open the MLflow UI: `{result['mlflow_ui']}`"]
    create_markdown_artifact("\n".join(lines), key="vitdistill-summary", description="stage headlines")
    if result.get("mlflow_run_url"):
        create_link_artifact(result["mlflow_run_url"], link_text="MLflow parent run", key="mlflow-run",
                             description="this flow run in the MLflow UI")
