"""``vitdistill up`` / ``down``: a local Prefect server, a process worker and an MLflow server.

Each server runs in its own process group, binds to ``orchestration.host`` (127.0.0.1 unless told
otherwise), logs to ``{state_dir}/logs/`` and is recorded in ``{state_dir}/stack.json``, so that
``down`` stops exactly those processes and nothing else.

No password appears on a command line (``ps`` shows those to every user): the MLflow server gets its
backend store and artifact destination through ``MLFLOW_BACKEND_STORE_URI`` and
``MLFLOW_ARTIFACTS_DESTINATION``, and the worker reads the passwords masked out of flow-run parameters
from the secrets file (``VITDISTILL_SECRETS_FILE``, see :func:`vitdistill.redact.conceal`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from vitdistill.config import VitdistillConfig
from vitdistill.errors import VitdistillError
from vitdistill.redact import SECRETS_ENV, redact_uri, secrets_file


class StackError(VitdistillError):
    """A server could not be started, reached or stopped."""


def _bin(name: str) -> str:
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else name


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def http_ok(url: str, timeout: float = 2.0) -> bool:
    from vitdistill.tracking import http_probe

    return http_probe(url, timeout) is None


def _wait(what: str, check, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
            last = redact_uri(tail[0]) if tail else "no output"
            raise StackError(f"{what} exited with code {proc.returncode} while starting ({last}); see {log}")
        if check():
            return
        time.sleep(0.5)
    raise StackError(f"{what} did not become healthy within {timeout:.0f} s; see {log}")


def _spawn(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log, "ab")
    return subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)  # own process group: `down` stops it and its children


def mlflow_server_command(cfg: VitdistillConfig) -> tuple[list[str], dict[str, str]]:
    """The ``mlflow server`` command line and the environment it needs: the backend store URI (which may
    hold a database password) and the artifact destination go by environment, never on the command line."""
    orch, tr = cfg.orchestration, cfg.tracking
    cmd = [_bin("mlflow"), "server", "--host", orch.host, "--port", str(orch.mlflow_port), "--workers", "1"]
    return cmd, {"MLFLOW_BACKEND_STORE_URI": tr.server_backend_store_uri,
                 "MLFLOW_ARTIFACTS_DESTINATION": tr.server_artifacts_destination}


def state_file(cfg: VitdistillConfig) -> Path:
    return Path(cfg.orchestration.state_dir) / "stack.json"


def up(cfg: VitdistillConfig, timeout: float = 120.0) -> dict:
    orch, tr = cfg.orchestration, cfg.tracking
    state = state_file(cfg)
    if state.exists():
        raise StackError(f"{state} exists: a stack is already up (run `vitdistill down` first)")
    for what, port in (("Prefect", orch.prefect_port), ("MLflow", orch.mlflow_port)):
        if not _port_free(orch.host, port):
            raise StackError(f"port {port} on {orch.host} is in use; stop what uses it or pass --set orchestration.{what.lower()}_port=N")
    logs = Path(orch.state_dir) / "logs"
    prefect_url = f"http://{orch.host}:{orch.prefect_port}"
    mlflow_url = f"http://{orch.host}:{orch.mlflow_port}"
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_API_URL": f"{prefect_url}/api"}
    env.pop("MLFLOW_TRACKING_URI", None)
    procs: list[dict] = []

    def record(name: str, proc: subprocess.Popen, log: Path) -> None:
        procs.append({"name": name, "pid": proc.pid, "pgid": os.getpgid(proc.pid), "log": str(log)})

    try:
        log = logs / "prefect-server.log"
        p = _spawn([_bin("prefect"), "server", "start", "--host", orch.host, "--port", str(orch.prefect_port)], env, log)
        record("prefect-server", p, log)
        _wait("prefect server", lambda: http_ok(f"{prefect_url}/api/health"), p, log, timeout)

        log = logs / "mlflow-server.log"
        if "://" not in tr.server_artifacts_destination:
            Path(tr.server_artifacts_destination).mkdir(parents=True, exist_ok=True)
        cmd, store_env = mlflow_server_command(cfg)
        p = _spawn(cmd, {**env, **store_env}, log)
        record("mlflow-server", p, log)
        _wait("mlflow server", lambda: http_ok(f"{mlflow_url}/health"), p, log, timeout)

        os.environ["PREFECT_API_URL"] = env["PREFECT_API_URL"]
        from deploy.deployments import ensure_work_pool

        ensure_work_pool(orch.work_pool)
        log = logs / "prefect-worker.log"
        worker_env = {**env, "MLFLOW_TRACKING_URI": mlflow_url, "PREFECT_WORKER_QUERY_SECONDS": "2",
                      SECRETS_ENV: str(secrets_file(orch.state_dir))}
        p = _spawn([_bin("prefect"), "worker", "start", "--pool", orch.work_pool, "--type", "process"], worker_env, log)
        record("prefect-worker", p, log)
        _wait("prefect worker", lambda: _worker_online(orch.work_pool), p, log, timeout)
    except BaseException:
        _stop(procs)
        raise
    info = {"prefect_url": prefect_url, "prefect_api_url": f"{prefect_url}/api", "mlflow_url": mlflow_url,
            "work_pool": orch.work_pool, "processes": procs}
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps(info, indent=2))
    return info


def _worker_online(pool: str) -> bool:
    from prefect import get_client

    try:
        with get_client(sync_client=True) as client:
            return any(w.status.value == "ONLINE" for w in client.read_workers_for_work_pool(pool))
    except Exception:  # the API may still be warming up
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def _stop(procs: list[dict], grace: float = 15.0) -> list[str]:
    stopped = []
    for p in reversed(procs):  # worker first, then MLflow, then Prefect
        try:
            os.killpg(p["pgid"], signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.time() + grace
        while _alive(p["pid"]) and time.time() < deadline:
            time.sleep(0.2)
        try:
            os.killpg(p["pgid"], signal.SIGKILL)  # children that ignored SIGTERM
        except ProcessLookupError:
            pass
        stopped.append(p["name"])
    return stopped


def down(cfg: VitdistillConfig) -> list[str]:
    state = state_file(cfg)
    if not state.exists():
        raise StackError(f"{state} not found: no stack started by `vitdistill up` from this directory")
    info = json.loads(state.read_text())
    stopped = _stop(info["processes"])
    state.unlink()
    return stopped
