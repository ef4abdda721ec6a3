"""Evaluators as plug-ins: each is built by ``create_evaluator(name, **config)`` and its
``run(classifier, images, labels, **extra)`` yields ``(metric_name, float)`` pairs.

A classifier is anything with ``predict(images uint8 (N, H, W, 3)) -> logits (N, C)``
(:class:`Classifier`). Figures are not yielded: ``evaluator.figures()`` returns the last run's
``{name: matplotlib.figure.Figure}`` (only ``calibration`` draws one, ``"reliability"``).

    ev = create_evaluator("robustness", corruptions=["gaussian_noise"], seed=0)
    metrics = dict(ev.run(classifier, images, labels))

Evaluators: ``calibration``, ``robustness``, ``shape_bias`` (needs ``texture_labels=``) and
``subgroup`` (needs ``groups=``). Bad input raises :class:`vitdistill.errors.DataError`.
"""

from vitdistill.evaluate.base import EVALUATORS, Classifier, Evaluator, create_evaluator, list_evaluators
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
from vitdistill.evaluate.shape_bias import ShapeBiasEvaluator, cue_conflict_arrays
from vitdistill.evaluate.subgroup import SubgroupEvaluator, SubgroupResult, subgroup_accuracy

__all__ = [
    "CORRUPTIONS",
    "EVALUATORS",
    "SEVERITIES",
    "CalibrationEvaluator",
    "Classifier",
    "Evaluator",
    "RobustnessEvaluator",
    "ShapeBiasEvaluator",
    "SubgroupEvaluator",
    "SubgroupResult",
    "corrupt",
    "create_evaluator",
    "cue_conflict_arrays",
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
