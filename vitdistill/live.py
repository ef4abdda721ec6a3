"""Live tracking of a training run: trainer callbacks that log to an MLflow run while it trains.

    callbacks = live_callbacks(cfg.tracking, run_id)    # [] without a run id, or off rank 0
    Trainer(model, loss_fn, data, tcfg, callbacks).fit()

- :class:`LogMetrics`: each epoch's row (losses, validation metrics, ``lr``, LiT's ``temperature``)
  at step = epoch, as soon as the epoch ends, and every ``tracking.log_every_n_steps`` optimiser
  steps the step's losses, ``lr`` and ``grad_norm`` as ``step/<key>`` at step = global step. Each
  point carries the time it was measured, so the MLflow UI draws the curves as they grow. Points
  are buffered and sent in one ``log_batch`` at the end of each epoch and at most every
  ``FLUSH_SECONDS``. A resumed training logs from the checkpoint's step on; epochs and steps the
  run already has (a retried task logging to the same run) are not logged twice.
- :class:`SystemMetrics`: MLflow's system-metrics monitor (``system/*``) for the duration of ``fit()``.

Under DDP only rank 0 logs (every rank sees the same epoch rows).
"""

from __future__ import annotations

import time
from typing import Any

from vitdistill.config import TrackingConfig
from vitdistill.trainer import Callback, Trainer

FLUSH_SECONDS = 5.0  # a step point reaches the UI at most this late (one HTTP/sqlite write per flush)
STEP_PREFIX = "step/"


class LogMetrics(Callback):
    def __init__(self, tracker: Any, run_id: str, every_n_steps: int) -> None:
        self.tracker, self.run_id, self.every = tracker, run_id, every_n_steps
        self.buffer: list[tuple[str, float, int, int]] = []
        self.last_flush = time.monotonic()
        self.logged_epochs: set[int] = set()
        self.last_logged_step = 0

    def on_fit_start(self, trainer: Trainer) -> None:
        from vitdistill.tracking import history_points

        if trainer.history:  # resumed: epochs the checkpoint holds that this run does not have yet
            key = next(k for k in trainer.history[0] if k != "epoch")
            self.logged_epochs = self.tracker.logged_steps(self.run_id, key)
            now = int(time.time() * 1000)
            for row in trainer.history:
                if int(row["epoch"]) not in self.logged_epochs:
                    self.buffer += history_points(row, now)
            self.flush()
        if self.every and trainer.step:
            self.last_logged_step = max(self.tracker.logged_steps(self.run_id, f"{STEP_PREFIX}loss"), default=0)

    def on_step(self, trainer: Trainer, step: int, losses: dict[str, float]) -> None:
        if not self.every or step % self.every or step <= self.last_logged_step:
            return
        now = int(time.time() * 1000)
        self.buffer += [(f"{STEP_PREFIX}{k}", float(v), now, step) for k, v in losses.items() if v == v]
        if time.monotonic() - self.last_flush >= FLUSH_SECONDS:
            self.flush()

    def on_epoch(self, trainer: Trainer, epoch: int, summary: dict[str, float]) -> None:
        from vitdistill.tracking import history_points

        if epoch not in self.logged_epochs:
            self.buffer += history_points(summary, int(time.time() * 1000))
        self.flush()

    def on_fit_end(self, trainer: Trainer) -> None:
        self.flush()

    def flush(self) -> None:
        if self.buffer:
            self.tracker.log_points(self.run_id, self.buffer)
            self.buffer = []
        self.last_flush = time.monotonic()


class SystemMetrics(Callback):
    def __init__(self, tracker: Any, run_id: str, interval: float) -> None:
        self.tracker, self.run_id, self.interval = tracker, run_id, interval
        self.monitor: Any = None

    def on_fit_start(self, trainer: Trainer) -> None:
        self.monitor = self.tracker.system_metrics(self.run_id, self.interval)

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.monitor is not None:
            self.monitor.finish()
            self.monitor = None


def live_callbacks(cfg: TrackingConfig, run_id: str | None) -> list[Callback]:
    """What a training logging to ``run_id`` adds to its callbacks (none without a run id or off rank 0)."""
    from vitdistill.trainer import world

    if not run_id or world()[0] != 0:
        return []
    from vitdistill.tracking import get_tracker

    tracker = get_tracker(cfg)
    out: list[Callback] = [LogMetrics(tracker, run_id, cfg.log_every_n_steps)]
    if cfg.system_metrics:
        out.append(SystemMetrics(tracker, run_id, cfg.system_metrics_interval))
    return out
