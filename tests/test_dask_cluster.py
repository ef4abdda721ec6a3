"""Extraction on a Dask cluster started outside the flow: a `dask scheduler` and two `dask worker`
processes on 127.0.0.1, as a user's cluster would be. The cache must equal a single-process run's."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = [pytest.mark.slow, pytest.mark.integration]

DASK = str(Path(sys.executable).with_name("dask"))


def _wait_for_workers(address: str, n: int, timeout: float = 90.0) -> None:
    from distributed import Client

    with Client(address, timeout=timeout) as client:
        client.wait_for_workers(n, timeout=timeout)


@pytest.fixture
def dask_cluster(tmp_path, prefect_harness):
    from prefect.settings import PREFECT_API_URL

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    # the workers run Prefect tasks: they report to this session's API, and import this checkout
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value() or "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    logs = [open(tmp_path / f"dask-{i}.log", "w") for i in range(3)]
    procs = [subprocess.Popen([DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--dashboard-address", f"127.0.0.1:{free_port()}", "--no-show"],
                              stdout=logs[0], stderr=subprocess.STDOUT, env=env)]
    try:
        time.sleep(1.0)
        for i in (1, 2):
            procs.append(subprocess.Popen(
                [DASK, "worker", address, "--host", "127.0.0.1", "--nworkers", "1", "--nthreads", "1",
                 "--dashboard-address", f"127.0.0.1:{free_port()}", "--local-directory", str(tmp_path / f"w{i}"),
                 "--name", f"w{i}"], stdout=logs[i], stderr=subprocess.STDOUT, env=env))
        _wait_for_workers(address, 2)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in logs:
            f.close()


def test_extraction_on_an_external_dask_cluster_equals_a_single_process_run(dask_cluster, make_cfg, tmp_path):
    from distributed import Client

    from flows.pipeline import extract_flow
    from vitdistill.data.ingest import resolve_inputs
    from vitdistill.extract import extract

    sets = ["data.limit=80", "data.shard_samples=20"]
    cfg = make_cfg(*sets, "orchestration.task_runner=dask", f"orchestration.dask_address={dask_cluster}",
                   f"cache.root={tmp_path}/dask")
    result = extract_flow(cfg)
    stage = result["stages"][0]
    assert stage["status"] == "ok" and stage["metrics"]["samples"] == 80 and stage["metrics"]["shards"] == 4

    with Client(dask_cluster) as client:  # the four shard tasks ran on the external worker processes
        executed = client.run(lambda dask_worker: len({e[0] for e in dask_worker.state.log
                                                       if len(e) > 2 and e[2] == "memory"}))
    assert len(executed) == 2 and sum(executed.values()) >= 4

    single = make_cfg(*sets, f"cache.root={tmp_path}/single")
    _, manifest = extract(single, resolve_inputs(single, progress=False), progress=False)
    import json

    dask_manifest = json.loads((Path(stage["paths"]["cache_dir"]) / "manifest.json").read_text())
    assert [s["sha256"] for s in dask_manifest["shards"]] == [s["sha256"] for s in manifest["shards"]]
    assert [s["name"] for s in dask_manifest["shards"]] == [s["name"] for s in manifest["shards"]]
