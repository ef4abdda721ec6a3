"""Evaluators as plug-ins: each is built by ``create_evaluator(name, **config)`` and its
``run(classifier, images, labels, **extra)`` yields ``(metric_name, float)`` pairs. Each class declares
its title, inputs, config, metrics (:class:`Metric`: direction, headline, description, format) and
report figures (:class:`Plot`); the evaluate stage and the report read them, so a new evaluator is one
registered class (see :mod:`vitdistill.evaluate.base`).

A classifier is anything with ``predict(images uint8 (N, H, W, 3)) -> logits (N, C)``
(:class:`Classifier`). Figures are not yielded: ``evaluator.figures()`` returns the last run's
``{name: matplotlib.figure.Figure}`` (only ``calibration`` draws one, ``"reliability"``).

    ev = create_evaluator("robustness", corruptions=["gaussian_noise"], seed=0)
    metrics = dict(ev.run(classifier, images, labels))

Evaluators: ``calibration``, ``robustness``, ``shape_bias`` (needs ``texture_labels=``) and
``subgroup`` (needs ``groups=``). Bad input raises :class:`vitdistill.errors.DataError`.
"""

from vitdistill.evaluate.base import (
    EVALUATORS,
    INPUTS,
    MODELS,
    Classifier,
    Evaluator,
    Metric,
    Plot,
    create_evaluator,
    describe_metric,
    evaluator_class,
    list_evaluators,
)
from vitdistill.evaluate.calibration import (
    CalibrationEvaluator,
    expected_calibration_error,
    max_calibration_error,
    negative_log_likelihood,
    reliability_bins,
    reliability_figure,
)
from vitdistill.evaluate.corruptions import CORRUPTIONS, SEVERITIES, corrupt, list_corruptions
from vitdistill.evaluate.robustness import RobustnessEvaluator, relative_drop
from vitdistill.evaluate.shape_bias import HUMAN_SHAPE_BIAS, ShapeBiasEvaluator, cue_conflict_arrays
from vitdistill.evaluate.subgroup import SubgroupEvaluator, SubgroupResult, subgroup_accuracy

__all__ = [
    "CORRUPTIONS",
    "EVALUATORS",
    "HUMAN_SHAPE_BIAS",
    "INPUTS",
    "MODELS",
    "SEVERITIES",
    "CalibrationEvaluator",
    "Classifier",
    "Evaluator",
    "Metric",
    "Plot",
    "RobustnessEvaluator",
    "ShapeBiasEvaluator",
    "SubgroupEvaluator",
    "SubgroupResult",
    "corrupt",
    "create_evaluator",
    "cue_conflict_arrays",
    "describe_metric",
    "evaluator_class",
    "expected_calibration_error",
    "list_corruptions",
    "list_evaluators",
    "max_calibration_error",
    "negative_log_likelihood",
    "relative_drop",
    "reliability_bins",
    "reliability_figure",
    "subgroup_accuracy",
]
