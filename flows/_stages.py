"""Stage bodies: each composes the tasks of one stage inside an MLflow child run.

Flows call :func:`run_stages`, which runs a target stage after the stages it depends on (each
reuses its cache when it is there) under one MLflow parent run, then, when the evaluate stage ran,
writes the HTML report of that run (``report.enabled``).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

from prefect import flow, unmapped

from tasks import extract as extract_tasks
from tasks._common import watch_prefect_api
from tasks.tracking import close_run, open_run, publish_summary
from vitdistill.config import OrchestrationConfig, VitdistillConfig
from vitdistill.faults import TrackingServerLost, explain_stage_failure
from vitdistill.stages import StageResult, stages_to_run
from vitdistill.tracking import get_tracker


@contextmanager
def stage_run(config: VitdistillConfig, name: str, parent_run_id: str | None) -> Iterator[str]:
    run_id = open_run(config, name, parent_run_id)
    try:
        yield run_id
    except BaseException as e:
        explained = explain_stage_failure(config, name, e)  # a full disk or a lost MLflow server: one line
        if not isinstance(explained, TrackingServerLost):  # (a run on a lost server is closed at the next start)
            close_run(config, run_id, "FAILED")
        if explained is None or explained is e:
            raise
        raise explained from None
    close_run(config, run_id, "FINISHED")


def task_runner(orch: OrchestrationConfig):
    if orch.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if orch.dask_address:
            return DaskTaskRunner(address=orch.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": orch.dask_workers, "threads_per_worker": 1})
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=orch.max_workers)


@flow(name="extract-shards")
def _map_shards(plan: dict) -> list[dict]:
    """One task per input shard, on the task runner chosen by ``orchestration``."""
    futures = extract_tasks.extract_one.map(unmapped(plan), list(range(len(plan["inputs"]))))
    return [f.result() for f in futures]


def extract_stage(config: VitdistillConfig, parent: str, ctx: dict) -> StageResult:
    with stage_run(config, "extract", parent) as run_id:
        t0 = time.perf_counter()
        inputs = extract_tasks.ingest(config)
        plan = extract_tasks.plan(config, inputs)
        records = _map_shards.with_options(task_runner=task_runner(config.orchestration))(plan)
        manifest = extract_tasks.finalize(plan, records)
        result = extract_tasks.report(config, run_id, plan, manifest, time.perf_counter() - t0)
    ctx["cache_dir"] = result["paths"]["cache_dir"]
    return StageResult(**result)


def probe_stage(config: VitdistillConfig, parent: str, ctx: dict) -> StageResult:
    from tasks import probe as probe_tasks

    if not config.probe.enabled:
        return StageResult("probe", "disabled", message="probe.enabled is false")
    with stage_run(config, "probe", parent) as run_id:
        content = probe_tasks.cache_content(ctx["cache_dir"])
        report = probe_tasks.compute(config.probe, ctx["cache_dir"], content)
        result = probe_tasks.log(config, run_id, ctx["cache_dir"], report)
    return StageResult(**result)


def lit_stage(config: VitdistillConfig, parent: str, ctx: dict) -> StageResult:
    from tasks import lit as lit_tasks

    if not config.lit.enabled:
        return StageResult("lit", "disabled", message="lit.enabled is false")
    with stage_run(config, "lit", parent) as run_id:
        result = lit_tasks.lit(config, run_id, ctx["cache_dir"])
    return StageResult(**result)


def distill_stage(config: VitdistillConfig, parent: str, ctx: dict) -> StageResult:
    from tasks import distill as distill_tasks

    if not config.distill.enabled:
        return StageResult("distill", "disabled", message="distill.enabled is false")
    with stage_run(config, "distill", parent) as run_id:
        result = distill_tasks.distill(config, run_id)
    ctx["student_uri"] = result["paths"].get("student")
    return StageResult(**result)


def evaluate_stage(config: VitdistillConfig, parent: str, ctx: dict) -> StageResult:
    from tasks import evaluate as evaluate_tasks

    if not config.evaluate.enabled:
        return StageResult("evaluate", "disabled", message="evaluate.enabled is false")
    with stage_run(config, "evaluate", parent) as run_id:
        result = evaluate_tasks.evaluate(config, run_id, ctx["cache_dir"], ctx.get("student_uri"))
    return StageResult(**result)


STAGE_FUNCTIONS: dict[str, Callable[[VitdistillConfig, str, dict], StageResult]] = {
    "extract": extract_stage,
    "probe": probe_stage,
    "lit": lit_stage,
    "distill": distill_stage,
    "evaluate": evaluate_stage,
}


def run_stages(config: VitdistillConfig, target: str) -> dict:
    """Run ``target`` (a stage or ``pipeline``) and what it needs, under one MLflow parent run."""
    watch_prefect_api()  # a deployment's run ends when its Prefect server is gone, instead of lingering
    tracker = get_tracker(config.tracking)
    results: list[StageResult] = []
    ctx: dict = {}
    with stage_run(config, f"vitdistill-{target}", None) as parent:
        for stage in stages_to_run(target):
            results.append(STAGE_FUNCTIONS[stage](config, parent, ctx))
    report = None
    if config.report.enabled and any(r.stage == "evaluate" and r.status == "ok" for r in results):
        from tasks.report import report as report_task

        report = report_task(config, parent)  # after the parent run is closed: it reads a finished run
    result = {
        "target": target,
        "mlflow_run_id": parent,
        "mlflow_experiment_id": tracker.experiment_id,
        "tracking_uri": tracker.display_uri,
        "mlflow_run_url": tracker.run_url(parent),
        "mlflow_ui": tracker.ui_command(),
        "stages": [r.to_dict() for r in results],
        "report": report,
    }
    publish_summary(result)
    return result
