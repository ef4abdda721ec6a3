"""Checking and preparing probe inputs: features ``x`` (N, D) and integer labels ``y`` (N,).

Every probe validates its splits here first, so bad input fails the same way everywhere: a
:class:`~vitdistill.errors.DataError` whose one-line message names the split and what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vitdistill.errors import ConfigError, DataError


@dataclass(frozen=True)
class Split:
    """One validated split: float64 features and int64 labels."""

    name: str
    x: np.ndarray  # (N, D) float64, finite
    y: np.ndarray  # (N,) int64, >= 0


def check_split(name: str, x: object, y: object) -> Split:
    """Validate one split and return it as float64 features and int64 labels."""
    if x is None:
        raise DataError(f"{name}: features are missing; expected an (N, D) array")
    if y is None:
        raise DataError(f"{name}: labels are missing; expected an (N,) integer array")
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim != 2:
        raise DataError(f"{name}: features have shape {x.shape}; expected a 2-D (N, D) array")
    if y.ndim != 1:
        raise DataError(f"{name}: labels have shape {y.shape}; expected a 1-D (N,) array")
    if x.shape[0] == 0:
        raise DataError(f"{name}: split is empty; expected at least one sample")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{name}: {x.shape[0]} feature rows but {y.shape[0]} labels; expected equal lengths")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise DataError(f"{name}: features have dtype {x.dtype}; expected a float array")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{name}: labels have dtype {y.dtype}; expected integer class ids")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        bad = int(np.count_nonzero(~np.isfinite(x).all(axis=1)))
        raise DataError(f"{name}: {bad} of {x.shape[0]} feature rows contain NaN or inf; expected finite features")
    if y.min() < 0:
        raise DataError(f"{name}: label {int(y.min())} is negative; expected class ids in [0, num_classes)")
    return Split(name, x, y.astype(np.int64))


def check_splits(train: Split, *others: Split) -> int:
    """Check that every split has the train feature dim; returns that dim D."""
    dim = train.x.shape[1]
    for s in others:
        if s.x.shape[1] != dim:
            raise DataError(f"{s.name}: features have dim {s.x.shape[1]}; expected {dim} to match {train.name}")
    return dim


def resolve_num_classes(num_classes: int | None, fit_splits: list[Split], eval_splits: list[Split]) -> int:
    """Number of classes C: given, or inferred from the splits used for fitting and selection only.

    Labels of ``eval_splits`` (test) never enlarge C, so they cannot change any fitted model; a
    test label outside [0, C) is an error asking for ``num_classes``.
    """
    inferred = max(int(s.y.max()) for s in fit_splits) + 1
    if num_classes is None:
        num_classes = inferred
        source = "inferred from " + "/".join(s.name for s in fit_splits)
    else:
        source = "given as num_classes"
        if num_classes < inferred:
            worst = max(fit_splits, key=lambda s: int(s.y.max()))
            raise DataError(
                f"{worst.name}: label {inferred - 1} is out of range; expected labels below num_classes={num_classes}"
            )
    for s in eval_splits:
        if int(s.y.max()) >= num_classes:
            raise DataError(
                f"{s.name}: label {int(s.y.max())} is out of range; expected labels below {num_classes} "
                f"({source}); pass num_classes"
            )
    return num_classes


def require_classes(split: Split, minimum: int = 2) -> None:
    """Fail unless ``split`` has at least ``minimum`` distinct labels."""
    present = np.unique(split.y)
    if present.size < minimum:
        raise DataError(
            f"{split.name}: labels contain {present.size} distinct class(es) {present.tolist()}; "
            f"expected at least {minimum}"
        )


def check_l2_grid(l2_grid: object, default: tuple[float, ...]) -> tuple[float, ...]:
    """The grid (``default`` if None) as sorted unique positive floats, weakest l2 first."""
    grid = tuple(sorted({float(v) for v in (default if l2_grid is None else l2_grid)}))  # type: ignore[attr-defined]
    if not grid or not all(np.isfinite(v) and v > 0 for v in grid):
        raise ConfigError(f"l2_grid must be a non-empty sequence of positive finite floats, got {l2_grid!r}")
    return grid


def check_positive_ints(name: str, values: object) -> tuple[int, ...]:
    """``values`` as sorted unique positive ints (shots, k of kNN)."""
    out = tuple(sorted({int(v) for v in values}))  # type: ignore[attr-defined]
    if not out or out[0] < 1:
        raise ConfigError(f"{name} must be a non-empty sequence of positive integers, got {values!r}")
    return out


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Scale each row to unit Euclidean norm; all-zero rows stay zero."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # (N, 1)
    return x / np.maximum(norms, eps)  # (N, D)
