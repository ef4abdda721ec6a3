"""CLI latency: what a person waits for before anything happens, and where that time goes.

    python benchmarks/bench_cli.py                 # --help, config show, cold and warm `vitdistill extract`
    python benchmarks/bench_cli.py --repeats 5

Measured in one run, each command a fresh process as a person starts it, in a fresh working
directory (embedded defaults: ephemeral Prefect API, sqlite MLflow, digits, local cache):

1. ``vitdistill --help`` and ``vitdistill config show``: wall time (median of ``--repeats``), and
   whether torch, Prefect or MLflow were imported (they must not be). Target: at most 1.5 s.
2. ``vitdistill extract`` cold (empty cache, a fresh ``PREFECT_HOME``), then ``--repeats`` warm no-op
   re-runs (everything is cached; the ephemeral Prefect API the cold run started is kept,
   ``orchestration.keep_api_s``), each followed by one with ``keep_api_s=0`` (its own API, started
   and stopped with it). Target for the warm re-run: at most 8 s. The CLI writes its start-up phases to
   ``$VITDISTILL_TIMINGS``: config + watchdog, the Prefect API check (and the ephemeral server's
   spawn), MLflow (import, store, stale-run sweep), importing the flows (Prefect; a no-op imports
   neither torch nor timm), the ephemeral API's start (a process of its own, from its spawn to its
   first ``/health``, overlapping the rows before it) and what is still waited for after them, then
   the flow itself.
   "process" is the rest: interpreter start-up, importing the CLI, and exit (stopping the
   ephemeral server).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECK_IMPORTS = r"""
import json, sys
from vitdistill_cli.main import app
try:
    app(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & {"torch", "prefect", "mlflow", "timm"})))
"""


def _cli(args: list[str], cwd: Path, env: dict) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "vitdistill_cli.main", *args], cwd=cwd, env=env,
                       capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"`vitdistill {' '.join(args)}` failed ({r.returncode}): {r.stderr.strip()[-400:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the working directory")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-cli-"))
    # a Prefect home of its own: no API kept by an earlier command serves the cold run
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONPATH": str(REPO),
           "PREFECT_HOME": str(work / "prefect-home")}
    # PYTHONDONTWRITEBYTECODE: as a person's shell, the project's modules are compiled once, not on every command
    for k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PYTHONDONTWRITEBYTECODE"):
        env.pop(k, None)
    try:
        print(f"{'command':34s} {'median s':>9s} {'target':>8s}  imports torch/prefect/mlflow/timm")
        for argv in (["--help"], ["config", "show"]):
            times = [_cli(argv, work, env) for _ in range(args.repeats)]
            r = subprocess.run([sys.executable, "-c", CHECK_IMPORTS, *argv], cwd=work, env=env,
                               capture_output=True, text=True)
            heavy = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"{'vitdistill ' + ' '.join(argv):34s} {statistics.median(times):9.2f} {'<= 1.5':>8s}  "
                  f"{', '.join(heavy) or 'none'}")

        timings = work / "timings.json"
        env_t = {**env, "VITDISTILL_TIMINGS": str(timings)}
        cold = _cli(["extract"], work, env_t)
        cold_phases = json.loads(timings.read_text())
        warm, phases, own = [], [], []
        for _ in range(args.repeats):  # alternated, so both see the same load
            warm.append(_cli(["extract"], work, env_t))
            phases.append(json.loads(timings.read_text()))
            own.append(_cli(["extract", "--set", "orchestration.keep_api_s=0"], work, env_t))
        w = statistics.median(warm)
        print(f"{'vitdistill extract (cold)':34s} {cold:9.2f} {'':>8s}")
        print(f"{'vitdistill extract (warm no-op)':34s} {w:9.2f} {'<= 8':>8s}  warm/cold {w / cold:.2f}  "
              "(the API kept by the cold run)")
        print(f"{'  ... with keep_api_s=0':34s} {statistics.median(own):9.2f} {'':>8s}  "
              "(each command starts its own API)")
        print("\nwhere the time goes (seconds; median over the warm runs; the API start overlaps the three rows above it):")
        keys = list(phases[0])
        print(f"  {'phase':28s} {'cold':>7s} {'warm':>7s}")
        for k in keys:
            print(f"  {k:28s} {cold_phases.get(k, 0):7.2f} {statistics.median(p[k] for p in phases):7.2f}")
        serial = ("config_and_watchdog", "prefect_api_check", "mlflow", "imports_flows",
                  "ephemeral_api_wait", "flow")
        rest = [t - sum(p[k] for k in serial) for t, p in zip(warm, phases)]
        print(f"  {'process (start, CLI import, exit)':28s} {cold - sum(cold_phases[k] for k in serial):7.2f} "
              f"{statistics.median(rest):7.2f}")
        print(f"\nmachine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    finally:
        sys.path.insert(0, str(REPO))
        from vitdistill_cli.prefect_api import stop_kept

        stop_kept(work / "prefect-home")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
