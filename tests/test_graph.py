"""The pipeline as a Prefect graph, read back through the Prefect API: one task run per stage with the
registry's dependencies, probe/LiT/distillation running at the same time, library log lines and
progress artifacts under the task runs, a failed stage skipping only what needs it, and a toy stage
registered in a test reaching the flows, the CLI and the deployments."""

from __future__ import annotations

import time

import pytest

from vitdistill.stages import STAGES, Stage, StageResult, StagesFailed

TINY = ["data.limit=120", "data.shard_samples=40", "probe.fewshot_shots=[1]", "probe.fewshot_seeds=[0]",
        "probe.knn_k=[3]", "lit.epochs=3", "distill.epochs=2", "distill.register_as=null",
        "orchestration.stage_concurrency=3"]


def _task_runs(flow_run_id):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def _stage_runs(flow_run_id, timeout=30.0) -> dict:
    """The stage task runs of a flow run, once the API holds their final states (it learns them from events)."""
    deadline = time.time() + timeout
    while True:
        runs = {r.name: r for r in _task_runs(flow_run_id) if r.name in STAGES}
        if all(r.state and r.state.is_final() and r.end_time for r in runs.values()) or time.time() > deadline:
            return runs
        time.sleep(1)


def _upstream_names(run, by_id: dict) -> set[str]:
    return {by_id[i.id].name for i in run.task_inputs.get("wait_for", []) if i.id in by_id}


def _logs(task_run_ids, want, timeout=30.0):
    """Log records of these task runs, polled until ``want(records)`` (the API handler ships them in batches)."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId

    deadline = time.time() + timeout
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=list(task_run_ids))))
        if want(logs) or time.time() > deadline:
            return logs
        time.sleep(1)


@pytest.mark.slow
def test_pipeline_is_a_graph_of_stage_tasks_that_overlap(prefect_harness, make_cfg):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    from flows.pipeline import pipeline_flow

    state = pipeline_flow(make_cfg(*TINY), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert {s["stage"]: s["status"] for s in result["stages"]} == {n: "ok" for n in STAGES.names()}
    assert result["stage_concurrency"] == 3 and result["failed"] == [] and result["report"]["html_path"]

    flow_run_id = state.state_details.flow_run_id
    runs = _stage_runs(flow_run_id)
    assert set(runs) == set(STAGES.names())
    by_id = {r.id: r for r in runs.values()}
    for spec in STAGES:  # the edges the UI draws are the registry's
        assert _upstream_names(runs[spec.name], by_id) == set(spec.needs), spec.name
        assert runs[spec.name].state.is_completed()

    # probe, LiT and distillation ran at the same time, after extraction and before evaluation
    trio = [runs[n] for n in ("probe", "lit", "distill")]
    assert max(r.start_time for r in trio) < min(r.end_time for r in trio)
    assert min(r.start_time for r in trio) >= runs["extract"].end_time
    assert runs["evaluate"].start_time >= max(r.end_time for r in (runs["probe"], runs["distill"]))

    # library log lines under their task runs: LiT's training lines under the lit task (inside the lit stage)
    all_runs = {r.id: r for r in _task_runs(flow_run_id)}
    logs = _logs(all_runs, lambda ls: any(rec.name == "vitdistill.logs" for rec in ls)
                 and any(rec.name == "vitdistill.evaluate.stage" for rec in ls))
    lit_lines = [rec for rec in logs if rec.name == "vitdistill.logs" and rec.message.startswith("lit: epoch")]
    assert len(lit_lines) == 3 and {all_runs[rec.task_run_id].name.split("-")[0] for rec in lit_lines} == {"lit"}
    distill_lines = [rec for rec in logs if rec.name == "vitdistill.logs" and rec.message.startswith("distill: epoch")]
    assert {all_runs[rec.task_run_id].name.split("-")[0] for rec in distill_lines} == {"distill"}
    assert any(rec.name == "vitdistill.evaluate.stage" and "evaluator" in rec.message
               and all_runs[rec.task_run_id].name.startswith("evaluate") for rec in logs)

    # progress artifacts: shards (in the extract-shards subflow), epochs, evaluators, each at 100 %
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["extract-progress", "lit-progress", "distill-progress", "evaluate-progress"])))
    mine = {a.key: a for a in arts if a.flow_run_id == flow_run_id or a.key == "extract-progress"}
    assert set(mine) == {"extract-progress", "lit-progress", "distill-progress", "evaluate-progress"}
    assert all(a.type == "progress" and float(a.data) == pytest.approx(100.0) for a in mine.values())
    with get_client(sync_client=True) as client:
        own = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), key=ArtifactFilterKey(any_=["distill-progress"])))
    assert own and own[0].task_run_id in all_runs


@pytest.mark.slow
def test_a_failed_stage_skips_only_what_needs_it(prefect_harness, make_cfg):
    from mlflow.tracking import MlflowClient

    from flows.pipeline import pipeline_flow

    cfg = make_cfg(*TINY, "student.name=no_such_student")
    state = pipeline_flow(cfg, return_state=True)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, StagesFailed) and "no_such_student" in str(error)
    result = error.result
    status = {s["stage"]: s for s in result["stages"]}
    assert {n: s["status"] for n, s in status.items()} == {
        "extract": "ok", "probe": "ok", "lit": "ok", "distill": "failed", "evaluate": "skipped"}
    assert status["distill"]["bad_input"] and "no_such_student" in status["distill"]["message"]
    assert status["distill"]["run_id"] and status["evaluate"]["run_id"] is None
    assert status["evaluate"]["skipped_because"] == "distill"
    assert result["failed"] == ["distill"] and result["skipped"] == {"evaluate": "distill"}
    assert result["report"] is None

    runs = _stage_runs(state.state_details.flow_run_id)
    assert runs["distill"].state.is_failed() and runs["lit"].state.is_completed()
    assert runs["evaluate"].state.name == "Skipped"

    client = MlflowClient(tracking_uri=cfg.tracking.resolved_uri())
    assert client.get_run(result["mlflow_run_id"]).info.status == "FAILED"
    assert client.get_run(status["lit"]["run_id"]).info.status == "FINISHED"
    assert client.get_run(status["distill"]["run_id"]).info.status == "FAILED"
    children = client.search_runs([client.get_experiment_by_name("vitdistill").experiment_id],
                                  f"tags.mlflow.parentRunId = '{result['mlflow_run_id']}'")
    assert {c.info.run_name: c.info.status for c in children} == {
        "extract": "FINISHED", "probe": "FINISHED", "lit": "FINISHED", "distill": "FAILED"}


def toy_stage(config, run_id: str, upstream: dict[str, dict]) -> StageResult:
    """A stage body for the test below: counts the cache's shards."""
    cache_dir = upstream["extract"]["paths"]["cache_dir"]
    shards = upstream["extract"]["metrics"]["shards"]
    return StageResult("toy", "ok", f"{shards:.0f} shards", {"toy_shards": shards}, {"cache_dir": cache_dir}, run_id)


@pytest.fixture
def toy():
    from vitdistill_cli import main as cli

    STAGES.add(Stage("toy", run="tests.test_graph:toy_stage", needs=("extract",), description="A toy stage.",
                     headline_keys=("toy_shards",), cron="0 9 * * *", schedule="toy, daily at 09:00"))
    try:
        yield STAGES.stage("toy")
    finally:
        STAGES.remove("toy")
        cli.app.registered_commands[:] = [c for c in cli.app.registered_commands if c.name != "toy"]


def test_a_registered_stage_reaches_the_flows_the_cli_and_the_deployments(toy, prefect_harness, make_cfg):
    from typer.testing import CliRunner

    import flows.pipeline as pipeline
    from deploy.deployments import deployments
    from vitdistill.stages import stages_to_run
    from vitdistill_cli import main as cli

    assert stages_to_run("toy") == ["extract", "toy"] and stages_to_run("pipeline")[-1] == "toy"
    assert pipeline.toy_flow.name == "vitdistill-toy" and pipeline.get_flow("toy") is pipeline.toy_flow

    spec = next(d for d in deployments() if d.stage == "toy")
    assert (spec.full_name, spec.entrypoint) == ("vitdistill-toy/toy", "flows/pipeline.py:toy_flow")
    assert (spec.cron, spec.description) == ("0 9 * * *", "toy, daily at 09:00")

    cli.add_stage_commands()
    r = CliRunner().invoke(cli.app, ["--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "toy" in r.stdout and "A toy stage." in r.stdout
    r = CliRunner().invoke(cli.app, ["list", "stages"], env={"COLUMNS": "200"})
    assert "toy  <- extract" in r.stdout

    state = pipeline.toy_flow(make_cfg("data.limit=40", "data.shard_samples=20"), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert [(s["stage"], s["status"]) for s in result["stages"]] == [("extract", "ok"), ("toy", "ok")]
    assert result["stages"][1]["metrics"] == {"toy_shards": 2.0}
    runs = _stage_runs(state.state_details.flow_run_id)
    assert _upstream_names(runs["toy"], {r.id: r for r in runs.values()}) == {"extract"}


def test_evaluate_of_a_named_student_does_not_distil_first(make_cfg):
    """evaluate.student names the model to evaluate: the graph then has no distillation before evaluate."""
    from flows.pipeline import _nodes
    from vitdistill.stages import stages_to_run

    named = make_cfg("evaluate.student=models:/vitdistill-student@champion")
    assert stages_to_run("evaluate", make_cfg()) == ["extract", "probe", "distill", "evaluate"]
    assert stages_to_run("evaluate", named) == ["extract", "probe", "evaluate"]
    assert _nodes(named, stages_to_run("evaluate", named))["evaluate"].needs == ("extract", "probe")
    whole = _nodes(named, stages_to_run("pipeline", named))  # the pipeline still distils, but evaluate waits not
    assert "distill" in whole and whole["evaluate"].needs == ("extract", "probe")
    assert STAGES.stage("evaluate").needed() == ("extract", "probe", "distill")


def test_epoch_log_lines_every_epoch_of_short_runs_and_about_ten_of_long_ones():
    import logging
    from types import SimpleNamespace

    from vitdistill.logs import EpochLog

    logger = logging.getLogger("vitdistill.logs")

    def lines(epochs: int) -> list[str]:
        records: list[logging.LogRecord] = []
        handler = logging.Handler(logging.INFO)
        handler.emit = records.append  # type: ignore[method-assign]
        logger.addHandler(handler)
        level = logger.level
        logger.setLevel(logging.INFO)
        try:
            trainer, cb = SimpleNamespace(cfg=SimpleNamespace(epochs=epochs)), EpochLog("lit")
            for e in range(epochs):
                cb.on_epoch(trainer, e, {"epoch": float(e), "loss": 1.0 / (e + 1), "seconds": 0.5})
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
        return [r.getMessage() for r in records]

    short = lines(5)
    assert len(short) == 5 and short[0] == "lit: epoch 1/5 loss 1 (0.50 s)"
    long = lines(33)
    assert len(long) == 9 and long[0].startswith("lit: epoch 4/33") and long[-1].startswith("lit: epoch 33/33")


@pytest.mark.slow
def test_several_teachers_run_every_stage_each_and_one_report_compares_them(prefect_harness, make_cfg):
    """`teacher.name: [test_vit, test_vit2]`: one stage task per stage and teacher, the second extraction
    after the first (which ingests the images once), MLflow stage runs tagged with their teacher, and one
    report with a section comparing the teachers."""
    from mlflow.tracking import MlflowClient

    from flows.pipeline import pipeline_flow

    cfg = make_cfg(*TINY, "teacher.name=[test_vit, test_vit2]")
    state = pipeline_flow(cfg, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    teachers = ["test_vit", "test_vit2"]
    assert result["teachers"] == teachers
    assert {(s["stage"], s["teacher"]): s["status"] for s in result["stages"]} == {
        (n, t): "ok" for t in teachers for n in STAGES.names()}
    caches = {s["teacher"]: s["paths"]["cache_dir"] for s in result["stages"] if s["stage"] == "extract"}
    assert len(set(caches.values())) == 2  # one feature cache per teacher

    runs = {}
    deadline = time.time() + 30
    while time.time() < deadline:  # the API learns the final states from events
        runs = {r.name: r for r in _task_runs(state.state_details.flow_run_id) if r.name.split("[")[0] in STAGES}
        if len(runs) == 10 and all(r.state.is_final() and r.end_time for r in runs.values()):
            break
        time.sleep(1)
    assert set(runs) == {f"{n}[{t}]" for t in teachers for n in STAGES.names()}
    by_id = {r.id: r for r in runs.values()}
    assert _upstream_names(runs["probe[test_vit2]"], by_id) == {"extract[test_vit2]"}
    assert _upstream_names(runs["extract[test_vit2]"], by_id) == {"extract[test_vit]"}  # ingestion once
    assert runs["extract[test_vit2]"].start_time >= runs["extract[test_vit]"].end_time
    assert _upstream_names(runs["evaluate[test_vit]"], by_id) == {"extract[test_vit]", "probe[test_vit]",
                                                                  "distill[test_vit]"}

    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    children = client.search_runs([result["mlflow_experiment_id"]],
                                  f"tags.`mlflow.parentRunId` = '{result['mlflow_run_id']}'")
    assert {(r.data.tags["vitdistill.stage"], r.data.tags["vitdistill.teacher"]) for r in children} == {
        (n, t) for t in teachers for n in STAGES.names()}
    assert {r.info.run_name for r in children} >= {"probe[test_vit]", "distill[test_vit2]"}

    report = result["report"]
    assert [r["teacher"] for r in report["teachers"]] == teachers
    for row, t in zip(report["teachers"], teachers):
        probe = next(s for s in result["stages"] if s["stage"] == "probe" and s["teacher"] == t)
        distill = next(s for s in result["stages"] if s["stage"] == "distill" and s["teacher"] == t)
        assert row["probe linear top-1"] == pytest.approx(probe["metrics"]["linear_top1"])
        assert row["student top-1"] == pytest.approx(distill["metrics"]["student_top1"])
        assert row["GFLOPs / image"] > 0 and row["status"] == "ok"
    page = open(report["html_path"], encoding="utf-8").read()
    assert "<h2>Teachers compared</h2>" in page and ">test_vit2<" in page


@pytest.mark.parametrize("cpus,gpus,want", [(2, 0, 1), (4, 0, 1), (8, 0, 2), (12, 0, 3), (64, 0, 3),
                                            (2, 1, 1), (4, 1, 2), (16, 1, 2), (16, 2, 3), (1, 0, 1)])
def test_auto_stage_concurrency_follows_cores_and_gpus(monkeypatch, cpus, gpus, want):
    """orchestration.stage_concurrency=auto: min(width, cpus // 4) on CPU (4 cores a stage), min(width, cpus // 2,
    2 * gpus) with GPUs, at least 1; the width of the default pipeline is 3 (probe, LiT, distillation)."""
    import vitdistill.stages as stages
    from vitdistill.config import load_config

    cfg = load_config(None, [])
    names = stages.STAGES.order(stages.PIPELINE, cfg)
    assert stages.STAGES.width(names, cfg) == 3
    monkeypatch.setattr(stages.os, "cpu_count", lambda: cpus)
    monkeypatch.setattr(stages, "_gpu_count", lambda: gpus)
    assert stages.stage_concurrency("auto", names, cfg) == want
    assert stages.stage_concurrency(2, names, cfg) == 2  # a number is taken as it is
    assert stages.stage_concurrency("auto", ["extract", "probe"], cfg) == 1  # nothing to run side by side
