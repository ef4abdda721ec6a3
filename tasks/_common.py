"""What every task module shares: retry policy for I/O, Prefect tags for MLflow, artifact keys."""

from __future__ import annotations

import re

from prefect.runtime import deployment, flow_run

from vitdistill.errors import VitdistillError


def retry_on_io_only(task, task_run, state) -> bool:
    """Retry transient I/O failures; never retry bad input (a VitdistillError fails at once)."""
    try:
        state.result()
    except VitdistillError:
        return False
    except (OSError, TimeoutError, ConnectionError):
        return True
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
