"""Real servers on 127.0.0.1: `vitdistill up` (Prefect server, process worker, MLflow server with
artifacts on a local S3 server), deploy, a deployment run executed by the worker on s3:// input and
cache, MLflow and Prefect checked through their APIs and in headless Chromium, then `vitdistill down`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import cli, free_port, stack_up
from tests.test_extract import write_wds

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,900"]
# how long (virtual ms) Chromium lets a page's scripts and requests run before it dumps the DOM; a page whose
# charts are still loading (a slow CI machine) is dumped again with the next, longer budget
VIRTUAL_TIME_BUDGETS_MS = (15_000, 40_000, 90_000)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, s3_server):
    """`vitdistill up` with MLflow artifacts on the local S3 server; `vitdistill down` afterwards."""
    import fsspec
    import s3fs

    work = tmp_path_factory.mktemp("stack")
    secret = f"vd-secret-{os.urandom(6).hex()}"  # moto accepts any key; a distinctive one is searchable
    creds = {"AWS_ACCESS_KEY_ID": "vd-key-id", "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
             "AWS_ENDPOINT_URL": s3_server, "MLFLOW_S3_ENDPOINT_URL": s3_server}
    saved = {k: os.environ.get(k) for k in (*creds, "PREFECT_API_URL")}
    os.environ.update(creds)  # this process reads the bucket too (restored at teardown)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = fsspec.filesystem("s3")
    bucket = f"stack-{os.urandom(3).hex()}"
    fs.mkdir(bucket)
    local = work / "in.tar"
    write_wds(local, 60, classes=3)
    fs.put_file(str(local), f"{bucket}/in/train-000.tar")

    env = {**os.environ, **creds, "PREFECT_HOME": str(work / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "TQDM_DISABLE": "1", "COLUMNS": "200"}
    for var in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        env.pop(var, None)
    info, sets = stack_up(work, env, f"s3://{bucket}/mlartifacts")
    client_env = {**env, "PREFECT_API_URL": info["prefect_api_url"], "MLFLOW_TRACKING_URI": info["mlflow_url"]}
    try:
        yield {"env": client_env, "work": work, "info": info, "bucket": bucket, "fs": fs, "sets": sets, "secret": secret}
    finally:
        down = cli(["down", *sets], env, work, timeout=120)
        assert down.returncode == 0, down.stderr
        assert "prefect-server" in down.stdout and "mlflow-server" in down.stdout and "prefect-worker" in down.stdout
        for p in info["processes"]:
            with pytest.raises(ProcessLookupError):
                os.kill(p["pid"], 0)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()


def _listening(pgids: set[int]) -> set[tuple[str, int]]:
    """``(ip, port)`` of every TCP socket in LISTEN state held by a process of these process groups."""
    import psutil

    pids = set()
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) in pgids:
                pids.add(proc.pid)
        except (ProcessLookupError, PermissionError):
            pass
    return {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.pid in pids}


def test_servers_bind_to_loopback(stack):
    """The sockets the running servers actually listen on, not the URLs they were told to use."""
    info = stack["info"]
    servers = {p["name"]: p["pgid"] for p in info["processes"] if p["name"] in ("prefect-server", "mlflow-server")}
    assert set(servers) == {"prefect-server", "mlflow-server"}
    for name, pgid in servers.items():
        bound = _listening({pgid})
        port = int(info["prefect_url" if name == "prefect-server" else "mlflow_url"].rsplit(":", 1)[1])
        assert ("127.0.0.1", port) in bound, (name, bound)
        assert all(ip in ("127.0.0.1", "::1") for ip, _ in bound), (name, bound)  # nothing on 0.0.0.0 or a NIC


def test_deploy_submit_worker_mlflow_prefect_and_browser(stack):
    env, work, bucket, fs = stack["env"], stack["work"], stack["bucket"], stack["fs"]
    run_sets = ["--set", "data.source=wds", "--set", f"data.path=s3://{bucket}/in/train-000.tar",
                "--set", f"cache.root=s3://{bucket}/cache", "--set", "probe.fewshot_shots=[1,5]",
                "--set", "probe.fewshot_seeds=[0]", "--set", "probe.knn_k=[5]"]
    r = cli(["deploy", "-c", str(ROOT / "configs/runlocal.yaml"), "--json", str(work / "deploy.json")], env, work)
    assert r.returncode == 0, r.stderr
    deployed = {d["deployment"] for d in json.loads((work / "deploy.json").read_text())}
    assert deployed == {"vitdistill-pipeline/pipeline", "vitdistill-extract/extract", "vitdistill-probe/probe",
                        "vitdistill-lit/lit", "vitdistill-distill/distill", "vitdistill-evaluate/evaluate",
                        "vitdistill-report/report"}

    r = cli(["submit", "probe", "-c", str(ROOT / "configs/runlocal.yaml"), *run_sets, "--wait", "--timeout", "240",
             "--json", str(work / "submit.json")], env, work)
    assert r.returncode == 0, r.stdout + r.stderr
    sub = json.loads((work / "submit.json").read_text())
    assert sub["state"] == "COMPLETED"

    # MLflow (through the server): parent + children, tagged with the flow run and the deployment
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=stack["info"]["mlflow_url"], registry_uri=stack["info"]["mlflow_url"])
    exp = client.get_experiment_by_name("vitdistill")
    runs = client.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{sub['flow_run_id']}'")
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {"vitdistill-probe", "extract", "probe"}
    assert all(r.data.tags["prefect.deployment"] == "probe" for r in runs)
    assert by_name["extract"].data.metrics["samples"] == 60
    assert by_name["extract"].data.params["cache_dir"].startswith(f"s3://{bucket}/cache/features/")
    # artifacts went through the server to S3
    assert {"confusion.png", "per_class.json"} <= {a.path for a in client.list_artifacts(by_name["probe"].info.run_id)}
    assert any(p.endswith("confusion.png") for p in fs.find(f"{bucket}/mlartifacts"))
    assert fs.exists(f"{bucket}/cache") and fs.find(f"{bucket}/cache", withdirs=False)

    # credentials reach S3 through the environment and are never logged
    for run in runs:
        logged = json.dumps([run.data.params, run.data.tags])
        assert stack["secret"] not in logged and "vd-key-id" not in logged
    config_yaml = client.download_artifacts(by_name["vitdistill-probe"].info.run_id, "config.yaml", str(work))
    assert stack["secret"] not in Path(config_yaml).read_text()

    # Prefect artifacts of that flow run
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # explicit, so a Prefect test harness elsewhere in the session cannot redirect the client
    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as pc:
        arts = pc.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[sub["flow_run_id"]])))
    kinds = {(a.key, a.type) for a in arts}
    assert {("probe-per-class", "table"), ("extract-shards", "table"), ("vitdistill-summary", "markdown")} <= kinds
    link = next(a for a in arts if a.key == "mlflow-run")  # Prefect 3.8 stores link artifacts as markdown links
    assert f"({stack['info']['mlflow_url']}/#/experiments/" in str(link.data)

    # the worker's flow-run process: one task run per stage, probe waiting on extract, and the library's
    # log lines under their task runs (the deployment's env names the library logger)
    import time

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterTaskRunId

    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as pc:
        task_runs = {t.name: t for t in pc.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[sub["flow_run_id"]])))}
        assert [i.id for i in task_runs["probe"].task_inputs["wait_for"]] == [task_runs["extract"].id]
        for _ in range(20):
            logs = pc.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[t.id for t in task_runs.values()])))
            if any(rec.name == "vitdistill.extract" for rec in logs):
                break
            time.sleep(1)
    finalize = next(t.id for n, t in task_runs.items() if n.startswith("finalize-cache"))
    assert any(rec.name == "vitdistill.extract" and "feature cache" in rec.message and rec.task_run_id == finalize
               for rec in logs)

    # the UIs, rendered in headless Chromium
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium); UI check not run")
    _screenshots(work, {
        "mlflow-run": (f"{stack['info']['mlflow_url']}/#/experiments/{exp.experiment_id}/runs/{by_name['extract'].info.run_id}",
                       ["extract", "images_per_s", "samples"]),
        "prefect-flow-run": (f"{stack['info']['prefect_url']}/runs/flow-run/{sub['flow_run_id']}",
                             [sub["flow_run_name"], "vitdistill-probe", "Completed"]),
    })


def _screenshots(work: Path, pages: dict[str, tuple[str, list[str]]]) -> dict[str, str]:
    """Each page rendered in headless Chromium: its DOM must show every expected text, and its screenshot
    (kept in $VITDISTILL_SCREENSHOTS, else under ``work``) must not be blank. Returns the DOMs."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium); UI check not run")
    shots = Path(os.environ.get("VITDISTILL_SCREENSHOTS", work / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    doms = {}
    for name, (url, expected) in pages.items():
        profile = ["--user-data-dir=" + str(work / f"chromium-{name}")]
        for budget in VIRTUAL_TIME_BUDGETS_MS:
            flags = [*CHROMIUM_FLAGS, *profile, f"--virtual-time-budget={budget}"]
            dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True,
                                 timeout=60 + 2 * budget // 1000).stdout
            missing = [text for text in expected if text not in dom]
            if not missing:
                break
        (shots / f"{name}.html").write_text(dom)  # what was rendered, kept beside the screenshot
        assert not missing, f"{name}: {missing} not rendered within {budget} ms of virtual time"
        subprocess.run([CHROMIUM, *flags, f"--screenshot={shots / (name + '.png')}", url],
                       capture_output=True, timeout=60 + 2 * budget // 1000)
        assert (shots / f"{name}.png").stat().st_size > 10_000
        doms[name] = dom
    return doms


def graph_nodes(png: Path) -> list[tuple[int, int, int, int]]:
    """The task-run nodes of a Prefect flow-run graph in a screenshot: the graph is a canvas (no DOM to
    read), on which each Completed run is a bar of the Completed state's green, 32 px high at this window
    size. Returns (top, bottom, left, right) of each such bar, found as the connected regions of that
    green (the state badge above the graph is shorter, the timeline under it thinner, so neither counts)."""
    import numpy as np
    from PIL import Image
    from skimage.measure import label, regionprops

    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    green = (g > r + 60) & (g > b + 40) & (g > 120)
    boxes = [(top, bottom, left, right) for top, left, bottom, right in
             (region.bbox for region in regionprops(label(green, connectivity=1)))]
    return sorted(box for box in boxes if 24 <= box[1] - box[0] <= 40 and box[3] - box[2] >= 8)


def test_evaluate_then_the_report_deployment_through_the_servers(stack):
    """The evaluate stage against the servers writes its report; the `report` deployment, run by the
    worker, writes it again to S3 and logs it on the parent run (artifacts on S3 via the MLflow server)."""
    env, work, bucket, fs = stack["env"], stack["work"], stack["bucket"], stack["fs"]
    runlocal = str(ROOT / "configs/runlocal.yaml")
    data = ["--set", "data.source=wds", "--set", f"data.path=s3://{bucket}/in/train-000.tar",
            "--set", f"cache.root=s3://{bucket}/cache", "--set", "evaluate.severities=[1,3]"]
    r = cli(["evaluate", "-c", runlocal, *data, "--set", "distill.register_as=vitdistill-student",
             "--set", "tracking.log_every_n_steps=1",
             "--json", str(work / "evaluate.json")], env, work, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    evaluated = json.loads((work / "evaluate.json").read_text())
    parent = evaluated["mlflow_run_id"]
    assert evaluated["report"]["run_id"] == parent and Path(evaluated["report"]["html_path"]).is_file()

    r = cli(["deploy", "-c", runlocal], env, work)
    assert r.returncode == 0, r.stderr
    r = cli(["submit", "report", "-c", runlocal, *data, "--set", f"report.out_dir=s3://{bucket}/reports", "--wait",
             "--timeout", "240", "--json", str(work / "submit-report.json")], env, work)
    assert r.returncode == 0, r.stdout + r.stderr
    sub = json.loads((work / "submit-report.json").read_text())
    assert sub["state"] == "COMPLETED"
    page = fs.cat_file(f"{bucket}/reports/{parent}/report.html").decode()
    assert "Teacher vs student" in page and parent in page and "data:image/png;base64," in page

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=stack["info"]["mlflow_url"], registry_uri=stack["info"]["mlflow_url"])
    assert {"report/report.html", "report/report.json"} <= {a.path for a in client.list_artifacts(parent, "report")}
    assert any(p.endswith("report/report.html") for p in fs.find(f"{bucket}/mlartifacts"))

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as pc:
        arts = pc.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[sub["flow_run_id"]])))
    by_key = {a.key: a for a in arts}
    assert by_key["vitdistill-report"].type == "markdown" and "| metric | teacher | student |" in str(by_key["vitdistill-report"].data)
    exp = client.get_run(parent).info.experiment_id
    link = f"{stack['info']['mlflow_url']}/#/experiments/{exp}/runs/{parent}/artifacts/report/report.html"
    assert link in str(by_key["vitdistill-report-link"].data)

    # what a person sees in the UIs: the Prefect flow run of `vitdistill evaluate` with its stage graph
    # (extract -> probe, distill -> evaluate), and the distill run in MLflow with its inputs (the dataset and
    # the caches it read), its live curves, and the registered student with its aliases
    flow_run_id = client.get_run(parent).data.tags["prefect.flow_run_id"]
    distill = next(s for s in evaluated["stages"] if s["stage"] == "distill")["run_id"]
    distill_run = client.get_run(distill)
    inputs = [d.dataset.name for d in distill_run.inputs.dataset_inputs]
    assert len(inputs) >= 2
    version = client.get_model_version_by_alias("vitdistill-student", "champion")
    assert version.run_id == distill and "candidate" in version.aliases
    mlflow_url, prefect_url = stack["info"]["mlflow_url"], stack["info"]["prefect_url"]
    doms = _screenshots(work, {
        "prefect-flow-run-graph": (f"{prefect_url}/runs/flow-run/{flow_run_id}",
                                   ["vitdistill-evaluate", "Completed"]),
        "mlflow-distill-run": (f"{mlflow_url}/#/experiments/{exp}/runs/{distill}",
                               ["distill", inputs[0], "vitdistill-student"]),
        "mlflow-distill-curves": (f"{mlflow_url}/#/experiments/{exp}/runs/{distill}/model-metrics",
                                  ["kd_loss", "step/loss"]),
        "mlflow-model-aliases": (f"{mlflow_url}/#/models/vitdistill-student",
                                 ["vitdistill-student", "champion", "candidate"]),
    })
    assert "Version 1" in doms["mlflow-model-aliases"] or "version 1" in doms["mlflow-model-aliases"].lower()
    # the graph itself is drawn on a canvas: its nodes are read from the screenshot. The flow's top-level
    # task runs (the four stages, opening and closing the MLflow runs, the report, the summary), laid out
    # over time in several lanes: a graph, not one row
    nodes = graph_nodes(Path(os.environ.get("VITDISTILL_SCREENSHOTS", work / "screenshots")) / "prefect-flow-run-graph.png")
    assert len(nodes) >= 6, nodes
    assert len({top for top, *_ in nodes}) >= 3 and len({left for *_, left, _ in nodes}) >= 4, nodes


def test_unreachable_servers_and_missing_deployments_are_one_line(stack):
    env, work = stack["env"], stack["work"]
    dead = f"http://127.0.0.1:{free_port()}"
    r = cli(["deploy"], {**env, "PREFECT_API_URL": dead + "/api"}, work)
    assert r.returncode == 2 and "cannot reach the Prefect API" in r.stderr and "vitdistill up" in r.stderr
    r = cli(["deploy"], {k: v for k, v in env.items() if k != "PREFECT_API_URL"}, work)
    assert r.returncode == 2 and "PREFECT_API_URL is not set" in r.stderr
    r = cli(["extract", "-c", str(ROOT / "configs/runlocal.yaml"), "--set", f"cache.root={work}/c2"],
            {**env, "MLFLOW_TRACKING_URI": dead}, work)
    assert r.returncode == 2 and "cannot reach the MLflow tracking server" in r.stderr
    for out in (r.stderr,):
        assert "Traceback" not in out and len(out.strip().splitlines()) == 1
    r = cli(["submit", "nope"], env, work)
    assert r.returncode == 2 and "no deployment for stage 'nope'" in r.stderr
