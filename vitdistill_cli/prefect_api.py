"""The ephemeral Prefect API server of a ``vitdistill`` command, as a process of its own.

    python -m vitdistill_cli.prefect_api FD [--keep SECONDS]

What Prefect's ``SubprocessASGIServer`` runs (uvicorn serving ``prefect.server.api.server:create_app``
as an ephemeral server: no UI, no services, the database migrated on start), started by the CLI
without importing Prefect's server into the CLI's process. Prefect's own start-up would import it
there (fastapi, sqlalchemy, the routers: seconds of CPU holding the GIL while the command imports
what it needs) only to launch this same process.

This process reads Prefect's settings as the command will (the same environment, profile and
working directory), binds a free port on 127.0.0.1, and writes one JSON line to file descriptor FD
before it imports the server: ``{"port": N, "timeout": S, "ui_url_set": bool}``, or ``{"port": null}``
when no ephemeral API is wanted (``PREFECT_API_URL`` set in a profile, or the ephemeral server
disabled). The command then points ``PREFECT_API_URL`` at the port before it imports Prefect and
waits for ``/health`` (:class:`vitdistill_cli.main._EphemeralAPI`). The socket stays bound from then
on, so no other process can take the port between the report and the server's start.

**Kept** (``--keep S``, ``orchestration.keep_api_s``): the server outlives the command that started
it, so the next command finds it up instead of waiting ~7 s for a new one to import Prefect's server.
It detaches (a process of no command's tree: a watchdog reaping a killed command leaves it alone),
records itself in ``$PREFECT_HOME/vitdistill-api/KEY.json`` and logs to ``KEY.log`` there. KEY is a
hash of what its settings come from (:func:`api_key`): the interpreter, Prefect's version, every
``PREFECT_*`` variable but the API/UI URLs, the profiles file and the working directory's
``prefect.toml``, ``.env`` and ``pyproject.toml``; a command with other settings gets a server of
its own. Each command using it holds a shared ``flock`` on ``KEY.lease`` until it exits (the kernel
drops it if the command is killed); the server stops once it has been able to take that lock
exclusively for S seconds, that is S seconds after the last command ended, and it removes its record
while it holds the lock, so no command attaches to a server that is stopping. ``vitdistill down``
stops the kept servers of this ``PREFECT_HOME`` (:func:`stop_kept`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

KEPT_DIR = "vitdistill-api"
POLL_S = 0.5


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()


def kept_dir() -> Path:
    return prefect_home() / KEPT_DIR


def api_key() -> str:
    """Which kept server a command may share: a hash of everything its Prefect settings are read from."""
    from importlib.metadata import version

    env = sorted((k, v) for k, v in os.environ.items()
                 if k.startswith("PREFECT_") and k not in ("PREFECT_API_URL", "PREFECT_UI_URL"))
    profiles = Path(os.environ.get("PREFECT_PROFILES_PATH") or prefect_home() / "profiles.toml").expanduser()
    files = []
    for p in (profiles, Path("prefect.toml"), Path(".env"), Path("pyproject.toml")):
        try:
            files.append(p.read_text(errors="replace"))
        except OSError:
            files.append(None)
    blob = json.dumps([sys.executable, version("prefect"), str(prefect_home().resolve()), env, files])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _alive(record: dict) -> bool:
    import psutil

    try:
        return psutil.Process(record["pid"]).create_time() == record["create_time"]
    except (psutil.Error, KeyError, TypeError):
        return False


def read_record(path: Path) -> dict | None:
    """A kept server's record, or None when there is none or its process is gone."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if _alive(record) else None


def stop_kept(home: Path | None = None, timeout: float = 10.0, since: float | None = None) -> list[int]:
    """Stop every kept server recorded under ``home`` (default: this ``PREFECT_HOME``), or only those started
    after ``since`` (a time.time()); their pids."""
    import psutil

    stopped = []
    for path in sorted(((home or prefect_home()) / KEPT_DIR).glob("*.json")):
        record = read_record(path)
        if record is not None and since is not None and record["create_time"] < since:
            continue
        if record is not None:
            try:
                p = psutil.Process(record["pid"])
                p.terminate()
                try:
                    p.wait(timeout)
                except psutil.TimeoutExpired:
                    p.kill()
                stopped.append(record["pid"])
            except psutil.Error:
                pass
        path.unlink(missing_ok=True)
    return stopped


def _watch_idle(server, lease: Path, record_path: Path, keep_s: float, pid: int) -> None:
    """Stop ``server`` once no command has held a shared lock on ``lease`` for ``keep_s`` seconds."""
    fd = os.open(lease, os.O_RDWR | os.O_CREAT, 0o644)
    idle_since = None
    while not server.should_exit:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a command is using this server
            idle_since = None
            time.sleep(POLL_S)
            continue
        now = time.monotonic()
        idle_since = now if idle_since is None else idle_since
        if now - idle_since >= keep_s:  # the lock is kept until this process exits: nobody attaches meanwhile
            record = read_record(record_path)
            if record is not None and record["pid"] == pid:
                record_path.unlink(missing_ok=True)
            _quiet()
            server.should_exit = True
            return
        fcntl.flock(fd, fcntl.LOCK_UN)
        time.sleep(POLL_S)


def _quiet() -> None:
    """Once the server is asked to stop, it logs nothing more: its services are cancelled in the middle
    of their writes, and each says so with a traceback (the task-run recorder's "Error flushing ...
    events"), which the command's terminal would otherwise show after its own last line."""
    import logging

    logging.disable(logging.CRITICAL)


def main(argv: list[str]) -> int:
    fd = int(argv[0])
    keep_s = float(argv[argv.index("--keep") + 1]) if "--keep" in argv else 0.0
    key = argv[argv.index("--key") + 1] if "--key" in argv else None
    if keep_s and os.fork():  # the command waits for this parent alone; the child is then nobody's child
        os._exit(0)
    os.environ["PREFECT__SERVER_EPHEMERAL"] = "1"  # as SubprocessASGIServer: no UI, no background services
    os.environ["PREFECT__SERVER_FINAL"] = "1"
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    report: dict = {"port": None}
    sock = None
    if not settings.api.url and settings.server.ephemeral.enabled:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        report = {"port": sock.getsockname()[1], "timeout": settings.server.ephemeral.startup_timeout_seconds,
                  "ui_url_set": settings.ui_url is not None}
    record_path = None
    if keep_s and sock is not None and key:
        import psutil

        me = psutil.Process()
        report.update(pid=me.pid, create_time=me.create_time(), keep_s=keep_s)
        record_path = kept_dir() / f"{key}.json"
        tmp = record_path.with_suffix(f".{me.pid}.tmp")
        tmp.write_text(json.dumps(report))
        os.replace(tmp, record_path)
    with os.fdopen(fd, "w") as pipe:
        pipe.write(json.dumps(report) + "\n")
    if sock is None:
        return 0
    import uvicorn

    config = uvicorn.Config("prefect.server.api.server:create_app", factory=True, host="127.0.0.1",
                            port=report["port"], log_level="error", lifespan="on")
    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # SIGTERM from the command's stop, or SIGINT
            _quiet()
            super().handle_exit(sig, frame)

    server = Server(config)
    if record_path is not None:
        threading.Thread(target=_watch_idle, args=(server, kept_dir() / f"{key}.lease", record_path, keep_s,
                                                   report["pid"]), daemon=True, name="idle-watch").start()
    try:
        server.run(sockets=[sock])
    finally:
        if record_path is not None:
            record = read_record(record_path)
            if record is None or record["pid"] == report["pid"]:
                record_path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
