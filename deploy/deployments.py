"""One Prefect deployment per flow, on a process work pool, each with an example cron schedule: the
pipeline, one per registered stage (:data:`vitdistill.stages.STAGES`, which holds their schedules) and the report.

Apply them to the server named by ``PREFECT_API_URL`` (``vitdistill up`` starts one locally):

    vitdistill deploy -c configs/shapes.yaml            # schedules created paused
    vitdistill deploy --activate-schedules
    vitdistill submit probe --set probe.knn_k=[5] --wait   # a run of the 'probe' deployment

The deployments' default parameter is the resolved config (the same tree as the CLI), so the
Prefect UI shows it as a form; the flows' code is read from this checkout by the process worker.
Passwords in its URIs are masked (``user:***@``) before they reach Prefect, as in every flow-run
parameter: they are kept in the secrets file (:func:`vitdistill.redact.conceal`), where the flow
run reads them back (``vitdistill up`` points its worker at it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vitdistill.config import VitdistillConfig
from vitdistill.errors import ConfigError
from vitdistill.redact import conceal
from vitdistill.stages import PIPELINE, STAGES

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class DeploymentSpec:
    stage: str
    entrypoint: str
    cron: str  # an example schedule; created paused unless activated
    description: str

    @property
    def flow_name(self) -> str:
        return f"vitdistill-{self.stage}"

    @property
    def full_name(self) -> str:
        return f"{self.flow_name}/{self.stage}"


# The flow-run processes a worker starts configure Prefect's logging before importing the flows:
# the library's loggers are named here so their lines reach the API under each task run.
JOB_ENV = {"PREFECT_LOGGING_EXTRA_LOGGERS": "vitdistill"}


def deployments() -> list[DeploymentSpec]:
    """The pipeline, each registered stage, then the report, in that order."""
    return [
        DeploymentSpec(PIPELINE, "flows/pipeline.py:pipeline_flow", "0 2 * * *", "whole pipeline, nightly at 02:00"),
        *(DeploymentSpec(s.name, f"flows/pipeline.py:{s.name}_flow", s.cron, s.schedule or s.description)
          for s in STAGES),
        DeploymentSpec("report", "flows/pipeline.py:report_flow", "0 7 * * *",
                       "HTML report of the latest finished run that evaluated, daily at 07:00"),
    ]


def ensure_work_pool(name: str) -> bool:
    """Create the process work pool if missing; True when it was created."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            client.create_work_pool(
                WorkPoolCreate(name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template())
            )
            return True


def deploy_all(config: VitdistillConfig, activate_schedules: bool = False) -> list[dict]:
    """Create or update every deployment; returns one row per deployment."""
    from prefect import flow

    pool = config.orchestration.work_pool
    ensure_work_pool(pool)
    rows = []
    params = {"config": conceal(config, persist=True)}  # no password reaches Prefect: the worker reads them back
    for spec in deployments():
        loaded = flow.from_source(source=str(REPO_ROOT), entrypoint=spec.entrypoint)
        deployment_id = loaded.deploy(
            name=spec.stage,
            work_pool_name=pool,
            cron=spec.cron,
            paused=not activate_schedules,
            parameters=params,
            job_variables={"env": JOB_ENV},
            description=spec.description,
            tags=["vitdistill"],
            build=False,
            push=False,
            print_next_steps=False,
        )
        rows.append({"deployment": spec.full_name, "id": str(deployment_id), "work_pool": pool, "cron": spec.cron,
                     "schedule_active": activate_schedules})
    return rows


def submit(stage: str, config: VitdistillConfig, wait_seconds: float | None) -> dict:
    """Start a run of a stage's deployment; with ``wait_seconds`` wait for it to finish."""
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    specs = deployments()
    spec = next((d for d in specs if d.stage == stage), None)
    if spec is None:
        raise ConfigError(f"no deployment for stage {stage!r}; deployed stages: {', '.join(d.stage for d in specs)}")
    with get_client(sync_client=True) as client:
        try:
            pool = client.read_deployment_by_name(spec.full_name).work_pool_name
        except ObjectNotFound:
            raise ConfigError(f"deployment {spec.full_name!r} not found on the server; run `vitdistill deploy` first") from None
        try:
            workers = client.read_workers_for_work_pool(pool)
        except ObjectNotFound:
            raise ConfigError(f"work pool {pool!r} does not exist; run `vitdistill deploy` (it creates the pool) "
                              f"and start a worker: `prefect worker start --pool {pool}`") from None
    if wait_seconds and not any(w.status.value == "ONLINE" for w in workers):
        raise ConfigError(f"no worker is online for work pool {pool!r}, so the run would wait forever; start one with "
                          f"`vitdistill up` or `prefect worker start --pool {pool}`")
    run = run_deployment(spec.full_name, parameters={"config": conceal(config, persist=True)},
                         timeout=wait_seconds if wait_seconds is not None else 0, as_subflow=False, poll_interval=2)
    return {"deployment": spec.full_name, "flow_run_id": str(run.id), "flow_run_name": run.name,
            "state": run.state.type.value if run.state else None}
