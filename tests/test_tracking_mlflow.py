"""MLflow as people use it, on a real tracking store: live training curves with real timestamps (read back
through a real MLflow server's REST API), system metrics, the student as a pickle-free pyfunc with a
signature, candidate/champion aliases, dataset and cache lineage, and evaluate.student by alias."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch

from tests.conftest import FAST_TEACHER, free_port
from vitdistill.config import LitConfig, StudentConfig, TrackingConfig, load_config
from vitdistill.errors import ConfigError

DISTILL = ["data.limit=120", "data.shard_samples=64", "distill.batch_size=16", "distill.epochs=3",
           "distill.mode=online", "distill.checkpoint_every=0", "tracking.log_every_n_steps=2",
           "tracking.system_metrics_interval=0.5"]


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """Extract, then one distill run logged live to a sqlite store: (cfg, tracker, run id, report, paths, cache)."""
    from vitdistill.data.ingest import resolve_inputs
    from vitdistill.distill.stage import log_report, run_distill
    from vitdistill.extract import extract
    from vitdistill.tracking import Tracker

    root = tmp_path_factory.mktemp("distilled")
    cfg = load_config(None, [f"cache.root={root}/cache", f"tracking.uri=sqlite:///{root}/mlflow.db", *FAST_TEACHER,
                             *DISTILL])
    plan, _ = extract(cfg, resolve_inputs(cfg, progress=False), progress=False)
    tracker = Tracker(cfg.tracking)
    run_id = tracker.start_run("distill")
    report = run_distill(cfg, progress=False, run_id=run_id)
    paths = log_report(tracker, run_id, report, cfg)
    tracker.end_run(run_id)
    return cfg, tracker, run_id, report, paths, plan.cache_dir


def test_distill_curves_are_logged_live_once_each_with_step_and_system_metrics(distilled):
    cfg, tracker, run_id, report, _, _ = distilled
    run = tracker.client.get_run(run_id)
    epochs = tracker.client.get_metric_history(run_id, "loss")
    assert [m.step for m in epochs] == [0, 1, 2]  # one point per epoch: the end-of-run log did not add any
    assert [m.value for m in epochs] == pytest.approx([h["loss"] for h in report.history])
    stamps = [m.timestamp for m in epochs]
    assert stamps == sorted(stamps) and stamps[-1] > stamps[0]  # measured as training went, not at the end
    assert run.info.start_time <= stamps[0] and stamps[-1] <= run.info.end_time
    steps = tracker.client.get_metric_history(run_id, "step/loss")
    assert [m.step for m in steps] == list(range(2, int(report.metrics["steps"]) + 1, 2))
    assert {"step/lr", "step/grad_norm", "step/kd_loss"} <= set(run.data.metrics)
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics)
    assert run.data.metrics["final_loss"] == pytest.approx(report.history[-1]["loss"])


def test_distill_run_records_the_dataset_and_feature_cache_as_inputs(distilled):
    from vitdistill.cache.reader import FeatureCache

    cfg, tracker, run_id, report, _, cache_dir = distilled
    inputs = tracker.client.get_run(run_id).inputs.dataset_inputs
    found = {next(t.value for t in d.tags if t.key == "vitdistill.kind"): d for d in inputs}
    cache = FeatureCache.open(cache_dir)
    assert found["dataset"].dataset.digest == cache.manifest["dataset"]["fingerprint"][:32]
    assert found["feature_cache"].dataset.digest == cache.content_sha256()[:32]
    assert json.loads(found["feature_cache"].dataset.profile)["sha256"] == cache.content_sha256()
    contexts = {k: next(t.value for t in d.tags if t.key == "mlflow.data.context") for k, d in found.items()}
    assert contexts == {"dataset": "training", "feature_cache": "evaluation"}


def test_student_loads_as_a_pyfunc_without_pickle_and_predicts_its_logits(distilled, tmp_path, monkeypatch):
    import mlflow

    cfg, tracker, run_id, report, paths, _ = distilled
    local = mlflow.artifacts.download_artifacts(paths["student"], dst_path=str(tmp_path / "student"),
                                                tracking_uri=tracker.uri)
    files = [os.path.relpath(os.path.join(d, f), local) for d, _, fs in os.walk(local) for f in fs]
    assert {"MLmodel", "architecture.json", "weights.safetensors"} <= {os.path.basename(f) for f in files}
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".pth", ".cloudpickle"))], files
    info = mlflow.models.get_model_info(paths["student"])
    side = report.model.img_size
    (spec,) = info.signature.inputs.inputs
    assert spec.type == np.dtype(np.float32) and spec.shape == (-1, 3, side, side)
    assert info.signature.outputs.inputs[0].shape == (-1, report.model.head.out_features)

    def refuse(*a, **k):
        raise AssertionError("the student was unpickled")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    model = mlflow.pyfunc.load_model(paths["student"])
    example = mlflow.models.Model.load(local).load_input_example(local)
    assert example.shape == (2, 3, side, side)
    with torch.inference_mode():
        expected = report.model(torch.from_numpy(example))["logits"].numpy()
    np.testing.assert_allclose(model.predict(example), expected, rtol=1e-5, atol=1e-5)


def test_new_versions_are_candidates_and_champion_moves_only_when_better(tmp_path):
    from vitdistill.distill.students import create_student
    from vitdistill.tracking import Tracker

    tracker = Tracker(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db"))
    student = create_student(StudentConfig(img_size=16), 3, 8, kd_head=False, feature_head=False)

    def register(value: float, mode: str = "max", name: str = "s") -> tuple[str, str]:
        run_id = tracker.start_run("distill")
        out = tracker.log_student(run_id, student, registered_model_name=name, version_tags={"student_top1": value},
                                  champion=("student_top1", mode))
        tracker.end_run(run_id)
        return out["version"], out["champion"]

    def alias(name: str, a: str) -> str:
        return str(tracker.client.get_model_version_by_alias(name, a).version)

    assert register(0.5) == ("1", "1")  # the first version is champion
    assert register(0.4) == ("2", "1") and alias("s", "candidate") == "2" and alias("s", "champion") == "1"
    assert register(0.5) == ("3", "1")  # a tie does not move it
    assert register(0.7) == ("4", "4") and alias("s", "champion") == "4" == alias("s", "candidate")
    assert tracker.client.get_model_version("s", "4").tags["student_top1"] == "0.7"
    assert register(2.0, "min", "m") == ("1", "1") and register(3.0, "min", "m") == ("2", "1")
    assert register(1.0, "min", "m") == ("3", "3")


def test_evaluate_loads_the_champion_by_alias_and_logs_it_as_an_input(distilled):
    from vitdistill.evaluate.stage import log_report, run_evaluate

    cfg, tracker, _, report, _, cache_dir = distilled
    cfg = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={
        "student": "models:/vitdistill-student@champion", "evaluators": ["calibration"], "max_images": 20})})
    student = tracker.load_student(cfg.evaluate.student)
    for k, v in report.model.state_dict().items():
        assert torch.equal(student.state_dict()[k], v), k
    result = run_evaluate(cfg, cache_dir, student)
    assert "student/calibration/ece" in result.metrics
    run_id = tracker.start_run("evaluate")
    log_report(tracker, run_id, result, cache_dir, cfg.evaluate.student)
    tracker.end_run(run_id)
    run = tracker.client.get_run(run_id)
    assert run.data.params["student_model_version"] == "1"
    assert [m.model_id for m in run.inputs.model_inputs] == [tracker.model_identity(cfg.evaluate.student)[0]]
    assert {d.dataset.digest for d in run.inputs.dataset_inputs} >= {
        json.loads(d.dataset.profile)["sha256"][:32] for d in tracker.client.get_run(distilled[2]).inputs.dataset_inputs
        if json.loads(d.dataset.profile)["kind"] == "feature_cache"}
    with pytest.raises(ConfigError, match="evaluate.student: expected an MLflow model URI"):
        load_config(None, ["evaluate.student=/tmp/student.pt"])
    with pytest.raises(ConfigError, match=r"student 'models:/vitdistill-student@nope': cannot load it"):
        tracker.load_student("models:/vitdistill-student@nope")


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` on 127.0.0.1 (sqlite store, local artifacts); yields its URL, then stops it."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "art")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"mlflow server did not start (exit {proc.poll()})") from None
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_lit_curves_reach_a_server_live_with_spread_timestamps(mlflow_server, tmp_path):
    from tests.test_lit import FAST_SCRATCH, write_fake_cache
    from vitdistill.lit.stage import log_report, run_lit
    from vitdistill.tracking import Tracker

    cache = write_fake_cache(tmp_path / "c", n=300, source="generic")
    tracking = TrackingConfig(uri=mlflow_server, log_every_n_steps=1, system_metrics=False)
    tracker = Tracker(tracking)
    run_id = tracker.start_run("lit")
    report = run_lit(cache, LitConfig(**FAST_SCRATCH), progress=False, run_id=run_id, tracking=tracking)
    log_report(tracker, run_id, report, cache)
    tracker.end_run(run_id)

    def history(key: str) -> list[dict]:
        q = f"{mlflow_server}/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key={key}"
        with urllib.request.urlopen(q, timeout=10) as r:
            return json.load(r)["metrics"]

    epochs = history("train_loss")
    assert [int(m["step"]) for m in epochs] == list(range(FAST_SCRATCH["epochs"]))
    stamps = [int(m["timestamp"]) for m in epochs]
    assert all(b > a for a, b in zip(stamps, stamps[1:])), stamps  # one per epoch end, each later than the last
    trained_ms = 1000 * sum(h["seconds"] for h in report.history[1:])
    assert stamps[-1] - stamps[0] >= 0.9 * trained_ms  # spread over the training, not stamped at once
    assert len(history("temperature")) == len(history("val_loss")) == FAST_SCRATCH["epochs"]
    steps = history("step/loss")
    assert len(steps) > FAST_SCRATCH["epochs"] and [int(m["step"]) for m in steps] == list(range(1, len(steps) + 1))
    step_stamps = [int(m["timestamp"]) for m in steps]
    assert step_stamps == sorted(step_stamps) and step_stamps[-1] > step_stamps[0]
    assert history("step/lr")


def test_a_resumed_training_logging_to_the_same_run_logs_each_epoch_and_step_once(tmp_path):
    from tests.test_distill import MSE, StopAt, ToyBatches
    from vitdistill.live import live_callbacks
    from vitdistill.trainer import Trainer, TrainerConfig
    from vitdistill.tracking import Tracker

    tracking = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", log_every_n_steps=1, system_metrics=False)
    tracker = Tracker(tracking)
    run_id = tracker.start_run("train")
    cfg = TrainerConfig(epochs=3, lr=0.05, checkpoint_every=6, checkpoint_dir=str(tmp_path / "ckpt"))

    def fit(*extra):
        torch.manual_seed(0)
        return Trainer(torch.nn.Linear(4, 1), MSE(), ToyBatches(), cfg, [*extra, *live_callbacks(tracking, run_id)]).fit()

    with pytest.raises(KeyboardInterrupt):
        fit(StopAt(9))  # 4 steps an epoch: checkpoint at step 6 (mid-epoch 1), killed at 9; steps 1-8 were logged
    assert [m.step for m in tracker.client.get_metric_history(run_id, "step/loss")] == list(range(1, 9))
    result = fit()
    assert result.resumed_from == 6
    steps = tracker.client.get_metric_history(run_id, "step/loss")
    assert sorted(m.step for m in steps) == list(range(1, 13))  # 7 and 8 were not logged a second time
    epochs = tracker.client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in epochs) == [0, 1, 2]
    assert [m.value for m in sorted(epochs, key=lambda m: m.step)] == pytest.approx([h["loss"] for h in result.history])
    assert not live_callbacks(tracking, None)


@pytest.mark.parametrize("dist_token", [False, True])
def test_student_saved_as_json_and_safetensors_rebuilds_with_a_probe_head(tmp_path, dist_token):
    from types import SimpleNamespace

    from vitdistill.distill.students import ProbeHead, create_student, load_student, save_student

    student = create_student(StudentConfig(img_size=16), 3, 8, teacher_classes=5, dist_token=dist_token).eval()
    if not dist_token:  # distill.head=probe: the task head is a fitted probe
        g = np.random.default_rng(0)
        student.head = ProbeHead(SimpleNamespace(normalize=True, mean=g.normal(size=128), scale=g.random(128),
                                                 weight=g.normal(size=(3, 128)), bias=g.normal(size=3)))
    paths = save_student(student, str(tmp_path))
    restored = load_student(paths["architecture"], paths["weights"])
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        a, b = student(x), restored(x)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert isinstance(restored.head, ProbeHead) != dist_token


def test_the_fluent_api_leaves_no_tracking_uri_in_the_environment(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri writes MLFLOW_TRACKING_URI into os.environ; the Tracker restores it, so the
    subprocesses this process starts (torchrun, a CLI in a test) keep their own tracking URI."""
    import os

    from vitdistill.config import TrackingConfig
    from vitdistill.tracking import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    tracker = Tracker(TrackingConfig(uri=f"sqlite:///{tmp_path}/m.db"))
    with tracker._fluent():
        assert os.environ["MLFLOW_TRACKING_URI"] == tracker.uri
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
