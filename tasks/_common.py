"""What every task module shares: retry policy for I/O, Prefect tags for MLflow, artifact keys."""

from __future__ import annotations

import errno
import re

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
