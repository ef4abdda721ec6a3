"""Locks (issue #17, fault 5): a portable local lock (filelock) and a conditional-PUT lease on S3, so
two writers into one cache do each shard's work once, on local disk and on an object store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from vitdistill.cache import fs


class _Plan(fs.ShardedCachePlan):
    def __init__(self, cache_dir: str):
        self.cache_dir, self.inputs = cache_dir, ["a", "b"]


def _race(cache_dir: str, writers: int = 4) -> tuple[list[dict], int]:
    """``writers`` threads ask for shard 0 of one cache at once; the build takes a while."""
    plan, builds, lock = _Plan(cache_dir), [], threading.Lock()

    def load(i: int) -> dict | None:
        url = plan.record_url(i)
        return fs.read_json(url) if fs.exists(url) else None

    def build(i: int) -> dict:
        with lock:
            builds.append(i)
        time.sleep(0.5)
        fs.write_json_atomic(plan.record_url(i), {"index": i, "by": threading.get_ident()})
        return {"index": i}

    out: list[dict] = []
    threads = [threading.Thread(target=lambda: out.append(plan.build_once(0, load, build))) for _ in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return out, len(builds)


def test_concurrent_writers_build_a_shard_once_on_local_disk(tmp_path):
    out, builds = _race(str(tmp_path / "cache"))
    assert builds == 1 and sorted(r["reused"] for r in out) == [False, True, True, True]


def test_concurrent_writers_build_a_shard_once_on_s3(s3_env):
    """Four writers into one s3:// cache: the conditional PUT (If-None-Match) lets exactly one build."""
    _, bucket = s3_env
    out, builds = _race(f"s3://{bucket}/cache")
    assert builds == 1 and sorted(r["reused"] for r in out) == [False, True, True, True]
    s3, _ = s3_env
    assert not s3.exists(f"{bucket}/cache/records/00000.lock")  # released


def test_s3_lock_of_a_dead_holder_is_taken_over_and_a_live_one_is_not(s3_env):
    s3, bucket = s3_env
    url = f"s3://{bucket}/locks/x.lock"
    s3.pipe_file(f"{bucket}/locks/x.lock", b"deadhost:1:abc 0")  # a holder killed with -9 left it
    t0 = time.monotonic()
    with fs.exclusive(url, stale_after=1.0, poll=0.1):
        waited = time.monotonic() - t0
        assert s3.cat_file(f"{bucket}/locks/x.lock").split(b" ")[0] != b"deadhost:1:abc"
    assert 1.0 <= waited < 10

    held, released = threading.Event(), threading.Event()

    def holder() -> None:
        with fs.exclusive(url, stale_after=1.0, poll=0.1):
            held.set()
            time.sleep(3.0)  # three times stale_after: only the heartbeat keeps the lease
        released.set()

    t = threading.Thread(target=holder)
    t.start()
    held.wait(10)
    with fs.exclusive(url, stale_after=1.0, poll=0.1):
        assert released.is_set()  # the waiter got in only after the live holder let go
    t.join()


def test_local_lock_is_released_when_its_holder_is_killed(tmp_path):
    lock = tmp_path / "records" / "00000.lock"
    script = textwrap.dedent(f"""
        import sys, time
        from vitdistill.cache import fs
        with fs.exclusive({str(lock)!r}):
            print("held", flush=True)
            time.sleep(600)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        got = threading.Event()
        t = threading.Thread(target=lambda: (fs.exclusive(str(lock)).__enter__(), got.set()), daemon=True)
        t.start()
        assert not got.wait(1.0)  # held by the other process
        os.kill(p.pid, signal.SIGKILL)
        assert got.wait(10)  # the kernel dropped the dead holder's lock
    finally:
        p.kill()
        p.wait()


@pytest.mark.slow
def test_two_extractions_into_one_s3_cache_do_each_shard_once(make_cfg, s3_env, tmp_path):
    """Two processes extract into one s3:// cache at once: each shard is built by one of them."""
    _, bucket = s3_env
    sets = [f"cache.root=s3://{bucket}/cache", "data.limit=120", "data.shard_samples=20", "teacher.batch_size=8",
            "teacher.name=test_vit", "teacher.pretrained=false"]
    script = tmp_path / "x.py"
    script.write_text(textwrap.dedent("""
        import json, sys
        from vitdistill.config import load_config
        from vitdistill.data.ingest import resolve_inputs
        from vitdistill.extract import extract
        cfg = load_config(None, sys.argv[1:])
        _, manifest = extract(cfg, resolve_inputs(cfg, progress=False), progress=False)
        print(json.dumps(manifest["stats"]))
    """))
    from vitdistill.config import load_config
    from vitdistill.data.ingest import resolve_inputs
    from vitdistill.extract import extract

    cfg = load_config(None, sets + ["data.limit=1"])
    extract(cfg, resolve_inputs(cfg, progress=False), progress=False)  # image shards ingested once, up front
    env = {**os.environ, "TQDM_DISABLE": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), *sets], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    stats = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    built = [s["shards_extracted"] for s in stats]
    assert sum(built) == 6, stats  # six shards, each built by exactly one writer
    cfg = load_config(None, sets)
    _, manifest = extract(cfg, resolve_inputs(cfg, progress=False), progress=False)
    assert manifest["stats"]["shards_reused"] == 6


@pytest.mark.slow
def test_two_distillations_of_one_run_take_turns(tmp_path):
    """Two identical distillations at once: the second waits for the first's run lock, then reuses its
    final checkpoint instead of deleting the checkpoint the first is loading; both end with the same
    metrics."""
    sets = ["data.limit=120", "teacher.name=test_vit", "teacher.pretrained=false", "distill.epochs=4",
            "distill.checkpoint_every=1", "distill.register_as=null", "distill.batch_size=16",
            f"cache.root={tmp_path}/cache"]
    args = [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "vitdistill.distill.stage", *args, "--result",
                               str(tmp_path / f"r{i}.json")], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    a, b = (json.loads((tmp_path / f"r{i}.json").read_text())["metrics"] for i in range(2))
    assert sorted([a["resumed_from_step"], b["resumed_from_step"]]) == [0, a["steps"]]  # one trained, one reused
    for key in ("student_top1", "agreement", "kl", "steps"):
        assert a[key] == b[key], key
    ckpts = list((tmp_path / "cache").glob("distill/*/checkpoints/step-*.pt"))
    assert len(ckpts) == 1  # the older ones were dropped, the last one kept


def test_two_first_commands_create_one_sqlite_tracking_database(tmp_path):
    """Two processes open a tracking database that does not exist yet: both get a working store
    (without the lock beside mlflow.db one fails with 'duplicate column name')."""
    script = textwrap.dedent(f"""
        from vitdistill.config import TrackingConfig
        from vitdistill.tracking import Tracker
        t = Tracker(TrackingConfig(uri="sqlite:///{tmp_path}/mlflow.db"))
        t.end_run(t.start_run("x"))
        print("ok")
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e[-1500:] for _, e in outs]
