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
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

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
            self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)  # not a global registry URI
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
        now = int(time.time() * 1000)
        self.log_points(run_id, [(k, v, now, step or 0) for k, v in metrics.items() if v is not None])

    def log_points(self, run_id: str, points: Sequence[tuple[str, float, int, int]]) -> None:
        """``(key, value, timestamp ms, step)`` points, each with its own time, in batches of 1000."""
        from mlflow.entities import Metric

        items = [Metric(k, float(v), ts, step) for k, v, ts, step in points]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i : i + 1000])

    def logged_steps(self, run_id: str, key: str) -> set[int]:
        """The steps at which ``run_id`` already has ``key`` (a retried or resumed run logs only the others)."""
        return {m.step for m in self.client.get_metric_history(run_id, key)}

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
                   tables: dict[str, list[dict]] | None = None, table_prefix: str = "",
                   curves_logged: bool = False, inputs: Sequence[Lineage] = ()) -> None:
        """What every stage logs: params, per-epoch curves, metrics, figures (PNG), tables (JSON) and its
        inputs (lineage). ``curves_logged``: the history went live during training (:mod:`vitdistill.live`)
        and is not logged again."""
        self.log_params(run_id, params)
        curves = {k for row in history for k in row}
        if history and not curves_logged:
            self.log_history(run_id, list(history))
        # a final value that is also a curve is the curve's last point already (not a second point at step 0)
        self.log_metrics(run_id, {k: v for k, v in metrics.items() if k not in curves})
        for name, fig in (figures or {}).items():
            self.log_figure(run_id, fig, name)
        for name, rows in (tables or {}).items():
            self.log_dict(run_id, rows, f"{table_prefix}{name}.json")
        if inputs:
            self.log_input(run_id, *inputs)

    # ------------------------------------------------------------------ lineage
    def log_input(self, run_id: str, *inputs: Lineage) -> None:
        """Data sets and caches a run read or wrote, as MLflow dataset inputs (the run page's lineage):
        digest = the first 32 hex digits of the content hash (MLflow keeps 36 characters), the full hash
        in the profile, the role in the ``mlflow.data.context`` tag."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        datasets = []
        for item in inputs:
            scheme = item.source.split("://", 1)[0] if "://" in item.source else "local"
            ds = Dataset(name=item.name, digest=item.digest[:32], source_type=scheme,
                         source=json.dumps({"uri": redact_uri(item.source)}),
                         profile=json.dumps({"kind": item.kind, "sha256": item.digest, **item.profile}))
            datasets.append(DatasetInput(ds, tags=[InputTag("mlflow.data.context", item.context),
                                                   InputTag("vitdistill.kind", item.kind)]))
        if datasets:
            self.client.log_inputs(run_id, datasets=datasets)

    # ------------------------------------------------------------------ models
    def log_student(self, run_id: str, student: Any, name: str = "student", registered_model_name: str | None = None,
                    version_tags: dict[str, Any] | None = None, champion: tuple[str, str] | None = None
                    ) -> dict[str, Any]:
        """Log a distilled student as a pyfunc model from code (:mod:`vitdistill.distill.pyfunc_student`):
        its architecture as JSON, its weights as safetensors, a tensor signature (float32 (-1, 3, S, S)
        -> logits (-1, C)) and an input example; nothing is pickled. Registered as
        ``registered_model_name`` with ``version_tags``, the version gets the alias ``candidate`` and,
        when it beats the current ``champion`` on ``champion = (metric, "max" | "min")``, ``champion``.
        Returns ``{"model_uri", "registered_model", "version", "champion"}``."""
        import mlflow
        import numpy as np
        import torch
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        from vitdistill.distill import pyfunc_student
        from vitdistill.distill.students import save_student

        side = int(student.img_size)
        gen = torch.Generator().manual_seed(0)
        example = torch.randn(2, 3, side, side, generator=gen).numpy()  # (2, 3, S, S), normalised inputs
        with torch.inference_mode():
            classes = int(student.eval()(torch.from_numpy(example))["logits"].shape[-1])
        signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, side, side))]),
                                   outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, classes))]))
        with self._fluent(), tempfile.TemporaryDirectory() as d, mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=name, python_model=pyfunc_student.__file__, artifacts=save_student(student, d),
                signature=signature, input_example=example, registered_model_name=registered_model_name,
                pip_requirements=_requirements("timm", "safetensors"))
        out: dict[str, Any] = {"model_uri": info.model_uri, "registered_model": registered_model_name, "version": None,
                               "champion": None}
        if registered_model_name and info.registered_model_version is not None:
            version = out["version"] = str(info.registered_model_version)
            for k, v in (version_tags or {}).items():
                self.client.set_model_version_tag(registered_model_name, version, k, str(v))
            if champion:
                out["champion"] = self.promote(registered_model_name, version, *champion,
                                               (version_tags or {}).get(champion[0]))
        return out

    def promote(self, model: str, version: str, metric: str, mode: str, value: float | None) -> str:
        """Alias ``candidate`` to ``version``; move ``champion`` to it when there is none yet, or when
        ``value`` of ``metric`` beats the champion's (``mode`` max: higher is better); returns the
        champion's version after the move."""
        from mlflow.exceptions import MlflowException

        self.client.set_registered_model_alias(model, "candidate", version)
        self.client.set_model_version_tag(model, version, "vitdistill.champion_metric", metric)
        try:
            current = self.client.get_model_version_by_alias(model, "champion")
        except MlflowException:
            current = None
        best = None
        if current is not None:
            best = current.tags.get(metric)
            if best is None and current.run_id:  # tagged under another champion_metric: read its run
                best = self.client.get_run(current.run_id).data.metrics.get(metric)
        better = value is not None and (best is None or (float(value) > float(best) if mode == "max"
                                                         else float(value) < float(best)))
        if current is None or better:
            self.client.set_registered_model_alias(model, "champion", version)
            return version
        return str(current.version)

    @contextmanager
    def _fluent(self) -> Iterator[None]:
        """MLflow's fluent API (``log_model``, ``load_model``) on this tracker's store. ``mlflow.set_tracking_uri``
        also writes ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI`` into the environment, where every
        subprocess this process starts would inherit them: the environment is restored afterwards."""
        import mlflow

        saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def load_student(self, model_uri: str) -> Any:
        """A student :meth:`log_student` logged (``runs:/``, ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``
        of this tracking server), as the torch module, without unpickling anything."""
        import mlflow
        from mlflow.exceptions import MlflowException

        try:
            with self._fluent():
                model = mlflow.pyfunc.load_model(model_uri)
        except (MlflowException, OSError) as e:
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise ConfigError(f"student {model_uri!r}: cannot load it from {self.display_uri} ({reason})") from None
        wrapped = model.unwrap_python_model()
        if not hasattr(wrapped, "model"):
            raise ConfigError(f"student {model_uri!r}: not a student logged by vitdistill (a pyfunc without .model)")
        return wrapped.model

    def model_identity(self, model_uri: str) -> tuple[str | None, str | None]:
        """(logged model id, registered version) of a model URI (``models:/NAME@ALIAS`` resolved to the version
        the alias points at now); None where MLflow has none."""
        import mlflow
        from mlflow.exceptions import MlflowException
        from mlflow.models import get_model_info

        version = None
        body = model_uri.removeprefix("models:/")
        if model_uri.startswith("models:/") and "@" in body:
            name, alias = body.split("@", 1)
            version = str(self.client.get_model_version_by_alias(name, alias).version)
        elif model_uri.startswith("models:/") and body.count("/") == 1:
            version = body.split("/")[1]
        try:
            with self._fluent():
                model_id = getattr(get_model_info(model_uri), "model_id", None)
        except MlflowException:
            model_id = None
        return model_id, version

    def log_model_input(self, run_id: str, model_id: str) -> None:
        """A logged model (MLflow 3 ``LoggedModel``) the run read: the run page links to it."""
        from mlflow.entities import LoggedModelInput

        self.client.log_inputs(run_id, models=[LoggedModelInput(model_id)])

    def log_pytorch_model(self, run_id: str, model: Any, name: str) -> dict[str, Any]:
        """Log a torch module (the LiT text side: strings in, so no tensor signature) as an MLflow model of
        ``run_id``; returns ``{"model_uri"}``. Pickle serialisation (MLflow 3's ``pt2`` traces tensor inputs
        only): a model we trained, for people to load; no stage loads it back, and the student is logged
        without pickle (:meth:`log_student`)."""
        import mlflow
        import mlflow.pytorch

        with self._fluent(), mlflow.start_run(run_id=run_id):
            info = mlflow.pytorch.log_model(model, name=name, serialization_format="pickle",
                                            pip_requirements=_requirements("transformers", "open_clip_torch"))
        return {"model_uri": info.model_uri}

    def log_history(self, run_id: str, history: list[dict[str, Any]], step_key: str = "epoch") -> None:
        """Per-epoch rows as metric curves (``train_loss`` at step ``epoch``, ...), all stamped now: a
        training logs its rows live instead (:mod:`vitdistill.live`)."""
        now = int(time.time() * 1000)
        self.log_points(run_id, [p for row in history for p in history_points(row, now, step_key)])

    def system_metrics(self, run_id: str, interval: float) -> Any:
        """MLflow's system-metrics monitor for ``run_id`` (CPU, memory, disk, network, GPU with pynvml),
        started: a sample every ``interval`` seconds as ``system/*`` metrics until ``.finish()``."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, resume_logging=True, tracking_uri=self.uri)
        monitor.start()
        return monitor

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


def history_points(row: dict[str, Any], timestamp: int, step_key: str = "epoch") -> list[tuple[str, float, int, int]]:
    """One epoch row -> ``(key, value, timestamp, step)`` points at step ``row[step_key]`` (NaNs dropped)."""
    step = int(row[step_key])
    return [(k, float(v), timestamp, step) for k, v in row.items()
            if k != step_key and isinstance(v, (int, float)) and v == v]


@dataclass(frozen=True)
class Lineage:
    """A data set or cache a stage read or wrote, as :meth:`Tracker.log_input` records it."""

    kind: str  # "dataset" | "feature_cache" | "view_cache"
    name: str
    digest: str  # content hash (sha256 hex)
    source: str  # where it lives: a manifest or directory URI
    context: str  # its role for the run: "source", "output", "training", "evaluation"
    profile: dict[str, Any] = field(default_factory=dict)  # small JSON facts (samples, shards, teacher)


def cache_lineage(cache_dir: str, context: str, dataset_context: str | None = None) -> list[Lineage]:
    """A feature cache (digest: :meth:`FeatureCache.content_sha256`) and the data set it was extracted from
    (digest: the ingest fingerprint its manifest records), for a run that used it as ``context``."""
    from vitdistill.cache import fs
    from vitdistill.cache.reader import FeatureCache

    cache = FeatureCache.open(cache_dir)
    m = cache.manifest
    ds = m.get("dataset") or {}
    out = []
    if ds.get("fingerprint"):  # a wds source has no ingest manifest: its shards are where they were read
        shard = next((s.get("input") for s in m.get("shards", ()) if s.get("input")), None)
        out.append(Lineage("dataset", str(ds.get("source", "dataset")), ds["fingerprint"],
                           ds.get("manifest") or shard or cache_dir, dataset_context or context))
    out.append(Lineage("feature_cache", f"features/{cache_dir.rstrip('/').rsplit('/', 1)[-1]}", cache.content_sha256(),
                       fs.join(cache_dir, "manifest.json"), context,
                       {"samples": m.get("num_samples"), "shards": len(m.get("shards", ()))}))
    return out


def inputs_lineage(inputs: Any, context: str) -> Lineage:
    """An :class:`~vitdistill.data.ingest.InputSet` (its content fingerprint as digest)."""
    return Lineage("dataset", inputs.source, inputs.fingerprint,
                   inputs.manifest or (inputs.shards[0].rsplit("/", 1)[0] if inputs.shards else inputs.source), context,
                   {"shards": len(inputs.shards)})


def _requirements(*names: str) -> list[str]:
    """A logged model's pip requirements, pinned to what logged it (MLflow's inference would load the
    model once more in a subprocess)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("mlflow", "torch", "numpy", "vitdistill", *names):
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(name)
    return out


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
