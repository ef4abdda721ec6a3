"""The one image-shard reader: split rule, decoding policy, the shard index and the streamed epoch order."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitdistill.cache.tario import TarShardWriter
from vitdistill.data.shards import (
    RawItem, ShardStream, SplitRule, decode_sample, index_shards, iter_samples, read_shard,
)
from vitdistill.data.splits import assign_split
from vitdistill.errors import DataError


def png(seed: int, size: int = 8) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(root: Path, n_shards: int, per_shard: int, corrupt: set[str] = frozenset()) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    urls = []
    for j in range(n_shards):
        url = str(root / f"s-{j:03d}.tar")
        w = TarShardWriter(url)
        for i in range(per_shard):
            key = f"k{j:03d}_{i:04d}"
            w.write(key, {"png": b"broken" if key in corrupt else png(j * 1000 + i), "cls": str(i % 3).encode()})
        w.close()
        urls.append(url)
    return urls


class Keys:
    """make_batch that keeps only the keys (picklable: module level)."""

    def __call__(self, items: list[RawItem], epoch: int) -> dict:
        return {"keys": [it.key for it in items]}


RULE = SplitRule(seed=0, val_fraction=0.2, test_fraction=0.2)


def stream(urls, rule=RULE, **kw) -> ShardStream:
    index = index_shards(urls, rule, "error")
    kw.setdefault("seed", 3)
    return ShardStream(urls, index.split_counts("train"), rule, "train", kw.pop("batch_size", 7), Keys(), **kw)


def epoch_keys(s: ShardStream, epoch: int, **kw) -> list[list[str]]:
    return [b["keys"] for b in s.batches(epoch, **kw)]


def test_split_rule_is_the_recorded_hash_and_round_trips():
    assert RULE.of("abc") == assign_split("abc", 0, 0.2, 0.2)
    assert SplitRule.from_dict(RULE.to_dict()) == RULE
    with pytest.raises(DataError, match="split method"):
        SplitRule.from_dict({**RULE.to_dict(), "method": "random"})


def test_index_counts_splits_and_labels_and_is_reused(tmp_path):
    urls = write_shards(tmp_path / "s", 3, 20)
    idx = index_shards(urls, RULE, "error", fingerprint="fp", cache_root=str(tmp_path / "c"))
    keys = [k for u in urls for k, _ in read_shard(u)]
    assert idx.total("train") + idx.total("val") + idx.total("test") == 60
    assert idx.total("test") == sum(RULE.of(k) == "test" for k in keys)
    assert idx.max_label == 2 and idx.labelled == 60
    assert list((tmp_path / "c" / "index").glob("*.json"))
    again = index_shards(urls, RULE, "error", fingerprint="fp", cache_root=str(tmp_path / "c"))
    assert again.counts == idx.counts


@pytest.mark.parametrize("n_shards,readers,world", [(6, 1, 1), (6, 2, 1), (2, 3, 1), (1, 2, 2), (5, 2, 2)])
def test_every_train_sample_once_per_epoch(tmp_path, n_shards, readers, world):
    urls = write_shards(tmp_path / "s", n_shards, 23)
    train = {k for u in urls for k, _ in read_shard(u) if RULE.of(k) == "train"}
    seen: list[str] = []
    for rank in range(world):
        s = stream(urls, readers=readers, rank=rank, world=world)
        batches = epoch_keys(s, 0)
        assert len(batches) == len(s) == s.steps(0)
        seen += [k for b in batches for k in b]
    assert len(seen) == len(set(seen))  # no sample twice
    if world == 1:
        assert set(seen) == train
    else:  # ranks step together: a bigger rank drops its surplus batches
        assert len(seen) <= len(train) and len(seen) >= len(train) - world * readers * 7 * 2


def test_order_depends_on_seed_and_epoch_only(tmp_path):
    urls = write_shards(tmp_path / "s", 4, 30)
    a, b = stream(urls), stream(urls)
    assert epoch_keys(a, 0) == epoch_keys(b, 0)
    assert epoch_keys(a, 0) != epoch_keys(a, 1)
    assert epoch_keys(a, 0) != epoch_keys(stream(urls, seed=4), 0)
    # the buffer mixes shards: the first batch holds keys from more than one shard
    assert len({k[:4] for k in epoch_keys(stream(urls, shuffle_buffer=64), 0)[0]}) > 1


def test_dataloader_workers_give_the_in_process_order(tmp_path):
    urls = write_shards(tmp_path / "s", 5, 25)
    s = stream(urls, readers=2)
    assert epoch_keys(s, 2, num_workers=2) == epoch_keys(s, 2, num_workers=0)


@pytest.mark.parametrize("readers", [1, 3])
def test_resume_position_skips_exactly_the_trained_batches(tmp_path, readers):
    urls = write_shards(tmp_path / "s", 4, 19)
    s = stream(urls, readers=readers)
    full = epoch_keys(s, 1)
    for start in (0, 1, 5, len(full) - 1, len(full)):
        assert epoch_keys(s, 1, start=start) == full[start:]


def test_skipped_batches_are_not_decoded(tmp_path):
    urls = write_shards(tmp_path / "s", 3, 20)
    calls = []

    class Count(Keys):
        def __call__(self, items, epoch):
            calls.append(len(items))
            return super().__call__(items, epoch)

    index = index_shards(urls, RULE, "error")
    s = ShardStream(urls, index.split_counts("train"), RULE, "train", 5, Count(), seed=0)
    list(s.batches(0, start=len(s) - 1))
    assert len(calls) == 1


def test_corrupt_image_policy(tmp_path):
    urls = write_shards(tmp_path / "s", 1, 10, corrupt={"k000_0003"})
    with pytest.raises(DataError, match=r"s-000\.tar.*k000_0003.*cannot decode"):
        list(iter_samples(urls))
    skipped: list[dict] = []
    got = [s.key for s in iter_samples(urls, on_error="skip", skipped=skipped)]
    assert len(got) == 9 and "k000_0003" not in got and skipped[0]["key"] == "k000_0003"
    fields = dict(read_shard(urls[0]))["k000_0003"]
    assert decode_sample("k000_0003", fields, urls[0], "skip") is None


def test_a_changed_shard_is_named(tmp_path):
    urls = write_shards(tmp_path / "s", 2, 20)
    index = index_shards(urls, RULE, "error")
    write_shards(tmp_path / "s", 2, 25)  # more samples than indexed
    s = ShardStream(urls, index.split_counts("train"), RULE, "train", 4, Keys(), seed=0)
    with pytest.raises(DataError, match=r"s-00\d\.tar: yields \d+ train samples but the index says"):
        list(s.batches(0))


def test_batch_count_is_known_before_reading(tmp_path):
    urls = write_shards(tmp_path / "s", 3, 10)
    index = index_shards(urls, RULE, "error")
    s = ShardStream(urls, index.split_counts("train"), RULE, "train", 4, Keys(), seed=0, readers=2)
    per_reader = [s.reader_plan(0, r)[1] for r in range(2)]
    assert len(s) == sum(math.ceil(n / 4) for n in per_reader)
    assert torch.utils.data.get_worker_info() is None


def test_extraction_with_decoding_workers_writes_the_same_cache(make_cfg, tmp_path):
    """The GPU path (DataLoader processes decoding in order) gives byte-identical shards to the CPU path."""
    from vitdistill.data.ingest import resolve_inputs
    from vitdistill.extract import extract

    manifests = []
    for workers in (0, 2):
        cfg = make_cfg("data.limit=90", "data.shard_samples=40", f"teacher.num_workers={workers}",
                       f"cache.root={tmp_path}/c{workers}")
        _, m = extract(cfg, resolve_inputs(cfg, progress=False), progress=False)
        manifests.append(m)
    assert [s["sha256"] for s in manifests[0]["shards"]] == [s["sha256"] for s in manifests[1]["shards"]]


def test_extraction_workers_honour_on_error(make_cfg, tmp_path):
    from vitdistill.extract import extract
    from vitdistill.data.ingest import resolve_inputs

    urls = write_shards(tmp_path / "s", 1, 12, corrupt={"k000_0005"})
    cfg = make_cfg("data.source=wds", f"data.path={urls[0]}", "teacher.num_workers=2")
    with pytest.raises(DataError, match=r"k000_0005.*cannot decode") as e:
        extract(cfg, resolve_inputs(cfg, progress=False), progress=False)
    assert "\n" not in str(e.value)
    cfg = make_cfg("data.source=wds", f"data.path={urls[0]}", "teacher.num_workers=2", "data.on_error=skip")
    _, m = extract(cfg, resolve_inputs(cfg, progress=False), progress=False)
    assert m["num_samples"] == 11 and [s["key"] for s in m["skipped"]] == ["k000_0005"]


# --------------------------------------------------------------------------- every stage honours data.on_error


def corrupt_wds(tmp_path: Path) -> tuple[str, set[str]]:
    """One shard of 90 images, every 10th corrupt (so each split holds some)."""
    bad = {f"k000_{i:04d}" for i in range(0, 90, 10)}
    url = write_shards(tmp_path / "bad", 1, 90, corrupt=bad)[0]
    assert {RULE.of(k) for k in bad} >= {"train"}
    return url, bad


@pytest.mark.parametrize("mode", ["online", "cached"])
def test_distillation_honours_on_error(make_cfg, tmp_path, mode):
    from vitdistill.distill import run_distill

    url, bad = corrupt_wds(tmp_path)
    sets = ["data.source=wds", f"data.path={url}", f"distill.mode={mode}", "distill.epochs=1", "distill.batch_size=16",
            "distill.num_views=1", "data.val_fraction=0.2", "data.test_fraction=0.2"]
    with pytest.raises(DataError, match=r"bad/s-000\.tar: sample 'k000_00\d0': cannot decode"):
        run_distill(make_cfg(*sets), progress=False)
    report = run_distill(make_cfg(*sets, "data.on_error=skip"), progress=False)
    good_train = sum(RULE.of(f"k000_{i:04d}") == "train" for i in range(90) if f"k000_{i:04d}" not in bad)
    assert report.metrics["steps"] >= 1 and np.isfinite(report.metrics["final_loss"])
    if mode == "cached":
        assert report.metrics["train_images_per_s"] > 0
        import json

        manifest = json.loads((Path(report.view_cache_dir) / "manifest.json").read_text())
        assert manifest["num_samples"] == good_train


def test_evaluation_honours_on_error(make_cfg, tmp_path):
    from vitdistill.evaluate.stage import load_test_images

    url, bad = corrupt_wds(tmp_path)
    sets = ["data.source=wds", f"data.path={url}", "data.val_fraction=0.2", "data.test_fraction=0.2"]
    assert any(RULE.of(k) == "test" for k in bad)
    with pytest.raises(DataError, match="cannot decode"):
        load_test_images(make_cfg(*sets))
    test = load_test_images(make_cfg(*sets, "data.on_error=skip"))
    good_test = sum(RULE.of(f"k000_{i:04d}") == "test" for i in range(90) if f"k000_{i:04d}" not in bad)
    assert len(test.images) == good_test
