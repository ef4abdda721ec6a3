"""Evaluators: registry, calibration and subgroup golden values, shape bias, corruptions and robustness."""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.figure import Figure

from vitdistill.config import VitdistillConfig
from vitdistill.errors import ConfigError, DataError, RegistryError
from vitdistill.evaluate import (
    INPUTS,
    MODELS,
    Classifier,
    Evaluator,
    Metric,
    RobustnessEvaluator,
    corrupt,
    create_evaluator,
    cue_conflict_arrays,
    describe_metric,
    evaluator_class,
    expected_calibration_error,
    list_corruptions,
    list_evaluators,
    max_calibration_error,
    negative_log_likelihood,
    subgroup_accuracy,
)

SIDE = 16  # tiny images keep every test fast


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.eye(num_classes)[labels] * 10.0  # (N, C) confident logits


class LookupClassifier:
    """Predicts the label stored for each exact image; unseen images get class 0."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
        self.table = {img.tobytes(): int(y) for img, y in zip(images, labels)}
        self.num_classes = num_classes

    def predict(self, images: np.ndarray) -> np.ndarray:
        return one_hot(np.array([self.table.get(img.tobytes(), 0) for img in images]), self.num_classes)


class OracleClassifier:
    """Ignores pixels: returns the true labels in call order, wrapping around after each pass."""

    def __init__(self, labels: np.ndarray, num_classes: int) -> None:
        self.labels, self.num_classes, self.cursor = labels, num_classes, 0

    def predict(self, images: np.ndarray) -> np.ndarray:
        idx = (self.cursor + np.arange(len(images))) % len(self.labels)
        self.cursor = (self.cursor + len(images)) % len(self.labels)
        return one_hot(self.labels[idx], self.num_classes)


class NearestMeanClassifier:
    """Negative squared distance to each class-mean image: sensitive to every pixel."""

    def __init__(self, means: np.ndarray) -> None:
        self.means = means.reshape(len(means), -1).astype(np.float64)  # (C, D)

    def predict(self, images: np.ndarray) -> np.ndarray:
        x = images.reshape(len(images), -1).astype(np.float64)  # (N, D)
        return -((x[:, None, :] - self.means[None]) ** 2).sum(-1)  # (N, C)


def half_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Four classes: the left/right/top/bottom half is brighter by 3, plus mild noise: clean is easy, noise hurts."""
    rng = np.random.default_rng(seed)
    means = np.full((4, SIDE, SIDE, 3), 116.0)
    h = SIDE // 2
    means[0, :, :h] += 3
    means[1, :, h:] += 3
    means[2, :h] += 3
    means[3, h:] += 3
    labels = np.arange(n) % 4
    images = np.clip(means[labels] + rng.normal(0, 2, (n, SIDE, SIDE, 3)), 0, 255).round().astype(np.uint8)
    return images, labels, means


# ----------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name", list_evaluators())
def test_every_registered_evaluator_builds_with_defaults(name):
    evaluator = create_evaluator(name)
    assert isinstance(evaluator, Evaluator)
    assert isinstance(evaluator.figures(), dict)


def test_registry_lists_the_four_evaluators_and_names_them_in_errors():
    assert list_evaluators() == ["calibration", "robustness", "shape_bias", "subgroup"]
    with pytest.raises(RegistryError) as err:
        create_evaluator("shape_bais")
    assert "did you mean 'shape_bias'" in str(err.value)
    assert all(name in str(err.value) for name in list_evaluators())


@pytest.mark.parametrize("name", list_evaluators())
def test_every_evaluator_declares_what_it_needs_and_what_it_yields(name):
    """Title, inputs the stage provides, models, config paths that exist in the one config, metrics and plots."""
    cls = evaluator_class(name)
    assert cls.title and cls.metrics and set(cls.inputs) <= set(INPUTS) and set(cls.models) <= set(MODELS)
    assert isinstance(cls.from_config(VitdistillConfig()), cls)  # every declared config path resolves
    assert all(m.better in ("higher", "lower", None) and m.label and m.description for m in cls.metrics)
    assert any(m.headline for m in cls.metrics)
    names = [p.name for p in cls.plots]
    assert len(names) == len(set(names)) and not {"headline", "data_efficiency"} & set(names)


def test_plot_names_are_unique_over_evaluators():
    names = [p.name for n in list_evaluators() for p in evaluator_class(n).plots]
    assert len(names) == len(set(names)) and "reliability" in names


@pytest.mark.parametrize("name, inputs", [
    ("calibration", ()),
    ("robustness", ()),
    ("subgroup", ("groups",)),
])
def test_every_metric_an_evaluator_yields_is_declared_once_in_the_catalogue(name, inputs):
    images, labels, means = half_images(8)
    extra = {"groups": labels % 2} if inputs else {}
    ev = evaluator_class(name).from_config(VitdistillConfig())
    for key, _ in ev.run(NearestMeanClassifier(means), images, labels, **extra):
        assert describe_metric(f"{name}/{key}") is not None, key


def test_metric_families_match_their_fields_and_fill_their_labels():
    drop = Metric("accuracy/{corruption}/{severity:int}", "accuracy: {corruption}, severity {severity}", "higher")
    assert drop.match("accuracy/jpeg/3") == {"corruption": "jpeg", "severity": "3"}
    assert drop.match("accuracy/jpeg/high") is None and drop.match("mean_accuracy/jpeg/3") is None
    assert drop.label_for("accuracy/gaussian_noise/5") == "accuracy: gaussian_noise, severity 5"
    rank, spec = describe_metric("robustness/relative_drop/occlusion")
    assert spec.headline and spec.better == "lower"  # the structural corruptions are headlines ...
    assert not describe_metric("robustness/relative_drop/jpeg")[1].headline  # ... the family is not
    assert describe_metric("calibration/nonsense") is None and describe_metric("nonsense/ece") is None
    with pytest.raises(ValueError, match="better='up'"):
        Metric("x", "x", "up")


def test_unknown_corruption_and_severity_name_the_valid_choices():
    images = np.zeros((1, SIDE, SIDE, 3), np.uint8)
    with pytest.raises(RegistryError, match="valid corruptions: contrast, gaussian_blur"):
        corrupt(images, "fog", 1)
    with pytest.raises(ConfigError, match="gaussian_noise"):
        RobustnessEvaluator(corruptions=["fog"])
    with pytest.raises(ConfigError, match="1, 2, 3, 4, 5"):
        corrupt(images, "contrast", 6)


# ----------------------------------------------------------------------------- calibration


def test_ece_is_zero_when_confidence_matches_accuracy():
    # 10 samples at confidence 0.8 with 8 correct, 5 at 0.6 with 3 correct.
    probs = np.array([[0.8, 0.2]] * 10 + [[0.4, 0.6]] * 5)
    labels = np.array([0] * 8 + [1] * 2 + [1] * 3 + [0] * 2)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)
    assert max_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)


def test_ece_and_mce_of_an_overconfident_model_match_the_hand_computed_values():
    # Bin of 0.95: 4 samples, 2 correct, gap 0.45. Bin of 0.65: 6 samples, 3 correct, gap 0.15.
    probs = np.array([[0.95, 0.05]] * 4 + [[0.65, 0.35]] * 6)
    labels = np.array([0, 0, 1, 1] + [0, 0, 0, 1, 1, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.4 * 0.45 + 0.6 * 0.15)
    assert max_calibration_error(probs, labels) == pytest.approx(0.45)


def test_nll_of_uniform_logits_is_log_num_classes():
    assert negative_log_likelihood(np.zeros((3, 5)), np.array([0, 2, 4])) == pytest.approx(math.log(5))


def test_calibration_evaluator_yields_metrics_and_a_reliability_figure():
    images, labels, means = half_images(24)
    evaluator = create_evaluator("calibration")
    metrics = dict(evaluator.run(NearestMeanClassifier(means), images, labels))
    assert set(metrics) == {"ece", "mce", "nll", "accuracy"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    assert isinstance(evaluator.figures()["reliability"], Figure)


# ----------------------------------------------------------------------------- subgroup


def test_subgroup_accuracy_gap_and_worst_group_on_a_hand_example():
    pred = np.array([0, 1, 1, 0, 0, 1, 1])
    labels = np.array([0, 1, 0, 0, 1, 1, 0])
    groups = np.array(["red", "red", "red", "blue", "blue", "green", "green"])
    result = subgroup_accuracy(pred, labels, groups)
    assert result.accuracy == pytest.approx({"blue": 0.5, "green": 0.5, "red": 2 / 3})
    assert result.count == {"blue": 2, "green": 2, "red": 3}
    assert result.gap == pytest.approx(2 / 3 - 0.5)
    assert result.worst_group in {"blue", "green"} and result.worst_accuracy == pytest.approx(0.5)


def test_subgroup_evaluator_yields_per_group_accuracy_gap_and_worst():
    images, labels, _ = half_images(8)
    pred = np.array([0, 1, 2, 3, 1, 1, 1, 1])  # group 0 (first four) all right, group 1 one of four
    classifier = LookupClassifier(images, pred, 4)
    metrics = dict(create_evaluator("subgroup").run(classifier, images, labels, groups=np.repeat([0, 1], 4)))
    expected = {"accuracy/0": 1.0, "accuracy/1": 0.25, "accuracy_gap": 0.75, "worst_group_accuracy": 0.25}
    assert metrics == pytest.approx(expected)


# ----------------------------------------------------------------------------- shape bias


@pytest.fixture(scope="module")
def cue_conflict():
    return cue_conflict_arrays(36, seed=0, size=SIDE)


def test_cue_conflict_arrays_are_uint8_images_with_both_labels(cue_conflict):
    images, shape_labels, texture_labels = cue_conflict
    assert images.shape == (36, SIDE, SIDE, 3) and images.dtype == np.uint8
    assert len(set(zip(shape_labels.tolist(), texture_labels.tolist()))) == 36


@pytest.mark.parametrize("cue, expected_bias", [("shape", 1.0), ("texture", 0.0)])
def test_shape_bias_of_a_shape_and_a_texture_classifier(cue_conflict, cue, expected_bias):
    images, shape_labels, texture_labels = cue_conflict
    classifier = LookupClassifier(images, shape_labels if cue == "shape" else texture_labels, 6)
    metrics = dict(create_evaluator("shape_bias").run(classifier, images, shape_labels, texture_labels=texture_labels))
    assert metrics["shape_bias"] == expected_bias
    assert metrics["shape_match"] == expected_bias and metrics["texture_match"] == 1.0 - expected_bias
    assert metrics["n_used"] == metrics["n_conflict"] == 30.0  # the 6 congruent images are excluded


# ----------------------------------------------------------------------------- corruptions


@pytest.mark.parametrize("name", list_corruptions())
def test_corruptions_are_deterministic_uint8_and_grow_with_severity(cue_conflict, name):
    images = cue_conflict[0][:12]
    out = [corrupt(images, name, s, seed=3) for s in range(1, 6)]
    assert all(o.dtype == np.uint8 and o.shape == images.shape for o in out)
    assert np.array_equal(out[2], corrupt(images, name, 3, seed=3))
    diffs = [np.abs(o.astype(np.float64) - images).mean() for o in out]
    assert diffs[0] > 0 and diffs[4] > diffs[0]
    if name != "patch_shuffle":  # a shuffle of finer tiles is not always farther in pixels
        assert all(b >= a for a, b in zip(diffs, diffs[1:])), diffs


def test_random_corruptions_depend_on_the_seed():
    images = half_images(4)[0]
    for name in ("gaussian_noise", "occlusion", "patch_shuffle"):
        assert not np.array_equal(corrupt(images, name, 3, seed=0), corrupt(images, name, 3, seed=1))


# ----------------------------------------------------------------------------- robustness


def test_a_classifier_that_ignores_pixels_loses_nothing():
    images, labels, _ = half_images(12)
    metrics = dict(create_evaluator("robustness", batch_size=5).run(OracleClassifier(labels, 4), images, labels))
    assert metrics["clean_accuracy"] == 1.0
    assert len([k for k in metrics if k.startswith("accuracy/")]) == 6 * 5
    assert all(metrics[f"relative_drop/{c}"] == 0.0 for c in list_corruptions())
    assert metrics["mean_relative_drop"] == 0.0


def test_a_pixel_sensitive_classifier_degrades_with_severity():
    images, labels, means = half_images(40)
    evaluator = create_evaluator("robustness", corruptions=["gaussian_noise", "occlusion"])
    metrics = dict(evaluator.run(NearestMeanClassifier(means), images, labels))
    assert metrics["clean_accuracy"] == 1.0
    noise = [metrics[f"accuracy/gaussian_noise/{s}"] for s in range(1, 6)]
    assert all(b <= a for a, b in zip(noise, noise[1:])) and noise[4] < noise[0] < 1.0
    assert metrics["relative_drop/gaussian_noise"] > 0
    assert metrics["mean_relative_drop"] > 0


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", list_evaluators())
def test_bad_input_raises_data_error(name):
    images, labels, means = half_images(6)
    classifier = NearestMeanClassifier(means)
    extra = {"texture_labels": labels, "groups": labels}
    evaluator = create_evaluator(name)
    with pytest.raises(DataError, match="uint8"):
        list(evaluator.run(classifier, images.astype(np.float32), labels, **extra))
    with pytest.raises(DataError, match=r"expected \(6,\)"):
        list(evaluator.run(classifier, images, labels[:5], **extra))


def test_product_classifiers_satisfy_the_classifier_protocol():
    """What the evaluate stage passes to evaluators (the student wrapper) has the protocol's predict."""
    import inspect

    import torch

    from vitdistill.evaluate.stage import StudentClassifier

    class Student(torch.nn.Module):
        img_size, mean, std = 8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

        def forward(self, x):
            return {"logits": x.flatten(1)[:, :3]}

    wrapped = StudentClassifier(Student())
    assert isinstance(wrapped, Classifier)
    assert list(inspect.signature(wrapped.predict).parameters) == list(
        inspect.signature(Classifier.predict).parameters)[1:]
    logits = wrapped.predict(np.zeros((2, 12, 12, 3), np.uint8))
    assert logits.shape == (2, 3) and logits.dtype == np.float32


def test_patch_shuffle_only_moves_tiles():
    images = half_images(3)[0]
    for severity in (1, 3, 5):
        out = corrupt(images, "patch_shuffle", severity, seed=0)
        assert np.array_equal(np.sort(out.reshape(3, -1), axis=1), np.sort(images.reshape(3, -1), axis=1))
