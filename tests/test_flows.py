"""Flows in-process under one shared Prefect test harness."""

from __future__ import annotations

import pytest

from flows.pipeline import extract_flow, pipeline_flow, probe_flow
from vitdistill.errors import RegistryError
from vitdistill.stages import StagesFailed, stages_to_run


def test_stage_dependencies():
    assert stages_to_run("probe") == ["extract", "probe"]
    assert stages_to_run("pipeline") == ["extract", "probe", "lit", "distill", "evaluate"]
    with pytest.raises(RegistryError, match="valid stages: extract, probe, lit, distill, evaluate"):
        stages_to_run("nope")


@pytest.mark.slow
def test_extract_flow_maps_shards_and_tags_runs(prefect_harness, make_cfg, tmp_path):
    cfg = make_cfg("data.limit=60", "data.shard_samples=20", "orchestration.max_workers=2")
    result = extract_flow(cfg)
    stage = result["stages"][0]
    assert stage["status"] == "ok" and stage["metrics"]["shards"] == 3 and stage["metrics"]["samples"] == 60

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking.resolved_uri())
    child = client.get_run(stage["run_id"])
    assert child.data.tags["mlflow.parentRunId"] == result["mlflow_run_id"]
    assert child.data.tags["prefect.flow_name"] == "vitdistill-extract"
    assert child.data.metrics["images_per_s"] > 0


@pytest.mark.slow
def test_extract_flow_on_a_local_dask_cluster(prefect_harness, make_cfg):
    cfg = make_cfg("data.limit=60", "data.shard_samples=20", "orchestration.task_runner=dask",
                   "orchestration.dask_workers=2")
    result = extract_flow(cfg)
    assert result["stages"][0]["metrics"]["samples"] == 60


def test_failed_stage_marks_runs_failed(prefect_harness, make_cfg, tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = make_cfg("data.source=wds", f"data.path={tmp_path}/missing.tar")
    with pytest.raises(StagesFailed, match="extract failed: .*missing.tar.*; skipped: probe, lit, distill, evaluate") as e:
        pipeline_flow(cfg)
    assert e.value.result["skipped"] == {s: "extract" for s in ("probe", "lit", "distill", "evaluate")}
    assert next(s for s in e.value.result["stages"] if s["stage"] == "extract")["bad_input"]
    client = MlflowClient(tracking_uri=cfg.tracking.resolved_uri())
    exp = client.get_experiment_by_name("vitdistill")
    runs = client.search_runs([exp.experiment_id])
    assert runs and all(r.info.status == "FAILED" for r in runs)


def test_probe_flow_creates_prefect_table_artifacts(prefect_harness, make_cfg):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    cfg = make_cfg("data.limit=120", "probe.fewshot_shots=[1]", "probe.fewshot_seeds=[0]", "probe.knn_k=[5]")
    result = probe_flow(cfg)
    assert [s["stage"] for s in result["stages"]] == ["extract", "probe"]
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["probe-per-class", "probe-linear-sweep", "extract-shards"])))
    keys = {a.key for a in arts}
    assert {"probe-per-class", "probe-linear-sweep", "extract-shards"} <= keys
    per_class = next(a for a in arts if a.key == "probe-per-class")
    assert per_class.type == "table" and "recall" in str(per_class.data)


@pytest.mark.slow
def test_probe_results_are_cached_across_runs_on_inputs(prefect_harness, make_cfg):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName

    cfg = make_cfg("data.limit=100", "probe.fewshot_shots=[1]", "probe.fewshot_seeds=[0]", "probe.knn_k=[3]")
    first = probe_flow(cfg, return_state=True)
    second = probe_flow(cfg, return_state=True)
    other = probe_flow(make_cfg("data.limit=100", "probe.fewshot_shots=[1]", "probe.fewshot_seeds=[0]",
                                "probe.knn_k=[4]"), return_state=True)

    def compute_state(flow_state):
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id])),
                task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="compute-probes")))
            # the probe task runs inside the flow run itself (no subflow), so exactly one per run
            assert len(runs) == 1
            return runs[0].state.name

    assert compute_state(first) == "Completed"
    assert compute_state(second) == "Cached"
    assert compute_state(other) == "Completed"  # another probe config is another key
    assert first.result()["stages"][1]["metrics"] == second.result()["stages"][1]["metrics"]


@pytest.mark.slow
def test_distill_flow_under_torchrun_registers_the_student(prefect_harness, make_cfg):
    from mlflow.tracking import MlflowClient

    from flows.pipeline import distill_flow

    cfg = make_cfg("data.limit=160", "distill.epochs=1", "distill.nproc=2", "distill.register_as=test-student",
                   "distill.batch_size=16")
    result = distill_flow(cfg)
    stage = result["stages"][-1]
    assert stage["stage"] == "distill" and stage["status"] == "ok"
    assert stage["paths"]["registered_model"] == "test-student/1"
    client = MlflowClient(tracking_uri=cfg.tracking.resolved_uri())
    version = client.get_model_version("test-student", "1")
    assert float(version.tags["student_top1"]) == pytest.approx(stage["metrics"]["student_top1"], abs=1e-6)
    run = client.get_run(stage["run_id"])
    assert run.data.params["nproc"] == "2" and "student_top1" in run.data.metrics
    assert len(client.get_metric_history(stage["run_id"], "loss")) == 1  # rank 0 logged the epoch live, once
    assert {"candidate", "champion"} <= set(version.aliases)  # the first version is champion
