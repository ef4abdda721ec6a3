"""Crashes and bad input: kill -9 at random points (extraction and distillation), invalid URIs,
missing credentials. Each recovers or fails with one line naming the thing."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_extract import KILL_SCRIPT, run_extract
from vitdistill.config import load_config

VITDISTILL = [sys.executable, "-m", "vitdistill_cli.main"]


def _kill_when(proc: subprocess.Popen, ready, extra_delay: float, deadline_s: float = 240) -> bool:
    """Wait until ``ready()`` (or the process ends), sleep ``extra_delay``, SIGKILL; True if it was still running."""
    deadline = time.time() + deadline_s
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.01)
    time.sleep(extra_delay)
    alive = proc.poll() is None
    if alive:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    return alive


@pytest.mark.slow
def test_extraction_survives_kill_minus_9_at_ten_random_points(tmp_path):
    """10 trials: SIGKILL during start-up, ingest or extraction; a re-run completes the cache with
    every key exactly once and every shard matching its manifest checksum."""
    rng = random.Random(20261121)
    env = {**os.environ, "TQDM_DISABLE": "1"}
    script = tmp_path / "extract.py"
    script.write_text(KILL_SCRIPT)
    interrupted_mid_extraction = 0
    for trial in range(10):
        root = tmp_path / f"trial{trial}"
        sets = [f"cache.root={root}", "data.limit=240", "data.shard_samples=16", "teacher.batch_size=8"]
        records = root / "features"
        wanted = rng.randint(0, 13)  # 15 shards: kill after this many finished (0: any point of start-up)
        delay = rng.uniform(0, 3.0) if wanted == 0 else rng.uniform(0, 0.05)
        proc = subprocess.Popen([sys.executable, str(script), *sets], env=env)
        ready = (lambda: True) if wanted == 0 else (lambda: len(list(records.glob("*/records/*.json"))) >= wanted)
        _kill_when(proc, ready, delay)
        done = len(list(records.glob("*/records/*.json")))
        if 0 < done < 15 and not list(records.glob("*/manifest.json")):
            interrupted_mid_extraction += 1
        _, manifest, fc = run_extract(load_config(None, sets))
        keys = [s["key"] for s in fc.iter_samples()]
        assert len(keys) == 240 and len(set(keys)) == 240, f"trial {trial}"
        assert manifest["stats"]["shards_reused"] + manifest["stats"]["shards_extracted"] == 15
        fc.verify()
    assert interrupted_mid_extraction >= 5  # most kills landed between shards being written


@pytest.mark.slow
def test_distillation_killed_mid_run_resumes_to_the_same_metrics(tmp_path):
    base = ["data.limit=200", "teacher.name=test_vit", "teacher.pretrained=false", "distill.epochs=12",
            "distill.checkpoint_every=4", "distill.register_as=null", "distill.batch_size=16"]
    env = {**os.environ, "TQDM_DISABLE": "1"}

    def cmd(root: Path, result: Path) -> list[str]:
        sets = [a for s in [*base, f"cache.root={root}"] for a in ("--set", s)]
        return [sys.executable, "-m", "vitdistill.distill.stage", *sets, "--result", str(result)]

    straight = tmp_path / "straight.json"
    subprocess.run(cmd(tmp_path / "a", straight), env=env, check=True, capture_output=True, timeout=600)

    root = tmp_path / "b"
    proc = subprocess.Popen(cmd(root, tmp_path / "never.json"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    was_running = _kill_when(proc, lambda: any(root.glob("distill/*/checkpoints/latest.json")), 0.0)
    assert was_running, "distillation finished before it could be killed"
    latest = json.loads(next(root.glob("distill/*/checkpoints/latest.json")).read_text())
    assert 0 < latest["step"]
    resumed = tmp_path / "resumed.json"
    subprocess.run(cmd(root, resumed), env=env, check=True, capture_output=True, timeout=600)

    a, b = json.loads(straight.read_text())["metrics"], json.loads(resumed.read_text())["metrics"]
    for key in ("student_top1", "agreement", "kl", "final_loss", "student_probe_top1", "steps"):
        assert b[key] == pytest.approx(a[key], abs=1e-6), key


@pytest.mark.parametrize("key", ["cache.root", "data.path"])
def test_invalid_uri_is_one_line_naming_the_key(tmp_path, key):
    sets = ["--set", f"{key}=foo://bucket/x"] + (["--set", "data.source=wds"] if key == "data.path" else [])
    r = subprocess.run([*VITDISTILL, "extract", *sets], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and key in r.stderr and "unsupported URI scheme 'foo'" in r.stderr


def test_missing_s3_credentials_is_one_line(tmp_path, s3_server):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"AWS_EC2_METADATA_DISABLED": "true",  # never ask an instance-metadata address
                "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                "AWS_ENDPOINT_URL": s3_server, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TQDM_DISABLE": "1"})
    r = subprocess.run([*VITDISTILL, "extract", "--set", "data.source=wds", "--set", "data.path=s3://bucket/x.tar",
                        "--set", f"tracking.uri=sqlite:///{tmp_path}/m.db"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode != 0
    error_lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(error_lines) == 1 and "no S3 credentials" in error_lines[0] and "AWS_ACCESS_KEY_ID" in error_lines[0]
    assert "Traceback" not in r.stderr


def test_progress_bars_honour_tqdm_disable(monkeypatch):
    from vitdistill.progress import progress_bar

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert not progress_bar(True, total=1).disable and progress_bar(False, total=1).disable
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert progress_bar(True, total=1).disable
