"""Probes of frozen features: linear (logistic regression), few-shot (ridge) and weighted kNN.

Every probe takes numpy features ``x`` (N, D), arrays or read-only memory maps (read chunk by chunk,
never copied whole), and integer labels ``y`` (N,) per split, picks any hyper-parameter on val only,
reads test once, and returns a dataclass result. Bad input raises
:class:`vitdistill.errors.DataError` naming the split and what was expected.
"""

from vitdistill.probes.fewshot import DEFAULT_RIDGE_GRID, FewShotResult, fewshot_probe
from vitdistill.probes.knn import KNNResult, knn_probe
from vitdistill.probes.linear import DEFAULT_L2_GRID, LinearProbeResult, linear_probe, sklearn_c
from vitdistill.probes.plots import confusion_figure, per_class_table

__all__ = [
    "DEFAULT_L2_GRID",
    "DEFAULT_RIDGE_GRID",
    "FewShotResult",
    "KNNResult",
    "LinearProbeResult",
    "confusion_figure",
    "fewshot_probe",
    "knn_probe",
    "linear_probe",
    "per_class_table",
    "sklearn_c",
]
