"""Teacher against student, metric by metric, from the evaluate stage's ``<model>/<evaluator>/<metric>`` keys.

Each metric has a direction (``higher`` or ``lower`` is better, or ``None`` for counts and
descriptive numbers), so every row says which model wins and by how much:

    rows = compare(evaluate_metrics)            # one Row per evaluator metric both models have
    [r for r in rows if r.headline]             # the dozen numbers a reader looks at first
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

MODELS = ("teacher", "student")
TIE = 1e-9

# (pattern on "<evaluator>/<metric>", label, better, headline). First match wins.
CATALOGUE: tuple[tuple[str, str, str | None, bool], ...] = (
    (r"calibration/accuracy", "clean top-1 accuracy", "higher", True),
    (r"calibration/ece", "expected calibration error (15 bins)", "lower", True),
    (r"calibration/mce", "maximum calibration error", "lower", False),
    (r"calibration/nll", "negative log-likelihood", "lower", True),
    (r"robustness/clean_accuracy", "clean accuracy", "higher", False),
    (r"robustness/mean_corruption_accuracy", "mean accuracy under corruptions", "higher", True),
    (r"robustness/mean_relative_drop", "mean relative accuracy drop", "lower", True),
    (r"robustness/relative_drop/(occlusion|patch_shuffle)", r"relative drop: \1", "lower", True),
    (r"robustness/relative_drop/(.+)", r"relative drop: \1", "lower", False),
    (r"robustness/mean_accuracy/(.+)", r"accuracy: \1 (mean over severities)", "higher", False),
    (r"robustness/accuracy/(.+)/(\d+)", r"accuracy: \1, severity \2", "higher", False),
    (r"subgroup/worst_group_accuracy", "worst-group accuracy", "higher", True),
    (r"subgroup/accuracy_gap", "largest subgroup accuracy gap", "lower", True),
    (r"subgroup/accuracy/(.+)", r"accuracy of group \1", "higher", False),
    (r"shape_bias/shape_bias", "shape bias (humans about 0.96)", "higher", True),
    (r"shape_bias/shape_match", "cue-conflict decisions matching the shape", "higher", False),
    (r"shape_bias/texture_match", "cue-conflict decisions matching the texture", None, False),
    (r"shape_bias/(n_used|n_conflict)", r"cue-conflict images (\1)", None, False),
)
# Human shape bias on cue-conflict images (Geirhos et al. 2019, model-vs-human): about 0.96.
HUMAN_SHAPE_BIAS = 0.96


@dataclass(frozen=True)
class Row:
    key: str  # "<evaluator>/<metric>"
    evaluator: str
    label: str
    teacher: float
    student: float
    better: str | None  # "higher" | "lower" | None
    headline: bool

    @property
    def delta(self) -> float:
        """student - teacher."""
        return self.student - self.teacher

    @property
    def winner(self) -> str | None:
        """"teacher", "student", "tie", or None when the metric has no better direction or a value is NaN."""
        if self.better is None or math.isnan(self.teacher) or math.isnan(self.student):
            return None
        if abs(self.delta) <= TIE:
            return "tie"
        student_higher = self.delta > 0
        return "student" if student_higher == (self.better == "higher") else "teacher"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN as None)."""
        d = {**asdict(self), "delta": self.delta, "winner": self.winner}
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in d.items()}


def _entry(key: str) -> tuple[int, str, str | None, bool]:
    """``(catalogue rank, label, better, headline)``; unknown keys rank last, labelled by the key."""
    for rank, (pattern, label, better, headline) in enumerate(CATALOGUE):
        m = re.fullmatch(pattern, key)
        if m:
            return rank, m.expand(label), better, headline
    return len(CATALOGUE), key, None, False


def describe(key: str) -> tuple[str, str | None, bool]:
    """``(label, better, headline)`` of an ``<evaluator>/<metric>`` key; unknown keys: the key, None, False."""
    return _entry(key)[1:]


def split_key(metric: str) -> tuple[str, str] | None:
    """``"teacher/calibration/ece"`` -> ``("teacher", "calibration/ece")``; keys of other models: None."""
    model, _, rest = metric.partition("/")
    return (model, rest) if model in MODELS and "/" in rest else None


def compare(metrics: dict[str, float]) -> list[Row]:
    """One row per ``<evaluator>/<metric>`` of either model (NaN where the other lacks it, e.g. a run
    without a student), by evaluator, then in catalogue order, then by key (severities numerically)."""
    by_model: dict[str, dict[str, float]] = {m: {} for m in MODELS}
    for name, value in metrics.items():
        parts = split_key(name)
        if parts:
            by_model[parts[0]][parts[1]] = float(value)
    ranked = []
    nan = float("nan")
    for key in set(by_model["teacher"]) | set(by_model["student"]):
        rank, label, better, headline = _entry(key)
        evaluator = key.split("/", 1)[0]
        order = (evaluator, rank, [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)])
        ranked.append((order, Row(key, evaluator, label, by_model["teacher"].get(key, nan),
                                  by_model["student"].get(key, nan), better, headline)))
    return [row for _, row in sorted(ranked, key=lambda pair: pair[0])]


def tally(rows: list[Row]) -> dict[str, int]:
    """Headline wins per model (and ties) among rows with a direction."""
    out = {"teacher": 0, "student": 0, "tie": 0}
    for r in rows:
        if r.headline and r.winner:
            out[r.winner] += 1
    return out

