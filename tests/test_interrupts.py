"""Interrupts of every stage (issue #17, fault 6) and what a killed CLI leaves behind.

A Ctrl-C (SIGINT to the command's process group, as a terminal sends it) exits promptly with one
line and exit code 130; a ``kill -9`` leaves no ephemeral Prefect server running (the watchdog stops
it) and its MLflow runs are marked KILLED when the next command starts; and after each interruption
the same command resumes, ending with the metrics of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
# small teacher batches: extraction lasts long enough (on a fast machine) to be interrupted mid-stage
# keep_api_s=0: each command starts its own ephemeral Prefect API, which a kill -9 must not leave behind
SETS = ["lit.epochs=30", "distill.epochs=4", "distill.checkpoint_every=1", "teacher.batch_size=4",
        "orchestration.keep_api_s=0"]


def _cmd(json_path: Path) -> list[str]:
    args = [a for s in SETS for a in ("--set", s)]
    return [sys.executable, "-m", "vitdistill_cli.main", "run", "-c", str(ROOT / "configs/runlocal.yaml"), *args,
            "--json", str(json_path)]


def _env() -> dict[str, str]:
    """The embedded defaults (sqlite:///mlflow.db in the command's directory, an ephemeral Prefect API),
    whatever servers the rest of the session pointed this process at."""
    drop = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_URL")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "TQDM_DISABLE": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONPATH": str(ROOT)}


def _running_stages(db: Path, before: frozenset[str] = frozenset()) -> set[str]:
    """Names of the RUNNING MLflow runs (other than the run ids in ``before``), read straight from the
    sqlite file (read-only: it never creates the tables the command is creating)."""
    import sqlite3

    if not db.exists():
        return set()
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            rows = con.execute("SELECT name, run_uuid FROM runs WHERE status = 'RUNNING'").fetchall()
        return {name for name, run_id in rows if run_id not in before}
    except sqlite3.Error:  # the tables are not there yet
        return set()


def _running_ids(db: Path) -> set[str]:
    import sqlite3

    if not db.exists():
        return set()
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
        return {run_id for (run_id,) in con.execute("SELECT run_uuid FROM runs WHERE status = 'RUNNING'")}


def _uvicorn(proc: psutil.Process) -> list[psutil.Process]:
    """The command's ephemeral Prefect API server (vitdistill_cli.prefect_api runs uvicorn)."""
    try:
        return [c for c in proc.children(recursive=True) if "vitdistill_cli.prefect_api" in " ".join(c.cmdline())]
    except psutil.Error:
        return []


def _interrupt(work: Path, stage: str, sig: int) -> tuple[subprocess.CompletedProcess, float, list[psutil.Process]]:
    """Start the pipeline in ``work``, send ``sig`` once ``stage``'s MLflow run is RUNNING; (result,
    seconds from the signal to the exit, the Prefect servers the command had started)."""
    before = frozenset(_running_ids(work / "mlflow.db"))  # a killed command's runs, still RUNNING
    proc = subprocess.Popen(_cmd(work / "never.json"), cwd=work, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    ps = psutil.Process(proc.pid)
    deadline = time.time() + 300
    servers: list[psutil.Process] = []
    while time.time() < deadline and proc.poll() is None and stage not in _running_stages(work / "mlflow.db", before):
        servers = servers or _uvicorn(ps)
        time.sleep(0.2)
    assert proc.poll() is None, f"the command ended before {stage} ran: {proc.communicate()[1][-2000:]}"
    servers = servers or _uvicorn(ps)
    t0 = time.time()
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)  # to the whole process group, as Ctrl-C in a terminal sends it
    else:
        os.kill(proc.pid, sig)  # kill -9 PID: the command alone, its children left behind
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), time.time() - t0, servers


def _stage_metrics(result: dict) -> dict[str, dict[str, float]]:
    # how long it took and how much was reused differ by nature after an interruption; the results do not
    timing = ("seconds", "_per_s", "elapsed", "wall", "reused", "extracted", "resumed_from")
    return {s["stage"]: {k: v for k, v in s["metrics"].items() if not any(t in k for t in timing)}
            for s in result["stages"]}


@pytest.mark.slow
def test_every_stage_survives_sigint_and_sigkill_and_resumes_to_the_same_metrics(tmp_path):
    straight_dir, work = tmp_path / "straight", tmp_path / "work"
    straight_dir.mkdir(), work.mkdir()
    r = subprocess.run(_cmd(straight_dir / "r.json"), cwd=straight_dir, env=_env(), capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    straight = json.loads((straight_dir / "r.json").read_text())

    for stage, sig in [("extract", signal.SIGINT), ("lit", signal.SIGINT), ("lit", signal.SIGKILL),
                       ("distill", signal.SIGINT), ("evaluate", signal.SIGKILL), ("evaluate", signal.SIGINT)]:
        r, seconds, servers = _interrupt(work, stage, sig)
        if sig == signal.SIGINT:
            assert r.returncode == 130, (stage, r.returncode, r.stderr[-3000:])
            assert "interrupted; what finished is kept" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
            assert seconds < 60, (stage, seconds)
        else:
            assert r.returncode == -signal.SIGKILL
            time.sleep(8)  # the watchdog polls every 0.5 s, then gives the server 5 s to stop
            assert servers and not [s for s in servers if s.is_running() and s.status() != psutil.STATUS_ZOMBIE], \
                f"the ephemeral Prefect server outlived a kill -9 of the command ({stage})"
            assert _running_stages(work / "mlflow.db")  # left RUNNING: the next command closes them

    r = subprocess.run(_cmd(work / "r.json"), cwd=work, env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not _running_stages(work / "mlflow.db")  # the killed commands' runs were marked KILLED
    resumed = json.loads((work / "r.json").read_text())
    assert {s["stage"]: s["status"] for s in resumed["stages"]} == {s["stage"]: s["status"] for s in straight["stages"]}
    a, b = _stage_metrics(straight), _stage_metrics(resumed)
    for stage in a:
        for key, value in a[stage].items():
            assert b[stage][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (stage, key)
