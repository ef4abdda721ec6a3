"""The hooks of a training run (:class:`vitdistill.trainer.Trainer` calls them), in a module of their own
that imports neither torch nor timm: the Prefect tasks subclass it for their progress artifacts, and a
no-op command that trains nothing then never imports torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vitdistill.trainer import Trainer


class Callback:
    """Hooks of a training run; override the ones you need (each default does nothing)."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first step, after a resume (``trainer.step``, ``trainer.history`` hold the checkpoint's)."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """When ``fit()`` ends, normally or by an error (flush what is buffered, stop monitors)."""

    def on_step(self, trainer: Trainer, step: int, losses: dict[str, float]) -> None:
        """After optimiser step ``step`` (1-based): this rank's losses, ``lr`` and ``grad_norm``."""

    def on_epoch(self, trainer: Trainer, epoch: int, summary: dict[str, float]) -> None:
        """After epoch ``epoch`` (0-based): mean losses over all ranks, ``lr``, ``seconds``. A callback may
        add entries (validation metrics); later callbacks and the history see them."""

    def on_checkpoint(self, trainer: Trainer, path: str) -> None:
        """After a checkpoint was published at ``path`` (rank 0 only)."""
