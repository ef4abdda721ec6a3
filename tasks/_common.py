"""What every task module shares: retry policy for I/O, Prefect tags for MLflow, artifact keys, and the
watchdog that ends a deployment's flow run when its Prefect API is gone."""

from __future__ import annotations

import errno
import os
import re
import sys
import threading
import time

from prefect.runtime import deployment, flow_run

from vitdistill.errors import StorageError, VitdistillError


def retry_on_io_only(task, task_run, state) -> bool:
    """Retry transient I/O failures only: a lost or refused connection, a timeout, an object store's
    server error (5xx) or throttling. Bad input (a VitdistillError) and permanent refusals (no such file
    or bucket, access denied, a full disk) fail at once, without the retry delays."""
    try:
        state.result()
    except StorageError as e:
        return e.transient
    except VitdistillError:
        return False
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError):
        return False
    except (TimeoutError, ConnectionError):
        return True
    except OSError as e:
        return e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EINVAL)
    except Exception:
        return False
    return False


def prefect_tags() -> dict[str, str | None]:
    return {
        "prefect.flow_run_id": flow_run.id,
        "prefect.flow_run_name": flow_run.name,
        "prefect.flow_name": flow_run.flow_name,
        "prefect.deployment": deployment.name,
    }


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


API_LOST_AFTER_S = 30.0  # a Prefect API unreachable this long ends the flow run (a restart within it is survived)
_watchdog: threading.Thread | None = None


def watch_prefect_api(lost_after_s: float = API_LOST_AFTER_S, poll_s: float = 2.0) -> None:
    """In a flow run that a worker executes (a deployment's run), end the run's process when its Prefect
    API has not answered ``/health`` for ``lost_after_s``: Prefect's client would otherwise retry every
    call against the dead server, and the run would go on, unseen and uncancellable, for minutes after
    its work had ended. The process and its children are killed with one line on stderr; the worker
    reports the run Crashed, and a resubmission resumes from the caches and checkpoints. Runs on the
    CLI's own ephemeral API (no deployment) are left alone: the CLI owns that server."""
    global _watchdog
    from prefect.runtime import deployment
    from prefect.settings import PREFECT_API_URL

    from vitdistill.redact import redact_uri
    from vitdistill.tracking import http_probe

    api = PREFECT_API_URL.value()
    if not api or not deployment.id or (_watchdog is not None and _watchdog.is_alive()):
        return

    def watch() -> None:
        down_since = None
        while True:
            time.sleep(poll_s)
            reason = http_probe(f"{api.rstrip('/')}/health", timeout=5)
            if reason is None:
                down_since = None
                continue
            down_since = down_since or time.monotonic()
            if time.monotonic() - down_since >= lost_after_s:
                sys.stderr.write(f"error: lost the Prefect API at {redact_uri(api)} ({reason}) for {lost_after_s:.0f} s; "
                                 "ending this flow run: resubmit it once the server is back (caches are kept)\n")
                sys.stderr.flush()
                _kill_self_and_children()

    _watchdog = threading.Thread(target=watch, name="prefect-api-watchdog", daemon=True)
    _watchdog.start()


def _kill_self_and_children() -> None:
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.Error:
            pass
    os._exit(1)
