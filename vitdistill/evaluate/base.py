"""The evaluator interface: the :class:`Classifier` protocol, declared metrics, input checks and the registry.

An evaluator is a small class built from config whose ``run(classifier, images, labels, **extra)``
yields ``(metric_name, float)`` pairs, as in big_vision. Each class describes itself, so the evaluate
stage runs it and the report shows it without knowing its name:

- ``title``: the report's section heading;
- ``inputs``: what the stage passes to ``run`` (names from :data:`INPUTS`: the test images, their
  labels and groups, the cue-conflict set, the teacher);
- ``models``: which of the evaluated models it measures (``teacher``, ``student``);
- ``config``: constructor argument -> dotted path in :class:`~vitdistill.config.VitdistillConfig`
  (the config is defined there only); :meth:`Evaluator.from_config` builds the evaluator from it;
- ``metrics``: a :class:`Metric` per metric it yields, or per family (``relative_drop/{corruption}``),
  with its direction, whether it is a headline, a description and a format. A name it yields that
  none of them matches is an error of the evaluator;
- ``plots``: the report's :class:`Plot` figures, redrawn from both models' metrics and tables.

Evaluators that draw keep the figures of their last ``run`` and return them from ``figures()`` as
``{name: matplotlib.figure.Figure}``; those with data behind a figure that a report may redraw
(reliability bins) return it from ``tables()`` as ``{name: rows}``. Both default to ``{}``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Literal, Protocol, runtime_checkable

import numpy as np
from matplotlib.figure import Figure

from vitdistill.errors import DataError
from vitdistill.registry import Registry


@runtime_checkable
class Classifier(Protocol):
    """Anything that maps uint8 images ``(N, H, W, 3)`` to logits ``(N, C)`` over the dataset's classes."""

    def predict(self, images: np.ndarray) -> np.ndarray: ...


# The models the evaluate stage measures, in report order.
MODELS = ("teacher", "student")

# What the evaluate stage can pass to an evaluator's ``run``: input name -> what it is (and the arguments it fills).
INPUTS: dict[str, str] = {
    "test_images": "the test split's images, uint8 (N, H, W, 3): run(images=)",
    "labels": "the test images' class indices (N,): run(labels=)",
    "groups": "the test images' subgroup (evaluate.group_by: class, colour, ...) (N,): run(groups=)",
    "cue_conflict": "cue-conflict images (the shape of one class, the texture of another; data.source=shapes "
                    "only): run(images=, labels=shape labels, texture_labels=)",
    "teacher": "the teacher classifier, for evaluators that score a model against it: run(teacher=)",
}

Direction = Literal["higher", "lower"]
_FIELD = re.compile(r"\{(\w+)(?::(int))?\}")


@dataclass(frozen=True)
class Metric:
    """One metric an evaluator yields, or a family: ``{field}`` in ``name`` matches any text
    (``{field:int}`` digits only), and ``label`` may use the fields.

        Metric("relative_drop/{corruption}", "relative drop: {corruption}", "lower")
    """

    name: str
    label: str  # for people, in the report's tables and figures
    better: Direction | None  # None: a count or a descriptive number, no winner
    headline: bool = False  # among the numbers a reader looks at first (the report's headline table, the tally)
    description: str = ""
    fmt: str | None = None  # a format spec for the report (",.0f"); None: 4 significant digits
    detail: bool = False  # folded away under the evaluator's main table (per-severity numbers)
    short: str | None = None  # in the stage's one-line summary ("ECE 0.059"); None: left out

    def __post_init__(self) -> None:
        if self.better not in ("higher", "lower", None):
            raise ValueError(f"metric {self.name!r}: better={self.better!r}; expected 'higher', 'lower' or None")

    @functools.cached_property
    def _pattern(self) -> re.Pattern[str]:
        parts, pos = [], 0
        for m in _FIELD.finditer(self.name):
            parts += [re.escape(self.name[pos:m.start()]), rf"(?P<{m[1]}>{'[0-9]+' if m[2] else '.+'})"]
            pos = m.end()
        return re.compile("".join(parts) + re.escape(self.name[pos:]))

    def match(self, metric: str) -> dict[str, str] | None:
        """The fields of ``metric`` if this spec names it (``{}`` for a plain name), else None."""
        m = self._pattern.fullmatch(metric)
        return None if m is None else m.groupdict()

    def label_for(self, metric: str) -> str:
        """The label of ``metric`` with its fields filled in (``relative drop: jpeg``)."""
        return self.label.format(**(self.match(metric) or {}))


@dataclass(frozen=True)
class Plot:
    """A report figure: ``draw(metrics, tables)`` with ``metrics = {model: {metric: value}}`` and
    ``tables = {model: {table: rows}}`` of this evaluator (as its ``run`` yielded them and its
    ``tables()`` returned them), returning a Figure, or None when the run has nothing to draw.
    ``name`` is the figure's file name in the report (``report/<name>.png``), unique over evaluators."""

    name: str
    draw: Callable[[dict[str, dict[str, float]], dict[str, dict[str, Any]]], Figure | None]


class Evaluator:
    """Base of the evaluators: ``run`` yields ``(name, value)``; ``figures`` returns the last run's figures.
    Subclasses declare what they need and what they yield (see the module doc)."""

    title: ClassVar[str] = ""
    inputs: ClassVar[tuple[str, ...]] = ("test_images", "labels")
    models: ClassVar[tuple[str, ...]] = MODELS
    config: ClassVar[dict[str, str]] = {}
    metrics: ClassVar[tuple[Metric, ...]] = ()
    plots: ClassVar[tuple[Plot, ...]] = ()

    @classmethod
    def from_config(cls, cfg: Any) -> "Evaluator":
        """Built with each declared ``config`` argument read from ``cfg`` (a VitdistillConfig)."""
        return cls(**{arg: config_value(cfg, path) for arg, path in cls.config.items()})

    @classmethod
    def metric(cls, name: str) -> tuple[int, Metric] | None:
        """``(rank, spec)`` of the first declared metric that names ``name``, else None."""
        return next(((i, m) for i, m in enumerate(cls.metrics) if m.match(name) is not None), None)

    def run(
        self, classifier: Classifier, images: np.ndarray, labels: np.ndarray, **extra: Any
    ) -> Iterator[tuple[str, float]]:
        raise TypeError(f"{type(self).__name__} must define run()")

    def figures(self) -> dict[str, Figure]:
        return {}

    def tables(self) -> dict[str, list[dict[str, float]]]:
        return {}


EVALUATORS: Registry[Evaluator] = Registry("evaluator")


def evaluator_class(name: str) -> type[Evaluator]:
    """The class registered as ``name`` (RegistryError naming the valid ones if there is none)."""
    entry = EVALUATORS.get(name)
    if not (isinstance(entry, type) and issubclass(entry, Evaluator)):
        raise TypeError(f"evaluator {name!r} is registered as {entry!r}; expected a subclass of Evaluator")
    return entry


def config_value(cfg: Any, path: str) -> Any:
    """``cfg`` at the dotted ``path`` (``evaluate.severities``)."""
    value = cfg
    for part in path.split("."):
        value = getattr(value, part)
    return value


def describe_metric(key: str) -> tuple[int, Metric] | None:
    """``(rank, spec)`` of an ``<evaluator>/<metric>`` key from the registry; None for an unknown
    evaluator or an undeclared metric (a run logged before the metric was declared)."""
    evaluator, _, metric = key.partition("/")
    if evaluator not in EVALUATORS:
        return None
    return evaluator_class(evaluator).metric(metric)


def create_evaluator(name: str, **kwargs: Any) -> Evaluator:
    """Build the evaluator registered as ``name`` with its config ``kwargs``."""
    return EVALUATORS.create(name, **kwargs)


def list_evaluators(pattern: str = "*") -> list[str]:
    """Registered evaluator names matching the shell-style ``pattern``."""
    return EVALUATORS.list(pattern)


def check_images(images: object, what: str = "images") -> np.ndarray:
    """``images`` as uint8 ``(N, H, W, 3)`` with N >= 1, else DataError."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        dtype = getattr(images, "dtype", type(images).__name__)
        raise DataError(f"{what}: dtype {dtype}; expected a uint8 numpy array (N, H, W, 3)")
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
        raise DataError(f"{what}: shape {images.shape}; expected (N, H, W, 3) with N >= 1")
    return images


def check_labels(labels: object, n: int, what: str = "labels") -> np.ndarray:
    """``labels`` as a 1-D int64 array of length ``n``, else DataError."""
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise DataError(f"{what}: shape {arr.shape}; expected ({n},), one per image")
    if arr.dtype.kind not in "iu":
        raise DataError(f"{what}: dtype {arr.dtype}; expected integer class indices")
    return arr.astype(np.int64)


def predict_logits(classifier: Classifier, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    """``classifier.predict`` over ``images`` in batches (all at once when None), checked: (N, C) float64."""
    n = images.shape[0]
    step = n if batch_size is None else batch_size
    if step < 1:
        raise DataError(f"batch_size: {batch_size}; expected a positive integer or None")
    parts = [np.asarray(classifier.predict(images[i : i + step]), dtype=np.float64) for i in range(0, n, step)]
    logits = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
    if logits.ndim != 2 or logits.shape[0] != n or logits.shape[1] == 0:
        raise DataError(f"classifier logits: shape {logits.shape}; expected ({n}, C) for {n} images")
    if not np.isfinite(logits).all():
        raise DataError("classifier logits: has NaN or inf; expected finite logits")
    return logits


def check_label_range(labels: np.ndarray, num_classes: int, what: str = "labels") -> None:
    """DataError unless every label indexes one of the classifier's ``num_classes`` logits."""
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f"{what}: range [{labels.min()}, {labels.max()}]; expected indices in [0, {num_classes - 1}]")


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``logits`` (N, C) against ``labels`` (N,)."""
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def labelled_logits(classifier: Classifier, images: object, labels: object,
                    batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checked ``(images (N,H,W,3) uint8, labels (N,), logits (N,C))`` for evaluators scoring against labels."""
    images = check_images(images)
    labels = check_labels(labels, images.shape[0])
    logits = predict_logits(classifier, images, batch_size)  # (N, C)
    check_label_range(labels, logits.shape[1])
    return images, labels, logits
