"""The ``vitdistill`` command line.

    vitdistill run                                  # whole pipeline on embedded defaults
    vitdistill probe -c configs/shapes.yaml --set probe.knn_k=[5,10] --json out.json
    vitdistill config show --set data.source=shapes
    vitdistill list teachers
    vitdistill report                               # HTML report of the latest finished run

Every stage command takes ``-c/--config FILE``, repeatable ``--set dotted.key=value`` and
``--json PATH``. Bad input exits non-zero with one line on stderr; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # telemetry lookups fail offline
os.environ.setdefault("PREFECT_UI_ENABLED", "true")
# the ephemeral API's start-up wait (Prefect's default, 20 s, is too short on a loaded 2-core machine)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# a tracking server that dies mid-run: MLflow's client would retry for minutes (7 retries, backoff factor 2, 120 s
# timeout); these bound it to about 10 s, then the stage fails with one line (vitdistill.faults); set them to override
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")

app = typer.Typer(
    name="vitdistill",
    help="Frozen vision teacher -> feature cache -> probes, LiT, distillation, evaluations; Prefect + MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Show or validate the resolved config.", no_args_is_help=True)
data_app = typer.Typer(help="Dataset utilities.", no_args_is_help=True)
list_app = typer.Typer(help="List registered plug-ins.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
app.add_typer(list_app, name="list")

out = Console()
err = Console(stderr=True)

ConfigOpt = Annotated[Optional[list[Path]], typer.Option(
    "-c", "--config", help="YAML config file (an instance of the config tree); repeat to layer files, e.g. a data "
    "config then a recipe from configs/distill/")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a key: dotted.key=value (repeatable).")]
def _json_target(path: Path | None) -> Path | None:
    """``--json PATH`` is checked when the command line is parsed, before any work: a directory, or a
    place where no file can be created, is one line and exit code 2."""
    if path is None:
        return None
    if path.is_dir():
        _fail_usage(f"--json {path}: is a directory; expected the path of a file to write")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        _fail_usage(f"--json {path}: {ancestor} is not a directory; expected the path of a file to write")
    writable = os.access(path, os.W_OK) if path.exists() else os.access(ancestor, os.W_OK | os.X_OK)
    if not writable:
        _fail_usage(f"--json {path}: cannot write there (permission denied or read-only); choose another path")
    return path


def _fail_usage(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


JsonOpt = Annotated[Optional[Path], typer.Option("--json", callback=_json_target,
                                                 help="Write the command's result (metrics, paths, run ids) as JSON.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show full tracebacks and Prefect's error logs.")]


# --------------------------------------------------------------------------- error handling


class _NoTracebacks(logging.Filter):
    """Keep Prefect's error logs to their first line unless --debug."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info = None
        record.exc_text = None
        msg = record.getMessage()
        if "\nTraceback" in msg:
            record.msg, record.args = msg.split("\nTraceback", 1)[0], ()
        return True


def _quiet_prefect_tracebacks() -> None:
    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", ""):
        for h in logging.getLogger(name).handlers:
            h.addFilter(_NoTracebacks())


def _one_line(e: BaseException) -> str:
    from vitdistill.errors import one_line

    known = one_line(e)
    if known is not None:
        return known
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first} (re-run with --debug for the traceback)"


_INTERRUPTED = False


def _on_sigint(signum: int, frame: Any) -> None:
    global _INTERRUPTED
    _INTERRUPTED = True
    signal.default_int_handler(signum, frame)


def _exit_interrupted() -> None:
    """One line, exit code 130 (128 + SIGINT), as shells report a Ctrl-C."""
    err.print("interrupted; what finished is kept (caches, shards, checkpoints): run the same command "
              "again to resume", highlight=False, soft_wrap=True)
    raise typer.Exit(130) from None


def _guard(debug: bool, fn: Callable[[], Any]) -> Any:
    if debug:
        return fn()
    try:
        return fn()
    except BaseException as e:
        if not (isinstance(e, KeyboardInterrupt) or _INTERRUPTED):
            return _fail(e)
        # a Ctrl-C reaches the whole process group: the ephemeral Prefect server may stop first, so
        # what surfaces here can be a connection error rather than the KeyboardInterrupt itself
        _exit_interrupted()


def _fail(e: BaseException) -> Any:
    """Every failure becomes one line on stderr (typer's own exits pass through)."""
    if isinstance(e, (typer.Exit, typer.Abort)):
        raise e
    from vitdistill.errors import VitdistillError
    from vitdistill.redact import redact_uri

    err.print(f"[bold red]error:[/] {redact_uri(_one_line(e))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2 if isinstance(e, VitdistillError) else 1) from None


def _load(config: list[Path] | None, sets: list[str] | None):
    from vitdistill.config import load_config

    return load_config(config, sets or [])


def _write_json(path: Path | None, result: Any) -> None:
    if path is None:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
        os.replace(tmp, path)
    except OSError as e:  # checked up front (_json_target); this is the path changing under us
        _fail_usage(f"--json {path}: cannot write the result ({e.strerror or e})")
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- stages


def _label(stage: dict) -> str:
    from vitdistill.stages import stage_label

    return stage_label(stage["stage"], stage.get("teacher"))


def _summary(result: dict) -> None:
    table = Table(title=f"vitdistill {result['target']}", show_lines=False)
    table.add_column("stage", style="bold")
    table.add_column("status")
    table.add_column("headline")
    table.add_column("MLflow run", style="dim")
    colour = {"ok": "green", "not built": "yellow", "disabled": "dim", "failed": "red", "skipped": "yellow"}
    for s in result["stages"]:
        status = f"[{colour.get(s['status'], 'white')}]{s['status']}[/]"
        table.add_row(_label(s), status, s["headline"] or s["message"], s["run_id"] or "-")
    out.print(table)
    out.print(f"MLflow parent run [bold]{result['mlflow_run_id']}[/] (experiment {result['mlflow_experiment_id']}, {result['tracking_uri']})")
    if result.get("mlflow_run_url"):
        out.print(f"  open: {result['mlflow_run_url']}")
    out.print(f"  MLflow UI: [cyan]{result['mlflow_ui']}[/]  -> http://127.0.0.1:5000")
    out.print("  Prefect UI: [cyan]prefect server start[/]  -> http://127.0.0.1:4200 (shows ephemeral runs too)")
    if result.get("report"):
        out.print(f"  report: [bold]{result['report']['html_path']}[/] ({result['report']['headline']})", highlight=False)


def check_prefect_api(required: bool = False) -> str | None:
    """One line telling what to start or set when the Prefect API is missing or unreachable."""
    from vitdistill.errors import ConfigError
    from vitdistill.redact import redact_uri
    from vitdistill_cli.stack import http_ok

    api = os.environ.get("PREFECT_API_URL")
    if not api:
        if required:
            raise ConfigError("PREFECT_API_URL is not set; start a server with `vitdistill up` and "
                              "`export PREFECT_API_URL=http://127.0.0.1:4200/api`")
        return None
    if not http_ok(f"{api.rstrip('/')}/health", timeout=5):
        raise ConfigError(f"cannot reach the Prefect API at PREFECT_API_URL={redact_uri(api)}; start it with `vitdistill up` or "
                          "`prefect server start`, or unset PREFECT_API_URL to run on an ephemeral API")
    return api


class _EphemeralAPI:
    """Prefect's ephemeral API server, started first thing as a process of its own
    (:mod:`vitdistill_cli.prefect_api`), in a process group of its own, while this command does its other
    start-up work (MLflow, importing the flows).

    Prefect would start it on first use, importing its whole server (fastapi, sqlalchemy, the routers)
    into this process only to launch the same uvicorn process, and in this command's process group,
    where a Ctrl-C reaches it too: it would stop before the flows could record their ends, and print its
    own shutdown traceback. In its own group it outlives the interrupt, this command ends its flows and
    stops it at exit; the watchdog stops it if this command is killed. Its start-up (importing Prefect's
    server and migrating the database, about 4 s) runs on one core while this command imports on the
    other, and this process never imports the server."""

    def __init__(self, keep_s: float = 0.0) -> None:
        import atexit
        import subprocess

        self.t0 = time.perf_counter()
        self.seconds = 0.0
        self.api_url: str | None = None
        self.kept = keep_s > 0
        self.reused = False
        self._timeout = 120.0
        self._report: dict | None = None
        self._lock_fd: int | None = None
        self._pid: int | None = None
        self.process: subprocess.Popen | None = None
        self._pipe: int | None = None
        if self.kept and self._attach(keep_s):
            return
        read, write = os.pipe()
        args = [sys.executable, "-m", "vitdistill_cli.prefect_api", str(write)]
        try:
            if self.kept:  # detached, logging to a file of its own: it outlives this command
                from vitdistill_cli import prefect_api

                self._log = prefect_api.kept_dir() / f"{self._key}.log"
                with open(self._log, "ab") as log:
                    self.process = subprocess.Popen([*args, "--keep", str(keep_s), "--key", self._key],
                                                    pass_fds=(write,), stdin=subprocess.DEVNULL, stdout=log,
                                                    stderr=log, start_new_session=True)
            else:
                self.process = subprocess.Popen(args, pass_fds=(write,), stdin=subprocess.DEVNULL, process_group=0)
        finally:
            os.close(write)
        self._pipe = read
        if not self.kept:
            atexit.register(self.stop)  # early, so it runs after Prefect's own exit hooks (they flush to the API)

    def _attach(self, keep_s: float) -> bool:
        """With ``orchestration.keep_api_s``: take this command's lease on the kept server of these settings
        (held until the process ends) and use the server if it is up; False when one has to be started (the
        start lock is then held until :meth:`use` has its port, so a concurrent command waits for it)."""
        import fcntl

        from vitdistill_cli import prefect_api

        d = prefect_api.kept_dir()
        d.mkdir(parents=True, exist_ok=True)
        self._key = prefect_api.api_key()
        self._lock_fd = os.open(d / f"{self._key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        lease = os.open(d / f"{self._key}.lease", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(lease, fcntl.LOCK_SH)  # never closed: the kernel drops it when this process ends
        record = prefect_api.read_record(d / f"{self._key}.json")
        if record is None:
            return False
        self._report, self._pid, self.reused = record, record["pid"], True
        self._release_start_lock()
        return True

    def _release_start_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    def use(self) -> None:
        """Point this process's Prefect at the server (``PREFECT_API_URL``) once it has its port; called
        before Prefect is imported, which reads its settings once."""
        report = self._report
        if report is None:
            with os.fdopen(self._pipe, "r") as pipe:
                line = pipe.readline()
            if self.kept and self.process is not None:  # the parent of the detached server, gone at once
                self.process.wait()
                self.process = None
            self._release_start_lock()
            if not line:
                code = self.process.wait() if self.process else None
                where = f"see {self._log}" if self.kept else "see its output above"
                raise RuntimeError(f"the ephemeral Prefect API server exited (code {code}) before it chose a port; "
                                   f"{where}")
            report = json.loads(line)
            self._pid = report.get("pid")
        if report["port"] is None:  # a profile names the API, or the ephemeral server is disabled
            self.stop()
            return
        self._timeout = float(report["timeout"])
        self.api_url = f"http://127.0.0.1:{report['port']}/api"
        os.environ["PREFECT_API_URL"] = self.api_url
        if not report["ui_url_set"]:  # as on Prefect's own ephemeral API: no "View at" links to a server that
            os.environ["PREFECT_UI_URL"] = ""  # serves no UI and stops with the command

    def wait(self) -> None:
        """Until the server answers ``/health`` (at most ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``)."""
        if self.api_url is None:
            return
        from vitdistill_cli.stack import http_ok

        deadline = self.t0 + self._timeout
        while not http_ok(f"{self.api_url}/health", timeout=2):
            code = self.process.poll() if self.process else None
            gone = code is not None or (self.kept and not self._kept_alive())
            if gone or time.perf_counter() > deadline:
                why = (f"exited with code {code}" if code is not None else "exited" if gone
                       else f"did not answer in {self._timeout:.0f} s")
                where = f"see {self._log}" if self.kept and not self.reused else "see its output above"
                raise RuntimeError(f"the ephemeral Prefect API server at {self.api_url} {why}; {where} "
                                   "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS sets the wait)")
            time.sleep(0.05)
        self.seconds = 0.0 if self.reused else time.perf_counter() - self.t0

    def _kept_alive(self) -> bool:
        import psutil

        return self._pid is not None and psutil.pid_exists(self._pid)

    def stop(self) -> None:
        """Terminate the server (5 s to stop, then killed), as Prefect's ``SubprocessASGIServer.stop``. A kept
        server is left running: it stops itself once no command has used it for ``keep_api_s``."""
        import subprocess

        if self.kept:
            return
        proc, self.process = self.process, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.api_url is not None and os.environ.get("PREFECT_API_URL") == self.api_url:
            del os.environ["PREFECT_API_URL"]


def _start_ephemeral_api(keep_s: float = 0.0) -> _EphemeralAPI | None:
    """Start the ephemeral API in the background when no ``PREFECT_API_URL`` server is used, or with
    ``keep_s`` (``orchestration.keep_api_s``) use the kept one of these settings if it is up. Where
    Prefect was imported already (this command run from Python), its settings are read: Prefect
    then starts its own server on first use."""
    if check_prefect_api() is not None or "prefect" in sys.modules:
        return None
    return _EphemeralAPI(keep_s)


# where a command's start-up time goes (seconds), written as JSON to $VITDISTILL_TIMINGS when set;
# benchmarks/bench_cli.py reads it
TIMINGS: dict[str, float] = {}


def _write_timings() -> None:
    path = os.environ.get("VITDISTILL_TIMINGS")
    if path:
        Path(path).write_text(json.dumps(TIMINGS, indent=2) + "\n")


def _before_flows(config: list[Path] | None, sets: list[str] | None, debug: bool, prefect_level: int = logging.INFO):
    """The config, after the checks that fail in one line before any flow run (Prefect API, MLflow
    server), with Prefect's logs at ``prefect_level`` and cut to one line unless ``debug``."""
    t0 = time.perf_counter()
    cfg = _load(config, sets)
    from vitdistill_cli import watchdog

    watchdog.start()  # first: a kill -9 of this command then still stops the ephemeral Prefect server below
    t1 = time.perf_counter()
    api = _start_ephemeral_api(cfg.orchestration.keep_api_s)
    t2 = time.perf_counter()
    from vitdistill.tracking import get_tracker

    tracker = get_tracker(cfg.tracking)  # an unreachable MLflow server fails here
    stale = tracker.close_stale_runs()  # runs a killed earlier command left RUNNING
    if stale:
        err.print(f"marked {len(stale)} MLflow run(s) KILLED that an earlier, killed command left RUNNING",
                  highlight=False)
    t3 = time.perf_counter()
    if api is not None:
        api.use()  # PREFECT_API_URL, before the flows import Prefect
    importlib.import_module("flows.pipeline")  # sets up Prefect's logging, whose handlers are then quietened
    t4 = time.perf_counter()
    if api is not None:
        api.wait()
    t5 = time.perf_counter()
    TIMINGS.update({"config_and_watchdog": t1 - t0, "prefect_api_check": t2 - t1, "mlflow": t3 - t2,
                    "imports_flows": t4 - t3, "ephemeral_api_start": api.seconds if api else 0.0,
                    "ephemeral_api_wait": t5 - t4})
    if not debug:
        logging.getLogger("prefect").setLevel(prefect_level)
        _quiet_prefect_tracebacks()
    return cfg


def _run_target(target: str, config: list[Path] | None, sets: list[str] | None, json_path: Path | None, debug: bool) -> None:
    def body() -> dict:
        cfg = _before_flows(config, sets, debug)
        from flows.pipeline import get_flow
        from vitdistill.redact import conceal
        from vitdistill.stages import StagesFailed

        t0 = time.perf_counter()
        try:
            result = get_flow(target)(conceal(cfg))  # Prefect keeps the parameter: passwords masked, kept here
        except StagesFailed as e:  # some stages failed: the summary still tells what ran, failed, was skipped
            result = e.result
        TIMINGS["flow"] = time.perf_counter() - t0
        _write_timings()
        _write_json(json_path, result)
        return result

    result = _guard(debug, body)
    _summary(result)
    if _INTERRUPTED:  # a stage stopped by the Ctrl-C reports itself failed
        _exit_interrupted()
    failed = [s for s in result["stages"] if s["status"] == "failed"]
    for s in failed:
        from vitdistill.redact import redact_uri

        err.print(f"[bold red]error:[/] {redact_uri(s['message'])} (stage {_label(s)})", highlight=False, soft_wrap=True)
    for s in result["stages"]:
        if s["status"] == "skipped":
            need = _label({"stage": s["skipped_because"], "teacher": s.get("teacher")})
            err.print(f"skipped: {_label(s)} (it needs {need}, which failed)", highlight=False)
    if failed:
        raise typer.Exit(2 if all(s["bad_input"] for s in failed) else 1)


@app.command("run")
def run_cmd(config: ConfigOpt = None, set_: SetOpt = None, json_path: JsonOpt = None, debug: DebugOpt = False) -> None:
    """Run the whole pipeline: extract -> probe -> lit -> distill -> evaluate."""
    _run_target("pipeline", config, set_, json_path, debug)


def _stage_command(stage: str, help_text: str) -> None:
    def cmd(config: ConfigOpt = None, set_: SetOpt = None, json_path: JsonOpt = None, debug: DebugOpt = False) -> None:
        _run_target(stage, config, set_, json_path, debug)

    cmd.__doc__ = help_text
    app.command(stage)(cmd)


def add_stage_commands() -> None:
    """One sub-command per registered stage (each runs the stage after what it needs)."""
    from vitdistill.stages import STAGES

    have = {c.name for c in app.registered_commands}
    for s in STAGES:
        if s.name not in have:
            _stage_command(s.name, s.description)


add_stage_commands()


RunIdArg = Annotated[Optional[str], typer.Argument(
    help="MLflow run id of a pipeline run or of one of its stages; default: the latest finished run that evaluated")]


@app.command("report")
def report_cmd(run_id: RunIdArg = None, config: ConfigOpt = None, set_: SetOpt = None, json_path: JsonOpt = None,
               debug: DebugOpt = False) -> None:
    """One HTML report of a finished run: teacher vs student across every evaluation, and every stage."""

    def body() -> dict:
        cfg = _before_flows(config, set_, debug, prefect_level=logging.WARNING)
        from flows.pipeline import report_flow
        from vitdistill.redact import conceal
        from vitdistill.report import find_parent_run_id
        from vitdistill.tracking import get_tracker

        find_parent_run_id(get_tracker(cfg.tracking), run_id)  # a wrong id fails here, in one line, before Prefect starts
        return report_flow(conceal(cfg), run_id)  # passwords masked in the flow-run parameter, kept here

    result = _guard(debug, body)
    _write_json(json_path, result)
    _print_report(result)


def _print_report(report: dict) -> None:
    out.print(f"[bold]report[/] of {report['run_name']} ({report['run_id']}): {report['verdict']}", highlight=False)
    table = Table(show_lines=False)
    for col in ("metric", "teacher", "student", "student - teacher", "winner"):
        table.add_column(col)
    for r in report["rows"]:
        if r["headline"]:
            vals = [f"{r[k]:.4g}" if r[k] is not None else "-" for k in ("teacher", "student")]
            delta = f"{r['delta']:+.4g}" if r["delta"] is not None else "-"
            table.add_row(r["label"], *vals, delta, r["winner"] or "-")
    out.print(table)
    out.print(f"  HTML:            {report['html_path']}", highlight=False)
    out.print(f"  MLflow artifact: {report['artifact_uri']}", highlight=False)
    if report.get("run_url"):
        out.print(f"  open:            {report['run_url']}/artifacts/report/report.html", highlight=False)


# --------------------------------------------------------------------------- servers and deployments


@app.command("up")
def up_cmd(config: ConfigOpt = None, set_: SetOpt = None, json_path: JsonOpt = None, debug: DebugOpt = False) -> None:
    """Start a local Prefect server, a process worker and an MLflow server on 127.0.0.1."""
    from vitdistill_cli import stack

    info = _guard(debug, lambda: stack.up(_load(config, set_)))
    _write_json(json_path, info)
    out.print(f"Prefect UI   {info['prefect_url']}")
    out.print(f"MLflow UI    {info['mlflow_url']}")
    out.print(f"worker       pool {info['work_pool']!r} (logs in {Path(info['processes'][-1]['log']).parent})")
    out.print("use them:    [cyan]export PREFECT_API_URL=" + info["prefect_api_url"]
              + " MLFLOW_TRACKING_URI=" + info["mlflow_url"] + "[/]")
    out.print("then:        vitdistill deploy && vitdistill submit pipeline --wait   (stop: vitdistill down)")


@app.command("down")
def down_cmd(config: ConfigOpt = None, set_: SetOpt = None, debug: DebugOpt = False) -> None:
    """Stop exactly the processes `vitdistill up` started from this directory, and the kept ephemeral
    Prefect APIs of this PREFECT_HOME (orchestration.keep_api_s)."""
    from vitdistill_cli import prefect_api, stack

    cfg = _guard(debug, lambda: _load(config, set_))
    kept = [f"ephemeral Prefect API (pid {pid})" for pid in prefect_api.stop_kept()]
    if kept and not stack.state_file(cfg).exists():
        stopped = []
    else:
        stopped = _guard(debug, lambda: stack.down(cfg))
    out.print(f"stopped: {', '.join([*stopped, *kept]) or 'nothing was running'}")


@app.command("deploy")
def deploy_cmd(config: ConfigOpt = None, set_: SetOpt = None, json_path: JsonOpt = None, debug: DebugOpt = False,
               activate_schedules: Annotated[bool, typer.Option("--activate-schedules", help="Turn the example cron schedules on (created paused otherwise).")] = False) -> None:
    """Create or update one deployment per flow on the server in PREFECT_API_URL."""

    def body() -> list[dict]:
        cfg = _load(config, set_)
        check_prefect_api(required=True)
        from deploy.deployments import deploy_all

        return deploy_all(cfg, activate_schedules)

    rows = _guard(debug, body)
    _write_json(json_path, rows)
    table = Table(title="vitdistill deployments")
    for col in ("deployment", "work_pool", "cron", "schedule_active"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["deployment"], r["work_pool"], r["cron"], str(r["schedule_active"]))
    out.print(table)


@app.command("submit")
def submit_cmd(stage: Annotated[str, typer.Argument(help="pipeline, a stage (`vitdistill list stages`) or report")],
               config: ConfigOpt = None, set_: SetOpt = None, json_path: JsonOpt = None, debug: DebugOpt = False,
               wait: Annotated[bool, typer.Option("--wait", help="Wait for the run to finish.")] = False,
               timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait.")] = 1800) -> None:
    """Start a run of a stage's deployment on the server (a worker executes it)."""

    def body() -> dict:
        cfg = _load(config, set_)
        check_prefect_api(required=True)
        from deploy.deployments import submit

        return submit(stage, cfg, timeout if wait else None)

    result = _guard(debug, body)
    _write_json(json_path, result)
    out.print(f"{result['deployment']}: flow run {result['flow_run_name']} ({result['flow_run_id']}) {result['state']}")
    if wait and result["state"] != "COMPLETED":
        err.print(f"[bold red]error:[/] flow run {result['flow_run_id']} ended {result['state']}; is a worker "
                  f"running on the pool (`vitdistill up`, or `prefect worker start --pool ...`)?")
        raise typer.Exit(1)


# --------------------------------------------------------------------------- config


@config_app.command("show")
def config_show(config: ConfigOpt = None, set_: SetOpt = None, flat: Annotated[bool, typer.Option("--flat", help="dotted.key = value lines")] = False,
                debug: DebugOpt = False) -> None:
    """Print the resolved config (defaults <- file <- --set) as YAML, passwords in URIs masked."""
    from vitdistill.config import flatten, to_yaml
    from vitdistill.redact import redact, redact_uri

    cfg = _guard(debug, lambda: _load(config, set_))
    if flat:
        for k, v in flatten(cfg).items():
            out.print(f"{k} = {redact(v)!r}", highlight=False)
    else:
        out.print(redact_uri(to_yaml(cfg)), highlight=False, end="")


@config_app.command("validate")
def config_validate(config: ConfigOpt = None, set_: SetOpt = None, debug: DebugOpt = False) -> None:
    """Check a config file; exits non-zero with one line naming the bad key."""
    _guard(debug, lambda: _load(config, set_))
    out.print(f"ok: {' + '.join(map(str, config)) if config else 'defaults'} is a valid vitdistill config")


# --------------------------------------------------------------------------- data and registries


@data_app.command("ingest")
def data_ingest(config: ConfigOpt = None, set_: SetOpt = None, json_path: JsonOpt = None, debug: DebugOpt = False) -> None:
    """Write the configured dataset (digits, shapes, folder) as image shards; reuses finished ones."""

    def body() -> dict:
        from vitdistill.data.ingest import resolve_inputs

        return resolve_inputs(_load(config, set_)).to_dict()

    result = _guard(debug, body)
    _write_json(json_path, result)
    out.print(f"{len(result['shards'])} shards, manifest {result['manifest'] or '(existing wds shards)'}")
    for s in result["shards"]:
        out.print(f"  {s}", highlight=False)


@list_app.command("teachers")
def list_teachers_cmd(pattern: Annotated[str, typer.Argument(help="shell-style pattern")] = "*") -> None:
    """Registered teachers, and the SOURCE:MODEL families (any timm model name works too)."""
    from vitdistill.models.teachers import TEACHER_SOURCES, list_teacher_sources, list_teachers

    for n in list_teachers(pattern):
        out.print(n)
    for n in list_teacher_sources():
        doc = (TEACHER_SOURCES.get(n).__doc__ or "").strip().splitlines()[0]
        out.print(f"{n}:MODEL  [dim]{doc}[/]", highlight=False)
    out.print("[dim]... or any timm model name (timm.list_models()), with teacher.pretrained / teacher.checkpoint[/]")


@list_app.command("datasets")
def list_datasets_cmd() -> None:
    """Dataset sources for data.source."""
    from vitdistill.data.datasets import list_datasets

    for n in list_datasets():
        out.print(n)


@list_app.command("students")
def list_students_cmd() -> None:
    """Registered students (any timm model name works too)."""
    from vitdistill.distill.students import list_students

    for n in list_students():
        out.print(n)
    out.print("[dim]... or any timm model name[/]")


@list_app.command("text-towers")
def list_text_towers_cmd() -> None:
    """LiT text towers for lit.text_tower."""
    from vitdistill.lit import list_text_towers

    for n in list_text_towers():
        out.print(n)


@list_app.command("losses")
def list_losses_cmd() -> None:
    """Distillation loss terms (distill.losses) and LiT losses (lit.loss)."""
    from vitdistill.distill.losses import list_losses
    from vitdistill.lit import list_lit_losses

    out.print("distill.losses: " + ", ".join(list_losses()))
    out.print("lit.loss:       " + ", ".join(list_lit_losses()))


@list_app.command("stages")
def list_stages_cmd() -> None:
    """Pipeline stages and what each needs first."""
    from vitdistill.stages import STAGES

    for s in STAGES:
        out.print(f"{s.name}  <- {', '.join(s.needs) or '-'}  [dim]{s.description}[/]", highlight=False)


def _exit_now(code: Any) -> None:
    """End the process as ``sys.exit(code)`` would, without the interpreter's teardown.

    Non-daemon threads are joined and the exit hooks run (``atexit``: Prefect and MLflow flush what they
    queued, logging shuts down, temporary directories go, the ephemeral API server is stopped), and the
    output is flushed; then ``os._exit``. What is skipped is the interpreter tearing down every module and
    freeing every object one by one: after a flow run (Prefect, MLflow, pandas, SQLAlchemy imported) that
    alone took ~3 s, a quarter of a no-op command (``benchmarks/bench_cli.py``)."""
    import atexit
    import threading

    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message")
        print(code, file=sys.stderr)
        code = 1
    threading._shutdown()  # as at a normal exit, first: its hooks end thread pools, then non-daemon threads are joined
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def main() -> None:
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        app()
    except SystemExit as e:
        _exit_now(e.code)
    _exit_now(0)


if __name__ == "__main__":
    sys.exit(main())
