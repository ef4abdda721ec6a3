"""The LiT stage as a Prefect task: train on the locked image features, log curves, figures and model."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks._common import Progress, artifact_key
from vitdistill.config import VitdistillConfig
from vitdistill.lit.stage import log_report, run_lit
from vitdistill.stages import StageResult
from vitdistill.tracking import get_tracker


@task(name="lit", cache_policy=NO_CACHE)
def lit(config: VitdistillConfig, run_id: str, cache_dir: str) -> dict:
    """Text tower + heads trained contrastively against cached image embeddings; zero-shot + retrieval."""
    progress = Progress("lit-progress", config.lit.epochs, "LiT epochs")

    def on_epoch(row: dict) -> None:
        progress.advance(note=f"loss {row.get('train_loss', float('nan')):.4g}")

    report = run_lit(cache_dir, config.lit, run_id=run_id, tracking=config.tracking, on_epoch=on_epoch)
    paths = log_report(get_tracker(config.tracking), run_id, report, cache_dir)
    create_table_artifact(table=[{"metric": k, "value": round(v, 4)} for k, v in report.metrics.items()],
                          key=artifact_key("lit", "metrics"), description="LiT zero-shot and retrieval")
    return StageResult("lit", "ok", report.headline, report.metrics, paths, run_id).to_dict()


def run_stage(config: VitdistillConfig, run_id: str, upstream: dict[str, dict]) -> StageResult:
    return StageResult(**lit(config, run_id, upstream["extract"]["paths"]["cache_dir"]))
