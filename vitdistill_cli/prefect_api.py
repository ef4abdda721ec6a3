"""The ephemeral Prefect API server of a ``vitdistill`` command, as a process of its own.

    python -m vitdistill_cli.prefect_api FD

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
"""

from __future__ import annotations

import json
import os
import socket
import sys


def main(fd: int) -> int:
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
    with os.fdopen(fd, "w") as pipe:
        pipe.write(json.dumps(report) + "\n")
    if sock is None:
        return 0
    import uvicorn

    config = uvicorn.Config("prefect.server.api.server:create_app", factory=True, host="127.0.0.1",
                            port=report["port"], log_level="error", lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
