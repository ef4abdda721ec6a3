"""Teacher against student, metric by metric, from the evaluate stage's ``<model>/<evaluator>/<metric>`` keys.

What each metric means comes from the evaluator that yields it: its declared
:class:`~vitdistill.evaluate.base.Metric` gives the label, the direction (``higher`` or ``lower`` is
better, or ``None`` for counts and descriptive numbers), whether it is a headline and its format, so
every row says which model wins and by how much:

    rows = compare(evaluate_metrics)            # one Row per evaluator metric either model has
    [r for r in rows if r.headline]             # the dozen numbers a reader looks at first

A key that no registered evaluator declares (a run logged by an older version) is still a row,
labelled by its key, with no direction.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

from vitdistill.evaluate.base import MODELS, Metric, describe_metric

TIE = 1e-9
UNKNOWN_RANK = 1 << 30


@dataclass(frozen=True)
class Row:
    key: str  # "<evaluator>/<metric>"
    evaluator: str
    label: str
    teacher: float
    student: float
    better: str | None  # "higher" | "lower" | None
    headline: bool
    description: str = ""
    fmt: str | None = None  # a format spec, None: the report's default
    detail: bool = False  # folded away under its evaluator's main table

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


def _entry(key: str) -> tuple[int, Metric | None]:
    """``(rank among its evaluator's declared metrics, spec)``; undeclared keys rank last, with no spec."""
    found = describe_metric(key)
    return found if found else (UNKNOWN_RANK, None)


def describe(key: str) -> tuple[str, str | None, bool]:
    """``(label, better, headline)`` of an ``<evaluator>/<metric>`` key; unknown keys: the key, None, False."""
    spec = _entry(key)[1]
    return (spec.label_for(key.split("/", 1)[1]), spec.better, spec.headline) if spec else (key, None, False)


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
        rank, spec = _entry(key)
        evaluator, metric = key.split("/", 1)
        order = (evaluator, rank, [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)])
        values = (by_model["teacher"].get(key, nan), by_model["student"].get(key, nan))
        if spec is None:
            row = Row(key, evaluator, key, *values, None, False)
        else:
            row = Row(key, evaluator, spec.label_for(metric), *values, spec.better, spec.headline, spec.description,
                      spec.fmt, spec.detail)
        ranked.append((order, row))
    return [row for _, row in sorted(ranked, key=lambda pair: pair[0])]


def tally(rows: list[Row]) -> dict[str, int]:
    """Headline wins per model (and ties) among rows with a direction."""
    out = {"teacher": 0, "student": 0, "tie": 0}
    for r in rows:
        if r.headline and r.winner:
            out[r.winner] += 1
    return out

