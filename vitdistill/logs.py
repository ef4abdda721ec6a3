"""Log lines at the milestones of training: one INFO line per epoch, through ``logging`` (the flows show
them under each Prefect task run; a terminal shows them beside the progress bars)."""

from __future__ import annotations

import logging

from vitdistill.trainer import Callback, Trainer

log = logging.getLogger(__name__)


class EpochLog(Callback):
    """``distill: epoch 3/15 loss 0.412 (2.1 s)``: the epoch's mean losses and validation numbers."""

    def __init__(self, name: str) -> None:
        self.name = name

    def on_epoch(self, trainer: Trainer, epoch: int, summary: dict[str, float]) -> None:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in summary.items() if k not in ("epoch", "seconds", "lr"))
        log.info("%s: epoch %d/%d %s (%.1f s)", self.name, epoch + 1, trainer.cfg.epochs, shown,
                 summary.get("seconds", 0.0))

    def on_checkpoint(self, trainer: Trainer, path: str) -> None:
        log.debug("%s: checkpoint at step %d: %s", self.name, trainer.step, path)
