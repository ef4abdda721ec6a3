"""MLflow tracking with explicit run ids.

Runs are addressed by id rather than through MLflow's global "active run", so stages can log from
worker threads or processes. A flow run opens one parent run; each stage opens a nested child
(``mlflow.parentRunId``). Params and metrics go in batches.

Default tracking URI: ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``.
Params, tags, ``config.yaml`` and every URI this module shows pass through
:func:`vitdistill.redact.redact_uri`: a ``user:password@`` in a URI is logged as ``user:***@``.
"""

from __future__ import annotations

import functools
import io
import json
import os
import tempfile
from typing import Any

from vitdistill.config import TrackingConfig, VitdistillConfig, flatten, to_yaml
from vitdistill.errors import ConfigError
from vitdistill.redact import redact_uri, split_userinfo

_MAX_PARAMS_PER_BATCH = 100
_MAX_PARAM_LEN = 6000


def sqlite_init_lock(uri: str):
    """A lock beside a ``sqlite:///`` tracking database (a no-op for other URIs): two first commands
    would otherwise both create its tables and one would fail (``duplicate column name``)."""
    from contextlib import nullcontext

    from filelock import FileLock

    if not uri.startswith("sqlite:///"):
        return nullcontext()
    path = uri[len("sqlite:///"):].split("?")[0]
    if not path or path == ":memory:":
        return nullcontext()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return FileLock(f"{path}.lock")


def owner_tags() -> dict[str, str]:
    """Which process opened a run (host, pid, process start time): how a stale RUNNING run is told apart."""
    import socket

    import psutil

    return {"vitdistill.host": socket.gethostname(), "vitdistill.pid": str(os.getpid()),
            "vitdistill.pid_started": repr(psutil.Process().create_time())}


def _process_alive(pid: int, started: str | None) -> bool:
    import psutil

    try:
        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE and (started is None or repr(p.create_time()) == started)
    except psutil.Error:
        return False


class Tracker:
    def __init__(self, cfg: TrackingConfig) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = cfg.resolved_uri()
        if self.uri.startswith(("http://", "https://")):
            check_server(self.uri)
        with sqlite_init_lock(self.uri):  # the first client creates the tables: one process at a time
            self.client = MlflowClient(tracking_uri=self.uri)
            self.experiment_name = cfg.experiment
            exp = self.client.get_experiment_by_name(cfg.experiment)
        if exp is None:
            try:
                self.experiment_id = self.client.create_experiment(cfg.experiment, artifact_location=cfg.artifact_location)
            except Exception:  # created concurrently by another process: read it back
                exp = self.client.get_experiment_by_name(cfg.experiment)
                if exp is None:
                    raise
                self.experiment_id = exp.experiment_id
        else:
            self.experiment_id = exp.experiment_id

    # ------------------------------------------------------------------ runs
    def start_run(self, name: str, parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> str:
        all_tags = {**owner_tags(), **{k: str(v) for k, v in (tags or {}).items() if v is not None}}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        return run.info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def close_stale_runs(self) -> list[str]:
        """Mark KILLED the RUNNING runs of this experiment whose process, on this host, is gone (a
        ``kill -9`` or OOM kill leaves them RUNNING forever); returns their ids. Runs started on another
        host, or by a process that still lives, are left alone."""
        import socket

        host = socket.gethostname()
        stale = []
        for run in self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
            tags = run.data.tags
            if tags.get("vitdistill.host") != host or "vitdistill.pid" not in tags:
                continue
            if _process_alive(int(tags["vitdistill.pid"]), tags.get("vitdistill.pid_started")):
                continue
            self.client.set_tag(run.info.run_id, "vitdistill.ended_by",
                                f"process {tags['vitdistill.pid']} on {host} ended without closing the run")
            self.client.set_terminated(run.info.run_id, status="KILLED")
            stale.append(run.info.run_id)
        return stale

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, redact_uri(str(v))) for k, v in tags.items() if v is not None])

    # ------------------------------------------------------------------ values
    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_str(v)) for k, v in params.items()]
        for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=items[i : i + _MAX_PARAMS_PER_BATCH])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i : i + 1000])

    def log_config(self, run_id: str, cfg: VitdistillConfig) -> None:
        """The resolved config: flattened as params and whole as ``config.yaml``, credentials masked."""
        self.log_params(run_id, flatten(cfg))
        self.client.log_text(run_id, redact_uri(to_yaml(cfg)), "config.yaml")

    # ------------------------------------------------------------------ artifacts
    def log_dict(self, run_id: str, obj: Any, artifact_file: str) -> None:
        self.client.log_text(run_id, json.dumps(obj, indent=2), artifact_file)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_figure(self, run_id: str, figure: Any, artifact_file: str) -> None:
        self.log_bytes(run_id, figure_png(figure), artifact_file)

    def log_bytes(self, run_id: str, data: bytes, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, os.path.basename(artifact_file))
            with open(path, "wb") as f:
                f.write(data)
            self.client.log_artifact(run_id, path, os.path.dirname(artifact_file) or None)

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, local_path, artifact_path)

    def log_report(self, run_id: str, *, params: dict[str, Any], metrics: dict[str, float],
                   history: list[dict[str, Any]] = (), figures: dict[str, Any] | None = None,
                   tables: dict[str, list[dict]] | None = None, table_prefix: str = "") -> None:
        """What every stage logs: params, per-epoch curves, metrics, figures (PNG) and tables (JSON)."""
        self.log_params(run_id, params)
        curves: set[str] = set()
        if history:
            self.log_history(run_id, list(history))
            curves = {k for row in history for k in row}
        # a final value that is also a curve is the curve's last point already (not a second point at step 0)
        self.log_metrics(run_id, {k: v for k, v in metrics.items() if k not in curves})
        for name, fig in (figures or {}).items():
            self.log_figure(run_id, fig, name)
        for name, rows in (tables or {}).items():
            self.log_dict(run_id, rows, f"{table_prefix}{name}.json")

    def log_pytorch_model(self, run_id: str, model: Any, name: str, registered_model_name: str | None = None,
                          version_tags: dict[str, Any] | None = None) -> dict[str, Any]:
        """Log a torch module as an MLflow model of ``run_id``, optionally registered with ``version_tags``;
        returns ``{"model_uri", "registered_model", "version"}``.

        Pickle serialisation: these are models we trained, loaded back with ``mlflow.pytorch.load_model``;
        data read from shards is never unpickled.
        """
        import mlflow
        import mlflow.pytorch

        mlflow.set_tracking_uri(self.uri)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pytorch.log_model(model, name=name, serialization_format="pickle",
                                            registered_model_name=registered_model_name)
        out: dict[str, Any] = {"model_uri": info.model_uri, "registered_model": registered_model_name, "version": None}
        if registered_model_name and info.registered_model_version is not None:
            out["version"] = str(info.registered_model_version)
            for k, v in (version_tags or {}).items():
                self.client.set_model_version_tag(registered_model_name, out["version"], k, str(v))
        return out

    def load_pytorch_model(self, model_uri: str) -> Any:
        """A model this project logged (``log_pytorch_model``), from this tracking server."""
        import mlflow
        import mlflow.pytorch

        mlflow.set_tracking_uri(self.uri)
        return mlflow.pytorch.load_model(model_uri, map_location="cpu")

    def log_history(self, run_id: str, history: list[dict[str, Any]], step_key: str = "epoch") -> None:
        """Per-epoch rows as metric curves (``train_loss`` at step ``epoch``, ...)."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(row[step_key])) for row in history for k, v in row.items()
                 if k != step_key and isinstance(v, (int, float)) and v == v]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i : i + 1000])

    # ------------------------------------------------------------------ where to look
    @property
    def display_uri(self) -> str:
        """The tracking URI as it may be shown or logged (credentials masked)."""
        return redact_uri(self.uri)

    def run_url(self, run_id: str) -> str | None:
        if self.uri.startswith(("http://", "https://")):
            return f"{self.display_uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"
        return None

    def artifact_url(self, run_id: str, path: str) -> str | None:
        """The MLflow UI page that opens ``path`` in the run's artifact viewer (HTML renders there)."""
        url = self.run_url(run_id)
        return f"{url}/artifacts/{path}" if url else None

    def ui_command(self) -> str:
        if self.uri.startswith(("http://", "https://")):
            return f"open {self.display_uri}"
        return f"mlflow ui --backend-store-uri {self.display_uri} --port 5000"


def figure_png(figure: Any, dpi: int = 110) -> bytes:
    """A matplotlib figure as PNG bytes, as every figure this project logs is stored."""
    buf = io.BytesIO()
    figure.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def http_probe(url: str, timeout: float = 5.0) -> str | None:
    """GET ``url``: None if it answers 2xx, else the reason. Credentials in the URL go as basic auth."""
    import urllib.error
    import urllib.request

    bare, headers = split_userinfo(url)
    try:
        with urllib.request.urlopen(urllib.request.Request(bare, headers=headers), timeout=timeout) as r:
            return None if 200 <= r.status < 300 else f"HTTP {r.status}"
    except (urllib.error.URLError, OSError, ValueError) as e:
        return redact_uri(str(getattr(e, "reason", e)))


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail fast with one line, instead of MLflow's minutes of retries, when the server is down."""
    reason = http_probe(f"{uri.rstrip('/')}/health", timeout)
    if reason is None:
        return
    raise ConfigError(
        f"cannot reach the MLflow tracking server at {redact_uri(uri)} ({reason}); start one with `vitdistill up` or "
        "`mlflow server`, or unset MLFLOW_TRACKING_URI / tracking.uri to use sqlite:///mlflow.db"
    )


def _param_str(v: Any) -> str:
    s = redact_uri(json.dumps(v) if isinstance(v, (list, dict)) else str(v))
    return s if len(s) <= _MAX_PARAM_LEN else s[: _MAX_PARAM_LEN - 3] + "..."


@functools.lru_cache(maxsize=8)
def _tracker(cfg_json: str) -> Tracker:
    return Tracker(TrackingConfig.model_validate_json(cfg_json))


def get_tracker(cfg: TrackingConfig) -> Tracker:
    """One Tracker per distinct tracking config and process (MLflow clients are thread-safe)."""
    return _tracker(cfg.model_dump_json())
