"""Distillation: students, loss numerics, the trainer (NaN, resume), cached replay, DDP, end to end.

Tiny on purpose: digits limited to a few hundred images, the random ``test_vit`` teacher, the
32 px ``vit22b_tiny`` student, one or two epochs.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.layers import Attention

from tests.conftest import free_port
from vitdistill.config import StudentConfig
from vitdistill.data.ingest import resolve_inputs
from vitdistill.distill import (
    ParallelBlock, Trainer, TrainerConfig, create_distill_loss, create_student, kd_kl, list_losses,
    list_students, run_distill,
)
from vitdistill.data.shards import SplitRule, index_shards, iter_samples
from vitdistill.distill.data import StreamBatches, chw, parse_view_record, read_view_shard
from vitdistill.distill.losses import FeatureDistillation, HardDistillation
from vitdistill.distill.stage import build_student, student_spec
from vitdistill.distill.viewcache import build_view_cache, plan_views, teacher_spec
from vitdistill.distill.views import View, render_batch
from vitdistill.errors import ConfigError, RegistryError
from vitdistill.models.teachers import Teacher, create_teacher
from vitdistill.trainer import Callback, TrainingError

TINY = ["data.limit=300", "data.shard_samples=128", "distill.batch_size=16", "distill.epochs=8",
        "distill.checkpoint_every=40", "distill.mode=online"]


# --------------------------------------------------------------------------- students


@pytest.mark.parametrize("name", list_students() + ["test_resnet"])
def test_student_forward_shapes(name):
    s = create_student(StudentConfig(name=name, img_size=32 if name.startswith("vit") else None), num_classes=10,
                       teacher_dim=24, teacher_classes=7)
    x = torch.randn(2, 3, s.img_size, s.img_size)
    out = s(x)
    assert out["logits"].shape == (2, 10) and out["kd_logits"].shape == (2, 7) and out["feat"].shape == (2, 24)
    assert out["emb"].shape == (2, s.num_features)


def test_vit22b_blocks_are_parallel_with_qk_norm_and_no_biases():
    s = create_student(StudentConfig(name="vit22b_tiny"), num_classes=10, teacher_dim=8)
    blocks = list(s.backbone.blocks)
    assert len(blocks) == 4 and all(isinstance(b, ParallelBlock) for b in blocks)
    for b in blocks:
        assert not hasattr(b, "norm1") and not hasattr(b, "norm2")  # one shared pre-norm
        assert isinstance(b.attn, Attention) and b.attn.qkv.bias is None
        assert isinstance(b.attn.q_norm, torch.nn.LayerNorm) and isinstance(b.attn.k_norm, torch.nn.LayerNorm)
    norms = [m for m in s.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 4 * 3 + 1 and all(m.bias is None for m in norms)  # block, q, k per block + final
    b = blocks[0].eval()
    x = torch.randn(2, 17, 128)
    with torch.no_grad():  # the block really is x + attn(norm(x)) + mlp(norm(x))
        expected = x + b.attn(b.norm(x)) + b.mlp(b.norm(x))
        torch.testing.assert_close(b(x), expected)


def test_dist_token_student_averages_heads_at_eval():
    s = create_student(StudentConfig(name="vit22b_tiny"), num_classes=10, teacher_dim=8, teacher_classes=10,
                       dist_token=True)
    assert s.kd_head is not None and s.backbone.num_prefix_tokens == 2
    x = torch.randn(3, 3, 32, 32)
    s.eval()
    with torch.no_grad():
        cls, dist = s.tokens(x)
        out = s(x)
    torch.testing.assert_close(out["logits"], (s.head(cls) + s.kd_head(dist)) / 2)


def test_unknown_student_names_the_choices():
    with pytest.raises(RegistryError, match="vit22b_tiny"):
        create_student(StudentConfig(name="vit22b_tinny"), num_classes=10, teacher_dim=8)


# --------------------------------------------------------------------------- losses


def test_kd_kl_matches_a_hand_computation():
    s = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = np.array([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    temp = 2.0

    def log_softmax(z):
        z = z / temp
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    p_t = np.exp(log_softmax(t))
    expected = (p_t * (log_softmax(t) - log_softmax(s))).sum(-1).mean() * temp**2
    got = kd_kl(torch.tensor(s), torch.tensor(t), temp)
    assert got.dtype == torch.float32
    assert abs(float(got) - expected) < 1e-6


def test_kd_kl_is_stable_with_large_logits():
    s = torch.tensor([[3e4, -2e4, 0.0]], dtype=torch.float16, requires_grad=True)
    t = torch.tensor([[-3e4, 2e4, 1.0]], dtype=torch.float16)
    loss = kd_kl(s, t, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert float(loss.detach()) == pytest.approx(5e4, rel=1e-3)  # log p_t - log p_s at the teacher's argmax
    assert float(kd_kl(t.float(), t.float(), 4.0)) == 0.0


def test_hard_feature_and_combined_losses():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    teacher = torch.tensor([[0.0, 9.0, 0.0], [0.0, 0.0, 1.0]])
    out = {"kd_logits": logits, "logits": logits, "feat": torch.tensor([[1.0, 0.0], [0.0, 2.0]])}
    batch = {"teacher_logits": teacher, "teacher_emb": torch.tensor([[3.0, 0.0], [0.0, -1.0]]),
             "label": torch.tensor([0, -1])}
    assert float(HardDistillation()(out, batch)) == pytest.approx(float(F.cross_entropy(logits, torch.tensor([1, 2]))))
    assert float(FeatureDistillation()(out, batch)) == pytest.approx((0.0 + 2.0) / 2)  # cos 1 and -1
    loss_fn = create_distill_loss(alpha=0.25, weights={"kd": 2.0, "feature": 1.0, "hard": 0.0}, temperature=1.0)
    losses = loss_fn(out, batch)
    assert set(losses) == {"loss", "ce_loss", "kd_loss", "feature_loss"}
    assert float(losses["ce_loss"]) == pytest.approx(float(F.cross_entropy(logits[:1], torch.tensor([0]))))
    expected = 0.25 * losses["ce_loss"] + 0.75 * (2.0 * losses["kd_loss"] + losses["feature_loss"])
    assert float(losses["loss"]) == pytest.approx(float(expected))
    assert {"kd", "hard", "feature"} <= set(list_losses())
    with pytest.raises(RegistryError, match="feature"):
        create_distill_loss(0.5, {"featur": 1.0})


# --------------------------------------------------------------------------- trainer


class ToyBatches:
    """y = x @ w on fixed data; batch ``poison_at`` (0-based, epoch 0) holds a NaN."""

    def __init__(self, poison_at: int | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.poison_at = torch.randn(32, 4, generator=g), poison_at

    def __len__(self) -> int:
        return 4

    def batches(self, epoch: int, start: int = 0):
        for b in range(start, len(self)):
            x = self.x[b * 8:(b + 1) * 8].clone()
            if epoch == 0 and b == self.poison_at:
                x[0, 0] = float("nan")
            yield {"input": x, "target": x.sum(-1, keepdim=True)}


class MSE(torch.nn.Module):
    def forward(self, out, batch):
        return {"loss": F.mse_loss(out, batch["target"])}


def test_non_finite_loss_stops_with_the_step():
    trainer = Trainer(torch.nn.Linear(4, 1), MSE(), ToyBatches(poison_at=2), TrainerConfig(epochs=1, lr=0.1))
    with pytest.raises(TrainingError, match=r"step 3 \(epoch 0\): loss is nan"):
        trainer.fit()


class StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, trainer, step, losses):
        if step == self.step:
            raise KeyboardInterrupt  # a killed run: no checkpoint beyond the last periodic one


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """One uninterrupted online run on 300 digits (shared by the resume and end-to-end tests)."""
    from vitdistill.config import load_config

    root = tmp_path_factory.mktemp("straight")
    cfg = load_config(None, [f"cache.root={root}", "teacher.name=test_vit", "teacher.pretrained=false", *TINY])
    return run_distill(cfg, progress=False)


@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run(make_cfg, straight_run):
    cfg = make_cfg(*TINY)
    with pytest.raises(KeyboardInterrupt):
        run_distill(cfg, progress=False, callbacks=[StopAt(50)])  # checkpoint at step 40 (epoch 2), killed at 50
    resumed = run_distill(cfg, progress=False)
    for k, v in straight_run.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    for h0, h1 in zip(straight_run.history, resumed.history, strict=True):
        assert {k: v for k, v in h0.items() if k != "seconds"} == {k: v for k, v in h1.items() if k != "seconds"}
    for k in ("student_top1", "agreement", "kl", "student_probe_top1", "final_loss"):
        assert straight_run.metrics[k] == resumed.metrics[k], k


def test_streamed_cached_run_with_worker_processes_resumes_mid_epoch_to_identical_weights(make_cfg):
    sets = ["data.limit=200", "data.shard_samples=40", "distill.batch_size=16", "distill.epochs=3",
            "distill.checkpoint_every=7", "distill.mode=cached", "distill.num_workers=2", "distill.shuffle_buffer=16"]
    straight = run_distill(make_cfg(*sets, "distill.resume=false"), progress=False)
    cfg = make_cfg(*sets, "cache.root=" + straight.checkpoint_dir.split("/distill/")[0] + "-killed")
    with pytest.raises(KeyboardInterrupt):
        run_distill(cfg, progress=False, callbacks=[StopAt(13)])  # checkpoint at step 7 (mid-epoch 0), killed at 13
    resumed = run_distill(cfg, progress=False)
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert straight.metrics["student_top1"] == resumed.metrics["student_top1"]


@pytest.mark.slow  # shares the straight_run fixture (~1-2 min) with the resume test
def test_online_distillation_end_to_end_beats_chance(straight_run):
    m = straight_run.metrics
    assert m["student_top1"] > 0.4  # 10 classes: chance is 0.1
    assert {"agreement", "kl", "student_params", "teacher_params", "student_gflops", "teacher_gflops",
            "student_probe_top1", "final_loss", "final_kd_loss", "final_feature_loss"} <= set(m)
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    assert len(straight_run.history) == 8 and straight_run.history[-1]["loss"] < straight_run.history[0]["loss"]
    assert "loss_curves.png" in straight_run.figures and straight_run.headline.startswith("student top-1")
    assert os.path.exists(os.path.join(straight_run.checkpoint_dir, "latest.json"))


# --------------------------------------------------------------------------- cached mode


def test_cached_mode_replays_the_stored_views_without_a_teacher(make_cfg, monkeypatch):
    cfg = make_cfg("data.limit=100", "distill.mode=cached", "distill.num_views=2", "distill.hflip=0.5",
                   "cache.dtype=float32", "distill.batch_size=16", "distill.epochs=2")
    inputs = resolve_inputs(cfg, progress=False)
    plan, manifest = build_view_cache(cfg, inputs, progress=False)
    rule = SplitRule.from_config(cfg.data)
    train = {s.key: chw(s.image) for s in iter_samples(inputs.shards, rule, "train")}
    stored = {k: parse_view_record(k, f, "views", 2) for sh in manifest["shards"]
              for k, f in read_view_shard(f"{plan.cache_dir}/{sh['name']}").items()}
    assert manifest["num_samples"] == len(train) == len(stored) and set(train) == set(stored)
    flips = [v[4] for r in stored.values() for v in r["views"]]
    assert any(flips) and not all(flips)  # some views flipped, some not

    teacher = create_teacher(cfg.teacher)
    spec = teacher_spec(teacher, cfg.distill.teacher_size)
    keys = sorted(stored)[::7]
    for k in range(2):  # rebuild each stored view from its parameters: the teacher gives the stored logits
        imgs = [train[key] for key in keys]
        views = [View.from_list(stored[key]["views"][k]) for key in keys]
        assert views == [plan_views(plan, key, img)[k] for key, img in zip(keys, imgs)]
        _, logits = teacher(render_batch(imgs, views, spec))
        np.testing.assert_allclose(logits.numpy(), np.stack([stored[key]["logits"][k] for key in keys]),
                                   atol=1e-4, rtol=1e-4)

    # training replays them, and no teacher runs
    student = build_student(cfg, teacher, 10)
    data = StreamBatches.cached(inputs, plan.cache_dir, manifest, rule, cfg.distill, "error", student_spec(student))
    monkeypatch.setattr(Teacher, "__call__", lambda *a, **k: pytest.fail("the teacher ran in cached mode"))
    batch = next(data.batches(epoch=1))
    assert batch["teacher_logits"].shape == (16, 1000) and batch["input"].shape == (16, 3, 32, 32)
    loss_fn = create_distill_loss(cfg.distill.alpha, cfg.distill.losses, cfg.distill.temperature)
    result = Trainer(student, loss_fn, data, TrainerConfig(epochs=2, lr=1e-3)).fit()
    assert result.step == 2 * len(data) == 2 * math.ceil(len(train) / 16) and math.isfinite(result.history[-1]["loss"])


def test_config_rejects_bad_views(make_cfg):
    with pytest.raises(ConfigError, match="crop_scale"):
        make_cfg("distill.crop_scale=[0.8, 0.2]")


# --------------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world_size: int, port: int, root: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from vitdistill.config import load_config

    cfg = load_config(None, [f"cache.root={root}", "teacher.name=test_vit", "teacher.pretrained=false",
                             "data.limit=120", "distill.batch_size=16", "distill.epochs=1", "distill.mode=cached",
                             "distill.num_views=1"])
    report = run_distill(cfg, progress=False)
    torch.save({"state": report.model.state_dict(), "metrics": report.metrics, "history": report.history},
               os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_ddp_two_gloo_processes_agree(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    torch.multiprocessing.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path / "cache"), str(out)), nprocs=2,
                                join=True)
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k
    assert r0["history"][0]["loss"] == r1["history"][0]["loss"]
    assert r0["metrics"]["student_top1"] == r1["metrics"]["student_top1"]
    assert r0["metrics"]["steps"] == math.ceil(math.ceil(len_train(tmp_path) / 2) / 8)


def len_train(tmp_path) -> int:
    from vitdistill.config import load_config

    cfg = load_config(None, [f"cache.root={tmp_path / 'cache'}", "data.limit=120"])
    inputs = resolve_inputs(cfg, progress=False)
    return index_shards(inputs.shards, SplitRule.from_config(cfg.data), "error").total("train")


def test_the_streamed_test_pass_gives_the_whole_array_metrics_and_keeps_only_the_embeddings():
    """evaluate_distill reduces the test split batch by batch (memory O(N x D), not O(N x classes)); its means
    are those of the whole arrays: top-1 over labelled rows, top-1/top-5 agreement, KL(teacher || student)."""
    from vitdistill.distill.evaluate import collect, test_pass
    from vitdistill.distill.losses import kl_per_sample

    g = torch.Generator().manual_seed(0)
    n, c, d = 203, 12, 7
    out = {"logits": torch.randn(n, c, generator=g), "kd_logits": torch.randn(n, c, generator=g),
           "emb": torch.randn(n, d, generator=g), "feat": torch.randn(n, 5, generator=g)}
    teach = {"logits": torch.randn(n, c, generator=g), "emb": torch.randn(n, 5, generator=g)}
    labels = torch.randint(-1, c, (n,), generator=g).numpy()
    batches = [([torch.tensor(i) for i in range(a, min(a + 32, n))], labels[a:a + 32]) for a in range(0, n, 32)]

    def fn(d: dict):
        return lambda imgs: {k: v[int(imgs[0]):int(imgs[-1]) + 1] for k, v in d.items()}

    emb, lab, m = test_pass(batches, fn(out), fn(teach), size=n - 50)  # fewer rows expected than come: it grows
    assert np.array_equal(emb, out["emb"].numpy()) and np.array_equal(lab, labels)
    valid = torch.from_numpy(labels) >= 0
    y = torch.from_numpy(labels)[valid]
    t_top = teach["logits"].argmax(-1)
    want = {"student_top1": (out["logits"].argmax(-1)[valid] == y).double().mean(),
            "teacher_top1": (teach["logits"].argmax(-1)[valid] == y).double().mean(),
            "agreement": (out["kd_logits"].argmax(-1) == t_top).double().mean(),
            "agreement_top5": (out["kd_logits"].topk(5, -1).indices == t_top[:, None]).any(-1).double().mean(),
            "kl": kl_per_sample(out["kd_logits"], teach["logits"]).double().mean(),
            "feature_cosine": F.cosine_similarity(out["feat"], teach["emb"], dim=-1).double().mean()}
    assert m.keys() == want.keys()
    for k, v in want.items():
        assert m[k] == pytest.approx(float(v), rel=1e-6), k
    outs, lab2 = collect(batches, {"s": fn(out)}, size=n)
    assert np.array_equal(outs["s"]["kd_logits"], out["kd_logits"].numpy()) and np.array_equal(lab2, labels)
