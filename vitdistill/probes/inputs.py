"""Checking and preparing probe inputs: features ``x`` (N, D) and integer labels ``y`` (N,).

Every probe validates its splits here first, so bad input fails the same way everywhere: a
:class:`~vitdistill.errors.DataError` whose one-line message names the split and what was expected.

Features are never copied whole: a split keeps the array it was given (in memory, or a read-only
float16 memory map from ``FeatureCache.load(spill_dir=...)``), and the probes read it in chunks of
rows (:func:`row_chunks`, :func:`read_rows`), each converted on its own to float64 or float32.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from vitdistill.errors import ConfigError, DataError

# A chunk of rows read at a time is about this many bytes once converted (float64): 64 MiB.
CHUNK_BYTES = 2**26


@dataclass(frozen=True)
class Split:
    """One validated split: its features as given (not copied) and int64 labels."""

    name: str
    x: np.ndarray  # (N, D) float or integer, finite; possibly a read-only memory map
    y: np.ndarray  # (N,) int64, >= 0


def row_chunks(num_rows: int, dim: int, itemsize: int = 8, chunk_bytes: int = CHUNK_BYTES) -> Iterator[slice]:
    """Consecutive row slices of about ``chunk_bytes`` each at ``itemsize`` bytes per value."""
    step = max(1, chunk_bytes // max(1, dim * itemsize))
    for start in range(0, num_rows, step):
        yield slice(start, min(num_rows, start + step))


def release(x: np.ndarray) -> None:
    """Drop the pages a read-only memory map has faulted in from this process's resident set (the page
    cache keeps them), so that reading a spilled split chunk by chunk does not grow RSS to its size."""
    mm = getattr(x, "_mmap", None)
    if isinstance(x, np.memmap) and x.mode == "r" and mm is not None and hasattr(mm, "madvise"):
        mm.madvise(mmap.MADV_DONTNEED)


def read_rows(x: np.ndarray, rows: slice | np.ndarray, dtype: type = np.float64) -> np.ndarray:
    """A fresh ``dtype`` copy of ``x[rows]`` (a memory map reads only those rows)."""
    out = np.array(x[rows], dtype=dtype)
    release(x)
    return out


def unit_rows(x: np.ndarray, rows: slice | np.ndarray, normalize: bool = True) -> np.ndarray:
    """``x[rows]`` as float64, L2-normalised per row when ``normalize``."""
    chunk = read_rows(x, rows)
    return l2_normalize(chunk) if normalize else chunk


def check_split(name: str, x: object, y: object) -> Split:
    """Validate one split chunk by chunk (no copy of the features) and return it with int64 labels."""
    if x is None:
        raise DataError(f"{name}: features are missing; expected an (N, D) array")
    if y is None:
        raise DataError(f"{name}: labels are missing; expected an (N,) integer array")
    x = x if isinstance(x, np.ndarray) else np.asarray(x)  # a memory map stays one
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
    bad = 0
    if x.dtype.kind == "f":
        for rows in row_chunks(x.shape[0], x.shape[1], x.dtype.itemsize):
            bad += int(np.count_nonzero(~np.isfinite(x[rows]).all(axis=1)))
            release(x)
    if bad:
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
