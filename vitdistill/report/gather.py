"""Read a finished pipeline run back from MLflow: the parent run, one child run per stage, their
metrics (with per-epoch curves), the figures and JSON tables they logged, and the config.

    run = gather_run(tracker)                 # the latest finished run that has an evaluate stage
    run = gather_run(tracker, "3f2a...")      # a parent run id, or any of its stages' run ids
    run.stages["evaluate"].metrics["teacher/calibration/ece"]

Everything comes through the MLflow client, so it works the same on ``sqlite:///mlflow.db`` and
on a tracking server (artifacts proxied or on S3).
"""

from __future__ import annotations

import fnmatch
import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from vitdistill.errors import ConfigError
from vitdistill.redact import redact, redact_uri
from vitdistill.stages import STAGES
from vitdistill.tracking import Tracker

STAGE_TAG = "vitdistill.stage"
TEACHER_TAG = "vitdistill.teacher"  # on each stage run of a run with several teachers (teacher.name a list)
PARENT_TAG = "mlflow.parentRunId"
TERMINAL = ("FINISHED", "FAILED", "KILLED")
# Artifacts read back: figures and small JSON tables, never models or large files.
MAX_ARTIFACT_BYTES = 4 << 20
_PROGRESS_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


@dataclass
class StageRun:
    stage: str
    run_id: str
    status: str
    start_ms: int | None
    end_ms: int | None
    metrics: dict[str, float]
    params: dict[str, str]
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> [(step, value)]
    figures: dict[str, bytes] = field(default_factory=dict)  # artifact path -> PNG bytes
    tables: dict[str, Any] = field(default_factory=dict)  # artifact path without .json -> parsed JSON

    @property
    def seconds(self) -> float | None:
        return _seconds(self.start_ms, self.end_ms)


@dataclass
class PipelineRun:
    run_id: str
    name: str
    status: str
    experiment_id: str
    experiment_name: str
    tracking_uri: str
    run_url: str | None
    start_ms: int | None
    end_ms: int | None
    tags: dict[str, str]
    params: dict[str, str]  # the flattened config
    config_yaml: str | None
    stages: dict[str, StageRun]  # pipeline order; with several teachers, those of the first that evaluated
    # with several teachers: teacher -> its stage runs (metrics and params only; in teacher.name's order)
    teachers: dict[str, dict[str, StageRun]] = field(default_factory=dict)
    teacher: str | None = None  # the teacher whose stages are ``stages``

    @property
    def seconds(self) -> float | None:
        return _seconds(self.start_ms, self.end_ms)


def _seconds(start_ms: int | None, end_ms: int | None) -> float | None:
    return (end_ms - start_ms) / 1000 if start_ms and end_ms else None


def find_parent_run_id(tracker: Tracker, run_id: str | None) -> str:
    """The parent run of ``run_id`` (itself if it has none); with None, the parent of the latest
    finished evaluate stage in the tracker's experiment."""
    client = tracker.client
    if run_id is None:
        runs = client.search_runs(
            [tracker.experiment_id],
            filter_string=f"tags.`{STAGE_TAG}` = 'evaluate' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not runs:
            raise ConfigError(f"no finished run with an evaluate stage in MLflow experiment {tracker.experiment_name!r} "
                              f"at {tracker.display_uri}; run `vitdistill run` first, or pass a run id")
        run = runs[0]
    else:
        run = _get_run(tracker, run_id)
    return run.data.tags.get(PARENT_TAG) or run.info.run_id


def gather_run(tracker: Tracker, run_id: str | None = None, figures: bool = True) -> PipelineRun:
    """Everything the report needs from MLflow about one finished pipeline run (see module doc)."""
    client = tracker.client
    parent = _get_run(tracker, find_parent_run_id(tracker, run_id))
    info = parent.info
    if info.status not in TERMINAL:
        raise ConfigError(f"MLflow run {info.run_id} ({info.run_name}) is still {info.status}; "
                          "a report reads a finished run: wait for it, or pass another run id")
    children = client.search_runs([info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{info.run_id}'",
                                  order_by=["attributes.start_time ASC"])
    groups: dict[str | None, dict[str, Any]] = {}  # teacher (None: a one-teacher run) -> stage -> run
    for c in children:  # a stage run twice: the later one
        groups.setdefault(c.data.tags.get(TEACHER_TAG), {})[c.data.tags.get(STAGE_TAG)] = c
    finished = [t for t, g in groups.items() if "evaluate" in g and g["evaluate"].info.status == "FINISHED"]
    primary = finished[0] if finished else next(iter(groups), None)
    by_stage = groups.get(primary, {})
    stages = {}
    for spec in STAGES:
        name = spec.name
        child = by_stage.get(name)
        if child is None:
            continue
        stage = _stage_run(name, child)
        if spec.curves:  # the metrics the stage logs per epoch
            stage.curves = _curves(tracker, stage.run_id, [k for k in stage.metrics
                                                           if any(fnmatch.fnmatch(k, p) for p in spec.curves)])
        stage.tables, stage.figures = _artifacts(tracker, stage.run_id, figures)
        stages[name] = stage
    teachers = {}
    if len([t for t in groups if t is not None]) > 1:
        for t, group in groups.items():
            if t is not None:
                teachers[t] = stages if t == primary else {n: _stage_run(n, group[n]) for n in STAGES.names()
                                                            if n in group}
    evaluate = stages.get("evaluate")
    if evaluate is None or evaluate.status != "FINISHED":
        what = "has no evaluate stage" if evaluate is None else f"has an evaluate stage that ended {evaluate.status}"
        raise ConfigError(f"MLflow run {info.run_id} ({info.run_name}) {what}; the report compares teacher and "
                          "student from it: run `vitdistill run` or `vitdistill evaluate`")
    experiment = client.get_experiment(info.experiment_id)
    config_yaml = _read_text(tracker, info.run_id, "config.yaml")
    # masked again on the way out: a run logged before redaction existed may hold a password
    return PipelineRun(
        run_id=info.run_id, name=info.run_name, status=info.status, experiment_id=info.experiment_id,
        experiment_name=experiment.name, tracking_uri=tracker.display_uri, run_url=tracker.run_url(info.run_id),
        start_ms=info.start_time, end_ms=info.end_time, tags=redact(dict(parent.data.tags)),
        params=redact(dict(parent.data.params)), config_yaml=redact_uri(config_yaml) if config_yaml else None,
        stages=stages, teachers=teachers, teacher=primary,
    )


def _stage_run(name: str, child) -> StageRun:
    return StageRun(name, child.info.run_id, child.info.status, child.info.start_time, child.info.end_time,
                    dict(child.data.metrics), redact(dict(child.data.params)))


def _get_run(tracker: Tracker, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return tracker.client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"MLflow run {run_id!r} not found at {tracker.display_uri}; `vitdistill report` with no "
                          "argument takes the latest finished run") from None


def _curves(tracker: Tracker, run_id: str, metrics: list[str]) -> dict[str, list[tuple[int, float]]]:
    out = {}
    for key in sorted(metrics):
        if key.startswith(("step/", "system/")):  # per-step and machine curves stay in the MLflow UI
            continue
        history = tracker.client.get_metric_history(run_id, key)
        if len(history) > 1:
            out[key] = sorted((m.step, m.value) for m in history)
    return out


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """MLflow draws a progress bar per downloaded file; a report reads dozens of small ones."""
    old = os.environ.get(_PROGRESS_ENV)
    os.environ[_PROGRESS_ENV] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(_PROGRESS_ENV, None)
        else:
            os.environ[_PROGRESS_ENV] = old


def _download(tracker: Tracker, run_id: str, path: str, dst: str) -> bytes:
    with _no_progress_bars():
        local = tracker.client.download_artifacts(run_id, path, dst)
    with open(local, "rb") as f:
        return f.read()


def _artifacts(tracker: Tracker, run_id: str, figures: bool) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The JSON tables (and, with ``figures``, the PNGs) a stage logged, from its artifact tree."""
    tables: dict[str, Any] = {}
    pngs: dict[str, bytes] = {}
    wanted = (".json", ".png") if figures else (".json",)
    with tempfile.TemporaryDirectory() as tmp:
        for path in _walk(tracker, run_id):
            if not path.endswith(wanted):
                continue
            data = _download(tracker, run_id, path, tmp)
            if path.endswith(".png"):
                pngs[path] = data
            else:
                try:
                    tables[path.removesuffix(".json")] = json.loads(data)
                except ValueError:  # not ours to judge: leave it out of the report
                    continue
    return tables, pngs


def _walk(tracker: Tracker, run_id: str, path: str | None = None, depth: int = 0) -> list[str]:
    out = []
    for item in tracker.client.list_artifacts(run_id, path):
        if item.is_dir:
            if depth < 2:
                out += _walk(tracker, run_id, item.path, depth + 1)
        elif (item.file_size or 0) <= MAX_ARTIFACT_BYTES:
            out.append(item.path)
    return out


def _read_text(tracker: Tracker, run_id: str, path: str) -> str | None:
    if not any(i.path == path for i in tracker.client.list_artifacts(run_id)):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return _download(tracker, run_id, path, tmp).decode("utf-8")
