"""The report as a Prefect task: one HTML page from a finished run's MLflow records, logged to MLflow
and published as Prefect artifacts (the verdict and headline table, and a link to the page)."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks._common import retry_on_io_only
from vitdistill.config import VitdistillConfig
from vitdistill.report import build_report
from vitdistill.tracking import get_tracker


@task(name="report", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_on_io_only)
def report(config: VitdistillConfig, run_id: str | None = None) -> dict:
    """``run_id``: a pipeline run or one of its stage runs; None: the latest finished run that evaluated."""
    tracker = get_tracker(config.tracking)
    result = build_report(tracker, run_id, config.report.out_dir, config.report.stage_figures)
    create_markdown_artifact(result.markdown, key="vitdistill-report", description=result.headline)
    url = tracker.artifact_url(result.run_id, "report/report.html")
    if url:
        create_link_artifact(url, link_text=f"report of {result.run_name}", key="vitdistill-report-link",
                             description="the HTML report in the MLflow UI")
    return result.to_dict()
