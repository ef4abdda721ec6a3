"""Faults around the pipeline (issue #17, faults 1-4): the MLflow server, the Prefect server or the S3
server dies mid-run, or the disk fills up. Each ends in one line naming what failed, keeps what was
computed (nothing half-written is visible), and a re-run after recovery resumes instead of redoing.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import psutil
import pytest

from tests.conftest import cli, free_port, stack_up

ROOT = Path(__file__).resolve().parents[1]
RUNLOCAL = str(ROOT / "configs/runlocal.yaml")


def base_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "TQDM_DISABLE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONPATH": str(ROOT),
           "COLUMNS": "300", **extra}
    for var in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        if var not in extra:
            env.pop(var, None)
    return env


def error_line(stderr: str) -> str:
    """The command's error: its one ``error:`` line (asserted single), with no traceback anywhere."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def stage(result: dict, name: str) -> dict:
    return next(s for s in result["stages"] if s["stage"] == name)


# --------------------------------------------------------------------------- 3. S3 dies or errors


class FaultProxy:
    """An HTTP proxy between the S3 client and the moto server that can die mid-upload and then
    answer 503 (the server down or overloaded) until ``restore()``; it counts the requests it sees."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.split("://", 1)[1]
        self.trigger: str | None = None  # a PUT whose path contains this cuts the upload; then 503s
        self.down = False
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status; 0 = connection cut)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", ""):
                    out = b""
                    while (n := int(self.rfile.readline().split(b";")[0], 16)):
                        out += self.rfile.read(n)
                        self.rfile.readline()
                    self.rfile.readline()
                    return out
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                if proxy.trigger and self.command == "PUT" and proxy.trigger in self.path:
                    proxy.trigger, proxy.down = None, True
                    self.rfile.read(int(self.headers.get("Content-Length") or 0) // 2)  # half the upload...
                    proxy.requests.append((self.command, self.path, 0))
                    self.close_connection = True  # ...then the server is gone
                    self.connection.shutdown(2)
                    return
                body = self._body()
                if proxy.down:
                    proxy.requests.append((self.command, self.path, 503))
                    msg = b"<Error><Code>ServiceUnavailable</Code><Message>S3 is down (test)</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(msg)
                    return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "connection")}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
                proxy.requests.append((self.command, self.path, r.status))
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(k, v)
                self.send_header("Content-Length", r.getheader("Content-Length", "0") if self.command == "HEAD"
                                 else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def restore(self) -> None:
        self.down = False

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def s3_proxy(s3_server):
    proxy = FaultProxy(s3_server)
    yield proxy
    proxy.close()


def _s3_env(endpoint: str) -> dict[str, str]:
    # botocore's retries bounded (a user sets the same two variables); Prefect's task retries still apply
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint, "AWS_MAX_ATTEMPTS": "2", "AWS_RETRY_MODE": "standard"}


@pytest.mark.integration
@pytest.mark.slow
def test_s3_dying_mid_extraction_publishes_no_partial_shard_and_a_rerun_resumes(tmp_path, s3_env, s3_proxy):
    s3, bucket = s3_env
    env = base_env(**_s3_env(s3_proxy.url))
    args = ["extract", "-c", RUNLOCAL, "--set", f"cache.root=s3://{bucket}/cache",
            "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    s3_proxy.trigger = "/feat-00001-000.tar"  # shard 0 is published, shard 1's upload is cut halfway
    r = cli([*args, "--json", str(tmp_path / "never.json")], env, tmp_path)
    assert r.returncode != 0
    line = error_line(r.stderr)
    assert f"error: s3://{bucket}/cache/" in line and ": the object store failed (" in line, line
    assert "is the S3 server up?" in line, line
    cut = [req for req in s3_proxy.requests if req[2] == 0]
    retried = [req for req in s3_proxy.requests if req[2] == 503]
    assert len(cut) == 1 and len(retried) >= 3, s3_proxy.requests[-20:]  # botocore's and Prefect's retries

    objects = [p for p in s3.find(f"{bucket}/cache") if "/features/" in p]
    names = {p.rsplit("/", 1)[-1] for p in objects}
    assert "feat-00000-000.tar" in names and "00000.json" in names
    assert not [n for n in names if n.startswith("feat-00001") or n.startswith(".tmp-") or n == "00001.json"], names
    published = {p.rsplit("/", 1)[-1]: s3.size(p) for p in objects if p.endswith(".tar")}

    s3_proxy.restore()
    n_before = len(s3_proxy.requests)
    r = cli([*args, "--json", str(tmp_path / "r.json")], env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    m = stage(json.loads((tmp_path / "r.json").read_text()), "extract")["metrics"]
    assert m["shards_reused"] == 1 and m["shards"] == 4 and m["samples"] == 200  # only the missing shards rebuilt
    assert not [p for method, p, _ in s3_proxy.requests[n_before:] if method == "PUT" and "/feat-00000" in p]
    cache_dir = stage(json.loads((tmp_path / "r.json").read_text()), "extract")["paths"]["cache_dir"]
    s3.invalidate_cache()
    manifest = json.loads(s3.cat_file(f"{cache_dir}/manifest.json"))
    for part in manifest["shards"]:  # what the failed run published is whole: the same bytes as the manifest's
        if part["name"] in published:
            assert published[part["name"]] == part["bytes"]
    assert not [p for p in s3.find(f"{bucket}/cache") if p.endswith(".lock")]  # the failed run's lock was taken over


@pytest.mark.integration
def test_a_missing_bucket_fails_at_once_without_retries(tmp_path, s3_env, s3_proxy):
    env = base_env(**_s3_env(s3_proxy.url))
    missing = f"vd-missing-{os.urandom(3).hex()}"
    r = cli(["extract", "-c", RUNLOCAL, "--set", f"cache.root=s3://{missing}/cache",
             "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"], env, tmp_path)
    assert r.returncode == 2
    line = error_line(r.stderr)
    assert f"s3://{missing}/cache/" in line and "bucket does not exist" in line, line
    puts = [p for m, p, _ in s3_proxy.requests if m == "PUT"]
    assert len(puts) == 1, puts  # one PUT, answered 404 NoSuchBucket: never retried, by botocore or Prefect


def test_retries_are_for_transient_errors_only(prefect_harness):
    """Through a real Prefect task with the project's retry policy: transient failures are retried,
    permanent ones fail at the first attempt."""
    import errno

    from prefect import flow, task

    from tasks._common import retry_on_io_only
    from vitdistill.errors import DataError, DiskFullError, StorageError

    cases = [
        (StorageError("s3://b/x: the object store failed (503)", transient=True), 3),
        (ConnectionResetError("reset by peer"), 3),
        (OSError(errno.EIO, "I/O error"), 3),
        (StorageError("s3://b/x: The specified bucket does not exist", transient=False), 1),
        (FileNotFoundError("s3://b/x"), 1),
        (PermissionError("Access Denied"), 1),
        (DiskFullError("/c/x.tar"), 1),
        (OSError(errno.ENOSPC, "No space left on device"), 1),
        (DataError("a.tar: truncated"), 1),
        (ValueError("a bug"), 1),
    ]
    for exc, expected in cases:
        attempts = []

        @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_on_io_only)
        def fails() -> None:
            attempts.append(1)
            raise exc

        @flow
        def run() -> str:
            try:
                fails()
            except type(exc):
                return "failed"
            return "passed"

        assert run() == "failed"
        assert len(attempts) == expected, (exc, len(attempts))


def test_s3_errors_are_classified_transient_or_permanent(s3_env, monkeypatch):
    """The object store's own answers: a missing bucket is permanent, a refused connection transient."""
    import s3fs

    from vitdistill.cache import fs
    from vitdistill.errors import StorageError

    with pytest.raises(StorageError) as e:
        fs.write_bytes_atomic(f"s3://vd-nope-{os.urandom(3).hex()}/x.bin", b"x")
    assert not e.value.transient and "bucket does not exist" in str(e.value)
    _, bucket = s3_env
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(StorageError) as e:
        fs.write_bytes_atomic(f"s3://{bucket}/x.bin", b"x")
    assert e.value.transient and "is the S3 server up?" in str(e.value) and len(str(e.value).splitlines()) == 1


# --------------------------------------------------------------------------- 4. the disk fills up


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs at tmp_path/disk (the extraction needs about 1.7 MB); unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a small filesystem for the full-disk test")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _leftover_temp(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".tmp-")]


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_a_rerun_after_freeing_space_completes(tmp_path, small_disk):
    from vitdistill.cache import fs

    env = base_env()
    root = small_disk / "cache"
    args = ["extract", "-c", RUNLOCAL, "--set", f"cache.root={root}", "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    r = cli(args, env, tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    line = error_line(r.stderr)
    assert "no space left on device writing " in line and f"under cache.root={root};" in line, line
    assert not _leftover_temp(small_disk)  # nothing half-written is left, and no temp file
    feats = next((root / "features").iterdir())
    assert not (feats / "manifest.json").exists()
    records = sorted((feats / "records").glob("*.json"))
    assert records  # at least one shard finished before the disk filled
    for rec in records:  # what was published is valid: every part matches its record
        for part in json.loads(rec.read_text())["parts"]:
            assert fs.sha256_file(str(feats / part["name"])) == part["sha256"]

    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)  # space freed
    r = cli([*args, "--json", str(tmp_path / "r.json")], env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    m = stage(json.loads((tmp_path / "r.json").read_text()), "extract")["metrics"]
    assert m["shards_reused"] == len(records) and m["samples"] == 200
    assert not _leftover_temp(small_disk)


def test_a_full_disk_while_writing_a_checkpoint_leaves_the_last_one_valid(tmp_path, small_disk):
    """The trainer's checkpoint write on a full disk: DiskFullError, no temp file, latest.json intact."""
    import torch

    from vitdistill.errors import DiskFullError
    from vitdistill.trainer import Trainer, TrainerConfig, latest_checkpoint

    class Data:
        def __len__(self) -> int:
            return 2

    ckpt = small_disk / "ckpt"
    model = torch.nn.Linear(8, 8)
    trainer = Trainer(model, None, Data(), TrainerConfig(epochs=1, lr=1e-3, checkpoint_dir=str(ckpt)))
    trainer.step = 1
    assert trainer.save_checkpoint()
    first = latest_checkpoint(str(ckpt))
    filler = small_disk / "filler"
    with open(filler, "wb") as f:  # fill the disk to the last byte
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    trainer.step = 2
    with pytest.raises(DiskFullError, match=r"no space left on device writing .*step-00000002\.pt"):
        trainer.save_checkpoint()
    assert latest_checkpoint(str(ckpt)) == first and not _leftover_temp(small_disk)
    filler.unlink()
    assert trainer.save_checkpoint().endswith("step-00000002.pt")


# --------------------------------------------------------------------------- 1. the MLflow server dies


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    from vitdistill.tracking import http_probe

    deadline = time.time() + timeout
    while http_probe(url, 2) is not None:
        assert proc.poll() is None and time.time() < deadline, f"{url} did not come up"
        time.sleep(0.5)


def _mlflow_server(work: Path, port: int) -> subprocess.Popen:
    """A real ``mlflow server`` on 127.0.0.1 (as ``vitdistill up`` starts it), in its own process group."""
    mlflow = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen([str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{work}/mlflow-server.db",
                             "--artifacts-destination", str(work / "mlartifacts")],
                            stdout=open(work / "mlflow-server.log", "ab"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, env=base_env())
    _wait_http(f"http://127.0.0.1:{port}/health", proc)
    return proc


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _files(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*.tar")}


@pytest.mark.integration
@pytest.mark.slow
def test_mlflow_server_dying_mid_distillation_is_one_line_and_a_rerun_resumes(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    root = tmp_path / "cache"
    env = base_env(MLFLOW_TRACKING_URI=url)
    args = ["distill", "-c", RUNLOCAL, "--set", f"cache.root={root}", "--set", "distill.epochs=3",
            "--set", "distill.checkpoint_every=1", "--set", "distill.data_efficiency=[]"]
    server = _mlflow_server(tmp_path, port)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "vitdistill_cli.main", *args], env=env, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.time() + 300
        while not list(root.glob("distill/*/checkpoints/latest.json")):  # the first checkpoint is written
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        _kill_group(server)  # the tracking server dies mid-training
        t0 = time.time()
        _, stderr = proc.communicate(timeout=180)
        seconds = time.time() - t0
    finally:
        _kill_group(server)
    assert proc.returncode == 2, stderr[-3000:]
    line = error_line(stderr)
    assert line.startswith(f"error: lost the MLflow tracking server at {url} during distill ("), line
    assert "re-run the same command to resume" in line, line
    assert seconds < 120, seconds  # bounded MLflow client retries, not minutes of them

    import torch

    from vitdistill.trainer import latest_checkpoint

    ckpt_dir = next(root.glob("distill/*/checkpoints"))
    with open(latest_checkpoint(str(ckpt_dir)), "rb") as f:  # what was written stays valid
        assert torch.load(f, weights_only=True)["step"] > 0
    assert not _leftover_temp(root)
    before = _files(root / "features") | _files(root / "views")
    assert any(Path(k).name.startswith("feat-") for k in _files(root / "features")) and _files(root / "views")

    server = _mlflow_server(tmp_path, port)  # back, on the same backend store
    try:
        r = cli([*args, "--json", str(tmp_path / "r.json")], env, tmp_path)
    finally:
        _kill_group(server)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "r.json").read_text())
    extract, distill = stage(result, "extract")["metrics"], stage(result, "distill")["metrics"]
    assert extract["shards_reused"] == extract["shards"]  # extraction reused
    assert _files(root / "features") | _files(root / "views") == before  # no shard or view rebuilt
    assert distill["resumed_from_step"] > 0  # training resumed from its checkpoint


# --------------------------------------------------------------------------- 2. the Prefect server dies


def _prefect(env: dict, fn):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as c:
        return fn(c)


def _until(what: str, check, timeout: float, poll: float = 1.0):
    deadline = time.time() + timeout
    while True:
        try:
            value = check()
        except Exception:  # the API is still coming up
            value = None
        if value:
            return value
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


@pytest.mark.integration
@pytest.mark.slow
def test_prefect_server_dying_mid_flow_run_crashes_it_and_a_resubmission_completes(tmp_path):
    work = tmp_path
    env = base_env(PREFECT_HOME=str(work / "prefect-home"))
    info, sets = stack_up(work, env, f"{work}/mlartifacts")
    pids = {p["name"]: p for p in info["processes"]}
    client_env = {**env, "PREFECT_API_URL": info["prefect_api_url"], "MLFLOW_TRACKING_URI": info["mlflow_url"]}
    run_sets = ["-c", RUNLOCAL, "--set", f"cache.root={work}/cache", "--set", "distill.epochs=8",
                "--set", "distill.checkpoint_every=1", "--set", "distill.data_efficiency=[]"]
    restarted = None
    try:
        assert cli(["deploy", "-c", RUNLOCAL], client_env, work).returncode == 0
        r = cli(["submit", "distill", *run_sets, "--json", str(work / "first.json")], client_env, work)
        assert r.returncode == 0, r.stderr
        first = json.loads((work / "first.json").read_text())["flow_run_id"]
        _until("the first checkpoint", lambda: list((work / "cache").glob("distill/*/checkpoints/latest.json")), 400,
               poll=0.2)
        worker = psutil.Process(pids["prefect-worker"]["pid"])
        flow_procs = [p for p in worker.children(recursive=True) if "prefect.engine" in " ".join(p.cmdline())]
        assert len(flow_procs) == 1
        tree = [flow_procs[0], *flow_procs[0].children(recursive=True)]
        os.killpg(pids["prefect-server"]["pgid"], signal.SIGKILL)  # the Prefect server dies mid-run

        gone, alive = psutil.wait_procs(tree, timeout=180)  # the worker kills its runs once the API is gone
        assert not alive, f"the flow run's processes outlived the Prefect server by 180 s: {alive}"
        assert worker.is_running()  # the worker itself stays, and reconnects below

        restarted = subprocess.Popen(  # the server back, on the same database (PREFECT_HOME)
            [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
             "--port", str(urlparse(info["prefect_url"]).port)], env=env, stdout=open(work / "prefect-again.log", "ab"),
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        _wait_http(f"{info['prefect_api_url']}/health", restarted)
        state = _until("the first run's final state", lambda: (s := _prefect(client_env, lambda c: c.read_flow_run(
            first).state.type.value)) in ("CRASHED", "FAILED") and s, 120)
        assert state in ("CRASHED", "FAILED")
        _until("the worker back online", lambda: any(w.status.value == "ONLINE" for w in _prefect(
            client_env, lambda c: c.read_workers_for_work_pool(info["work_pool"]))), 180)

        r = cli(["submit", "distill", *run_sets, "--wait", "--timeout", "400", "--json", str(work / "again.json")],
                client_env, work, timeout=450)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        again = json.loads((work / "again.json").read_text())
        assert again["state"] == "COMPLETED"

        from mlflow.tracking import MlflowClient

        mlflow = MlflowClient(tracking_uri=info["mlflow_url"])
        exp = mlflow.get_experiment_by_name("vitdistill").experiment_id
        runs = {r.info.run_name: r.data.metrics for r in mlflow.search_runs(
            [exp], f"tags.`prefect.flow_run_id` = '{again['flow_run_id']}'")}
        assert runs["extract"]["shards_reused"] == runs["extract"]["shards"]  # the caches reused
        assert runs["distill"]["resumed_from_step"] > 0  # training resumed from the crashed run's checkpoint
    finally:
        if restarted is not None:
            _kill_group(restarted)
        down = cli(["down", *sets], env, work, timeout=120)
        assert down.returncode == 0, down.stderr
    left = [p for p in [*tree, worker] if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    left += [p for p in psutil.process_iter(["cmdline"]) if str(work) in " ".join(p.info["cmdline"] or [])]
    assert not left, left  # nothing of the stack or of its flow runs is left behind
