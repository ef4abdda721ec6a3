"""Extraction as Prefect tasks: ingest, plan, one task per input shard, finalize, report."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks._common import artifact_key, retry_on_io_only
from vitdistill.config import VitdistillConfig
from vitdistill.data.ingest import InputSet, resolve_inputs
from vitdistill.extract import ExtractionPlan, extract_shard, extraction_report, finalize_cache, plan_extraction
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
