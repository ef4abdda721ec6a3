"""Feature extraction into sharded webdataset caches: inputs, resume, invalidation, bad input, S3."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from vitdistill.cache.reader import FeatureCache
from vitdistill.data.ingest import resolve_inputs
from vitdistill.errors import CacheError, DataError
from vitdistill.extract import extract
from vitdistill.models.teachers import Teacher


def run_extract(cfg):
    plan, manifest = extract(cfg, resolve_inputs(cfg, progress=False), progress=False)
    return plan, manifest, FeatureCache.open(plan.cache_dir)


def png_bytes(seed: int, size: int = 24) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_folder(root: Path, per_class: int = 6) -> Path:
    for c, cname in enumerate(["cat", "dog"]):
        (root / cname).mkdir(parents=True)
        for i in range(per_class):
            (root / cname / f"img.{i}.png").write_bytes(png_bytes(10 * c + i))
    (root / "cat" / "img.0.txt").write_text("a sidecar caption")
    (root / "captions.csv").write_text("file,caption\ndog/img.1.png,a dog from the csv\n")
    return root


def write_wds(path: Path, n: int, start: int = 0, classes: int = 3) -> None:
    with wds.TarWriter(str(path)) as w:
        for i in range(start, start + n):
            w.write({"__key__": f"s{i:04d}", "png": png_bytes(i), "cls": i % classes, "txt": f"caption {i}"})


# --------------------------------------------------------------------------- inputs


def test_digits_cache_layout_and_manifest(make_cfg):
    cfg = make_cfg("data.limit=60", "data.shard_samples=25")
    plan, manifest, fc = run_extract(cfg)
    assert manifest["num_samples"] == 60 and len(manifest["shards"]) == 3
    assert manifest["teacher"]["name"] == "test_vit" and len(manifest["teacher"]["weights_sha256"]) == 64
    assert manifest["preprocessing"]["input_size"] == [3, 160, 160]
    assert manifest["dtype"] == "float16" and manifest["code_version"]
    assert sum(manifest["split"]["counts"].values()) == 60
    for s in manifest["shards"]:
        assert {"name", "count", "sha256", "first_key", "last_key", "bytes"} <= set(s)
    d = fc.load()
    assert d["emb"].shape == (60, 64) and d["logits"].shape == (60, 1000) and d["cls"].max() <= 9
    assert fc.classes == [str(i) for i in range(10)]
    fc.verify()


def test_load_splits_reads_every_split_in_one_pass_as_load_reads_each(make_cfg, tmp_path, monkeypatch):
    """load_splits gives each split exactly what load(split) gives, in memory and spilled, reading the shards once."""
    cfg = make_cfg("data.source=shapes", "data.num_samples=60", "data.shard_samples=25")
    _, _, fc = run_extract(cfg)
    opened = []
    real = FeatureCache.iter_samples
    monkeypatch.setattr(FeatureCache, "iter_samples", lambda self, *a: opened.append(a) or real(self, *a))
    for spill in (None, tmp_path / "spill"):
        if spill is not None:
            spill.mkdir()
        opened.clear()
        together = fc.load_splits(("train", "val", "test"), spill_dir=spill and str(spill))
        assert len(opened) == 1  # one pass over the shards
        for s in ("train", "val", "test"):
            alone = fc.load(s)
            assert together[s]["key"] == alone["key"] and together[s]["txt"] == alone["txt"]
            assert np.array_equal(together[s]["cls"], alone["cls"])
            assert np.array_equal(np.asarray(together[s]["emb"], np.float32), alone["emb"])
            if spill is not None:
                assert isinstance(together[s]["emb"], np.memmap) and not together[s]["emb"].flags.writeable
    assert sorted(p.name for p in (tmp_path / "spill").glob("*.npy")) == sorted(
        f"{s}-{f}.npy" for s in ("train", "val", "test") for f in ("emb", "logits"))


def test_shapes_carries_captions_and_attributes(make_cfg):
    cfg = make_cfg("data.source=shapes", "data.num_samples=40", "cache.dtype=float32")
    _, manifest, fc = run_extract(cfg)
    d = fc.load()
    assert len(d["txt"]) == 40 and all(t.startswith("a") for t in d["txt"])
    assert set(d["meta"][0]) == {"shape", "colour", "texture"}
    assert fc.classes[d["cls"][0]] == d["meta"][0]["shape"]
    assert manifest["dtype"] == "float32"


def test_folder_with_sidecar_and_csv_captions(make_cfg, tmp_path):
    root = make_folder(tmp_path / "imgs")
    cfg = make_cfg("data.source=folder", f"data.path={root}")
    _, manifest, fc = run_extract(cfg)
    assert manifest["classes"] == ["cat", "dog"] and manifest["num_samples"] == 12
    rows = {s["key"]: s for s in fc.iter_samples()}
    assert "cat/img_0" in rows  # the dot in the file name is not taken for a field separator
    assert rows["cat/img_0"]["txt"] == "a sidecar caption"
    assert rows["dog/img_1"]["txt"] == "a dog from the csv"
    assert rows["dog/img_2"]["cls"] == 1 and "txt" not in rows["dog/img_2"]


def test_existing_wds_shards_with_braces(make_cfg, tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    write_wds(d / "train-000.tar", 10, 0)
    write_wds(d / "train-001.tar", 7, 10)
    (d / "classes.txt").write_text("a\nb\nc\n")
    cfg = make_cfg("data.source=wds", f"data.path={d}/train-{{000..001}}.tar")
    _, manifest, fc = run_extract(cfg)
    assert manifest["num_samples"] == 17 and manifest["classes"] == ["a", "b", "c"]
    assert [s["input"].rsplit("/", 1)[-1] for s in manifest["shards"]] == ["train-000.tar", "train-001.tar"]
    assert fc.load()["txt"][3] == "caption 3"


def test_plain_webdataset_reads_the_cache(make_cfg):
    _, manifest, fc = run_extract(make_cfg("data.limit=30"))
    ds = wds.WebDataset(fc.shard_urls(), shardshuffle=False).decode()
    samples = list(ds)
    assert len(samples) == 30
    s = samples[0]
    assert s["emb.npy"].shape == (64,) and s["emb.npy"].dtype == np.float16
    assert isinstance(s["cls"], int) and s["split.txt"] in ("train", "val", "test")


def test_split_is_deterministic_and_recorded(make_cfg):
    _, m1, fc1 = run_extract(make_cfg("data.limit=80"))
    d = fc1.load()
    assert m1["split"]["method"] == "sha1(seed/key)" and m1["split"]["seed"] == 0
    from vitdistill.data.splits import assign_split

    assert all(assign_split(k, 0, 0.15, 0.15) == s for k, s in zip(d["key"], d["split"]))
    assert set(d["split"]) == {"train", "val", "test"}


# --------------------------------------------------------------------------- reuse and invalidation


def test_rerun_reuses_and_teacher_change_invalidates(make_cfg, tmp_path):
    cfg = make_cfg("data.limit=40")
    plan1, m1, _ = run_extract(cfg)
    assert m1["stats"]["shards_extracted"] == 1
    plan2, m2, _ = run_extract(cfg)
    assert plan2.cache_dir == plan1.cache_dir and m2["stats"]["shards_reused"] == 1
    assert m2["shards"] == m1["shards"]

    # other weights for the same architecture: a new cache, never the stale one
    from safetensors.torch import save_file

    from vitdistill.models.teachers import create_teacher

    t = create_teacher(cfg.teacher)
    save_file({k: (v * 1.01).contiguous() for k, v in t.model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    plan3, m3, _ = run_extract(make_cfg("data.limit=40", f"teacher.checkpoint={tmp_path}/w.safetensors"))
    assert plan3.cache_dir != plan1.cache_dir and m3["stats"]["shards_extracted"] == 1
    # other preprocessing-relevant settings too
    plan4, _, _ = run_extract(make_cfg("data.limit=40", "cache.dtype=float32"))
    plan5, _, _ = run_extract(make_cfg("data.limit=41"))
    assert len({plan1.cache_dir, plan4.cache_dir, plan5.cache_dir}) == 3


def test_teacher_identity_memo_skips_the_build_and_follows_the_weights_file(make_cfg, tmp_path, monkeypatch):
    """A re-plan over a finished cache builds no teacher (its identity memo under cache.root answers); a
    rewritten weights file, or a memo gone stale, never reuses the old address."""
    from safetensors.torch import save_file

    import vitdistill.models.teachers as teachers
    from vitdistill.extract import extract_shard, plan_extraction
    from vitdistill.models.identity import memo_url

    ckpt = tmp_path / "w.safetensors"
    src = teachers.create_teacher(make_cfg().teacher)
    weights = {k: v.contiguous() for k, v in src.model.state_dict().items()}
    save_file(weights, str(ckpt))
    cfg = make_cfg("data.limit=40", f"teacher.checkpoint={ckpt}")
    inputs = resolve_inputs(cfg, progress=False)
    plan1 = plan_extraction(cfg, inputs)  # builds the teacher, writes the memo
    assert json.loads(Path(memo_url(cfg.teacher, cfg.cache.root)).read_text())["files"][0]["path"] == str(ckpt)

    def no_build(*a, **k):
        raise AssertionError("the teacher was built although its memo is valid")

    monkeypatch.setattr(teachers, "create_teacher", no_build)
    assert plan_extraction(cfg, inputs).cache_dir == plan1.cache_dir
    rand = make_cfg("data.limit=40")  # a seeded random initialisation is memoised too (no weights file)
    monkeypatch.undo()
    plan_rand = plan_extraction(rand, inputs)
    monkeypatch.setattr(teachers, "create_teacher", no_build)
    assert plan_extraction(rand, inputs).cache_dir == plan_rand.cache_dir != plan1.cache_dir

    # other weights in the same file (same size): the memo misses, the teacher is built, a new address
    save_file({k: (v * 1.01).contiguous() for k, v in weights.items()}, str(ckpt))
    with pytest.raises(AssertionError, match="was built"):
        plan_extraction(cfg, inputs)
    monkeypatch.undo()
    teachers._create_teacher_cached.cache_clear()
    plan2 = plan_extraction(cfg, inputs)
    assert plan2.cache_dir != plan1.cache_dir
    assert plan2.teacher["weights_sha256"] != plan1.teacher["weights_sha256"]

    # a memo that went stale without the file's size or mtime changing: the shard task's teacher disagrees,
    # nothing is written, the memo is removed, and the next plan builds the teacher and finds the true address
    url = Path(memo_url(cfg.teacher, cfg.cache.root))
    memo = json.loads(url.read_text())
    memo["identity"]["fingerprint"]["weights_sha256"] = "0" * 64
    url.write_text(json.dumps(memo))
    stale = plan_extraction(cfg, inputs)
    assert stale.cache_dir != plan2.cache_dir
    with pytest.raises(CacheError, match="not the one this cache is addressed by"):
        extract_shard(stale, 0, progress=False)
    assert not url.exists() and not list(Path(stale.cache_dir).glob("feat-*"))
    assert plan_extraction(cfg, inputs).cache_dir == plan2.cache_dir


def test_damaged_shard_is_redone(make_cfg):
    cfg = make_cfg("data.limit=40", "data.shard_samples=20")
    plan, m1, _ = run_extract(cfg)
    victim = Path(plan.cache_dir) / m1["shards"][1]["name"]
    victim.write_bytes(victim.read_bytes()[:1000])  # truncated by a crash or a bad copy
    _, m2, fc = run_extract(cfg)
    assert m2["stats"]["shards_extracted"] == 1 and m2["stats"]["shards_reused"] == 1
    fc.verify()


KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    from vitdistill.config import load_config
    from vitdistill.data.ingest import resolve_inputs
    from vitdistill.extract import extract
    cfg = load_config(None, sys.argv[1:])
    extract(cfg, resolve_inputs(cfg, progress=False), progress=False)
    """
)


@pytest.mark.slow
def test_resume_after_kill_has_every_key_once(tmp_path):
    sets = [f"cache.root={tmp_path}/cache", "data.limit=192", "data.shard_samples=24", "teacher.batch_size=8"]
    script = tmp_path / "x.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, str(script), *sets], env=env)
    features = tmp_path / "cache" / "features"
    deadline = time.time() + 240
    while time.time() < deadline:
        recs = list(features.glob("*/records/*.json"))
        if len(recs) >= 2:
            break
        assert proc.poll() is None, "extraction ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list(features.glob("*/manifest.json")), "killed run must not have a manifest"

    from vitdistill.config import load_config

    _, manifest, fc = run_extract(load_config(None, sets))
    assert manifest["stats"]["shards_reused"] >= 2 and manifest["stats"]["shards_extracted"] >= 1
    keys = [s["key"] for s in fc.iter_samples()]
    assert len(keys) == 192 and len(set(keys)) == 192
    fc.verify()


# --------------------------------------------------------------------------- bad input


def corrupt_folder(root: Path) -> Path:
    make_folder(root, per_class=3)
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "dog" / "empty.jpg").write_bytes(b"")
    return root


def test_corrupt_image_error_policy_names_shard_and_key(make_cfg, tmp_path):
    cfg = make_cfg("data.source=folder", f"data.path={corrupt_folder(tmp_path / 'imgs')}")
    with pytest.raises(DataError) as e:
        run_extract(cfg)
    msg = str(e.value)
    assert "shard-00000.tar" in msg and ("dog/broken" in msg or "dog/empty" in msg)
    assert not list((tmp_path / "cache" / "features").glob("*/feat-*.tar"))


def test_corrupt_image_skip_policy_counts(make_cfg, tmp_path):
    cfg = make_cfg("data.source=folder", f"data.path={corrupt_folder(tmp_path / 'imgs')}", "data.on_error=skip")
    _, manifest, fc = run_extract(cfg)
    assert manifest["num_samples"] == 6 and manifest["num_skipped"] == 2
    assert {s["key"] for s in manifest["skipped"]} == {"dog/broken", "dog/empty"}
    assert len(list(fc.iter_samples())) == 6


def test_truncated_input_shard(make_cfg, tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    write_wds(d / "a.tar", 12)
    data = (d / "a.tar").read_bytes()
    (d / "a.tar").write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(DataError, match=r"a\.tar.*(truncated|not a readable)"):
        run_extract(make_cfg("data.source=wds", f"data.path={d}/a.tar"))
    _, manifest, _ = run_extract(make_cfg("data.source=wds", f"data.path={d}/a.tar", "data.on_error=skip"))
    assert 0 < manifest["num_samples"] < 12 and manifest["num_skipped"] == 1
    assert "a.tar" in manifest["skipped"][0]["shard"]


def test_sample_without_image_and_non_tar(make_cfg, tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    with wds.TarWriter(str(d / "noimg.tar")) as w:
        w.write({"__key__": "x1", "cls": 1})
    with pytest.raises(DataError, match="x1.*no image"):
        run_extract(make_cfg("data.source=wds", f"data.path={d}/noimg.tar"))
    (d / "junk.tar").write_bytes(b"this is not a tar file at all" * 40)
    with pytest.raises(DataError, match="junk.tar"):
        run_extract(make_cfg("data.source=wds", f"data.path={d}/junk.tar"))
    with pytest.raises(DataError, match="missing.tar.*not found"):
        run_extract(make_cfg("data.source=wds", f"data.path={d}/missing.tar"))


@pytest.mark.parametrize("field", ["pth", "pyd", "pickle"])
def test_pickle_fields_are_refused(make_cfg, tmp_path, field):
    d = tmp_path / "shards"
    d.mkdir()
    with wds.TarWriter(str(d / "p.tar")) as w:
        w.write({"__key__": "k1", "png": png_bytes(1), field: b"\x80\x04N."})
    with pytest.raises(DataError, match="pickle"):
        run_extract(make_cfg("data.source=wds", f"data.path={d}/p.tar", "data.on_error=skip"))


def test_path_traversal_and_duplicate_keys_are_refused(make_cfg, tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    with tarfile.open(d / "evil.tar", "w") as tar:
        data = png_bytes(0)
        info = tarfile.TarInfo("../../escape.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match="unsafe path"):
        run_extract(make_cfg("data.source=wds", f"data.path={d}/evil.tar", "data.on_error=skip"))
    with tarfile.open(d / "dup.tar", "w") as tar:
        for name in ("a.png", "b.png", "a.cls"):
            data = png_bytes(1) if name.endswith("png") else b"1"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match="duplicate key 'a'"):
        run_extract(make_cfg("data.source=wds", f"data.path={d}/dup.tar"))


def test_non_finite_features_fail_the_shard_and_publish_nothing(make_cfg, monkeypatch, tmp_path):
    original = Teacher.forward  # what the extraction calls: embedding, logits and layers in one pass

    def poisoned(self, x):
        out = original(self, x)
        out.emb = out.emb.clone()
        out.emb[1, 0] = float("nan")
        return out

    monkeypatch.setattr(Teacher, "forward", poisoned)
    with pytest.raises(CacheError, match="non-finite embedding for key"):
        run_extract(make_cfg("data.limit=20"))
    cache = tmp_path / "cache" / "features"
    assert not list(cache.glob("*/feat-*.tar")) and not list(cache.glob("*/records/*.json"))
    assert not list(cache.glob("*/.tmp-*"))


def test_all_zero_embedding_fails(make_cfg, monkeypatch):
    original = Teacher.forward

    def zeroed(self, x):
        out = original(self, x)
        out.emb = out.emb.clone()
        out.emb[0] = 0
        return out

    monkeypatch.setattr(Teacher, "forward", zeroed)
    with pytest.raises(CacheError, match="all-zero embedding"):
        run_extract(make_cfg("data.limit=10"))


def test_reader_detects_manifest_disagreement(make_cfg):
    plan, manifest, _ = run_extract(make_cfg("data.limit=20"))
    manifest["shards"][0]["count"] += 1
    Path(plan.manifest_url).write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="manifest says 21"):
        list(FeatureCache.open(plan.cache_dir).iter_samples())
    with pytest.raises(CacheError, match="no manifest"):
        FeatureCache.open(plan.cache_dir + "-nope")


@pytest.mark.slow
def test_shard_roll_over_by_bytes(make_cfg):
    # float32 64-d emb + 1000 logits ~ 6.5 kB per sample: 1 MB parts hold ~150 samples
    _, manifest, fc = run_extract(make_cfg("data.limit=400", "data.shard_samples=400", "cache.dtype=float32",
                                           "cache.shard_bytes=1000000"))
    assert len(manifest["shards"]) >= 2
    assert all(s["bytes"] < 1_100_000 for s in manifest["shards"])
    assert len({s["key"] for s in fc.iter_samples()}) == 400


def test_topk_logits(make_cfg):
    _, _, fc = run_extract(make_cfg("data.limit=10", "cache.logits_topk=5"))
    d = fc.load()
    assert d["logits"] is None and d["logits_topk"].shape == (10, 5) and d["logits_idx"].dtype == np.int32
    assert (np.diff(d["logits_topk"].astype(np.float32), axis=1) <= 0).all()


# --------------------------------------------------------------------------- S3


def test_s3_input_and_cache_on_a_local_s3_server(make_cfg, s3_env, tmp_path):
    fs, bucket = s3_env
    local = tmp_path / "in.tar"
    write_wds(local, 9)
    fs.put_file(str(local), f"{bucket}/in/train-0.tar")
    cfg = make_cfg("data.source=wds", f"data.path=s3://{bucket}/in/train-0.tar", f"cache.root=s3://{bucket}/cache")
    plan, manifest, fc = run_extract(cfg)
    assert plan.cache_dir.startswith(f"s3://{bucket}/cache/features/")
    assert fs.exists(plan.manifest_url) and manifest["num_samples"] == 9
    assert len(fc.load()["key"]) == 9
    fc.verify()
    _, again, _ = run_extract(cfg)
    assert again["stats"]["shards_reused"] == 1
    # built-in datasets ingest to S3 as well
    _, m2, _ = run_extract(make_cfg("data.limit=12", f"cache.root=s3://{bucket}/cache2"))
    assert m2["num_samples"] == 12 and fs.ls(f"{bucket}/cache2/images")


def test_shard_writer_is_byte_identical_to_tarfile(tmp_path):
    """The fast header path writes exactly what tarfile (USTAR, mtime 0, owner vitdistill) writes."""
    from vitdistill.cache.tario import TarShardWriter

    rng = np.random.default_rng(0)
    samples = [(f"d/k{i:03d}" if i % 3 else "p" * 60 + "/" + "x" * 80 + str(i),
                {"emb.npy": rng.bytes(int(rng.integers(0, 3000))), "cls": b"3", "split.txt": b"train"})
               for i in range(30)]
    w = TarShardWriter(str(tmp_path / "ours.tar"))
    for key, fields in samples:
        w.write(key, fields)
    w.close()
    with open(tmp_path / "ref.tar", "wb") as fh, tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for key, fields in samples:
            for field, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "vitdistill", "vitdistill"
                t.addfile(info, io.BytesIO(data))
    assert (tmp_path / "ours.tar").read_bytes() == (tmp_path / "ref.tar").read_bytes()
    assert w.bytes_written == (tmp_path / "ours.tar").stat().st_size
    long_key = "y" * 150  # too long for USTAR: a PAX header, still readable everywhere
    w = TarShardWriter(str(tmp_path / "long.tar"))
    w.write(long_key, {"cls": b"1"})
    w.close()
    with tarfile.open(tmp_path / "long.tar") as t:
        assert t.getnames() == [f"{long_key}.cls"]


@pytest.mark.slow
def test_two_concurrent_extractions_into_one_cache(tmp_path):
    """Two processes extract the same cache at once: a valid cache, every key once, no torn shard."""
    sets = [f"cache.root={tmp_path}/cache", "data.limit=160", "data.shard_samples=20", "teacher.batch_size=8"]
    script = tmp_path / "x.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "TQDM_DISABLE": "1"}
    from vitdistill.config import load_config

    run_extract(load_config(None, sets + ["data.limit=1"]))  # ingest + teacher warm in this process only
    procs = [subprocess.Popen([sys.executable, str(script), *sets], env=env) for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    _, manifest, fc = run_extract(load_config(None, sets))
    assert manifest["stats"]["shards_reused"] == 8
    fc.verify()  # every shard matches the sha256 its record (and the manifest) states
    keys = [s["key"] for s in fc.iter_samples()]
    assert len(keys) == 160 and len(set(keys)) == 160
    assert not list((tmp_path / "cache" / "features").glob("*/.tmp-*"))


def test_keys_with_dots_are_refused_by_the_writer(tmp_path):
    from vitdistill.cache.tario import TarShardWriter

    w = TarShardWriter(str(tmp_path / "x.tar"))
    with pytest.raises(DataError, match="'img.0' contains a dot"):
        w.write("img.0", {"cls": b"1"})
    w.close()


def test_teacher_layers_are_cached_per_sample_and_address_the_cache(make_cfg):
    from vitdistill.cache.tario import iter_tar_samples, load_npy

    plain, _, _ = run_extract(make_cfg("data.limit=40"))
    plan, manifest, fc = run_extract(make_cfg("data.limit=40", "teacher.layers=[-3,-1]"))
    assert plan.cache_dir != plain.cache_dir
    assert manifest["teacher"]["layers"] == {"blocks": [-3, -1], "dims": [128, 128]}  # test_vit: CLS + patch mean
    rows = []
    for url in fc.shard_urls():
        with open(url, "rb") as f:
            rows += [load_npy(fields["layers.npy"], key) for key, fields in iter_tar_samples(f, url)]
    assert len(rows) == 40 and all(r.shape == (256,) and r.dtype == np.float16 for r in rows)
    assert fc.load()["emb"].shape == (40, 64)  # the embedding is unchanged
    other, _, _ = run_extract(make_cfg("data.limit=40", "teacher.layers=2"))
    assert other.cache_dir not in (plan.cache_dir, plain.cache_dir)
