"""What every task module shares: retry policy for I/O, Prefect tags for MLflow, artifact keys, the
library's log lines under each task run, progress artifacts, the stop flag of an interrupted run, and
the watchdog that ends a deployment's flow run when its Prefect API is gone."""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
import threading
import time
from typing import Any

# Library modules log through logging.getLogger(__name__); Prefect forwards the loggers named here to
# the API, under the task run that logged them. Set before Prefect configures its logging (in this
# process, and in the flow-run processes a worker starts, which import this module first).
LIBRARY_LOGGER = "vitdistill"
_extra = [n for n in os.environ.get("PREFECT_LOGGING_EXTRA_LOGGERS", "").split(",") if n.strip()]
if LIBRARY_LOGGER not in _extra:
    os.environ["PREFECT_LOGGING_EXTRA_LOGGERS"] = ",".join([*_extra, LIBRARY_LOGGER])
# the library also runs outside flows (a notebook, a test): its lines then just stay off the API
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

from prefect.runtime import deployment, flow_run  # noqa: E402

from vitdistill.errors import StorageError, VitdistillError  # noqa: E402
from vitdistill.callbacks import Callback  # noqa: E402  (no torch: a no-op run never imports it)

# Set when the flow is interrupted (Ctrl-C reaches the main thread only): stages running in worker
# threads check it between steps, epochs, shards and evaluators and stop there.
STOP = threading.Event()


def route_library_logs() -> None:
    """Send the ``vitdistill`` loggers' INFO lines to the Prefect API (and console) even when Prefect
    configured its logging before ``PREFECT_LOGGING_EXTRA_LOGGERS`` was set (an imported Prefect)."""
    lib = logging.getLogger(LIBRARY_LOGGER)
    for handler in logging.getLogger("prefect.extra").handlers:
        if handler not in lib.handlers:
            lib.addHandler(handler)
    if lib.level == logging.NOTSET or lib.level > logging.INFO:
        lib.setLevel(logging.INFO)


def check_stop() -> None:
    if STOP.is_set():
        raise KeyboardInterrupt("the flow run was interrupted")


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


def deployment_id() -> str | None:
    """The deployment of this flow run, or None (a run from the CLI). Read from the run's context:
    ``prefect.runtime.deployment.id`` asks the API for the flow run (a round trip and a new client,
    ~0.15 s) whenever the run has no deployment, that is on every CLI run."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is not None and ctx.flow_run is not None:
        return str(ctx.flow_run.deployment_id) if ctx.flow_run.deployment_id else None
    return deployment.id


def prefect_tags() -> dict[str, str | None]:
    return {
        "prefect.flow_run_id": flow_run.id,
        "prefect.flow_run_name": flow_run.name,
        "prefect.flow_name": flow_run.flow_name,
        "prefect.deployment": deployment.name if deployment_id() else None,
    }


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


class Progress:
    """A Prefect progress artifact of ``total`` units (shards, epochs, evaluators), updated as they finish;
    each update also checks the stop flag (an interrupted flow stops there).

    Artifacts are best effort: a failed API call never fails the stage."""

    def __init__(self, key: str, total: int, description: str) -> None:
        self.total, self.done, self.description = max(1, total), 0, description
        self.id: Any = None
        try:
            from prefect.artifacts import create_progress_artifact

            self.id = create_progress_artifact(0.0, key=artifact_key(key), description=description)
        except Exception as e:  # noqa: BLE001 - never fail a stage for its progress bar
            logging.getLogger(__name__).debug("no progress artifact %s: %s", key, e)

    def advance(self, n: int = 1, note: str = "") -> None:
        check_stop()
        self.done = min(self.total, self.done + n)
        if self.id is None:
            return
        try:
            from prefect.artifacts import update_progress_artifact

            desc = f"{self.description}: {self.done}/{self.total}" + (f" ({note})" if note else "")
            update_progress_artifact(self.id, 100.0 * self.done / self.total, description=desc)
        except Exception as e:  # noqa: BLE001
            logging.getLogger(__name__).debug("progress artifact not updated: %s", e)


class EpochProgress(Callback):
    """Trainer callback: one progress unit per epoch, and the stop flag checked after every step."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def on_step(self, trainer, step: int, losses: dict[str, float]) -> None:
        check_stop()

    def on_epoch(self, trainer, epoch: int, summary: dict[str, float]) -> None:
        self.progress.advance(note=f"loss {summary.get('loss', float('nan')):.4g}")


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
    from prefect.settings import PREFECT_API_URL

    from vitdistill.redact import redact_uri
    from vitdistill.tracking import http_probe

    api = PREFECT_API_URL.value()
    if not api or not deployment_id() or (_watchdog is not None and _watchdog.is_alive()):
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
