"""The probe stage as Prefect tasks: a cached computation, then logging and artifacts."""

from __future__ import annotations

from datetime import timedelta

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE

from tasks._common import artifact_key
from vitdistill.cache.reader import FeatureCache
from vitdistill.config import ProbeConfig, VitdistillConfig
from vitdistill.probes.stage import ProbeReport, probe_cache
from vitdistill.stages import StageResult
from vitdistill.tracking import cache_lineage, get_tracker


@task(name="cache-content", cache_policy=NO_CACHE)
def cache_content(cache_dir: str) -> str:
    return FeatureCache.open(cache_dir).content_sha256()


@task(name="compute-probes", cache_policy=INPUTS + TASK_SOURCE, persist_result=True, result_serializer="json",
      cache_expiration=timedelta(days=30))
def compute(probe: ProbeConfig, cache_dir: str, content_sha256: str) -> dict:
    """Linear (regularisation sweep), few-shot and kNN probes. Cached across runs on the probe config
    and the cache's content (``content_sha256``: every shard's sha256), never on run ids: the same
    features and settings are probed once. The key names the bytes the result came from because the
    reader checks every shard against its sha256 as it reads: a shard changed in place fails the probe
    (nothing is cached), and after a repair (``cache.verify=true``) the probe computes again."""
    return probe_cache(cache_dir, probe).to_dict()


@task(name="log-probes", cache_policy=NO_CACHE)
def log(config: VitdistillConfig, run_id: str, cache_dir: str, report: dict) -> dict:
    r = ProbeReport(**report)
    tracker = get_tracker(config.tracking)
    tracker.log_report(run_id, params={"cache_dir": cache_dir, **{f"split_{k}": v for k, v in r.split_sizes.items()}},
                       metrics=r.metrics, figures=r.figures(), tables=r.tables,
                       inputs=cache_lineage(cache_dir, "training", dataset_context="source"))
    for name, rows in r.tables.items():
        create_table_artifact(table=rows, key=artifact_key("probe", name), description=f"probe: {name}")
    return StageResult("probe", "ok", r.headline, r.metrics, {"cache_dir": cache_dir}, run_id).to_dict()


def run_stage(config: VitdistillConfig, run_id: str, upstream: dict[str, dict]) -> StageResult:
    cache_dir = upstream["extract"]["paths"]["cache_dir"]
    report = compute(config.probe, cache_dir, cache_content(cache_dir))
    return StageResult(**log(config, run_id, cache_dir, report))
