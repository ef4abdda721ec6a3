"""The distill stage as a Prefect task: in-process, or under torchrun when ``distill.nproc > 1``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks._common import EpochProgress, Progress, artifact_key
from vitdistill.config import VitdistillConfig, to_yaml
from vitdistill.distill.stage import log_report, run_distill
from vitdistill.errors import VitdistillError
from vitdistill.logs import EpochLog
from vitdistill.redact import redact_uri
from vitdistill.stages import StageResult
from vitdistill.tracking import get_tracker


def _torchrun(config: VitdistillConfig, run_id: str) -> dict:
    """``torchrun --standalone --nproc_per_node=N -m vitdistill.distill.stage``; rank 0 logs to ``run_id``."""
    pinned = config.model_copy(deep=True)
    pinned.tracking.uri = config.tracking.resolved_uri()  # every rank logs where this flow logs
    with tempfile.TemporaryDirectory() as d:
        cfg_path, result_path = os.path.join(d, "config.yaml"), os.path.join(d, "result.json")
        with open(cfg_path, "w") as f:
            f.write(to_yaml(pinned))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={config.distill.nproc}",
               "-m", "vitdistill.distill.stage", "-c", cfg_path, "--run-id", run_id, "--result", result_path]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = redact_uri((proc.stderr.strip().splitlines() or ["no output"])[-1])
            raise VitdistillError(f"distillation under torchrun ({config.distill.nproc} processes) failed: {last}")
        with open(result_path) as f:
            return json.load(f)


@task(name="distill", cache_policy=NO_CACHE)
def distill(config: VitdistillConfig, run_id: str) -> dict:
    """Teacher -> student (online or from cached teacher views), evaluated, logged and registered."""
    if config.distill.nproc > 1:
        summary = _torchrun(config, run_id)
        metrics, headline, paths = summary["metrics"], summary["headline"], summary["paths"]
    else:
        progress = Progress("distill-progress", config.distill.epochs, "distillation epochs")
        report = run_distill(config, run_id=run_id, callbacks=[EpochLog("distill"), EpochProgress(progress)])
        metrics, headline = report.metrics, report.headline
        paths = log_report(get_tracker(config.tracking), run_id, report, config)
    create_table_artifact(table=[{"metric": k, "value": round(v, 4)} for k, v in metrics.items()],
                          key=artifact_key("distill", "metrics"), description=headline)
    return StageResult("distill", "ok", headline, metrics, {k: v for k, v in paths.items() if v}, run_id).to_dict()


def run_stage(config: VitdistillConfig, run_id: str, upstream: dict[str, dict]) -> StageResult:
    return StageResult(**distill(config, run_id))
