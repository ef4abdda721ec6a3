"""Extraction as Prefect tasks: ingest, plan, one task per input shard (a subflow on the configured
task runner), finalize, report; :func:`run_stage` composes them."""

from __future__ import annotations

import time

from prefect import flow, task, unmapped
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from tasks._common import Progress, artifact_key, check_stop, retry_on_io_only
from vitdistill.config import OrchestrationConfig, VitdistillConfig
from vitdistill.data.ingest import InputSet, resolve_inputs
from vitdistill.extract import (ExtractionPlan, extract_shard, extraction_report, finalize_cache, finished_records,
                                plan_extraction)
from vitdistill.stages import StageResult
from vitdistill.tracking import cache_lineage, get_tracker

_IO = dict(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_on_io_only)


@task(name="ingest", **_IO)
def ingest(config: VitdistillConfig) -> dict:
    """Image shards for the dataset (written once, then reused); existing wds shards as they are."""
    return resolve_inputs(config).to_dict()


@task(name="plan-extraction", cache_policy=NO_CACHE)
def plan(config: VitdistillConfig, inputs: dict) -> dict:
    return plan_extraction(config, InputSet(**inputs)).to_dict()


@task(name="extract-shard", task_run_name="extract-shard-{index}", **_IO)
def extract_one(plan: dict, index: int) -> dict:
    """Input shard -> feature shard(s), published atomically; skipped when already valid."""
    check_stop()
    return extract_shard(ExtractionPlan.from_dict(plan), index)


@task(name="finalize-cache", **_IO)
def finalize(plan: dict, records: list[dict]) -> dict:
    return finalize_cache(ExtractionPlan.from_dict(plan), records)


@task(name="report-extraction", **_IO)
def report(config: VitdistillConfig, run_id: str, plan: dict, manifest: dict, wall_seconds: float) -> dict:
    p = ExtractionPlan.from_dict(plan)
    params, metrics, rows = extraction_report(p, manifest, wall_seconds)
    tracker = get_tracker(config.tracking)
    tracker.log_params(run_id, params)
    tracker.log_metrics(run_id, metrics)
    tracker.log_dict(run_id, manifest, "manifest.json")
    tracker.log_input(run_id, *cache_lineage(p.cache_dir, "output", dataset_context="source"))
    create_table_artifact(table=rows, key=artifact_key("extract-shards"),
                          description=f"Feature shards of {p.cache_dir} ({metrics['samples']} samples)")
    headline = f"{metrics['samples']} samples in {metrics['shards']} shards"
    if "images_per_s" in metrics:
        headline += f", {metrics['images_per_s']:.0f} img/s"
    else:
        headline += " (cache reused)"
    return StageResult("extract", "ok", headline, metrics, {"cache_dir": p.cache_dir}, run_id).to_dict()


def task_runner(orch: OrchestrationConfig):
    """The runner of the shard tasks: threads, a local Dask cluster, or the Dask scheduler at ``dask_address``."""
    if orch.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if orch.dask_address:
            return DaskTaskRunner(address=orch.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": orch.dask_workers, "threads_per_worker": 1})
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=orch.max_workers)


@flow(name="extract-shards")
def map_shards(plan: dict) -> list[dict]:
    """One task per input shard, on the task runner chosen by ``orchestration``; a progress artifact
    counts the shards as they finish."""
    n = len(plan["inputs"])
    progress = Progress("extract-progress", n, f"feature shards of {plan['cache_dir']}")
    futures = extract_one.map(unmapped(plan), list(range(n)))
    for future in as_completed(futures):
        future.wait()
        progress.advance()
    return [f.result() for f in futures]  # in shard order


def run_stage(config: VitdistillConfig, run_id: str, upstream: dict[str, dict]) -> StageResult:
    t0 = time.perf_counter()
    inputs = ingest(config)
    p = plan(config, inputs)
    records = finished_records(ExtractionPlan.from_dict(p))  # a finished cache: no shard tasks to run
    if records is None:
        records = map_shards.with_options(task_runner=task_runner(config.orchestration))(p)
    manifest = finalize(p, records)
    return StageResult(**report(config, run_id, p, manifest, time.perf_counter() - t0))
