"""The CLI as a user runs it: subprocesses, exit codes, one-line errors, the embedded pipeline."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vitdistill.config import load_config

ROOT = Path(__file__).resolve().parents[1]
VITDISTILL = [sys.executable, "-m", "vitdistill_cli.main"]


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "TQDM_DISABLE": "1", "COLUMNS": "200"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    return env


def cli(args, env, cwd, timeout=600):
    return subprocess.run(VITDISTILL + args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_help_lists_the_stages(cli_env, tmp_path):
    r = cli(["--help"], cli_env, tmp_path)
    assert r.returncode == 0
    for stage in ("run", "extract", "probe", "lit", "distill", "evaluate", "config"):
        assert stage in r.stdout
    for sub in (["probe", "--help"], ["config", "show", "--help"], ["list", "--help"], ["data", "ingest", "--help"]):
        r = cli(sub, cli_env, tmp_path)
        assert r.returncode == 0 and "--help" in r.stdout


def test_misspelt_key_fails_with_one_line(cli_env, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher:\n  nmae: resnet18\n")
    r = cli(["config", "validate", "-c", str(bad)], cli_env, tmp_path)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "teacher.nmae" in lines[0] and "Traceback" not in r.stderr
    r = cli(["run", "-c", str(bad)], cli_env, tmp_path)
    assert r.returncode != 0 and "teacher.nmae" in r.stderr and "Traceback" not in r.stderr
    r = cli(["config", "validate", "-c", str(bad), "--debug"], cli_env, tmp_path)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_config_show_applies_sets(cli_env, tmp_path):
    r = cli(["config", "show", "-c", str(ROOT / "configs/shapes.yaml"), "--set", "data.num_samples=123", "--flat"],
            cli_env, tmp_path)
    assert r.returncode == 0
    assert "data.source = 'shapes'" in r.stdout and "data.num_samples = 123" in r.stdout
    r = cli(["config", "validate", "-c", str(ROOT / "configs/digits.yaml")], cli_env, tmp_path)
    assert r.returncode == 0 and "ok" in r.stdout


@pytest.mark.slow
def test_list_registries(cli_env, tmp_path):
    r = cli(["list", "teachers"], cli_env, tmp_path)
    assert r.returncode == 0 and "effnet_lite0_imagenet" in r.stdout and "timm" in r.stdout
    r = cli(["list", "datasets"], cli_env, tmp_path)
    assert all(n in r.stdout for n in ("digits", "shapes", "folder", "wds"))
    r = cli(["list", "students"], cli_env, tmp_path)
    assert "vit22b_tiny" in r.stdout
    r = cli(["list", "text-towers"], cli_env, tmp_path)
    assert "minilm" in r.stdout and "scratch" in r.stdout
    r = cli(["list", "losses"], cli_env, tmp_path)
    assert "kd" in r.stdout and "softmax" in r.stdout


@pytest.mark.slow
def test_bad_input_during_a_run_is_one_line(cli_env, tmp_path):
    r = cli(["extract", "--set", "data.source=folder", "--set", f"data.path={tmp_path}/nope"], cli_env, tmp_path)
    assert r.returncode == 2
    assert "error: data.path" in r.stderr and "not found" in r.stderr and "Traceback" not in r.stderr + r.stdout


@pytest.mark.slow
def test_run_embedded_pipeline_logs_nested_mlflow_runs_with_prefect_tags(cli_env, tmp_path):
    out = tmp_path / "result.json"
    r = cli(["run", "-c", str(ROOT / "configs/runlocal.yaml"), "--json", str(out)], cli_env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    status = {s["stage"]: s["status"] for s in result["stages"]}
    assert set(status.values()) == {"ok"} and len(status) == 5
    assert "vitdistill pipeline" in r.stdout and "mlflow ui" in r.stdout  # the summary table
    assert (tmp_path / "mlflow.db").exists() and result["tracking_uri"] == "sqlite:///mlflow.db"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.data.tags["prefect.flow_run_id"] and parent.data.tags["prefect.flow_name"] == "vitdistill-pipeline"
    assert parent.data.params["data.source"] == "digits" and parent.data.params["teacher.name"] == "test_vit"
    assert "config.yaml" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    names = {c.info.run_name: c for c in children}
    assert set(names) == {"extract", "probe", "lit", "distill", "evaluate"}
    ev = names["evaluate"]
    for who in ("teacher", "student"):
        assert 0 <= ev.data.metrics[f"{who}/calibration/ece"] <= 1
        assert f"{who}/robustness/relative_drop/gaussian_noise" in ev.data.metrics
        assert f"{who}/subgroup/accuracy_gap" in ev.data.metrics
    assert "teacher_calibration_reliability.png" in {a.path for a in client.list_artifacts(ev.info.run_id)}
    distill = names["distill"]
    assert {"student_top1", "agreement", "kl", "student_params", "teacher_gflops"} <= set(distill.data.metrics)
    assert "loss_curves.png" in {a.path for a in client.list_artifacts(distill.info.run_id)}
    for child in children:
        assert child.data.tags["prefect.flow_run_id"] == parent.data.tags["prefect.flow_run_id"]
        assert child.info.status == "FINISHED"
    # the report's stage table shows each stage's headline_keys "when logged": a key no stage run logs
    # (a renamed metric, a typo) would silently drop out of it
    from vitdistill.stages import STAGES
    local = load_config(ROOT / "configs/runlocal.yaml")
    for name, run in names.items():
        skipped = {k for k in STAGES.stage(name).headline_keys  # few-shot keys of shots this config skips
                   if (m := re.fullmatch(r"fewshot_(\d+)shot_top1", k)) and int(m[1]) not in local.probe.fewshot_shots}
        wanted = set(STAGES.stage(name).headline_keys) - skipped
        missing = wanted - set(run.data.metrics)
        assert not missing, f"stage {name}: headline keys not logged: {sorted(missing)}"
    ext = names["extract"]
    assert ext.data.metrics["samples"] == 200 and ext.data.params["teacher"] == "test_vit"
    assert "manifest.json" in [a.path for a in client.list_artifacts(ext.info.run_id)]
    probe = names["probe"]
    assert 0.0 <= probe.data.metrics["linear_top1"] <= 1.0 and "knn10_top1" in probe.data.metrics
    assert {"confusion.png", "per_class.json", "linear_sweep.json"} <= {a.path for a in client.list_artifacts(probe.info.run_id)}

    lit = names["lit"]
    assert lit.data.metrics["zeroshot_top1"] > lit.data.metrics["chance_top1"]
    curve = client.get_metric_history(lit.info.run_id, "train_loss")
    epochs = local.lit.epochs
    assert sorted(m.step for m in curve) == list(range(epochs))  # the loss curve: one point per epoch, from 0
    assert "lit_loss.png" in {a.path for a in client.list_artifacts(lit.info.run_id)}
    stamps = [m.timestamp for m in sorted(curve, key=lambda m: m.step)]
    assert stamps == sorted(stamps) and stamps[-1] > stamps[0]  # logged live, epoch by epoch
    # lineage: every stage run names the data set and the feature cache by content digest
    kinds = {n: {next(t.value for t in d.tags if t.key == "vitdistill.kind") for d in c.inputs.dataset_inputs}
             for n, c in names.items()}
    assert all(k >= {"dataset", "feature_cache"} for k in kinds.values()), kinds
    digests = {n: {d.dataset.digest for d in c.inputs.dataset_inputs} for n, c in names.items()}
    assert digests["extract"] == digests["probe"] == digests["lit"] == digests["evaluate"]
    student_uri = next(s for s in result["stages"] if s["stage"] == "distill")["paths"]["student"]
    assert ev.data.params["student_uri"] == student_uri and client.get_run(ev.info.run_id).inputs.model_inputs
    lit_stage = next(s for s in result["stages"] if s["stage"] == "lit")
    assert lit_stage["paths"]["text_tower"].startswith("models:/")

    # the run's HTML report, written at the end of the pipeline and logged on the parent run
    report = result["report"]
    assert report["run_id"] == parent.info.run_id and Path(report["html_path"]).is_file()
    assert Path(report["html_path"]).resolve().parent == (tmp_path / "reports" / parent.info.run_id).resolve()
    assert "report/report.html" in {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report: " in r.stdout and report["verdict"]
    # ... and again on demand, from a stage's run id; a wrong id is one line
    r3 = cli(["report", ev.info.run_id, "-c", str(ROOT / "configs/runlocal.yaml")], cli_env, tmp_path)
    assert r3.returncode == 0, r3.stderr[-3000:]
    assert f"report of vitdistill-pipeline ({parent.info.run_id})" in r3.stdout and "clean top-1 accuracy" in r3.stdout
    r4 = cli(["report", "0123abc"], cli_env, tmp_path)
    assert r4.returncode == 2 and r4.stderr.strip().count("\n") == 0 and "MLflow run '0123abc' not found" in r4.stderr

    # a stage alone reuses the finished cache
    r2 = cli(["extract", "-c", str(ROOT / "configs/runlocal.yaml"), "--json", str(out)], cli_env, tmp_path)
    assert r2.returncode == 0, r2.stderr[-3000:]
    again = json.loads(out.read_text())["stages"][0]
    assert again["metrics"]["shards_reused"] == again["metrics"]["shards"] and "reused" in again["headline"]


@pytest.mark.slow
def test_a_failed_stage_is_in_the_summary_and_the_exit_code(cli_env, tmp_path):
    out = tmp_path / "result.json"
    r = cli(["run", "-c", str(ROOT / "configs/runlocal.yaml"), "--set", "student.name=no_such_student",
             "--json", str(out)], cli_env, tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]  # bad input
    result = json.loads(out.read_text())
    assert {s["stage"]: s["status"] for s in result["stages"]} == {
        "extract": "ok", "probe": "ok", "lit": "ok", "distill": "failed", "evaluate": "skipped"}
    assert result["failed"] == ["distill"] and result["skipped"] == {"evaluate": "distill"}
    assert "vitdistill pipeline" in r.stdout and "skipped" in r.stdout  # the summary table
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith(("error:", "skipped:"))]
    assert len(lines) == 2 and "no_such_student" in lines[0] and "(stage distill)" in lines[0]
    assert lines[1] == "skipped: evaluate (it needs distill, which failed)"
    assert "Traceback" not in r.stdout + r.stderr


# a command run as `python -m vitdistill_cli.main`, printing at exit which heavy modules it imported
_WITH_MODULES = """
import atexit, runpy, sys
heavy = ("torch", "timm", "prefect.server.api.server")  # (MLflow imports fastapi itself)
atexit.register(lambda: print("MODULES", sorted(m for m in heavy if m in sys.modules)))
sys.argv = ["vitdistill", *sys.argv[1:]]
runpy.run_module("vitdistill_cli.main", run_name="__main__")
"""


@pytest.mark.slow
def test_a_warm_no_op_imports_neither_torch_timm_nor_prefects_server(cli_env, tmp_path):
    """Everything cached: the teacher's identity comes from its memo (no torch, no timm) and the ephemeral
    Prefect API runs in its own process (vitdistill_cli.prefect_api), so this process never imports it."""
    sets = ["--set", "teacher.name=test_vit", "--set", "teacher.pretrained=false", "--set", "data.limit=40"]
    cold = subprocess.run([sys.executable, "-c", _WITH_MODULES, "extract", *sets], env=cli_env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert cold.returncode == 0, cold.stderr[-3000:]
    assert "MODULES ['timm', 'torch']" in cold.stdout  # the cold run builds the teacher
    warm = subprocess.run([sys.executable, "-c", _WITH_MODULES, "extract", *sets], env=cli_env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert warm.returncode == 0, warm.stderr[-3000:]
    assert "(cache reused)" in warm.stdout and "MODULES []" in warm.stdout, warm.stdout[-2000:]


@pytest.mark.slow
def test_the_kept_prefect_api_serves_the_next_command_and_stops_when_idle(cli_env, tmp_path):
    """orchestration.keep_api_s: the ephemeral API outlives its command, the next command uses it (no start-up
    wait), `vitdistill down` stops it, and with keep_api_s=1 it stops itself once no command uses it (not
    during the command that holds its lease, which runs longer than 1 s)."""
    import psutil

    from vitdistill_cli.prefect_api import KEPT_DIR, read_record

    home = tmp_path / "home"
    env = {**cli_env, "PREFECT_HOME": str(home), "VITDISTILL_TIMINGS": str(tmp_path / "t.json")}
    sets = ["--set", "teacher.name=test_vit", "--set", "teacher.pretrained=false", "--set", "data.limit=40"]
    r = cli(["extract", *sets], env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (record_path,) = (home / KEPT_DIR).glob("*.json")
    first = read_record(record_path)
    assert first is not None and first["keep_s"] == 300  # up after its command ended
    r = cli(["extract", *sets], env, tmp_path)
    assert r.returncode == 0 and "(cache reused)" in r.stdout, r.stderr[-3000:]
    assert read_record(record_path)["pid"] == first["pid"]
    assert json.loads((tmp_path / "t.json").read_text())["ephemeral_api_start"] == 0.0  # nothing waited for

    r = cli(["down"], env, tmp_path)
    assert r.returncode == 0 and f"ephemeral Prefect API (pid {first['pid']})" in r.stdout, r.stdout + r.stderr
    assert not psutil.pid_exists(first["pid"]) and not record_path.exists()

    r = cli(["extract", *sets, "--set", "orchestration.keep_api_s=1"], env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    second = json.loads(record_path.read_text()) if record_path.exists() else None
    deadline = time.time() + 60
    while time.time() < deadline and (record_path.exists() or (second and psutil.pid_exists(second["pid"]))):
        time.sleep(0.5)
    assert not record_path.exists(), "the kept API did not stop after keep_api_s=1 s idle"
    assert second is None or not psutil.pid_exists(second["pid"])


@pytest.mark.parametrize("setting", ["PREFECT_SERVER_EPHEMERAL_ENABLED=false", "PREFECT_API_URL=http://127.0.0.1:9/api"])
def test_the_api_process_reports_no_port_when_no_ephemeral_api_is_wanted(cli_env, tmp_path, setting):
    """vitdistill_cli.prefect_api reads Prefect's settings as the command would: with the ephemeral server
    disabled, or an API named, it serves nothing and reports no port (the command then starts none)."""
    key, value = setting.split("=", 1)
    read, write = os.pipe()
    p = subprocess.Popen([sys.executable, "-m", "vitdistill_cli.prefect_api", str(write)], pass_fds=(write,),
                         env={**cli_env, key: value}, cwd=tmp_path)
    os.close(write)
    with os.fdopen(read) as pipe:
        assert json.loads(pipe.readline()) == {"port": None}
    assert p.wait(timeout=60) == 0
