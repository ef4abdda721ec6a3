"""Log lines at the milestones of training: one INFO line per epoch, through ``logging`` (the flows show
them under each Prefect task run; a terminal shows them beside the progress bars)."""

from __future__ import annotations

import logging
import math

from vitdistill.trainer import Callback, Trainer

log = logging.getLogger(__name__)


class EpochLog(Callback):
    """``distill: epoch 3/15 loss 0.412 (2.10 s)``: the epoch's mean losses and validation numbers, every
    epoch of a run of up to ``every_up_to`` epochs, else about ten lines a run (and always the last)."""

    def __init__(self, name: str, every_up_to: int = 20) -> None:
        self.name, self.every_up_to = name, every_up_to

    def on_epoch(self, trainer: Trainer, epoch: int, summary: dict[str, float]) -> None:
        epochs = trainer.cfg.epochs
        stride = 1 if epochs <= self.every_up_to else math.ceil(epochs / 10)
        if (epoch + 1) % stride and epoch + 1 != epochs:
            return
        shown = ", ".join(f"{k} {v:.4g}" for k, v in summary.items() if k not in ("epoch", "seconds", "lr"))
        log.info("%s: epoch %d/%d %s (%.2f s)", self.name, epoch + 1, epochs, shown, summary.get("seconds", 0.0))

    def on_checkpoint(self, trainer: Trainer, path: str) -> None:
        log.debug("%s: checkpoint at step %d: %s", self.name, trainer.step, path)
