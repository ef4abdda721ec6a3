"""Reliability, round 2 (issue #17): truncated shards, bad shard lists, escaping names, credentials in
logs, bad paths. Each bad input fails with one line naming the file, key or field."""

from __future__ import annotations

import gzip
import re
import io

import pytest

from vitdistill.cache.tario import TarShardWriter, UnreadableShardError, iter_tar_samples
from vitdistill.errors import VitdistillError


def _shard(path, n: int = 5) -> bytes:
    w = TarShardWriter(str(path))
    for i in range(n):
        w.write(f"s{i:04d}", {"png": bytes([i]) * (100 + 300 * i), "cls": str(i % 2).encode()})
    w.close()
    return path.read_bytes()


def _end_marker(data: bytes) -> int:
    """Byte offset just past the two zero blocks that end the archive."""
    offset = 0
    while data[offset : offset + 512] != bytes(512):
        size = int(data[offset + 124 : offset + 135], 8)
        offset += 512 + -(-size // 512) * 512
    return offset + 1024


def _read(data: bytes, name: str = "a.tar") -> list[str]:
    return [k for k, _ in iter_tar_samples(io.BytesIO(data), name)]


def test_truncated_tar_is_never_taken_for_a_shorter_shard(tmp_path):
    data = _shard(tmp_path / "a.tar")
    end = _end_marker(data)
    assert _read(data) == [f"s{i:04d}" for i in range(5)]
    cuts = sorted({*range(0, end, 512), *range(1, end, 97), end - 1, end - 512})  # every header boundary too
    for cut in cuts:
        with pytest.raises(UnreadableShardError, match=r"^a\.tar: (truncated|not a readable)"):
            _read(data[:cut])
    for cut in range(end, len(data) + 1, 512):  # only the record padding after the end marker is missing
        assert len(_read(data[:cut])) == 5, cut


def test_truncated_gzip_shard_gives_all_samples_or_an_error(tmp_path):
    data = gzip.compress(_shard(tmp_path / "a.tar"), mtime=0)
    assert len(_read(data)) == 5
    errors = 0
    for cut in range(0, len(data)):
        try:
            assert len(_read(data[:cut])) == 5, cut  # a cut in the gzip trailer loses only padding
        except UnreadableShardError as e:
            assert str(e).startswith("a.tar: ")
            errors += 1
    assert errors > len(data) // 2



def _tarfile_reference(data: bytes) -> list[tuple[str, dict[str, bytes]]]:
    """What a plain tarfile read gives, grouped into samples the webdataset way."""
    import tarfile

    out: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, field = m.name.split("/")[-1].split(".", 1)
            key = "/".join(m.name.split("/")[:-1] + [key])
            if not out or out[-1][0] != key:
                out.append((key, {}))
            out[-1][1][field] = tar.extractfile(m).read()
    return out


@pytest.mark.parametrize("fmt", ["ustar", "gnu", "pax"])
def test_the_tar_parser_reads_what_tarfile_reads(fmt):
    """Shards from other tools: long names (GNU long-name and PAX headers, a POSIX ustar prefix), directories,
    symlinks, non-ASCII names, empty members; samples are exactly tarfile's, also after it takes over from
    the fast parser mid-shard, and a cut after that point still fails."""
    import tarfile

    buf = io.BytesIO()
    format = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}[fmt]
    names = ["a.png", "a.cls", "dir/b.png", "dir/b.json", "d" * 80 + "/" + "e" * 60 + ".png",  # ustar: a prefix
             "caf\u00e9.png", "empty.txt"]
    if fmt != "ustar":
        names.insert(4, "x" * 150 + ".png")  # needs a long-name / PAX header: tarfile reads the rest
        names.append("z.png")
    with tarfile.open(fileobj=buf, mode="w", format=format) as tar:
        d = tarfile.TarInfo("dir")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        link = tarfile.TarInfo("link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "a.png"
        tar.addfile(link)
        for i, name in enumerate(names):
            payload = bytes([i]) * (0 if name.startswith("empty") else 700 * i + 1)
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    data = buf.getvalue()
    got = list(iter_tar_samples(io.BytesIO(data), "a.tar"))
    assert got == _tarfile_reference(data) and len(got) == len(names) - 2  # a.* and dir/b.* are one sample each
    end = len(data.rstrip(b"\0"))
    with pytest.raises(UnreadableShardError, match=r"^a\.tar: (truncated|not a readable)"):
        list(iter_tar_samples(io.BytesIO(data[: end - 1]), "a.tar"))


# --------------------------------------------------------------------------- data.path shard lists


def _wds_cfg(make_cfg, path: str):
    return make_cfg("data.source=wds", f"data.path='{path}'")


@pytest.mark.parametrize("pattern, message", [
    ("{d}/a.tar::{d}/a.tar", r"^data\.path: shard .*/a\.tar is listed twice"),
    ("{d}/a.tar::{d}/{{a,b}}.tar", r"^data\.path: shard .*/a\.tar is listed twice"),
    ("{d}/a.tar::", r"^data\.path .*: part 2 of the '::'-separated list is empty$"),
    ("{d}/a.tar:: ::{d}/b.tar", r"^data\.path .*: part 2 of the '::'-separated list is empty$"),
    ("{d}", r"^data\.path: shard .* is a directory, expected a tar file$"),
])
def test_bad_shard_list_is_one_line(make_cfg, tmp_path, pattern, message):
    from vitdistill.data.ingest import resolve_inputs
    from vitdistill.errors import DataError

    for name in ("a.tar", "b.tar"):
        _shard(tmp_path / name, 2)
    with pytest.raises(DataError, match=message):
        resolve_inputs(_wds_cfg(make_cfg, pattern.format(d=tmp_path)), progress=False)
    assert len(resolve_inputs(_wds_cfg(make_cfg, f"{tmp_path}/a.tar::{tmp_path}/b.tar")).shards) == 2


# --------------------------------------------------------------------------- LiT divergence


def test_lit_stops_on_a_non_finite_loss_naming_the_step(tmp_path):
    from tests.test_lit import FAST_SCRATCH, write_fake_cache
    from vitdistill.config import LitConfig
    from vitdistill.errors import TrainingError
    from vitdistill.lit import run_lit

    cache = write_fake_cache(tmp_path / "c", n=120, captions=lambda i, c: f"caption {c}")
    cfg = LitConfig(**{**FAST_SCRATCH, "epochs": 2}, lr=float("inf"))
    with pytest.raises(TrainingError, match=r"^step 2 \(epoch 1\): loss is nan .*; lower lit\.lr") as e:  # the one trainer
        run_lit(cache, cfg, progress=False)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- kNN at a small temperature


def test_knn_at_temperature_001_matches_a_float64_reference():
    import numpy as np

    from vitdistill.probes import knn_probe

    rng = np.random.default_rng(0)
    common, centres = rng.normal(size=32) * 8, rng.normal(size=(4, 32))  # every cosine ~0.98: exp(98)
    y_train, y_test = rng.integers(4, size=200), rng.integers(4, size=60)
    x_train = (common + centres[y_train] + rng.normal(size=(200, 32))).astype(np.float32)
    x_test = (common + centres[y_test] + rng.normal(size=(60, 32))).astype(np.float32)
    t, k = 0.01, 10
    res = knn_probe(x_train, y_train, x_test, y_test, ks=(k,), temperature=t)

    a = x_train / np.linalg.norm(x_train, axis=1, keepdims=True)
    q = x_test / np.linalg.norm(x_test, axis=1, keepdims=True)
    sim = q.astype(np.float64) @ a.T.astype(np.float64)  # (M, N)
    nn = np.argsort(-sim, axis=1)[:, :k]
    votes = np.zeros((len(q), 4))
    for i in range(len(q)):
        for j in nn[i]:
            votes[i, y_train[j]] += np.exp(sim[i, j] / t)  # float64 holds exp(100)
    assert np.isfinite(votes).all() and votes.max() > np.finfo(np.float32).max  # float32 would overflow
    assert res.test_pred[k].tolist() == votes.argmax(1).tolist()
    assert res.top1[k] == pytest.approx(float((votes.argmax(1) == y_test).mean()))


# --------------------------------------------------------------------------- few-shot with few images


def test_fewshot_reports_only_shot_counts_every_class_has(tmp_path):
    import numpy as np

    from tests.test_lit import write_fake_cache
    from vitdistill.cache.reader import FeatureCache
    from vitdistill.config import ProbeConfig
    from vitdistill.probes.stage import probe_cache

    cache = write_fake_cache(tmp_path / "c", n=30, classes=("cat", "dog", "fish"))
    counts = np.bincount(FeatureCache.open(cache).load(split="train")["cls"], minlength=3)
    assert 3 <= counts.min() <= 7 < 10  # the few-image case of the issue
    report = probe_cache(cache, ProbeConfig(knn_k=[3]))
    shots = [s for s in (1, 5, 10, 25) if s <= counts.min()]
    assert sorted(k for k in report.metrics if k.endswith("shot_top1")) == sorted(f"fewshot_{s}shot_top1" for s in shots)
    assert f", {max(shots)}-shot " in report.headline and "25-shot" not in report.headline
    rows = {r["shots"]: r for r in report.tables["fewshot"]}
    assert sorted(rows) == [1, 5, 10, 25]
    assert rows[25]["mean_top1"] is None and rows[10]["mean_top1"] is None
    short = [c for c in ("cat", "dog", "fish") if counts[("cat", "dog", "fish").index(c)] < 10][0]
    assert rows[10]["note"].startswith(f"skipped: class {short!r} has ")
    assert rows[1]["note"] == "" and rows[1]["mean_top1"] is not None


# --------------------------------------------------------------------------- config values and files


@pytest.mark.parametrize("item, message", [
    ("cache.root=''", r"^--set: cache\.root: expected a directory or URI such as \./vitdistill-cache, got ''"),
    ("cache.root='   '", r"^--set: cache\.root: expected a directory or URI .*got '   '"),
    ("report.out_dir=''", r"^--set: report\.out_dir: expected a directory or URI"),
    ("teacher.device=gpu", r"^--set: teacher\.device: expected auto, cpu, cuda, cuda:N or mps, got 'gpu'$"),
    ("teacher.device='cuda:x'", r"^--set: teacher\.device: expected auto, cpu, cuda, cuda:N or mps, got 'cuda:x'$"),
    ("distill.device=cuda0", r"^--set: distill\.device: expected auto, cpu, cuda, cuda:N or mps, got 'cuda0'$"),
])
def test_bad_config_values_are_one_line_naming_the_key(item, message):
    from vitdistill.config import load_config
    from vitdistill.errors import ConfigError

    with pytest.raises(ConfigError, match=message) as e:
        load_config(None, [item])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_valid_devices_pass(device):
    from vitdistill.config import load_config

    assert load_config(None, [f"teacher.device={device}"]).teacher.device == device


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", r"x\.yaml: not UTF-8 text \(byte \d+ is 0x[0-9a-f]{2}\); expected a YAML config$"),
    (b"data:\n  source: \x00digits\n", r"x\.yaml: contains NUL bytes \(binary data\?\); expected a YAML config$"),
    (b"data:\n  source: \x07digits\n", r"x\.yaml: is not valid YAML \(unacceptable character #x0007 at position \d+\)$"),
    (b"data: [1, 2\n", r"x\.yaml: line \d+ is not valid YAML \(.+\)$"),
])
def test_binary_or_broken_config_file_is_one_line(tmp_path, content, message):
    from vitdistill.config import load_config
    from vitdistill.errors import ConfigError

    (tmp_path / "x.yaml").write_bytes(content)
    with pytest.raises(ConfigError, match=message) as e:
        load_config(tmp_path / "x.yaml")
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- names read from JSON files


@pytest.mark.parametrize("name", ["../../../../outside/victim", "/etc/passwd", "a/../../b", "..", ".", "", "a//b",
                                  "C:/x", "s3://bucket/x", "a\\..\\b", 7, None, ["x"]])
def test_join_inside_refuses_names_that_leave_the_directory(tmp_path, name):
    from vitdistill.cache import fs
    from vitdistill.errors import CacheError

    with pytest.raises(CacheError, match=r"is not a plain relative path inside .*refusing to read, write or delete"):
        fs.join_inside(str(tmp_path), name)


def test_join_inside_keeps_plain_names(tmp_path):
    from vitdistill.cache import fs

    assert fs.join_inside("s3://b/ckpt", "step-00000004.pt") == "s3://b/ckpt/step-00000004.pt"
    assert fs.join_inside(str(tmp_path), "sub/x..y.pt") == f"{tmp_path}/sub/x..y.pt"


def test_tampered_latest_json_never_reaches_a_file_outside(tmp_path):
    import json

    from vitdistill.trainer import latest_checkpoint
    from vitdistill.errors import CacheError

    ckpt = tmp_path / "run" / "a" / "b" / "checkpoints"
    ckpt.mkdir(parents=True)
    victim = tmp_path / "outside" / "victim"
    victim.parent.mkdir()
    victim.write_text("precious")
    (ckpt / "latest.json").write_text(json.dumps({"name": "../../../../outside/victim", "step": 4}))
    with pytest.raises(CacheError, match=r"latest\.json: name '\.\./\.\./\.\./\.\./outside/victim' is not a plain"):
        latest_checkpoint(str(ckpt))
    assert victim.read_text() == "precious"
    (ckpt / "latest.json").write_text(json.dumps({"name": "step-00000004.pt", "step": 4}))
    (ckpt / "step-00000004.pt").write_bytes(b"")
    assert latest_checkpoint(str(ckpt)) == f"{ckpt}/step-00000004.pt"


# --------------------------------------------------------------------------- credentials


SECRET_URI = "postgresql://user:password@host/db"


@pytest.mark.parametrize("text, masked", [
    (SECRET_URI, "postgresql://user:***@host/db"),
    ("http://u:p@ss@h:5000/x and a@b.com", "http://u:***@h:5000/x and a@b.com"),
    ("x: 'mysql+pymysql://a:b@c/d'", "x: 'mysql+pymysql://a:***@c/d'"),
    ("redis://:pw@h", "redis://:***@h"),
    ("http://host:5000/x s3://bucket/k sqlite:///mlflow.db", "http://host:5000/x s3://bucket/k sqlite:///mlflow.db"),
])
def test_redact_uri(text, masked):
    from vitdistill.redact import redact, redact_uri

    assert redact_uri(text) == masked
    assert redact({"a": [text], "b": 3}) == {"a": [masked], "b": 3}
    from vitdistill.redact import credentials, unmask

    assert unmask({"a": [masked]}, credentials({"x": text})) == {"a": [text]}  # what a flow run puts back


def test_credentials_reach_no_param_artifact_or_report(tmp_path):
    from tests.test_report import _log_pipeline
    from vitdistill.config import load_config
    from vitdistill.report import build_report
    from vitdistill.tracking import Tracker

    cfg = load_config(None, [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "teacher.name=test_vit",
                             "student.name=vit22b_tiny", "data.source=shapes",
                             f"tracking.server_backend_store_uri={SECRET_URI}",
                             f"tracking.server_artifacts_destination=s3://user:password@minio/b"])
    tracker = Tracker(cfg.tracking)
    parent, _ = _log_pipeline(tracker, {"evaluate": {"metrics": {"teacher/calibration/ece": 0.1,
                                                                 "student/calibration/ece": 0.05}}},
                              finish_parent=False)
    tracker.log_config(parent, cfg)
    tracker.set_tags(parent, {"note": SECRET_URI})
    tracker.end_run(parent)
    run = tracker.client.get_run(parent)
    logged = " ".join([*run.data.params.values(), *run.data.tags.values()])
    config_text = open(tracker.client.download_artifacts(parent, "config.yaml", str(tmp_path))).read()
    assert "user:***@host/db" in run.data.params["tracking.server_backend_store_uri"] and "user:***@host" in config_text
    result = build_report(tracker, parent, str(tmp_path / "reports"))
    page = open(result.html_path, encoding="utf-8").read()
    for where, text in (("params and tags", logged), ("config.yaml", config_text), ("report", page)):
        assert "password" not in text, where


def test_report_masks_credentials_logged_before_redaction(tmp_path):
    from tests.test_report import _log_pipeline
    from vitdistill.config import TrackingConfig
    from vitdistill.report import build_report
    from vitdistill.tracking import Tracker

    tracker = Tracker(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db"))
    parent, _ = _log_pipeline(tracker, {"evaluate": {"metrics": {"teacher/calibration/ece": 0.1}}},
                              finish_parent=False)
    tracker.client.log_text(parent, f"tracking:\n  server_backend_store_uri: {SECRET_URI}\n", "config.yaml")
    tracker.client.log_param(parent, "tracking.server_backend_store_uri", SECRET_URI)  # raw, as an old run has it
    tracker.end_run(parent)
    page = open(build_report(tracker, parent, str(tmp_path / "r")).html_path, encoding="utf-8").read()
    assert "password" not in page and "user:***@host/db" in page


def test_mlflow_health_check_accepts_credentials_and_never_shows_them():
    import base64
    import http.server
    import threading

    from vitdistill.errors import ConfigError
    from vitdistill.tracking import check_server

    seen = []

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append((self.path, self.headers.get("Authorization")))
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        check_server(f"http://user:password@127.0.0.1:{port}")
        assert seen == [("/health", "Basic " + base64.b64encode(b"user:password").decode())]
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(ConfigError, match=r"at http://user:\*\*\*@127\.0\.0\.1:\d+ \(") as e:
        check_server(f"http://user:password@127.0.0.1:{port}", timeout=1)
    assert "password" not in str(e.value)


def test_cli_messages_mask_credentials(tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import free_port

    env = {**os.environ, "PREFECT_API_URL": f"http://user:password@127.0.0.1:{free_port()}/api"}
    r = subprocess.run([sys.executable, "-m", "vitdistill_cli.main", "extract"], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 2 and "PREFECT_API_URL=http://user:***@127.0.0.1" in r.stderr
    assert "password" not in r.stderr + r.stdout
    r = subprocess.run([sys.executable, "-m", "vitdistill_cli.main", "config", "show", "--set",
                        f"tracking.server_backend_store_uri={SECRET_URI}"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and "postgresql://user:***@host/db" in r.stdout and "password" not in r.stdout


def test_no_password_reaches_prefect_parameters_and_the_flow_gets_it_back(prefect_harness, tmp_path, monkeypatch):
    """Deployment defaults, submitted and local flow runs carry the config with its passwords masked; the
    flow run puts them back, from this process or (a worker's fresh process) from the 0600 secrets file."""
    import json
    import stat

    from prefect import get_client

    import vitdistill.redact as redact
    from deploy.deployments import deploy_all, submit
    from flows.pipeline import report_flow
    from vitdistill.config import VitdistillConfig, load_config

    monkeypatch.setattr(redact, "_KEPT", {})
    monkeypatch.delenv(redact.SECRETS_ENV, raising=False)
    store, artifacts = "postgresql://user:Pw-s3cr3t@host/db", "postgresql://user:Pw-2nd-s3cr3t@dbhost/db"
    cfg = load_config(None, [f"tracking.server_backend_store_uri={store}", f"orchestration.state_dir={tmp_path}/st",
                             "orchestration.work_pool=secrets-test-pool", f"tracking.uri=sqlite:///{tmp_path}/m.db",
                             f"tracking.artifact_location={artifacts}"])
    rows = deploy_all(cfg)
    flow_run = submit("probe", cfg, None)["flow_run_id"]
    seen = []
    monkeypatch.setattr("tasks.report.report", lambda config, run_id: seen.append(config) or {})
    local_run = report_flow(redact.conceal(cfg), None, return_state=True).state_details.flow_run_id
    assert seen[0].tracking.server_backend_store_uri == store  # the flow body got the real password back
    with get_client(sync_client=True) as client:
        deployed = [client.read_deployment(r["id"]) for r in rows]
        sent = [*(d.parameters for d in deployed), *(d.job_variables for d in deployed),
                client.read_flow_run(flow_run).parameters, client.read_flow_run(local_run).parameters]
    text = json.dumps(sent, default=str)
    assert len(rows) >= 3 and "s3cr3t" not in text
    assert "postgresql://user:***@host/db" in text and "postgresql://user:***@dbhost/db" in text
    secrets = tmp_path / "st" / "secrets.json"  # written by deploy and submit (a worker runs their flows)
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o600
    monkeypatch.setattr(redact, "_KEPT", {})  # a worker's flow-run process: nothing in memory
    got = redact.reveal(VitdistillConfig.model_validate(deployed[0].parameters["config"]))
    assert got.tracking.server_backend_store_uri == store and got.tracking.artifact_location == artifacts
    monkeypatch.setenv(redact.SECRETS_ENV, str(tmp_path / "elsewhere.json"))  # no file there: stays masked
    assert "***" in redact.reveal(got.model_copy(update={"tracking": got.tracking.model_copy(
        update={"server_backend_store_uri": "postgresql://user:***@host/db"})})).tracking.server_backend_store_uri


def test_mlflow_server_command_line_holds_no_password():
    from vitdistill.config import load_config
    from vitdistill_cli.stack import mlflow_server_command

    cfg = load_config(None, [f"tracking.server_backend_store_uri={SECRET_URI}",
                             "tracking.server_artifacts_destination=s3://key:password@minio/b"])
    cmd, env = mlflow_server_command(cfg)
    assert "password" not in " ".join(cmd) and cmd[1:3] == ["server", "--host"]
    assert env == {"MLFLOW_BACKEND_STORE_URI": SECRET_URI,  # `mlflow server` reads these options from there
                   "MLFLOW_ARTIFACTS_DESTINATION": "s3://key:password@minio/b"}


# --------------------------------------------------------------------------- --json targets


def _cli(args, cwd, timeout=120):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "vitdistill_cli.main", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


@pytest.mark.parametrize("target, message", [
    ("outdir", r"^error: --json .*outdir: is a directory; expected the path of a file to write$"),
    ("afile/r.json", r"^error: --json .*afile/r\.json: .*afile is not a directory; expected the path of a file"),
    pytest.param("locked/r.json", r"^error: --json .*locked/r\.json: cannot write there", marks=pytest.mark.skipif(
        hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0, reason="root writes anywhere")),
])
def test_unusable_json_path_fails_before_any_work(tmp_path, target, message):
    (tmp_path / "outdir").mkdir()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "locked").mkdir(mode=0o500)
    r = _cli(["extract", "--json", str(tmp_path / target)], tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and re.match(message, r.stderr.strip()), r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "vitdistill-cache").exists()  # nothing was started
    assert not [p for p in tmp_path.rglob("*.tmp")]


# --------------------------------------------------------------------------- image folders


def _folder_ds(root, *sets):
    from vitdistill.config import load_config
    from vitdistill.data.datasets import create_dataset

    return create_dataset(load_config(None, ["data.source=folder", f"data.path={root}", *sets]).data)


@pytest.mark.timeout(60)  # before the fix, reading the FIFO blocked forever
def test_fifo_named_png_never_hangs_ingestion(tmp_path):
    import os

    from tests.test_extract import make_folder
    from vitdistill.errors import DataError

    root = make_folder(tmp_path / "imgs", per_class=2)
    os.mkfifo(root / "cat" / "pipe.png")
    with pytest.raises(DataError, match=r"cat/pipe\.png: a FIFO, not an image file; remove it, or set "
                                         r"data\.on_error=skip"):
        list(_folder_ds(root))
    ds = _folder_ds(root, "data.on_error=skip")
    assert len(list(ds)) == 4 and ds.skipped == ["cat/pipe.png"]


def test_fifo_given_as_a_shard_is_one_line_not_a_hang(tmp_path, make_cfg):
    import os

    from vitdistill.data.ingest import resolve_inputs
    from vitdistill.errors import DataError

    os.mkfifo(tmp_path / "a.tar")
    with pytest.raises(DataError, match=r"^data\.path: shard .*a\.tar is not a regular file \(other\), expected a tar"):
        resolve_inputs(make_cfg("data.source=wds", f"data.path={tmp_path}/a.tar"), progress=False)


def test_caption_rows_naming_no_image_are_an_error(tmp_path):
    from tests.test_extract import make_folder
    from vitdistill.errors import DataError

    root = make_folder(tmp_path / "imgs", per_class=2)
    (root / "captions.csv").write_text("file,caption\ncat/img.1.png,a cat\ndog/img.0.png,a dog\ndog/img.9.png,typo\n")
    with pytest.raises(DataError, match=r"captions\.csv: 1 of 3 rows name no image in the class folders "
                                         r"\(first: 'dog/img\.9\.png'\); 'file' is relative to "):
        _folder_ds(root)
    (root / "captions.csv").unlink()
    (root / "captions.jsonl").write_text('{"file": "cat/nope.png", "caption": "x"}\n')
    with pytest.raises(DataError, match=r"captions\.jsonl: 1 of 1 rows name no image .*first: 'cat/nope\.png'"):
        _folder_ds(root)


def test_partial_captions_are_kept_and_the_missing_ones_counted(make_cfg, tmp_path, caplog):
    """23 of 24 images captioned: LiT trains on the 23 captions and the class prompts of the 24th, and says
    so (before the fix the cache kept no caption at all and LiT silently used class prompts for every image)."""
    from tests.test_extract import make_folder, run_extract
    from tests.test_lit import FAST_SCRATCH
    from vitdistill.config import LitConfig
    from vitdistill.lit import run_lit
    from vitdistill.lit.data import load_lit_data

    root = make_folder(tmp_path / "imgs", per_class=12)
    (root / "cat" / "img.0.txt").unlink()
    files = [f"{c}/img.{i}.png" for c in ("cat", "dog") for i in range(12)]
    rows = "".join(f"{f},caption of {f}\n" for f in files if f != "dog/img.5.png")
    (root / "captions.csv").write_text("file,caption\n" + rows)
    plan, _, fc = run_extract(make_cfg("data.source=folder", f"data.path={root}"))
    assert sum(t is not None for t in fc.load()["txt"]) == 23
    with caplog.at_level("WARNING", logger="vitdistill.lit.data"):
        data = load_lit_data(plan.cache_dir)
    assert "1 of 24 samples" in caplog.text and "class prompts stand in" in caplog.text
    assert not data.captions_generated and (data.captions_missing, data.captions_missing_dropped) == (1, 0)
    seen = {}
    for split in (data.train, data.val, data.test):
        for key, opts in zip(split.keys, split.options):
            seen[key] = {data.texts[i] for i in opts}
    assert len(seen) == 24
    assert seen.pop("dog/img_5") <= {t.format("dog") for t in data.templates}  # its class prompts
    assert all(texts == {f"caption of {k.replace('_', '.')}.png"} for k, texts in seen.items())  # 23 captions
    report = run_lit(plan.cache_dir, LitConfig(**{**FAST_SCRATCH, "epochs": 1}), progress=False)
    assert report.metrics["captions_missing"] == 1 and report.metrics["captions_missing_dropped"] == 0
    assert report.headline.endswith("; 1 of 24 samples had no caption (class prompts used)")


def test_partial_captions_without_class_names_leave_the_uncaptioned_out(tmp_path, caplog):
    from tests.test_lit import write_fake_cache
    from vitdistill.lit.data import load_lit_data

    cache = write_fake_cache(tmp_path / "c", n=40, with_cls=False,
                             captions=lambda i, c: None if i in (3, 17) else f"c{i}")
    with caplog.at_level("WARNING", logger="vitdistill.lit.data"):
        data = load_lit_data(cache)
    assert "2 of 40 samples" in caplog.text and "left out of LiT" in caplog.text
    assert (data.captions_missing, data.captions_missing_dropped) == (2, 2)
    keys = [k for s in (data.train, data.val, data.test) for k in s.keys]
    assert len(keys) == 38 and "s00003" not in keys and "s00017" not in keys


BINARY = b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x00"


@pytest.mark.parametrize("name, content, message", [
    ("cat/img.0.txt", BINARY, r"cat/img\.0\.txt: not UTF-8 text \(byte \d+ is 0x[0-9a-f]{2}\); expected a text file$"),
    ("cat/img.0.txt", b"a cat\x00\x00", r"cat/img\.0\.txt: contains NUL bytes"),
    ("captions.csv", BINARY, r"captions\.csv: not UTF-8 text"),
    ("captions.csv", b"file,caption\ncat/img.1.png\n", r"captions\.csv:2: expected a row with a 'file' and a 'caption'"),
    ("captions.csv", b"name,text\n", r"captions\.csv: expected a header with columns 'file' and 'caption'"),
    ("captions.jsonl", BINARY, r"captions\.jsonl: not UTF-8 text"),
    ("captions.jsonl", b'{"file": "cat/img.1.png", "caption": 3}\n', r"captions\.jsonl:1: expected a JSON object"),
    ("captions.jsonl", b"[1, 2]\n", r"captions\.jsonl:1: expected a JSON object with string 'file' and 'caption'"),
])
def test_bad_caption_files_are_one_line_naming_the_file(tmp_path, name, content, message):
    from tests.test_extract import make_folder
    from vitdistill.errors import DataError

    root = make_folder(tmp_path / "imgs", per_class=2)
    (root / name).write_bytes(content)
    with pytest.raises(DataError, match=message) as e:
        list(_folder_ds(root))
    assert "\n" not in str(e.value)


def test_non_utf8_class_folder_is_one_line(tmp_path):
    import os

    from tests.test_extract import make_folder
    from vitdistill.errors import DataError

    root = make_folder(tmp_path / "imgs", per_class=1)
    os.mkdir(os.path.join(os.fsencode(root), b"caf\xe9"))
    with pytest.raises(DataError, match=r"class folder name 'caf\\xe9' is not valid UTF-8; rename it"):
        _folder_ds(root)


def test_binary_classes_txt_beside_shards_is_one_line(make_cfg, tmp_path):
    from vitdistill.data.ingest import resolve_inputs
    from vitdistill.errors import DataError

    _shard(tmp_path / "a.tar", 2)
    (tmp_path / "classes.txt").write_bytes(BINARY)
    with pytest.raises(DataError, match=r"classes\.txt: not UTF-8 text \(byte \d+ is 0x"):
        resolve_inputs(_wds_cfg(make_cfg, f"{tmp_path}/a.tar"), progress=False)


def test_manifest_and_record_names_cannot_lead_outside_the_cache(make_cfg, tmp_path):
    """Every name read from a manifest or record goes through fs.join_inside: the reader refuses a tampered
    manifest in one line, and an edited shard record is redone instead of followed."""
    import json as _json

    from vitdistill.cache.reader import FeatureCache
    from vitdistill.data.ingest import resolve_inputs
    from vitdistill.errors import CacheError
    from vitdistill.extract import extract, plan_extraction

    cfg = make_cfg("data.limit=40")
    inputs = resolve_inputs(cfg, progress=False)
    plan, _ = extract(cfg, inputs, progress=False)
    record_url = f"{plan.cache_dir}/records/00000.json"
    record = _json.loads(open(record_url).read())
    record["parts"][0]["name"] = "../../../outside.tar"
    open(record_url, "w").write(_json.dumps(record))
    _, manifest = extract(cfg, inputs, progress=False)  # the edited record is not trusted: the shard is redone
    assert manifest["stats"]["shards_extracted"] == 1
    m = _json.loads(open(f"{plan.cache_dir}/manifest.json").read())
    m["shards"][0]["name"] = "../../etc/passwd"
    open(f"{plan.cache_dir}/manifest.json", "w").write(_json.dumps(m))
    with pytest.raises(CacheError, match="not a plain relative path inside"):
        FeatureCache.open(plan_extraction(cfg, inputs).cache_dir).shard_urls()


# --------------------------------------------------------------------------- integrity of what is read


def _shuffle_embeddings_in_place(shard) -> None:
    """Corrupt a feature shard without changing its size: the samples' emb.npy payloads trade places."""
    import tarfile

    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        spans = [(m.offset_data, m.size) for m in tar if m.name.endswith(".emb.npy")]
    payloads = [bytes(data[o : o + n]) for o, n in spans]
    for (o, n), p in zip(spans, payloads[1:] + payloads[:1]):
        data[o : o + n] = p
    size = shard.stat().st_size
    shard.write_bytes(bytes(data))
    assert shard.stat().st_size == size


def test_a_repaired_cache_is_probed_again_never_served_its_corrupt_result(prefect_harness, make_cfg):
    """Embeddings corrupted in place (same size): the probe fails naming the shard instead of computing
    a result that Prefect would cache under the manifest's content key; after `cache.verify=true`
    re-extracts the shard (same bytes, same sha256, same key), the probe gives the clean result."""
    from pathlib import Path

    from prefect import flow

    from tasks.probe import cache_content, compute
    from vitdistill.cache.reader import FeatureCache
    from vitdistill.data.ingest import resolve_inputs
    from vitdistill.errors import CacheError
    from vitdistill.extract import extract
    from vitdistill.probes.stage import probe_cache

    sets = ("data.limit=60", "probe.fewshot_shots=[1]", "probe.fewshot_seeds=[0]", "probe.knn_k=[3]")
    cfg = make_cfg(*sets)
    inputs = resolve_inputs(cfg, progress=False)
    plan, manifest = extract(cfg, inputs, progress=False)
    def accuracy(metrics: dict) -> dict:
        return {k: v for k, v in metrics.items() if not k.endswith("_seconds")}

    clean = accuracy(probe_cache(plan.cache_dir, cfg.probe).metrics)  # the library call: no Prefect cache
    key = FeatureCache.open(plan.cache_dir).content_sha256()

    @flow
    def probe_once(cache_dir: str) -> dict:
        return compute(cfg.probe, cache_dir, cache_content(cache_dir))

    _shuffle_embeddings_in_place(Path(plan.cache_dir) / manifest["shards"][0]["name"])
    with pytest.raises(CacheError, match=r"feat-00000-000\.tar: sha256 [0-9a-f]{12}\.\.\. does not match the "
                                         r"manifest's [0-9a-f]{12}\.\.\. .*--set cache\.verify=true") as e:
        probe_once(plan.cache_dir)
    assert "\n" not in str(e.value)
    _, repaired = extract(make_cfg(*sets, "cache.verify=true"), inputs, progress=False)
    assert repaired["stats"]["shards_extracted"] == 1 and FeatureCache.open(plan.cache_dir).content_sha256() == key
    assert accuracy(probe_once(plan.cache_dir)["metrics"]) == clean


def _bump_count(r):
    r["count"] += 1


def _bump_split(r):
    r["split_counts"]["train"] += 1


def _count_as_text(r):
    r["count"] = str(r["count"])


def _bump_every_count(r):  # self-consistent: only reading the part (cache.verify) shows it is wrong
    r["parts"][0]["count"] += 1
    r["count"] += 1
    r["split_counts"]["train"] += 1


def _move_a_sample_to_val(r):  # the totals still agree: only cache.verify counts the splits
    r["split_counts"]["train"] -= 1
    r["split_counts"]["val"] += 1


@pytest.mark.parametrize("edit, verify", [(_bump_count, False), (_bump_split, False), (_count_as_text, False),
                                          (_bump_every_count, True), (_move_a_sample_to_val, True)])
def test_a_record_with_edited_counts_is_redone(make_cfg, edit, verify):
    """A shard record whose counts were edited is not trusted: the re-run redoes that shard (only it) and
    the manifest has the true counts."""
    import json as _json

    from vitdistill.cache.reader import FeatureCache
    from vitdistill.data.ingest import resolve_inputs
    from vitdistill.extract import extract

    cfg = make_cfg("data.limit=40", "data.shard_samples=20")
    inputs = resolve_inputs(cfg, progress=False)
    plan, manifest = extract(cfg, inputs, progress=False)
    assert len(plan.inputs) == 2
    record_url = plan.record_url(0)
    original = _json.loads(open(record_url).read())
    record = _json.loads(_json.dumps(original))
    edit(record)
    open(record_url, "w").write(_json.dumps(record))
    _, again = extract(make_cfg("data.limit=40", "data.shard_samples=20", f"cache.verify={str(verify).lower()}"),
                       inputs, progress=False)
    assert (again["stats"]["shards_extracted"], again["stats"]["shards_reused"]) == (1, 1)
    assert again["num_samples"] == manifest["num_samples"] == 40
    assert again["split"]["counts"] == manifest["split"]["counts"] and again["shards"] == manifest["shards"]
    fixed = _json.loads(open(record_url).read())
    assert (fixed["count"], fixed["split_counts"], fixed["parts"]) == (original["count"], original["split_counts"],
                                                                       original["parts"])
    FeatureCache.open(plan.cache_dir).verify()


# --------------------------------------------------------------------------- the same samples twice


@pytest.mark.parametrize("second", ["./a.tar", "{d}/link.tar", "{d}/sub/../a.tar"])
def test_one_shard_under_two_names_is_listed_twice(make_cfg, tmp_path, monkeypatch, second):
    from vitdistill.data.ingest import resolve_inputs
    from vitdistill.errors import DataError

    _shard(tmp_path / "a.tar", 2)
    (tmp_path / "link.tar").symlink_to(tmp_path / "a.tar")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    second = second.format(d=tmp_path)
    with pytest.raises(DataError, match=rf"^data\.path: shard {re.escape(second)} is listed twice \({tmp_path}/a\.tar "
                                        rf"is the same file, {tmp_path}/a\.tar\); each shard may appear once$"):
        resolve_inputs(_wds_cfg(make_cfg, f"{tmp_path}/a.tar::{second}"), progress=False)


@pytest.mark.parametrize("on_error", ["error", "skip"])
def test_a_key_in_two_input_shards_fails_the_extraction_naming_both(make_cfg, tmp_path, on_error):
    """A copy of a shard under another name, or shards that overlap: the extraction fails in one line
    naming the key and both shards (whatever data.on_error), and writes no manifest."""
    import shutil

    from tests.test_extract import write_wds
    from vitdistill.data.ingest import resolve_inputs
    from vitdistill.errors import DataError
    from vitdistill.extract import extract

    d = tmp_path / "shards"
    d.mkdir()
    write_wds(d / "a.tar", 6)
    shutil.copy(d / "a.tar", d / "copy.tar")
    write_wds(d / "overlap.tar", 6, start=4)
    write_wds(d / "next.tar", 6, start=6)
    for other, key in (("copy", "s0000"), ("overlap", "s0004")):
        cfg = make_cfg("data.source=wds", f"data.path={d}/a.tar::{d}/{other}.tar", f"data.on_error={on_error}")
        inputs = resolve_inputs(cfg, progress=False)
        with pytest.raises(DataError, match=rf"^data\.path: key '{key}' is in two input shards, {d}/a\.tar and "
                                            rf"{d}/{other}\.tar; sample keys must be unique across shards") as e:
            extract(cfg, inputs, progress=False)
        assert "\n" not in str(e.value)
        assert not [p for p in (tmp_path / "cache").rglob("manifest.json") if "features" in str(p)]
    cfg = make_cfg("data.source=wds", f"data.path={d}/a.tar::{d}/next.tar")
    _, manifest = extract(cfg, resolve_inputs(cfg, progress=False), progress=False)
    assert manifest["num_samples"] == 12


def test_a_record_without_keys_gets_them_from_its_shard_not_a_re_extraction(make_cfg):
    """Records written before they listed their keys: the keys are read from the cached parts once (and
    written into the record), instead of extracting the shard again."""
    import json as _json

    from vitdistill.data.ingest import resolve_inputs
    from vitdistill.extract import extract

    cfg = make_cfg("data.limit=40", "data.shard_samples=20")
    inputs = resolve_inputs(cfg, progress=False)
    plan, _ = extract(cfg, inputs, progress=False)
    record = _json.loads(open(plan.record_url(0)).read())
    keys = record.pop("keys")
    assert len(keys) == record["count"] == 20
    open(plan.record_url(0), "w").write(_json.dumps(record))
    _, again = extract(cfg, inputs, progress=False)
    assert again["stats"]["shards_extracted"] == 0
    assert _json.loads(open(plan.record_url(0)).read())["keys"] == keys
