"""Few-shot probe in the style of big_vision's ``evaluators/fewshot.py``: closed-form ridge regression.

For each ``shots`` value and seed, ``shots`` examples per class are drawn from the train split
only. A linear map is fitted by ridge regression to one-vs-rest targets (+1 for the true class, -1
for the others); the bias is left unpenalised by centring features and targets on the sample
mean. For a sample X (n, D) with centred Xc and centred targets Yc (n, C), W minimises
||Xc W - Yc||^2 + l2 ||W||^2, the error summed over the n rows as in big_vision (not averaged):

    W(l2) = (Xc^T Xc + l2 I)^-1 Xc^T Yc = Xc^T (Xc Xc^T + l2 I)^-1 Yc,   b = mean(Y) - mean(X) W

One symmetric eigendecomposition, of the smaller of Xc^T Xc (D, D) and Xc Xc^T (n, n), serves the
whole l2 grid: with Q diag(e) Q^T the decomposition, W(l2) = L diag(1 / (e + l2)) R for fixed L and
R (:class:`RidgeEigen`). The l2 for each ``shots`` is chosen by mean val top-1 over seeds (ties go
to the stronger regularisation); test is scored once, at that l2.

A ``shots`` value above the smallest class's train count is skipped, with a note: its sample would
be every train row of the short classes, so it would not be a k-shot result (with 3-7 images per
class, 5-, 10- and 25-shot would all be the same fit under three names).

Features are optionally L2-normalised per row (``normalize``) before centring. Unlike big_vision we
do not standardise each dimension (so the penalty acts on the features' own scale), and the bias
comes from centring rather than from a large constant feature, so it is exactly unpenalised.

Memory: the shots are drawn from the labels alone and only the sampled train rows are read (a
memory-mapped cache is never read whole); val and test are scored chunk by chunk (``row_chunks``),
each chunk L2-normalised and projected on its own, so resident memory is the samples plus a chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vitdistill.errors import ConfigError, DataError
from vitdistill.probes.inputs import (
    check_l2_grid,
    check_positive_ints,
    check_split,
    check_splits,
    require_classes,
    resolve_num_classes,
    row_chunks,
    unit_rows,
)

# big_vision sweeps powers of two. With unit-norm features the eigenvalues of Xc^T Xc are at most
# n (<= shots * C), so 2^-10 (nearly interpolating) to 2^10 (weights nearly zero) covers the range.
DEFAULT_RIDGE_GRID: tuple[float, ...] = tuple(float(v) for v in 2.0 ** np.arange(-10, 11))


@dataclass
class RidgeEigen:
    """Ridge regression of one sample, factored once so that any l2 costs two small products.

    W(l2) = left @ diag(1 / (eigs + l2)) @ right and b(l2) = y_mean - x_mean @ W(l2).
    """

    x_mean: np.ndarray  # (D,)
    y_mean: np.ndarray  # (C,)
    left: np.ndarray  # (D, r), r = min(n, D)
    eigs: np.ndarray  # (r,) eigenvalues of the smaller Gram matrix, clipped at 0
    right: np.ndarray  # (r, C)

    def weights(self, l2: float) -> tuple[np.ndarray, np.ndarray]:
        w = (self.left / (self.eigs + l2)) @ self.right  # (D, C)
        return w, self.y_mean - self.x_mean @ w  # (D, C), (C,)

    def project(self, x: np.ndarray) -> np.ndarray:
        """Eval features in the eigenbasis, shared by every l2: (M, D) -> (M, r)."""
        return (x - self.x_mean) @ self.left

    def scores(self, projected: np.ndarray, l2: float) -> np.ndarray:
        """(M, C) scores at ``l2`` from :meth:`project` output."""
        return (projected / (self.eigs + l2)) @ self.right + self.y_mean


def ridge_eigen(x: np.ndarray, targets: np.ndarray) -> RidgeEigen:
    """Factor ridge regression of ``targets`` (n, C) on ``x`` (n, D), with an unpenalised bias."""
    x_mean, y_mean = x.mean(axis=0), targets.mean(axis=0)  # (D,), (C,)
    xc, yc = x - x_mean, targets - y_mean  # (n, D), (n, C)
    n, d = xc.shape
    if n >= d:
        eigs, q = np.linalg.eigh(xc.T @ xc)  # (D,), (D, D)
        left, right = q, q.T @ (xc.T @ yc)  # (D, D), (D, C)
    else:
        eigs, q = np.linalg.eigh(xc @ xc.T)  # (n,), (n, n)
        left, right = xc.T @ q, q.T @ yc  # (D, n), (n, C)
    return RidgeEigen(x_mean, y_mean, left, np.clip(eigs, 0.0, None), right)


def pm_one_targets(y: np.ndarray, num_classes: int) -> np.ndarray:
    """(n,) labels -> (n, C) one-vs-rest targets: +1 for the class, -1 elsewhere."""
    return 2.0 * (y[:, None] == np.arange(num_classes)[None, :]) - 1.0


def class_orders(y: np.ndarray, num_classes: int, seed: int) -> list[np.ndarray]:
    """For each class, its train rows in a seeded random order (fails on an empty class)."""
    rng = np.random.default_rng(seed)
    orders = []
    for c in range(num_classes):
        rows = np.flatnonzero(y == c)
        if rows.size == 0:
            raise DataError(f"train: class {c} has no samples; expected at least one per class for few-shot sampling")
        orders.append(rng.permutation(rows))
    return orders


def take_shots(orders: list[np.ndarray], shots: int) -> tuple[np.ndarray, list[int]]:
    """The first ``shots`` rows of each class order (all rows if fewer) and the classes that were short."""
    chosen = np.sort(np.concatenate([o[:shots] for o in orders]))
    short = [c for c, o in enumerate(orders) if o.size < shots]
    return chosen, short


@dataclass
class FewShotResult:
    mean_top1: dict[int, float] = field(default_factory=dict)  # shots -> mean test top-1 over seeds
    std_top1: dict[int, float] = field(default_factory=dict)  # shots -> population std (ddof=0) over seeds
    top1: dict[tuple[int, int], float] = field(default_factory=dict)  # (shots, seed) -> test top-1
    chosen_l2: dict[int, float] = field(default_factory=dict)  # shots -> l2 picked on val
    val_top1_by_l2: dict[int, dict[float, float]] = field(default_factory=dict)  # shots -> l2 -> mean val top-1
    train_indices: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # (shots, seed) -> x_train rows
    short_classes: dict[int, list[int]] = field(default_factory=dict)  # shots -> classes with < shots train rows
    class_counts: list[int] = field(default_factory=list)  # (C,) train rows per class

    def metrics(self) -> dict[str, float]:
        """Scalar metrics, ready to log (run shot counts only)."""
        return {f"{k}shot_top1": v for k, v in self.mean_top1.items()}

    @property
    def most_shots(self) -> int | None:
        """The largest shot count that was run, None if every one was skipped."""
        return max(self.mean_top1, default=None)

    @property
    def skipped(self) -> list[int]:
        """Shot counts not run because some class has fewer train rows."""
        return [k for k, short in self.short_classes.items() if short]

    def skip_note(self, shots: int, classes: list[str] | None = None) -> str:
        """Why ``shots`` was skipped, naming the first short class (by name if ``classes`` is given)."""
        c = self.short_classes[shots][0]
        return (f"skipped: class {repr(classes[c]) if classes else c} has {self.class_counts[c]} train samples, "
                f"fewer than {shots}")


def fewshot_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    shots: tuple[int, ...] = (1, 5, 10, 25),
    seeds: tuple[int, ...] = (0, 1, 2),
    l2_grid: tuple[float, ...] | None = None,
    normalize: bool = True,
    num_classes: int | None = None,
) -> FewShotResult:
    """k-shot ridge probes: sample from train, choose l2 on val, report test top-1 per shots.

    Samples are nested: for a seed, each class's train rows are shuffled once and the k-shot
    sample takes the first k, so the 5-shot sample contains the 1-shot one.
    """
    train = check_split("train", x_train, y_train)
    val = check_split("val", x_val, y_val)
    test = check_split("test", x_test, y_test)
    check_splits(train, val, test)
    require_classes(train)
    num_classes = resolve_num_classes(num_classes, [train, val], [test])
    shots = check_positive_ints("shots", shots)
    seeds = tuple(dict.fromkeys(int(s) for s in seeds))  # unique, in the given order
    if not seeds:
        raise ConfigError("seeds must name at least one seed")
    grid = check_l2_grid(l2_grid, DEFAULT_RIDGE_GRID)[::-1]  # strong to weak, so argmax ties -> stronger

    orders = {seed: class_orders(train.y, num_classes, seed) for seed in seeds}  # from the labels alone

    counts = np.bincount(train.y, minlength=num_classes)  # (C,) train rows per class
    result = FewShotResult(class_counts=counts.tolist())
    for k in shots:
        result.short_classes[k] = [int(c) for c in np.flatnonzero(counts < k)]
        if result.short_classes[k]:
            continue
        fits = {}
        for seed in seeds:
            rows, _ = take_shots(orders[seed], k)
            result.train_indices[(k, seed)] = rows
            # only the sampled rows are read (sorted, so a memory map reads them in order)
            fits[seed] = ridge_eigen(unit_rows(train.x, rows, normalize), pm_one_targets(train.y[rows], num_classes))
        val_correct = np.zeros(len(grid))  # summed over seeds and val chunks
        for part in row_chunks(len(val.y), val.x.shape[1]):
            xva = unit_rows(val.x, part, normalize)  # (M, D)
            for fit in fits.values():
                projected = fit.project(xva)  # (M, r)
                val_correct += [np.sum(fit.scores(projected, l2).argmax(axis=1) == val.y[part]) for l2 in grid]
        best = int(np.argmax(val_correct))  # first maximum in strong-to-weak order: ties -> stronger l2
        l2 = grid[best]
        result.chosen_l2[k] = l2
        result.val_top1_by_l2[k] = {
            g: c / (len(seeds) * len(val.y)) for g, c in sorted(zip(grid, val_correct, strict=True))
        }
        test_correct = dict.fromkeys(seeds, 0)
        for part in row_chunks(len(test.y), test.x.shape[1]):
            xte = unit_rows(test.x, part, normalize)  # (M, D)
            for seed, fit in fits.items():
                test_correct[seed] += int(np.sum(fit.scores(fit.project(xte), l2).argmax(axis=1) == test.y[part]))
        for seed in seeds:
            result.top1[(k, seed)] = test_correct[seed] / len(test.y)
        accs = np.array([result.top1[(k, s)] for s in seeds])
        result.mean_top1[k], result.std_top1[k] = float(accs.mean()), float(accs.std())
    return result
