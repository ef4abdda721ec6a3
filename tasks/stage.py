"""One Prefect task per stage of the graph: a task run named after the stage, in its own MLflow child run.

The flow submits it once per stage with the futures of the stages it needs (``wait_for``, so the
Prefect UI draws the edges, and ``upstream``, their results). A stage whose upstream failed or was
skipped is skipped, not run; a disabled stage returns at once; a stage whose body raises fails its task
run and only the stages that need it.
"""

from __future__ import annotations

import logging

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from tasks._common import route_library_logs
from tasks.tracking import close_run, open_run
from vitdistill.config import VitdistillConfig
from vitdistill.faults import TrackingServerLost, explain_stage_failure
from vitdistill.stages import STAGES, StageResult, stage_label

log = logging.getLogger(__name__)


def _skip_cause(name: str, upstream: dict[str, object]) -> str | None:
    """The failed stage behind an upstream that failed (an exception) or was skipped, else None."""
    for need in STAGES.stage(name).needs:
        got = upstream.get(need)
        if isinstance(got, BaseException):
            return need
        if isinstance(got, dict) and got.get("status") == "skipped":
            return got.get("skipped_because") or need
    return None


def _task_run_name() -> str:
    from prefect.runtime import task_run

    p = task_run.parameters
    return stage_label(p["name"], p.get("teacher"))


@task(name="stage", task_run_name=_task_run_name, cache_policy=NO_CACHE)
def stage(name: str, config: VitdistillConfig, parent_run_id: str, upstream: dict[str, object],
          teacher: str | None = None):
    """Run stage ``name`` (:data:`vitdistill.stages.STAGES`); ``upstream``: the results of the stages it needs;
    ``teacher``: whose stage this is in a run with several teachers (``config`` is that teacher's)."""
    route_library_logs()
    spec = STAGES.stage(name)
    cause = _skip_cause(name, upstream)
    if cause is not None:
        log.info("%s skipped: it needs %s, which failed", stage_label(name, teacher), stage_label(cause, teacher))
        result = StageResult(name, "skipped", message=f"skipped: needs {stage_label(cause, teacher)}, which failed",
                             skipped_because=cause, teacher=teacher)
        return Completed(name="Skipped", message=result.message, data=result.to_dict())  # its own name in the UI
    if not spec.enabled(config):
        return StageResult(name, "disabled", message=f"{spec.enabled_key} is false", teacher=teacher).to_dict()
    results = {k: v for k, v in upstream.items() if isinstance(v, dict)}
    run_id = open_run(config, name, parent_run_id, teacher=teacher)
    try:
        result = spec(config, run_id, results)
    except BaseException as e:
        explained = explain_stage_failure(config, stage_label(name, teacher), e)  # a full disk, a lost MLflow server
        if not isinstance(explained, TrackingServerLost):  # (a run on a lost server is closed at the next start)
            close_run(config, run_id, "FAILED")
        error = e if explained is None else explained
        error.mlflow_run_id = run_id  # type: ignore[attr-defined]  # the run summary names the failed stage's run
        if error is e:
            raise
        raise error from None
    close_run(config, run_id, "FINISHED")
    result.teacher = teacher
    return result.to_dict()
