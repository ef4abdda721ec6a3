"""The one training loop (minGPT style): it knows a model, a loss and batches, nothing else.
Distillation and LiT both train through it.

    trainer = Trainer(model, loss_fn, data, TrainerConfig(epochs=8, lr=2e-3, checkpoint_dir="ckpt/"),
                      callbacks=[PrintLosses()])
    result = trainer.fit()      # TrainResult: history (one dict per epoch), step, last losses

- ``data`` has ``len(data)`` batches per epoch and ``data.batches(epoch, start)``, dicts of tensors.
  The model gets ``batch["input"]`` and ``loss_fn(outputs, batch)`` returns a dict with ``"loss"``;
  without a ``loss_fn`` the model computes its own losses, ``model(batch) -> dict`` (LiT).
- The optimiser is timm's ``create_optimizer_v2`` (``optimizer="adamw"``; ``lamb``, ``sgd``, ...) over
  parameter groups: ``(module, peak lr)`` pairs from the caller (default: the model at ``lr``), each
  split by timm's rule: weight matrices decay; biases, norms, other 1-d parameters and what the
  module's ``no_weight_decay()`` names (tokens, position embeddings) do not.
- The schedule is timm's ``CosineLRScheduler`` updated per step: update ``u`` (1-based) runs at
  ``u / warmup`` of each group's peak during the warm-up, then cosine down to 0 at the last step.
- Global-norm gradient clipping, bf16 autocast on GPU, and optionally an EMA of the weights
  (timm's ``ModelEmaV3``, ``ema_decay``) updated after every step; when enabled the model ends
  ``fit()`` holding the EMA weights.
- A non-finite loss stops the run with a one-line :class:`TrainingError` naming the step.
- Epochs are numbered from 0 (history, callbacks and errors alike).
- Checkpoints every N steps hold the model, the EMA, optimizer, scheduler, RNG states and the data
  position (epoch, batch); saved with ``torch.save`` as tensors and plain types and loaded with
  ``torch.load(weights_only=True)``. ``resume=True`` continues from the latest one, and since a batch
  is a function of (epoch, position), the resumed run matches an uninterrupted one bit for bit.
- Under ``torchrun`` (``torch.distributed`` initialised), the model is wrapped in DDP, each rank
  reads its own shard of every epoch, rank 0 writes checkpoints, and epoch summaries are averaged
  over ranks, so every rank returns the same history.
- Callbacks (:class:`Callback`) see the start and end of ``fit()`` and every step, epoch and checkpoint:
  logging (:mod:`vitdistill.live`) and evaluation hook in there.
"""

from __future__ import annotations

import io
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import torch
import torch.distributed as dist
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn

from vitdistill.cache import fs
from vitdistill.callbacks import Callback  # re-exported: the hooks of a training run
from vitdistill.errors import TrainingError  # re-exported: the trainer raises it
from vitdistill.progress import progress_bar

Batch = dict[str, torch.Tensor]


class BatchSource(Protocol):
    def __len__(self) -> int: ...

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]: ...


@dataclass
class TrainerConfig:
    epochs: int
    lr: float  # peak learning rate (of the whole model, unless the caller passes its own parts)
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    grad_clip: float | None = 1.0
    optimizer: str = "adamw"  # any name of timm.optim.list_optimizers()
    ema_decay: float | None = None  # EMA of the model's weights after each step; None: no EMA
    name: str = "train"  # the config section: progress bar label and the error's hint
    precision: str = "fp32"  # "bf16": autocast on CUDA; CPU always trains in fp32
    device: str = "cpu"
    checkpoint_every: int = 0  # steps; 0: only a final checkpoint (if checkpoint_dir)
    checkpoint_dir: str | None = None
    resume: bool = True
    progress: bool = False


@dataclass
class TrainResult:
    history: list[dict[str, float]]  # one summary per epoch
    step: int
    last_losses: dict[str, float] = field(default_factory=dict)
    resumed_from: int | None = None  # step of the checkpoint the run continued from
    seconds: float = 0.0


def param_groups(parts: Sequence[tuple[nn.Module, float]], weight_decay: float) -> list[dict[str, Any]]:
    """Optimiser groups of ``(module, peak lr)`` pairs: timm's rule per module (weight matrices decay;
    biases, norms, 1-d parameters and the module's ``no_weight_decay()`` names do not)."""
    groups = []
    for module, lr in parts:
        skip = getattr(module, "no_weight_decay", lambda: ())()
        for group in param_groups_weight_decay(module, weight_decay, no_weight_decay_list=skip):
            groups.append({**group, "lr": lr})
    return groups


def create_optimizer(parts: Sequence[tuple[nn.Module, float]], cfg: TrainerConfig) -> torch.optim.Optimizer:
    """timm's ``cfg.optimizer`` over :func:`param_groups` of ``(module, peak lr)`` pairs."""
    return create_optimizer_v2(param_groups(parts, cfg.weight_decay), opt=cfg.optimizer, lr=cfg.lr,
                               weight_decay=cfg.weight_decay)


def warmup_cosine(optimizer: torch.optim.Optimizer, total: int, warmup: int) -> CosineLRScheduler:
    """Per-step schedule: ``step_update(u)`` sets the lr of update ``u`` (1-based), ``u / warmup`` of each
    group's peak while ``u < warmup``, then cosine from the peak at ``u = warmup`` to 0 at ``u = total``.
    Stateless given ``u``, so a resumed run sets exactly the lr an uninterrupted one had."""
    sched = CosineLRScheduler(optimizer, t_initial=max(1, total - warmup), warmup_t=warmup, warmup_prefix=True,
                              t_in_epochs=False)
    sched.step_update(1)
    return sched


# --------------------------------------------------------------------------- RNG state as plain data


def rng_state() -> dict[str, Any]:
    """Every RNG a step may draw from, as tensors and plain types (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- distributed


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def mean_over_ranks(sums: dict[str, float], count: int) -> dict[str, float]:
    """Per-key means of values summed on each rank over ``count`` steps, averaged over all ranks."""
    keys = sorted(sums)
    if world()[1] == 1:
        return {k: sums[k] / max(1, count) for k in keys}
    t = torch.tensor([sums[k] for k in keys] + [float(count)], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(t[i] / max(1.0, float(t[-1]))) for i, k in enumerate(keys)}


# --------------------------------------------------------------------------- the loop


class Trainer:
    def __init__(self, model: nn.Module, loss_fn: nn.Module | None, data: BatchSource, cfg: TrainerConfig,
                 callbacks: Sequence[Callback] = (), parts: Sequence[tuple[nn.Module, float]] | None = None) -> None:
        """``parts``: the ``(module, peak lr)`` pairs to optimise, all inside ``model``; default the model
        at ``cfg.lr``."""
        self.model, self.loss_fn, self.data, self.cfg = model, loss_fn, data, cfg
        self.callbacks = list(callbacks)
        self.device = torch.device(cfg.device)
        self.rank, self.world_size = world()
        self.total_steps = cfg.epochs * len(data)
        self.model.to(self.device)
        self.optimizer = create_optimizer(parts or [(model, cfg.lr)], cfg)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.scheduler = warmup_cosine(self.optimizer, self.total_steps, int(cfg.warmup_fraction * self.total_steps))
        self.ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay is not None else None
        self.step, self.epoch, self.position = 0, 0, 0
        self.sums: dict[str, float] = {}
        self.count = 0
        self.history: list[dict[str, float]] = []
        self.epoch_seconds = 0.0
        self._saved_step: int | None = None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            **({"ema": self.ema.module.state_dict()} if self.ema else {}),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "step": self.step, "epoch": self.epoch, "position": self.position,
            "sums": dict(self.sums), "count": self.count, "history": list(self.history),
            "epoch_seconds": self.epoch_seconds,
            "total_steps": self.total_steps, "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any], where: str) -> None:
        if (state["total_steps"], state["world_size"]) != (self.total_steps, self.world_size):
            raise TrainingError(f"{where}: checkpoint of a run with {state['total_steps']} steps on "
                                f"{state['world_size']} process(es), not {self.total_steps} on {self.world_size}")
        if (self.ema is None) != ("ema" not in state):
            raise TrainingError(f"{where}: checkpoint {'without' if self.ema else 'with'} EMA weights, "
                                f"this run has ema_decay={self.cfg.ema_decay}")
        self.model.load_state_dict(state["model"])
        if self.ema:
            self.ema.module.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.sums, self.count, self.history = dict(state["sums"]), state["count"], list(state["history"])
        self.epoch_seconds = state["epoch_seconds"]

    def save_checkpoint(self) -> str | None:
        """Rank 0 publishes ``step-NNNNNNNN.pt`` then ``latest.json`` and drops older checkpoints."""
        ckpt_dir = self.cfg.checkpoint_dir
        if ckpt_dir is None or self._saved_step == self.step:
            return None
        name = f"step-{self.step:08d}.pt"
        url = fs.join(ckpt_dir, name)
        if self.rank == 0:
            fs.makedirs(ckpt_dir)
            previous = latest_checkpoint(ckpt_dir)
            buf = io.BytesIO()  # torch.save to a file says RuntimeError on a full disk; this write says ENOSPC
            torch.save(self.state_dict(), buf)
            fs.write_bytes_atomic(url, buf.getbuffer())
            fs.write_json_atomic(fs.join(ckpt_dir, "latest.json"), {"name": name, "step": self.step})
            if previous and previous != url:
                fsys, path = fs.get_fs(previous)
                fsys.rm(path)
            for cb in self.callbacks:
                cb.on_checkpoint(self, url)
        self._saved_step = self.step
        barrier()
        return url

    def maybe_resume(self) -> int | None:
        if not (self.cfg.resume and self.cfg.checkpoint_dir):
            return None
        url = latest_checkpoint(self.cfg.checkpoint_dir)
        if url is None:
            return None
        with fs.open_read(url) as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
        self.load_state_dict(state, url)
        self._saved_step = self.step
        return self.step

    # ------------------------------------------------------------------ training
    def fit(self) -> TrainResult:
        """Train to ``cfg.epochs``, resuming from the run directory's checkpoint when there is one.

        One training at a time per checkpoint directory: rank 0 holds ``run.lock`` there for all ranks,
        so a second run of the same configuration waits, then resumes from (or reuses) the first one's
        checkpoints instead of deleting the checkpoint the first is loading."""
        if self.cfg.checkpoint_dir is None:
            return self._fit()
        with fs.exclusive(fs.join(self.cfg.checkpoint_dir, "run.lock")) if self.rank == 0 else nullcontext():
            barrier()
            return self._fit()

    def _fit(self) -> TrainResult:
        t0 = time.perf_counter()
        resumed = self.maybe_resume()
        started: list[Callback] = []
        try:
            for cb in self.callbacks:
                cb.on_fit_start(self)
                started.append(cb)
            return self._loop(t0, resumed)
        finally:
            for cb in started:
                cb.on_fit_end(self)

    def _loop(self, t0: float, resumed: int | None) -> TrainResult:
        net: nn.Module = self.model
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        autocast = self.device.type == "cuda" and self.cfg.precision == "bf16"
        last: dict[str, float] = {}
        bar = progress_bar(self.cfg.progress and not self.rank, total=self.total_steps, initial=self.step, unit="step",
                           leave=False, desc=self.cfg.name)
        while self.epoch < self.cfg.epochs:
            self.model.train()  # again each epoch: an evaluating callback may have switched it off
            t_epoch = time.perf_counter()
            for batch in self.data.batches(self.epoch, start=self.position):
                if len(batch["input"]) == 0:  # every image of the batch was skipped (data.on_error=skip)
                    self.position += 1
                    continue
                batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
                    losses = net(batch) if self.loss_fn is None else self.loss_fn(net(batch["input"]), batch)
                last = {k: float(v.detach()) for k, v in losses.items()}
                if not math.isfinite(last["loss"]):
                    terms = ", ".join(f"{k}={v:.4g}" for k, v in last.items() if k != "loss")
                    raise TrainingError(f"step {self.step + 1} (epoch {self.epoch}): loss is {last['loss']} ({terms}); "
                                        f"lower {self.cfg.name}.lr or check the inputs")
                self.optimizer.zero_grad(set_to_none=True)
                losses["loss"].backward()
                if self.cfg.grad_clip:
                    last["grad_norm"] = float(nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip))
                last["lr"] = self.optimizer.param_groups[0]["lr"]
                self.optimizer.step()
                self.step += 1
                self.scheduler.step_update(self.step + 1)
                if self.ema:
                    self.ema.update(self.model)
                self.position += 1
                self.count += 1
                for k, v in last.items():
                    if k != "lr":
                        self.sums[k] = self.sums.get(k, 0.0) + v
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.3f}")
                for cb in self.callbacks:
                    cb.on_step(self, self.step, last)
                if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                    self.epoch_seconds += time.perf_counter() - t_epoch
                    t_epoch = time.perf_counter()
                    self.save_checkpoint()
            self.epoch_seconds += time.perf_counter() - t_epoch
            summary = {"epoch": float(self.epoch), **mean_over_ranks(self.sums, self.count),
                       "lr": self.optimizer.param_groups[0]["lr"], "seconds": self.epoch_seconds}
            self.history.append(summary)
            for cb in self.callbacks:
                cb.on_epoch(self, self.epoch, summary)
            self.epoch, self.position, self.sums, self.count, self.epoch_seconds = self.epoch + 1, 0, {}, 0, 0.0
        bar.close()
        self.save_checkpoint()  # no-op when this step is already saved
        if self.ema:
            self.model.load_state_dict(self.ema.module.state_dict())
        self.model.eval()
        return TrainResult(self.history, self.step, last, resumed, time.perf_counter() - t0)


def latest_checkpoint(ckpt_dir: str) -> str | None:
    """The checkpoint ``latest.json`` points at, if both exist; a name leading outside ``ckpt_dir`` is a
    CacheError (the caller would load or delete that file)."""
    latest = fs.join(ckpt_dir, "latest.json")
    try:
        name = fs.read_json(latest)["name"]
    except (FileNotFoundError, KeyError, TypeError):
        return None
    url = fs.join_inside(ckpt_dir, name, where=latest)
    return url if fs.exists(url) else None
