"""Reaps what a killed CLI leaves behind.

``vitdistill run`` (and every command that runs flows) starts this watchdog beside itself. It
watches the CLI's process tree; when the CLI dies without cleaning up (``kill -9``, OOM kill), the
watchdog terminates the processes the CLI had started: the ephemeral Prefect API server, DataLoader
workers, a local Dask cluster. A CLI that exits normally stops its children itself, and the watchdog
then finds nothing left and exits.

    python -m vitdistill_cli.watchdog PID
"""

from __future__ import annotations

import sys
import time

import psutil

POLL_S = 0.5


def _tree(parent: psutil.Process) -> dict[int, float]:
    """pid -> create time of every live descendant (the create time guards against pid reuse)."""
    out: dict[int, float] = {}
    try:
        for p in parent.children(recursive=True):
            try:
                out[p.pid] = p.create_time()
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return out


def _reap(tree: dict[int, float], me: int) -> list[int]:
    procs = []
    for pid, created in tree.items():
        if pid == me:
            continue
        try:
            p = psutil.Process(pid)
            if p.create_time() == created:
                procs.append(p)
        except psutil.Error:
            pass
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    return [p.pid for p in procs]


def watch(pid: int) -> list[int]:
    """Block until process ``pid`` ends; then stop what it left running. Returns the pids stopped."""
    import os

    me = os.getpid()
    try:
        parent = psutil.Process(pid)
        started = parent.create_time()
    except psutil.Error:
        return []
    tree: dict[int, float] = {}
    while True:
        try:
            alive = parent.is_running() and parent.create_time() == started and parent.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            alive = False
        if not alive:
            return _reap(tree, me)
        tree = _tree(parent)
        time.sleep(POLL_S)


def start(pid: int | None = None) -> None:
    """Start a watchdog for ``pid`` (default: this process) in its own session, so a Ctrl-C sent to
    the terminal's process group reaches the CLI, which then cleans up and exits first."""
    import os
    import subprocess

    subprocess.Popen([sys.executable, "-m", "vitdistill_cli.watchdog", str(pid or os.getpid())],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True, close_fds=True)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
