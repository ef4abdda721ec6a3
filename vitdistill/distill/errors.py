"""The distillation stage's one error type (a one-line, actionable message like every VitdistillError)."""

from __future__ import annotations

from vitdistill.errors import VitdistillError


class DistillError(VitdistillError):
    """Training cannot go on: a non-finite loss (naming the step), or a checkpoint that does not fit."""
