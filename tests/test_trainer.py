"""The shared trainer on a toy model: schedule, parameter groups, clipping, NaN stop, resume, callbacks, EMA."""

from __future__ import annotations

import json
import math
import typing

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitdistill.config import Optimizer, load_config
from vitdistill.errors import ConfigError
from vitdistill.trainer import Callback, Trainer, TrainerConfig, TrainingError, param_groups, warmup_cosine


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 1, 4))  # a 3-d "token": decays unless no_weight_decay() names it
        self.fc = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 1)

    def no_weight_decay(self) -> set[str]:
        return {"token"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 4) -> (B, 1)
        return self.out(self.norm(self.fc(x + self.token[0])))


def toy(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    return Toy()


class ToyBatches:
    """y = sum(x) on 32 fixed rows, 4 batches of 8; batch ``poison_at`` of epoch 0 holds a NaN."""

    def __init__(self, n_batches: int = 4, poison_at: int | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.n, self.poison_at = torch.randn(8 * n_batches, 4, generator=g), n_batches, poison_at

    def __len__(self) -> int:
        return self.n

    def batches(self, epoch: int, start: int = 0):
        for b in range(start, self.n):
            x = self.x[b * 8:(b + 1) * 8].clone()
            if epoch == 0 and b == self.poison_at:
                x[0, 0] = float("nan")
            yield {"input": x, "target": x.sum(-1, keepdim=True)}


class MSE(nn.Module):
    def forward(self, out, batch):
        return {"loss": F.mse_loss(out, batch["target"]), "mae": (out - batch["target"]).abs().mean()}


class Record(Callback):
    def __init__(self, stop_at: int | None = None) -> None:
        self.events: list[tuple] = []
        self.lrs: list[float] = []
        self.stop_at = stop_at

    def on_step(self, trainer, step, losses):
        self.events.append(("step", step))
        self.lrs.append(losses["lr"])
        if step == self.stop_at:
            raise KeyboardInterrupt  # a killed run: nothing saved beyond the last periodic checkpoint

    def on_epoch(self, trainer, epoch, summary):
        self.events.append(("epoch", epoch))

    def on_checkpoint(self, trainer, path):
        self.events.append(("checkpoint", trainer.step))


def fit(cfg: TrainerConfig, callbacks=(), data=None) -> Trainer:
    trainer = Trainer(toy(), MSE(), data or ToyBatches(), cfg, callbacks)
    trainer.result = trainer.fit()
    return trainer


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- schedule and optimiser


def test_warmup_cosine_per_step_values_for_every_group():
    params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"params": [params[0]], "lr": 1.0}, {"params": [params[1]], "lr": 0.1}])
    sched = warmup_cosine(opt, total=10, warmup=4)
    lrs = []
    for u in range(1, 11):
        sched.step_update(u)
        lrs.append([g["lr"] for g in opt.param_groups])
    cosine = [0.5 * (1 + math.cos(math.pi * (u - 4) / 6)) for u in range(4, 11)]
    expected = [0.25, 0.5, 0.75] + cosine  # update u runs at u / warmup, then cosine to 0 at the last update
    assert [a for a, _ in lrs] == pytest.approx(expected)
    assert [b for _, b in lrs] == pytest.approx([0.1 * e for e in expected])
    assert lrs[-1] == [0.0, 0.0] and lrs[6][0] == pytest.approx(0.5)


def test_trainer_steps_at_the_scheduled_learning_rates():
    rec = Record()
    fit(TrainerConfig(epochs=2, lr=0.01, warmup_fraction=0.25), [rec])  # 8 steps, 2 of warm-up
    expected = [0.005, 0.01] + [0.005 * (1 + math.cos(math.pi * u / 6)) for u in range(1, 7)]
    assert rec.lrs == pytest.approx(expected)


def test_param_groups_decay_only_weight_matrices():
    model = toy()
    groups = param_groups([(model, 0.2)], weight_decay=0.5)
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert all(g["lr"] == 0.2 for g in groups)
    decayed = {n for n, p in model.named_parameters() if wd[id(p)] == 0.5}
    assert decayed == {"fc.weight", "out.weight"}  # not biases, norms, nor the token no_weight_decay() names
    parts = param_groups([(model.fc, 0.1), (model.out, 0.3)], weight_decay=0.5)
    assert {(g["lr"], g["weight_decay"], len(g["params"])) for g in parts} == {
        (0.1, 0.0, 1), (0.1, 0.5, 1), (0.3, 0.0, 1), (0.3, 0.5, 1)}


@pytest.mark.parametrize("name, cls", [("adamw", "AdamW"), ("lamb", "Lamb"), ("sgd", "SGD")])
def test_optimizer_comes_from_timms_factory(name, cls):
    trainer = Trainer(toy(), MSE(), ToyBatches(), TrainerConfig(epochs=1, lr=0.1, optimizer=name))
    assert type(trainer.optimizer).__name__ == cls
    assert {g["weight_decay"] for g in trainer.optimizer.param_groups} == {0.0, 0.05}


def test_every_configurable_optimizer_builds_and_steps():
    for name in typing.get_args(Optimizer):
        assert fit(TrainerConfig(epochs=1, lr=0.01, optimizer=name)).result.step == 4, name
    cfg = load_config(None, ["distill.optimizer=lamb", "distill.ema_decay=0.999", "lit.optimizer=sgd"])
    assert (cfg.distill.optimizer, cfg.distill.ema_decay, cfg.lit.optimizer) == ("lamb", 0.999, "sgd")
    with pytest.raises(ConfigError, match="distill.optimizer: input should be 'adamw', 'adam', 'lamb'"):
        load_config(None, ["distill.optimizer=adamx"])


def test_gradients_are_clipped_to_the_global_norm():
    """SGD's first step moves the weights by lr * g; clipped, that is lr * clip in norm."""
    model = toy()
    before = [p.detach().clone() for p in model.parameters()]
    rec = Record()
    cfg = TrainerConfig(epochs=1, lr=0.1, weight_decay=0.0, warmup_fraction=0.0, grad_clip=1e-3, optimizer="sgd")
    Trainer(model, MSE(), ToyBatches(n_batches=1), cfg, [rec]).fit()
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]).norm()
    assert float(moved) == pytest.approx(rec.lrs[0] * 1e-3, rel=1e-4)


def test_non_finite_loss_stops_with_the_step():
    with pytest.raises(TrainingError, match=r"^step 3 \(epoch 0\): loss is nan \(mae=nan\); lower distill\.lr"):
        fit(TrainerConfig(epochs=1, lr=0.1, name="distill"), data=ToyBatches(poison_at=2))


# --------------------------------------------------------------------------- callbacks and checkpoints


def test_callbacks_see_steps_checkpoints_and_epochs_in_order(tmp_path):
    rec = Record()
    t = fit(TrainerConfig(epochs=2, lr=0.01, checkpoint_every=3, checkpoint_dir=str(tmp_path)), [rec])
    assert rec.events == [("step", 1), ("step", 2), ("step", 3), ("checkpoint", 3), ("step", 4), ("epoch", 0),
                          ("step", 5), ("step", 6), ("checkpoint", 6), ("step", 7), ("step", 8), ("epoch", 1),
                          ("checkpoint", 8)]
    assert [h["epoch"] for h in t.result.history] == [0.0, 1.0] and t.result.step == 8
    assert {"loss", "mae", "grad_norm", "lr", "seconds"} <= set(t.result.history[0])
    latest = json.loads((tmp_path / "latest.json").read_text())
    assert latest == {"name": "step-00000008.pt", "step": 8} and sorted(p.name for p in tmp_path.glob("*.pt")) == [
        "step-00000008.pt"]
    state = torch.load(tmp_path / latest["name"], weights_only=True)
    assert state["step"] == 8 and "ema" not in state


@pytest.mark.parametrize("ema_decay", [None, 0.9])
def test_resume_matches_an_uninterrupted_run(tmp_path, ema_decay):
    cfg = dict(epochs=3, lr=0.05, warmup_fraction=0.2, ema_decay=ema_decay, checkpoint_every=5)
    straight = fit(TrainerConfig(**cfg, checkpoint_dir=str(tmp_path / "a")))
    killed = TrainerConfig(**cfg, checkpoint_dir=str(tmp_path / "b"))
    with pytest.raises(KeyboardInterrupt):
        fit(killed, [Record(stop_at=7)])  # checkpoint at step 5 (mid-epoch 1), killed at 7
    rec = Record()
    resumed = fit(killed, [rec])
    assert resumed.result.resumed_from == 5 and rec.events[0] == ("step", 6)
    assert_same(weights(straight.model), weights(resumed.model))
    for h0, h1 in zip(straight.result.history, resumed.result.history, strict=True):
        assert {k: v for k, v in h0.items() if k != "seconds"} == {k: v for k, v in h1.items() if k != "seconds"}
    with pytest.raises(TrainingError, match="checkpoint (with|without) EMA weights"):
        fit(TrainerConfig(**{**cfg, "ema_decay": None if ema_decay else 0.5}, checkpoint_dir=str(tmp_path / "b")))


# --------------------------------------------------------------------------- EMA


def test_ema_with_decay_0_is_the_raw_weights_and_0_9_differs(tmp_path):
    raw = fit(TrainerConfig(epochs=2, lr=0.05))
    zero = fit(TrainerConfig(epochs=2, lr=0.05, ema_decay=0.0))
    assert_same(weights(raw.model), weights(zero.model))
    ema = fit(TrainerConfig(epochs=2, lr=0.05, ema_decay=0.9, checkpoint_dir=str(tmp_path)))
    state = torch.load(tmp_path / "step-00000008.pt", weights_only=True)
    assert_same(weights(raw.model), state["model"])  # the EMA does not change training
    assert_same(weights(ema.model), state["ema"])  # and the model ends holding the EMA weights
    assert not torch.allclose(ema.model.fc.weight, raw.model.fc.weight)
    assert ema.result.history == [{**h, "seconds": e["seconds"]} for h, e in zip(raw.result.history,
                                                                                     ema.result.history)]
