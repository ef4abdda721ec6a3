"""A generic training loop (minGPT style): it knows a model, a loss module and batches, nothing else.

    trainer = Trainer(model, loss_fn, data, TrainerConfig(epochs=8, lr=2e-3, checkpoint_dir="ckpt/"),
                      callbacks=[PrintLosses()])
    result = trainer.fit()      # TrainResult: history (one dict per epoch), step, last losses

- ``data`` has ``len(data)`` batches per epoch and ``data.batches(epoch, start)``, dicts of tensors
  whose ``"input"`` goes to the model; ``loss_fn(outputs, batch)`` returns a dict with ``"loss"``.
- AdamW (no decay on norms, biases, tokens and position embeddings), linear warm-up then cosine,
  global-norm gradient clipping, bf16 autocast on GPU.
- A non-finite loss stops the run with a :class:`DistillError` naming the step.
- Checkpoints every N steps hold the model, optimizer, scheduler, RNG states and the data position
  (epoch, batch); saved with ``torch.save`` as tensors and plain types and loaded with
  ``torch.load(weights_only=True)``. ``resume=True`` continues from the latest one, and since a batch
  is a function of (epoch, position), the resumed run matches an uninterrupted one.
- Under ``torchrun`` (``torch.distributed`` initialised), the model is wrapped in DDP, each rank
  reads its own shard of every epoch, rank 0 writes checkpoints, and epoch summaries are averaged
  over ranks, so every rank returns the same history.
- Callbacks (:class:`Callback`) see every step, epoch and checkpoint: logging hooks in there.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from vitdistill.cache import fs
from vitdistill.distill.errors import DistillError
from vitdistill.progress import progress_bar

Batch = dict[str, torch.Tensor]


class BatchSource(Protocol):
    def __len__(self) -> int: ...

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]: ...


class Callback:
    """Hooks of a training run; override the ones you need (each default does nothing)."""

    def on_step(self, trainer: Trainer, step: int, losses: dict[str, float]) -> None:
        """After optimiser step ``step`` (1-based): this rank's losses, ``lr`` and ``grad_norm``."""

    def on_epoch(self, trainer: Trainer, epoch: int, summary: dict[str, float]) -> None:
        """After epoch ``epoch`` (0-based): mean losses over all ranks, ``lr``, ``seconds``."""

    def on_checkpoint(self, trainer: Trainer, path: str) -> None:
        """After a checkpoint was published at ``path`` (rank 0 only)."""


@dataclass
class TrainerConfig:
    epochs: int
    lr: float
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    grad_clip: float | None = 1.0
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


class WarmupCosine:
    """LR multiplier at step s: linear warm-up over ``warmup`` steps, then cosine to 0 at ``total``.

    A plain object (ints only), so ``LambdaLR.state_dict()`` stores it as data.
    """

    def __init__(self, total: int, warmup: int) -> None:
        self.total, self.warmup = total, warmup

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay weight matrices only: not biases, norms (ndim < 2) or what ``no_weight_decay()`` names."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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
    def __init__(self, model: nn.Module, loss_fn: nn.Module, data: BatchSource, cfg: TrainerConfig,
                 callbacks: Sequence[Callback] = ()) -> None:
        self.model, self.loss_fn, self.data, self.cfg = model, loss_fn, data, cfg
        self.callbacks = list(callbacks)
        self.device = torch.device(cfg.device)
        self.rank, self.world_size = world()
        self.total_steps = cfg.epochs * len(data)
        self.model.to(self.device)
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
        warmup = int(cfg.warmup_fraction * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, WarmupCosine(self.total_steps, warmup))
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
            raise DistillError(f"{where}: checkpoint of a run with {state['total_steps']} steps on "
                               f"{state['world_size']} process(es), not {self.total_steps} on {self.world_size}")
        self.model.load_state_dict(state["model"])
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
            with fs.staged(url) as tmp:
                torch.save(self.state_dict(), tmp)
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
        t0 = time.perf_counter()
        resumed = self.maybe_resume()
        net: nn.Module = self.model
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        autocast = self.device.type == "cuda" and self.cfg.precision == "bf16"
        last: dict[str, float] = {}
        bar = progress_bar(self.cfg.progress and not self.rank, total=self.total_steps, initial=self.step, unit="step",
                           leave=False, desc="distill")
        self.model.train()
        while self.epoch < self.cfg.epochs:
            t_epoch = time.perf_counter()
            for batch in self.data.batches(self.epoch, start=self.position):
                batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
                    losses = self.loss_fn(net(batch["input"]), batch)
                last = {k: float(v.detach()) for k, v in losses.items()}
                if not math.isfinite(last["loss"]):
                    terms = ", ".join(f"{k}={v:.4g}" for k, v in last.items() if k != "loss")
                    raise DistillError(f"step {self.step + 1} (epoch {self.epoch}): loss is {last['loss']} ({terms}); "
                                       "lower distill.lr or check the inputs and the teacher's outputs")
                self.optimizer.zero_grad(set_to_none=True)
                losses["loss"].backward()
                if self.cfg.grad_clip:
                    last["grad_norm"] = float(nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))
                last["lr"] = self.optimizer.param_groups[0]["lr"]
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
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
