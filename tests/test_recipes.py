"""Distillation recipes: function matching's exact mixup replay, students from unlabelled images with a
probe head, the shipped recipe files, and the one teacher probe shared by every stage."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from vitdistill.cache.tario import TarShardWriter
from vitdistill.config import load_config
from vitdistill.data.ingest import resolve_inputs
from vitdistill.data.shards import SplitRule, index_shards, iter_samples, read_shard
from vitdistill.distill import run_distill
from vitdistill.distill.data import OnlinePartner, StreamBatches, chw, parse_view_record, read_view_shard
from vitdistill.distill.losses import mixed_cross_entropy
from vitdistill.distill.stage import build_student, student_spec
from vitdistill.distill.students import ProbeHead
from vitdistill.distill.viewcache import build_view_cache, teacher_spec
from vitdistill.distill.views import View, mix_partner, render_batch
from vitdistill.models.teachers import create_teacher

ROOT = Path(__file__).resolve().parents[1]
MIX = ["data.limit=120", "data.shard_samples=60", "distill.mode=cached", "distill.num_views=2", "distill.mixup=1.0",
       "cache.dtype=float32", "distill.batch_size=16", "distill.epochs=1", "distill.alpha=0", "distill.losses={kd: 1}"]


def test_mix_partner_is_another_sample_of_the_shard_and_deterministic():
    keys = [f"k{i}" for i in range(10)]
    draws = [mix_partner(0, e, "k3", keys, 1.0) for e in range(50)]
    assert all(p != "k3" and p in keys and 0.0 <= lam <= 1.0 for p, lam in draws)
    assert draws == [mix_partner(0, e, "k3", keys, 1.0) for e in range(50)]
    assert len({p for p, _ in draws}) > 3 and mix_partner(0, 0, "k3", keys, 0.0) is None
    assert mix_partner(0, 0, "k3", ["k3"], 1.0) is None


def test_mixed_cross_entropy_is_the_lambda_weighted_ce():
    logits = torch.randn(4, 5)
    y, y2, lam = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 4, -1, 0]), torch.tensor([0.3, 1.0, 0.5, 0.8])
    logp = torch.log_softmax(logits, -1)
    want = -(lam * logp[range(4), y]).sum() - ((1 - lam[[0, 1, 3]]) * logp[[0, 1, 3], y2[[0, 1, 3]]]).sum()
    want = want / (lam.sum() + (1 - lam[[0, 1, 3]]).sum())
    assert torch.allclose(mixed_cross_entropy(logits, y, y2, lam), want)


def test_cached_mixup_replays_the_exact_mixed_image_the_teacher_saw(make_cfg):
    cfg = make_cfg(*MIX)
    inputs = resolve_inputs(cfg, progress=False)
    plan, manifest = build_view_cache(cfg, inputs, progress=False)
    rule = SplitRule.from_config(cfg.data)
    teacher = create_teacher(cfg.teacher)
    tspec = teacher_spec(teacher, cfg.distill.teacher_size)
    sh = manifest["shards"][0]
    images = {s.key: chw(s.image) for s in iter_samples([sh["input"]], rule, "train")}
    stored = {k: parse_view_record(k, f, "v", 2) for k, f in read_view_shard(f"{plan.cache_dir}/{sh['name']}").items()}
    keys = sorted(stored)[:6]
    for k in range(2):
        imgs, views, mixes = [], [], []
        for key in keys:
            partner, p_view, lam = stored[key]["mix"][k]
            assert partner != key and partner in images  # the partner is another training image of the shard
            assert (partner, lam) == mix_partner(cfg.distill.seed, k, key, list(images), 1.0)
            imgs.append(images[key])
            views.append(View.from_list(stored[key]["views"][k]))
            mixes.append((images[partner], View.from_list(p_view), lam))
        _, logits = teacher(render_batch(imgs, views, tspec, mixes))  # the teacher on the replayed mixed image
        np.testing.assert_allclose(logits.numpy(), np.stack([stored[key]["logits"][k] for key in keys]),
                                   atol=1e-4, rtol=1e-4)

    # training replays the same mixed image for the student; the online mode draws the same partners
    student = build_student(cfg, teacher, 10)
    sspec = student_spec(student)
    data = StreamBatches.cached(inputs, plan.cache_dir, manifest, rule, cfg.distill, "error", sspec)
    batch = next(data.batches(epoch=1))
    assert {"mix_label", "mix_lam"} <= set(batch) and batch["input"].shape[0] == 16
    online = OnlinePartner(cfg.distill.seed, 1.0)
    for key in keys:
        assert online(key, None, list(images), 1)[0] == stored[key]["mix"][1][0]


def test_student_from_unlabelled_images_gets_a_probe_head(make_cfg, tmp_path):
    """The student distils on another, unlabelled image set; its task head is a probe on data's labels."""
    cfg0 = make_cfg("data.limit=240")
    src = resolve_inputs(cfg0, progress=False)
    out = tmp_path / "unlabelled"
    out.mkdir()
    w = TarShardWriter(str(out / "u-000.tar"))
    for key, fields in read_shard(src.shards[0]):  # the same kind of images, without labels, under other keys
        w.write("u" + key, {"png": fields["png"]})
    w.close()
    cfg = make_cfg("data.limit=240", "distill.data.source=wds", f"distill.data.path={out}/u-000.tar",
                   "distill.alpha=0", "distill.losses={kd: 1, feature: 1}", "distill.epochs=2", "distill.batch_size=16",
                   "distill.mode=online")
    report = run_distill(cfg, progress=False)
    assert isinstance(report.model.head, ProbeHead)
    assert report.metrics["student_top1"] > 0.2 and report.metrics["head_labels"] > 0  # 10 classes
    assert report.split_sizes["test"] == index_shards(src.shards, SplitRule.from_config(cfg.data), "error").total("test")
    with torch.no_grad():  # the saved model's head gives the reported accuracy
        assert report.model(torch.zeros(1, 3, 32, 32))["logits"].shape == (1, 10)


def test_distill_data_must_not_be_the_evaluated_set(make_cfg):
    from vitdistill.errors import ConfigError

    cfg = make_cfg("data.limit=60", "distill.data.source=digits", "distill.data.limit=60")
    with pytest.raises(ConfigError, match="distill.data is the data set that is evaluated"):
        run_distill(cfg, progress=False)


@pytest.mark.parametrize("recipe", ["funmatch", "deit", "fkd"])
def test_recipe_files_layer_over_a_data_config_and_say_their_paper(recipe):
    path = ROOT / "configs" / "distill" / f"{recipe}.yaml"
    text = path.read_text()
    assert "et al." in text or "Shen & Xing" in text  # each names the paper it follows
    cfg = load_config([ROOT / "configs" / "shapes.yaml", path])
    assert cfg.data.source == "shapes" and cfg.distill.epochs >= 40
    if recipe == "funmatch":
        assert cfg.distill.mixup > 0 and cfg.distill.alpha == 0 and cfg.distill.mode == "cached"


def test_one_teacher_probe_for_the_probe_stage_distillation_and_evaluation(make_cfg):
    from vitdistill.cache.reader import FeatureCache
    from vitdistill.distill.stage import teacher_probe_top1
    from vitdistill.evaluate.stage import TeacherProbe
    from vitdistill.extract import extract
    from vitdistill.probes.stage import probe_cache

    cfg = make_cfg("data.limit=300")
    inputs = resolve_inputs(cfg, progress=False)
    plan, _ = extract(cfg, inputs, progress=False)
    probed = probe_cache(plan.cache_dir, cfg.probe).metrics["linear_top1"]
    assert teacher_probe_top1(cfg, inputs) == probed  # distillation's teacher number is the probe stage's
    tp = TeacherProbe(create_teacher(cfg.teacher), plan.cache_dir, cfg.probe)
    test = FeatureCache.open(plan.cache_dir).load("test")
    top1 = float((tp.classifier.logits(test["emb"]).argmax(1) == test["cls"]).mean())
    assert top1 == probed == tp.summary["top1"]  # evaluation's teacher is the same model
    assert math.isfinite(top1)


def test_data_efficiency_rows_train_labels_only_at_each_fraction(make_cfg):
    cfg = make_cfg("data.limit=200", "distill.mode=online", "distill.epochs=1", "distill.batch_size=16",
                   "distill.alpha=0", "distill.losses={kd: 1}", "distill.data_efficiency=[0.25, 1.0]")
    report = run_distill(cfg, progress=False)
    rows = report.tables["data_efficiency"]
    assert [r["label_fraction"] for r in rows] == [0.25, 1.0]
    assert all(0.0 <= r["labels_only_top1"] <= 1.0 and 0.0 <= r["distilled_top1"] <= 1.0 for r in rows)
    assert rows[-1]["distilled_top1"] == report.metrics["student_top1"]  # the full-label row is this run's student
    assert rows[0]["train_labels"] < rows[1]["train_labels"]
