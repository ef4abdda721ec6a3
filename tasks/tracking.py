"""Tasks that open and close MLflow runs, tagged with the Prefect flow run."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks._common import prefect_tags, retry_on_io_only
from vitdistill.config import VitdistillConfig
from vitdistill.tracking import get_tracker


@task(name="open-mlflow-run", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10],
      retry_condition_fn=retry_on_io_only)
def open_run(config: VitdistillConfig, name: str, parent_run_id: str | None = None) -> str:
    """A parent run logs the whole resolved config; a child run is tagged with its stage."""
    tracker = get_tracker(config.tracking)
    tags = {**prefect_tags(), "vitdistill.stage": name}
    run_id = tracker.start_run(name, parent_run_id=parent_run_id, tags=tags)
    if parent_run_id is None:
        tracker.log_config(run_id, config)
    return run_id


@task(name="close-mlflow-run", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10],
      retry_condition_fn=retry_on_io_only)
def close_run(config: VitdistillConfig, run_id: str, status: str = "FINISHED") -> None:
    get_tracker(config.tracking).end_run(run_id, status)
