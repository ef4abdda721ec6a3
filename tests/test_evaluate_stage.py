"""The evaluate stage on a real shapes cache: teacher probe and a student side by side."""

from __future__ import annotations

import numpy as np
import torch

from vitdistill.data.ingest import resolve_inputs
from vitdistill.data.shapes import CLASSES
from vitdistill.evaluate.stage import StudentClassifier, load_test_images, run_evaluate
from vitdistill.extract import extract


class TinyStudent(torch.nn.Module):
    """A stand-in with the student protocol (img_size, mean, std, dict output): a fixed random linear map."""

    img_size, mean, std = 16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = torch.nn.Linear(3 * 16 * 16, len(CLASSES))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.head(x.flatten(1))}


def test_evaluate_stage_on_shapes_with_teacher_and_student(make_cfg):
    cfg = make_cfg("data.source=shapes", "data.num_samples=240", "evaluate.max_images=40",
                   "evaluate.severities=[1,3]", "evaluate.cue_conflict_images=36")
    plan, _ = extract(cfg, resolve_inputs(cfg, progress=False), progress=False)
    test = load_test_images(cfg)
    assert test.group_by == "colour" and test.images.dtype == np.uint8 and test.images.shape[1:] == (64, 64, 3)
    report = run_evaluate(cfg, plan.cache_dir, TinyStudent())
    m = report.metrics
    for who in ("teacher", "student"):
        assert 0.0 <= m[f"{who}/shape_bias/shape_bias"] <= 1.0 or np.isnan(m[f"{who}/shape_bias/shape_bias"])
        assert 0.0 <= m[f"{who}/calibration/ece"] <= 1.0
        assert f"{who}/robustness/accuracy/jpeg/3" in m and f"{who}/robustness/accuracy/jpeg/2" not in m
        assert m[f"{who}/subgroup/accuracy_gap"] >= 0
    assert {r["metric"] for r in report.tables["teacher_vs_student"]} >= {"calibration/ece", "shape_bias/shape_bias"}
    assert "teacher_calibration_reliability.png" in report.figures and "shape bias" in report.headline


def test_student_classifier_resizes_and_normalises():
    logits = StudentClassifier(TinyStudent()).predict(np.zeros((3, 40, 40, 3), dtype=np.uint8))
    assert logits.shape == (3, len(CLASSES)) and np.isfinite(logits).all()
