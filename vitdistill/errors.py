"""Errors a user can act on.

Every exception the library raises for bad input derives from :class:`VitdistillError`.
Its message is one line that names the file, key or field and what was expected, so the
CLI can print it as is, without a traceback.
"""

from __future__ import annotations


class VitdistillError(Exception):
    """Bad input or state that the user can fix; the message is one actionable line."""


class ConfigError(VitdistillError):
    """A config file, key or value is wrong."""


class DataError(VitdistillError):
    """An input sample, shard or dataset is unusable."""


class CacheError(VitdistillError):
    """A feature cache is missing, stale, corrupt or inconsistent with its manifest."""


class TrainingError(VitdistillError):
    """Training cannot go on: a non-finite loss (naming the step and what to lower), or a checkpoint that
    does not fit the run (raised by :class:`vitdistill.trainer.Trainer`, for LiT and distillation alike)."""


class RegistryError(VitdistillError, KeyError):
    """A plug-in name is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
