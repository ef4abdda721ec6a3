"""The evaluate stage on a real shapes cache: teacher probe and a student side by side."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitdistill.data.ingest import resolve_inputs
from vitdistill.data.shapes import CLASSES
from vitdistill.evaluate import INPUTS
from vitdistill.evaluate import stage
from vitdistill.evaluate.stage import StageInputs, StudentClassifier, load_test_images, run_evaluate
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
        # shape bias = shape hits / (shape + texture hits), the hits recovered from the logged match rates
        sb = {k: m[f"{who}/shape_bias/{k}"] for k in ("shape_bias", "shape_match", "texture_match", "n_used",
                                                       "n_conflict")}
        shape_hits, texture_hits = sb["shape_match"] * sb["n_conflict"], sb["texture_match"] * sb["n_conflict"]
        assert sb["n_conflict"] == 30 and sb["n_used"] > 0  # 36 images, 6 congruent
        assert shape_hits + texture_hits == pytest.approx(sb["n_used"])
        assert sb["shape_bias"] == pytest.approx(shape_hits / sb["n_used"])
        # ECE = sum over bins of (share of images) * |accuracy - confidence|, from the logged reliability bins
        bins = [b for b in report.tables[f"{who}_calibration_reliability"] if b["count"]]
        n = sum(b["count"] for b in bins)
        assert n == min(40, len(test.labels))  # evaluate.max_images caps the test split
        ece = sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in bins)
        assert m[f"{who}/calibration/ece"] == pytest.approx(ece, abs=1e-6)
        assert f"{who}/robustness/accuracy/jpeg/3" in m and f"{who}/robustness/accuracy/jpeg/2" not in m
        # the gap is max - min over the per-colour accuracies, the worst group the min
        groups = [v for k, v in m.items() if k.startswith(f"{who}/subgroup/accuracy/")]
        assert len(groups) > 1
        assert m[f"{who}/subgroup/accuracy_gap"] == pytest.approx(max(groups) - min(groups))
        assert m[f"{who}/subgroup/worst_group_accuracy"] == pytest.approx(min(groups))
    assert {r["metric"] for r in report.tables["teacher_vs_student"]} >= {"calibration/ece", "shape_bias/shape_bias"}
    assert "teacher_calibration_reliability.png" in report.figures and "shape bias" in report.headline


def test_student_classifier_resizes_and_normalises():
    logits = StudentClassifier(TinyStudent()).predict(np.zeros((3, 40, 40, 3), dtype=np.uint8))
    assert logits.shape == (3, len(CLASSES)) and np.isfinite(logits).all()


def test_stage_inputs_provide_every_declared_input_and_skip_what_the_run_lacks(make_cfg):
    data = stage.TestImages(np.zeros((2, 8, 8, 3), np.uint8), np.array([0, 1]), np.array(["a", "b"]), "class")
    shapes = StageInputs(make_cfg("data.source=shapes", "evaluate.cue_conflict_images=36"), data, {"teacher": "T"})
    assert set(shapes.providers) == set(INPUTS)
    args = shapes.arguments(("cue_conflict", "teacher"))
    assert set(args) == {"images", "labels", "texture_labels", "teacher"} and args["teacher"] == "T"
    assert args["images"].shape == (36, 64, 64, 3) and len(args["labels"]) == len(args["texture_labels"]) == 36
    other = StageInputs(make_cfg("data.source=digits"), data, {"teacher": "T"})
    assert other.arguments(("test_images", "cue_conflict")) is None  # no cue-conflict set off the shapes data
    args = other.arguments(("test_images", "labels", "groups"))
    assert args["images"] is data.images and args["labels"] is data.labels and args["groups"] is data.groups
    with pytest.raises(TypeError, match="'nope' has no provider; valid inputs: test_images, labels"):
        other.arguments(("nope",))
