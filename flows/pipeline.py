"""The vitdistill flows: the whole pipeline, and each stage alone.

Run the whole pipeline on the embedded defaults (ephemeral Prefect, sqlite MLflow, digits):

    vitdistill run                       # or: python -m flows.pipeline
    vitdistill run -c configs/shapes.yaml --set teacher.batch_size=16

Each stage alone (it builds what it depends on, reusing caches):

    vitdistill extract | probe | lit | distill | evaluate  [-c FILE] [--set key=value]

The HTML report of a finished run (the pipeline writes one itself when it evaluates):

    vitdistill report [RUN_ID]
"""

from __future__ import annotations

from prefect import flow

from flows._stages import run_stages
from vitdistill.config import VitdistillConfig


@flow(name="vitdistill-pipeline", log_prints=True)
def pipeline_flow(config: VitdistillConfig = VitdistillConfig()) -> dict:
    """extract -> probe -> lit -> distill -> evaluate, one MLflow parent run with a child per stage."""
    return run_stages(config, "pipeline")


@flow(name="vitdistill-extract", log_prints=True)
def extract_flow(config: VitdistillConfig = VitdistillConfig()) -> dict:
    """Teacher features into a content-addressed, resumable webdataset cache."""
    return run_stages(config, "extract")


@flow(name="vitdistill-probe", log_prints=True)
def probe_flow(config: VitdistillConfig = VitdistillConfig()) -> dict:
    """Linear, few-shot and kNN probes on the cached features (extracting first if needed)."""
    return run_stages(config, "probe")


@flow(name="vitdistill-lit", log_prints=True)
def lit_flow(config: VitdistillConfig = VitdistillConfig()) -> dict:
    """LiT: a text tower aligned to the locked image features."""
    return run_stages(config, "lit")


@flow(name="vitdistill-distill", log_prints=True)
def distill_flow(config: VitdistillConfig = VitdistillConfig()) -> dict:
    """Distil the teacher into a small student."""
    return run_stages(config, "distill")


@flow(name="vitdistill-evaluate", log_prints=True)
def evaluate_flow(config: VitdistillConfig = VitdistillConfig()) -> dict:
    """Shape bias, robustness, calibration and subgroup evaluations."""
    return run_stages(config, "evaluate")


@flow(name="vitdistill-report", log_prints=True)
def report_flow(config: VitdistillConfig = VitdistillConfig(), run_id: str | None = None) -> dict:
    """One HTML report of a finished run (None: the latest that evaluated): teacher vs student, every stage."""
    from tasks.report import report

    return report(config, run_id)


FLOWS = {
    "pipeline": pipeline_flow,
    "extract": extract_flow,
    "probe": probe_flow,
    "lit": lit_flow,
    "distill": distill_flow,
    "evaluate": evaluate_flow,
}

if __name__ == "__main__":
    pipeline_flow()
