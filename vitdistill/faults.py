"""What a stage's failure means when the ground gave way under it: a full disk, or a tracking server
that went away mid-run. The flows turn such failures into one line naming the stage and the place
(:func:`explain_stage_failure`), and skip closing MLflow runs on a server that is gone."""

from __future__ import annotations

from vitdistill.config import VitdistillConfig
from vitdistill.errors import DiskFullError, VitdistillError


class TrackingServerLost(VitdistillError):
    """The MLflow tracking server stopped answering during a stage; what was computed is kept."""


def explain_stage_failure(cfg: VitdistillConfig, stage: str, exc: BaseException) -> VitdistillError | None:
    """``exc`` ended ``stage``: a DiskFullError naming ``cache.root``, a TrackingServerLost when the
    ``http(s)://`` tracking server no longer answers its health check, else None (the error stands)."""
    if isinstance(exc, TrackingServerLost):
        return exc
    if isinstance(exc, DiskFullError):
        return exc.under(cfg.cache.root)
    if isinstance(exc, VitdistillError) or not isinstance(exc, Exception):
        return None
    uri = cfg.tracking.resolved_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    from vitdistill.redact import redact_uri
    from vitdistill.tracking import http_probe

    reason = http_probe(f"{uri.rstrip('/')}/health", timeout=5)
    if reason is None:
        return None
    return TrackingServerLost(
        f"lost the MLflow tracking server at {redact_uri(uri)} during {stage} ({reason}); checkpoints and caches "
        "written so far are kept: start the server again and re-run the same command to resume")
