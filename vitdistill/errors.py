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


class DiskFullError(CacheError):
    """The disk filled up (``ENOSPC``) while writing ``path``: nothing half-written is kept, and a re-run
    after freeing space resumes. ``under(root)`` names the ``cache.root`` the file belongs to."""

    def __init__(self, path: str, root: str | None = None) -> None:
        self.path, self.root = path, root
        where = f" under cache.root={root}" if root else ""
        super().__init__(f"no space left on device writing {path}{where}; free space there (or point cache.root "
                         "at a larger disk) and re-run: what finished is kept")

    def __reduce__(self):  # pickled by Prefect and Dask with both arguments
        return type(self), (self.path, self.root)

    def under(self, root: str) -> DiskFullError:
        return self if self.root else DiskFullError(self.path, root)


class StorageError(CacheError):
    """An object store failed a request for ``url``. ``transient`` (5xx, throttling, a lost connection)
    is worth retrying; anything else (no such bucket, access denied) fails at once."""

    def __init__(self, message: str, transient: bool) -> None:
        self.transient = transient
        super().__init__(message)

    def __reduce__(self):
        return type(self), (str(self), self.transient)


def one_line(e: BaseException) -> str | None:
    """The one line a person reads for a failure they can act on (bad input, a missing file, missing S3
    credentials); None for anything else, which the caller names by its type."""
    if isinstance(e, VitdistillError):
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    if type(e).__name__ == "ValidationError" and hasattr(e, "errors"):  # pydantic, without importing it here
        first = e.errors()[0]
        return f"invalid value: {first['loc']}: {first['msg']}"
    if isinstance(e, FileNotFoundError):
        return f"{e.filename or e}: file not found"
    if type(e).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        return ("no S3 credentials found for the s3:// paths: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE), and AWS_ENDPOINT_URL for a non-AWS server")
    return None
