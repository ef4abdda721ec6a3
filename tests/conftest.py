"""Shared fixtures: tiny fast configs, one Prefect test harness per session, a local S3 server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest

from vitdistill.config import load_config

FAST_TEACHER = ["teacher.name=test_vit", "teacher.pretrained=false", "teacher.batch_size=16"]


@pytest.fixture
def make_cfg(tmp_path):
    """``make_cfg("data.limit=50", ...)``: a config in tmp_path with a tiny random teacher."""

    def make(*sets: str, fast_teacher: bool = True):
        base = [f"cache.root={tmp_path}/cache", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                f"report.out_dir={tmp_path}/reports"]
        return load_config(None, base + (FAST_TEACHER if fast_teacher else []) + list(sets))

    return make


@pytest.fixture(scope="session", autouse=True)
def _stop_kept_prefect_apis(tmp_path_factory):
    """CLI commands keep their ephemeral Prefect API up for the next command (orchestration.keep_api_s): stop
    those this session started (in its temporary PREFECT_HOMEs and the default one) when it ends."""
    import time
    from pathlib import Path

    from vitdistill_cli.prefect_api import KEPT_DIR, prefect_home, stop_kept

    since = time.time() - 1
    yield
    base = tmp_path_factory.getbasetemp()
    for d in {prefect_home() / KEPT_DIR, *Path(base).glob(f"**/{KEPT_DIR}")}:
        stop_kept(d.parent, since=since)


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect API for the whole session (~13 s to start), shared by every flow test."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(args: list[str], env: dict, cwd, timeout: float = 300) -> subprocess.CompletedProcess:
    """``vitdistill ARGS`` as a user runs it: a subprocess, its output captured."""
    return subprocess.run([sys.executable, "-m", "vitdistill_cli.main", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def stack_up(work, env: dict, artifacts: str) -> tuple[dict, list[str]]:
    """``vitdistill up`` on free ports, its state and sqlite backend store under ``work`` and its artifacts in
    ``artifacts`` (a directory or s3://); returns ``up``'s JSON and the ``--set`` options that name the stack
    (``vitdistill down`` takes them too)."""
    ports = {"prefect": free_port(), "mlflow": free_port()}
    sets = ["--set", f"orchestration.prefect_port={ports['prefect']}", "--set", f"orchestration.mlflow_port={ports['mlflow']}",
            "--set", f"orchestration.state_dir={work}/state",
            "--set", f"tracking.server_backend_store_uri=sqlite:///{work}/mlflow-server.db",
            "--set", f"tracking.server_artifacts_destination={artifacts}"]
    r = cli(["up", *sets, "--json", str(work / "up.json")], env, work, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads((work / "up.json").read_text()), sets


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 (as s3fs's own test-suite does); yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point s3fs at the local server through the environment, as a user would."""
    import fsspec
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = fsspec.filesystem("s3")
    bucket = f"vd-{os.urandom(4).hex()}"
    fs.mkdir(bucket)
    yield fs, bucket
    s3fs.S3FileSystem.clear_instance_cache()
