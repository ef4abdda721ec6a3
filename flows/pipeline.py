"""The vitdistill flows: the whole pipeline, and each stage alone, all built from the stage registry.

Run the whole pipeline on the embedded defaults (ephemeral Prefect, sqlite MLflow, digits):

    vitdistill run                       # or: python -m flows.pipeline
    vitdistill run -c configs/shapes.yaml --set teacher.batch_size=16

Each stage alone (it builds what it depends on, reusing caches):

    vitdistill extract | probe | lit | distill | evaluate  [-c FILE] [--set key=value]

The HTML report of a finished run (the pipeline writes one itself when it evaluates):

    vitdistill report [RUN_ID]

Each flow submits one ``stage`` task per stage it runs (see :data:`vitdistill.stages.STAGES`), each
waiting on the stages it needs, so the Prefect UI draws the graph; up to
``orchestration.stage_concurrency`` of them run at once (probe, LiT and distillation after extraction).
A failed stage fails the stages that need it (reported ``skipped``), the others go on, and the flow run
ends Failed (:class:`~vitdistill.stages.StagesFailed`, which carries the run's summary).
"""

from __future__ import annotations

import concurrent.futures
import logging
from dataclasses import dataclass

from prefect import allow_failure, flow
from prefect.task_runners import ThreadPoolTaskRunner

from tasks._common import STOP, route_library_logs, watch_prefect_api
from tasks.stage import stage as stage_task
from tasks.tracking import close_run, open_run, publish_summary
from vitdistill.config import VitdistillConfig
from vitdistill.faults import TrackingServerLost
from vitdistill.redact import reveal
from vitdistill.stages import (PIPELINE, STAGES, StageResult, StagesFailed, failure_message, stage_concurrency,
                               stage_label, stages_to_run, threads_per_stage)
from vitdistill.tracking import get_tracker

log = logging.getLogger("vitdistill.flows")


def run_graph(config: VitdistillConfig, target: str) -> dict:
    """Run ``target`` (a stage or ``pipeline``) and what it needs as a graph of stage tasks under one MLflow
    parent run, then, when the evaluate stage ran, write the run's HTML report (``report.enabled``)."""
    route_library_logs()
    watch_prefect_api()  # a deployment's run ends when its Prefect server is gone, instead of lingering
    config = reveal(config)  # the parameter's passwords are masked: put them back from this process or the file
    STOP.clear()
    names = stages_to_run(target, config)
    nodes = _nodes(config, names)
    workers = stage_concurrency(config.orchestration.stage_concurrency, names, config)
    tracker = get_tracker(config.tracking)
    torch, threads = None, None
    if workers > 1:  # concurrent stages share the cores instead of each taking all of them
        import torch  # only then: one stage at a time (a no-op re-run among them) never imports it here

        threads = torch.get_num_threads()
        torch.set_num_threads(min(threads, threads_per_stage(workers)))
        log.info("running %s with up to %d stages at once, %d torch thread(s) each", ", ".join(nodes), workers,
                 torch.get_num_threads())
    else:
        log.info("running %s, one stage at a time", ", ".join(nodes))
    parent = open_run(config, f"vitdistill-{target}", None)
    try:
        with ThreadPoolTaskRunner(max_workers=workers) as runner:
            futures = _run_stages(runner, workers, nodes, parent)
    except BaseException:
        close_run(config, parent, "FAILED")
        raise
    finally:
        if torch is not None:
            torch.set_num_threads(threads)
    results = [_result(node, futures[key]) for key, node in nodes.items()]
    failed = [r for r in results if r.status == "failed"]
    lost = [f for f in futures.values() if isinstance(f.state.result(raise_on_failure=False), TrackingServerLost)]
    if not lost:  # runs on a lost MLflow server are closed by the next command that starts (KILLED)
        close_run(config, parent, "FAILED" if failed else "FINISHED")
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
        "stage_concurrency": workers,
        "stages": [r.to_dict() for r in results],
        "teachers": config.teacher.names,
        "failed": [r.label for r in failed],
        "skipped": {r.label: stage_label(r.skipped_because, r.teacher) for r in results if r.status == "skipped"},
        "report": report,
    }
    publish_summary(result)
    if failed:
        raise StagesFailed(result)
    return result


@dataclass(frozen=True)
class _Node:
    """One stage task of the graph: a stage for one teacher (``teacher`` None: the run has one)."""

    stage: str
    teacher: str | None
    config: VitdistillConfig
    needs: tuple[str, ...]  # node keys whose results it takes (a failure there skips it)
    after: tuple[str, ...] = ()  # node keys it only waits for (drawn as edges too, never skip it)


def _nodes(config: VitdistillConfig, names: list[str]) -> dict[str, _Node]:
    """The graph's nodes by key (``probe``, or ``probe[teacher]`` with several teachers), in run order.

    With several teachers (``teacher.name`` a list) every stage runs once per teacher on that teacher's
    config. Their extractions run one after another: the first ingests the images, the others reuse
    those shards (and the cores or the GPU are not split between teachers' forward passes)."""
    teachers = config.teacher.names
    if len(teachers) == 1:
        return {n: _Node(n, None, config, STAGES.stage(n).needed(config)) for n in names}
    nodes: dict[str, _Node] = {}
    for i, teacher in enumerate(teachers):
        cfg = config.for_teacher(teacher)
        for n in names:
            after = (stage_label(n, teachers[i - 1]),) if n == "extract" and i else ()
            nodes[stage_label(n, teacher)] = _Node(n, teacher, cfg, tuple(stage_label(d, teacher)
                                                                          for d in STAGES.stage(n).needed(cfg)), after)
    return nodes


def _run_stages(runner: ThreadPoolTaskRunner, workers: int, nodes: dict[str, _Node], parent: str) -> dict:
    """Submit each stage once the stages it needs have ended, at most ``workers`` at a time; wait for all."""
    futures: dict = {}

    def ended(key: str) -> bool:
        return key in futures and futures[key].wrapped_future.done()

    try:
        while len(futures) < len(nodes) or any(not f.wrapped_future.done() for f in futures.values()):
            running = [f.wrapped_future for f in futures.values() if not f.wrapped_future.done()]
            ready = [k for k, node in nodes.items() if k not in futures and all(map(ended, node.needs + node.after))]
            for key in ready[: workers - len(running)]:
                node = nodes[key]
                futures[key] = runner.submit(
                    stage_task,
                    parameters={"name": node.stage, "config": node.config, "parent_run_id": parent,
                                "upstream": dict(zip(STAGES.stage(node.stage).needed(node.config),
                                                     (allow_failure(futures[k]) for k in node.needs))),
                                "teacher": node.teacher},
                    wait_for=[allow_failure(futures[k]) for k in node.needs + node.after])  # the edges the UI draws
                running.append(futures[key].wrapped_future)
            concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
    except BaseException:  # a Ctrl-C reaches this (main) thread only
        STOP.set()  # the stages in the runner's threads stop at their next step, epoch, shard or evaluator
        raise
    return futures


def _result(node: _Node, future) -> StageResult:
    future.wait()  # the final state, from the thread that ran it (the API's copy may lag behind)
    state = future.state
    if state.is_completed():
        return StageResult(**future.result())
    error = state.result(raise_on_failure=False)
    if not isinstance(error, BaseException):
        error = RuntimeError(state.message or f"stage {stage_label(node.stage, node.teacher)} ended {state.type.value}")
    return StageResult(node.stage, "failed", message=failure_message(error), run_id=getattr(error, "mlflow_run_id", None),
                       bad_input=_bad_input(error), teacher=node.teacher)


def _bad_input(error: BaseException) -> bool:
    from vitdistill.errors import VitdistillError

    return isinstance(error, VitdistillError)


def make_flow(target: str):
    """The flow ``vitdistill-<target>``: ``target`` (a registered stage or ``pipeline``) after what it needs."""
    if target == PIPELINE:
        doc = ("The whole pipeline as a graph: " + "; ".join(
            f"{s.name} <- {', '.join(s.needs)}" if s.needs else s.name for s in STAGES)
            + ". One MLflow parent run with a child run per stage.")
    else:
        doc = STAGES.stage(target).description

    def run(config: VitdistillConfig = VitdistillConfig()) -> dict:
        return run_graph(config, target)

    run.__name__ = run.__qualname__ = f"{target}_flow"
    run.__doc__ = doc
    return flow(run, name=f"vitdistill-{target}", log_prints=True, description=doc)


def get_flow(target: str):
    """The flow of ``target`` (a registered stage or ``pipeline``), built on first use: building one
    renders its parameter schema (the whole config tree, about 0.1 s), and a command runs one flow."""
    if target not in FLOWS:
        if target != PIPELINE:
            STAGES.stage(target)  # an unknown name fails naming the valid stages
        FLOWS[target] = make_flow(target)
    return FLOWS[target]


FLOWS: dict = {}  # target -> its flow, as get_flow builds them


def __getattr__(name: str):
    """``<target>_flow``: ``pipeline_flow`` or that of any registered stage (``extract_flow``, ...), the
    entrypoints the deployments name (``flows/pipeline.py:<target>_flow``)."""
    target = name[: -len("_flow")] if name.endswith("_flow") else ""
    if target == PIPELINE or (target and target in STAGES):
        return get_flow(target)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@flow(name="vitdistill-report", log_prints=True)
def report_flow(config: VitdistillConfig = VitdistillConfig(), run_id: str | None = None) -> dict:
    """One HTML report of a finished run (None: the latest that evaluated): teacher vs student, every stage."""
    from tasks.report import report

    return report(reveal(config), run_id)


if __name__ == "__main__":
    get_flow(PIPELINE)()
