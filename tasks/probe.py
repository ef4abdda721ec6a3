"""The probe stage as a Prefect task: probes on the cache, logged to MLflow, tables as artifacts."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks._common import artifact_key
from vitdistill.config import VitdistillConfig
from vitdistill.probes.stage import probe_cache
from vitdistill.stages import StageResult
from vitdistill.tracking import get_tracker


@task(name="probe", cache_policy=NO_CACHE)
def probe(config: VitdistillConfig, run_id: str, cache_dir: str) -> dict:
    """Linear (regularisation sweep), few-shot and kNN probes on frozen features."""
    report = probe_cache(cache_dir, config.probe)
    tracker = get_tracker(config.tracking)
    tracker.log_params(run_id, {"cache_dir": cache_dir, **{f"split_{k}": v for k, v in report.split_sizes.items()}})
    tracker.log_metrics(run_id, report.metrics)
    for name, fig in report.figures.items():
        tracker.log_figure(run_id, fig, name)
    for name, rows in report.tables.items():
        tracker.log_dict(run_id, rows, f"{name}.json")
        create_table_artifact(table=rows, key=artifact_key("probe", name), description=f"probe: {name}")
    return StageResult("probe", "ok", report.headline, report.metrics, {"cache_dir": cache_dir}, run_id).to_dict()
