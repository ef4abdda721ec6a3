"""Linear probe: L2-regularised multinomial logistic regression, CLIP-style l2 sweep.

The objective for weights ``W`` (C, D) and bias ``b`` (C,) on N training rows is

    loss(W, b) = mean_i CE(W x_i + b, y_i) + l2 / 2 * ||W||_F^2        (bias unpenalised)

which is scikit-learn's ``LogisticRegression`` objective divided by ``C * N``: the same model as
``LogisticRegression(C=1 / (l2 * N))`` fitted on the same N rows (:func:`sklearn_c`). Note that
the refit on train + val keeps l2, so its scikit-learn equivalent uses that larger N. It is
solved in float64 with full-batch L-BFGS (``torch.optim.LBFGS``, strong-Wolfe line search) and
analytic gradients, until max |gradient| <= ``tol`` (scikit-learn's lbfgs criterion and default).

Protocol (:func:`linear_probe`): sweep ``l2`` from strong to weak regularisation on train, each
fit warm-started by extrapolating the last two solutions along the path; pick the l2 with the
best val top-1 (ties go to the stronger regularisation); refit at that l2 on train (+ val),
warm-started from the train fit; score once on test. Test data is only read after the choice,
so it cannot influence it.

Features (:class:`FeatureTransform`, fitted on train only) are L2-normalised per row
(``normalize``), centred on the train mean, and standardised (``standardize``): each dimension is
divided by its train standard deviation and by sqrt(D), so rows keep a mean squared norm of 1 and
the l2 grid means the same with or without it. Centring is an exact reparameterisation, since the
bias is unpenalised (W is unchanged and b absorbs ``-W mu``), so it is always done. Standardising
changes the model (the penalty acts on standardised dimensions, as with MAE's non-affine
BatchNorm before its linear probe) and conditions the problem much better: on anisotropic
features the unstandardised result can move by several points with the solver tolerance, and
with it the agreement with other solvers; standardised, it does not.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from vitdistill.probes.inputs import (
    check_l2_grid,
    check_split,
    check_splits,
    l2_normalize,
    require_classes,
    resolve_num_classes,
)
from vitdistill.probes.metrics import confusion_matrix, mean_per_class_recall, per_class_recall, topk_accuracy

# Half-decade steps, CLIP-style. For unit-norm features, l2 = 1 already gives a near-constant
# classifier and 1e-7 is close to unregularised (scikit-learn C = 1e7 / N).
DEFAULT_L2_GRID: tuple[float, ...] = tuple(float(v) for v in 10.0 ** np.linspace(-7.0, 0.0, 15))
# Gradient tolerance with scikit-learn's meaning for lbfgs: stop when max |grad| <= tol.
DEFAULT_TOL = 1e-4
# L-BFGS memory, as scikit-learn/scipy (maxcor=10); torch's default of 100 only adds overhead here.
HISTORY_SIZE = 10
# Below this many multiply-adds per product (N * D * C) one thread is used: each objective
# evaluation is then a few ms at most, thread synchronisation costs more than it saves, and on a
# busy machine (more runnable threads than cores) multi-threaded runs were measured 30-100x slower.
SINGLE_THREAD_BELOW = 2**25
_THREADS_LOCK = threading.Lock()


@dataclass
class LinearProbeResult:
    top1: float
    top5: float  # top-min(5, C)
    mean_per_class_recall: float  # over classes present in test
    chosen_l2: float
    val_top1_by_l2: dict[float, float]  # every grid value, ascending; fitted on train only
    confusion: np.ndarray  # (C, C) int64 test counts; row = true, column = predicted
    per_class_recall: np.ndarray  # (C,) NaN for classes absent from test
    test_pred: np.ndarray  # (N_test,) int64
    fit_seconds: float  # sweep plus refit, excluding input checks and test scoring
    num_iterations: int = 0  # L-BFGS iterations over the sweep and the refit
    num_classes: int = 0

    def metrics(self) -> dict[str, float]:
        """Scalar metrics, ready to log."""
        return {
            "top1": self.top1,
            "top5": self.top5,
            "mean_per_class_recall": self.mean_per_class_recall,
            "chosen_l2": self.chosen_l2,
            "fit_seconds": self.fit_seconds,
        }


@dataclass
class LogRegModel:
    """A fitted multinomial logistic regression, on features already passed through the transform."""

    weight: torch.Tensor  # (C, D) float64
    bias: torch.Tensor  # (C,) float64
    l2: float
    num_iterations: int = 0

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T + self.bias  # (N, C)


@dataclass
class Sweep:
    """Result of the l2 sweep on train, scored on val."""

    val_top1_by_l2: dict[float, float]
    best: LogRegModel  # model at the chosen l2, fitted on train
    num_iterations: int  # L-BFGS iterations over the whole sweep


def sklearn_c(l2: float, num_samples: int) -> float:
    """scikit-learn's ``C`` that gives the same optimum as ``l2`` on ``num_samples`` rows."""
    return 1.0 / (l2 * num_samples)


@dataclass(frozen=True)
class FeatureTransform:
    """Preprocessing fitted on train and applied to every split: (N, D) -> (N, D) float64."""

    normalize: bool
    mean: np.ndarray  # (D,) train mean after row normalisation
    scale: np.ndarray  # (D,) ones, or 1 / (std * sqrt(D)) when standardising (0 for constant dims)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = l2_normalize(x) if self.normalize else x
        return (x - self.mean) * self.scale


def fit_transform(x_train: np.ndarray, normalize: bool, standardize: bool) -> FeatureTransform:
    """Fit the module's preprocessing on train features.

    Standardising gives constant train dimensions a scale of 0: they carry no train signal (the
    penalty keeps their weights at 0 anyway) and would otherwise blow up on other splits.
    """
    x = l2_normalize(x_train) if normalize else x_train
    mean = x.mean(axis=0)  # (D,)
    if not standardize:
        return FeatureTransform(normalize, mean, np.ones_like(mean))
    std = x.std(axis=0)  # (D,)
    varying = std > 1e-8 * std.max()  # (D,) bool
    scale = np.zeros_like(mean)
    scale[varying] = 1.0 / (std[varying] * np.sqrt(varying.sum()))
    return FeatureTransform(normalize, mean, scale)


def prior_init(y: torch.Tensor, num_classes: int, dim: int) -> LogRegModel:
    """W = 0 and b = log class frequencies: the optimum as l2 -> infinity (absent classes get -30)."""
    counts = torch.bincount(y, minlength=num_classes).to(torch.float64)  # (C,)
    bias = torch.log(counts / counts.sum()).clamp_min(-30.0)
    return LogRegModel(torch.zeros(num_classes, dim, dtype=torch.float64), bias, l2=float("inf"))


def logreg_loss_and_grad(
    x: torch.Tensor, onehot: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, l2: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Objective and its analytic gradients; ``onehot`` is (C, N) so every product is BLAS-friendly."""
    n = x.shape[0]
    logits = torch.addmm(bias[:, None], weight, x.T)  # (C, N)
    logp = torch.log_softmax(logits, dim=0)  # (C, N)
    loss = -(logp * onehot).sum() / n + 0.5 * l2 * weight.square().sum()
    resid = logp.exp_().sub_(onehot)  # (C, N): n * d mean-CE / d logits, in place of logp
    grad_w = torch.addmm(weight, resid, x, beta=l2, alpha=1.0 / n)  # (C, D): resid @ x / n + l2 * W
    grad_b = resid.sum(dim=1) / n  # (C,)
    return loss, grad_w, grad_b


def fit_logreg(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    l2: float,
    *,
    init: LogRegModel | None = None,
    max_iter: int = 1000,
    tol: float = DEFAULT_TOL,
) -> LogRegModel:
    """Minimise the module objective on (x (N, D) float64, y (N,) int64) with full-batch L-BFGS."""
    if init is None:
        init = prior_init(y, num_classes, x.shape[1])
    weight = init.weight.clone()  # (C, D)
    bias = init.bias.clone()  # (C,)
    onehot = torch.zeros(num_classes, x.shape[0], dtype=torch.float64)  # (C, N)
    onehot[y, torch.arange(x.shape[0])] = 1.0
    opt = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=1e-12,
        history_size=HISTORY_SIZE,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        loss, weight.grad, bias.grad = logreg_loss_and_grad(x, onehot, weight, bias, l2)
        return loss

    opt.step(closure)
    return LogRegModel(weight, bias, l2, num_iterations=int(opt.state[weight]["n_iter"]))


def extrapolate(prev: LogRegModel, cur: LogRegModel, l2: float) -> LogRegModel:
    """Warm start for ``l2``: a secant step along the regularisation path, linear in log(l2).

    The path (W, b)(l2) is smooth in log(l2), so continuing the last step lands much closer to
    the next optimum than ``cur`` itself. It is only a starting point: the fit is exact either way.
    """
    if not math.isfinite(prev.l2):  # cur is the first fit; there is no step to continue yet
        return cur
    r = math.log(l2 / cur.l2) / math.log(cur.l2 / prev.l2)
    return LogRegModel(cur.weight + r * (cur.weight - prev.weight), cur.bias + r * (cur.bias - prev.bias), l2)


@contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Run the block with ``num_threads`` torch intra-op threads (None: unchanged), then restore.

    torch's thread count is process-wide; the lock keeps concurrent probes from restoring each
    other's setting out of order.
    """
    if num_threads is None:
        yield
        return
    with _THREADS_LOCK:
        before = torch.get_num_threads()
        torch.set_num_threads(num_threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def default_threads(num_rows: int, dim: int, num_classes: int) -> int | None:
    """1 for small problems (see SINGLE_THREAD_BELOW), else None to keep torch's setting."""
    return 1 if num_rows * dim * num_classes < SINGLE_THREAD_BELOW else None


def correct_count(model: LogRegModel, x: torch.Tensor, y: torch.Tensor) -> int:
    return int((model.scores(x).argmax(dim=1) == y).sum())


def sweep_l2(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    num_classes: int,
    l2_grid: tuple[float, ...],
    *,
    max_iter: int = 1000,
    tol: float = DEFAULT_TOL,
) -> Sweep:
    """Fit train from strong to weak l2 with warm starts; keep the best val top-1 (ties: stronger l2)."""
    prev = model = prior_init(y_train, num_classes, x_train.shape[1])
    best, best_correct = model, -1
    val_top1: dict[float, float] = {}
    iterations = 0
    for l2 in sorted(l2_grid, reverse=True):
        init = extrapolate(prev, model, l2)
        prev, model = model, fit_logreg(x_train, y_train, num_classes, l2, init=init, max_iter=max_iter, tol=tol)
        iterations += model.num_iterations
        correct = correct_count(model, x_val, y_val)
        val_top1[l2] = correct / len(y_val)
        if correct > best_correct:  # strict: an equal later (weaker) l2 does not replace it
            best, best_correct = model, correct
    return Sweep(dict(sorted(val_top1.items())), best, iterations)


def linear_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    l2_grid: tuple[float, ...] | None = None,
    normalize: bool = True,
    refit_on_trainval: bool = True,
    max_iter: int = 1000,
    num_classes: int | None = None,
    tol: float = DEFAULT_TOL,
    standardize: bool = True,
    num_threads: int | None = None,
) -> LinearProbeResult:
    """Select l2 on val, refit on train (+ val), report test top-1/top-5/per-class recall.

    ``num_classes`` defaults to one more than the largest train/val label; test labels never
    enlarge it (a test label outside that range is a DataError asking for ``num_classes``).
    ``num_threads`` sets torch's intra-op threads during the fit and restores them after; by
    default small problems use 1 thread and larger ones keep torch's setting.
    """
    train = check_split("train", x_train, y_train)
    val = check_split("val", x_val, y_val)
    test = check_split("test", x_test, y_test)
    check_splits(train, val, test)
    require_classes(train)
    num_classes = resolve_num_classes(num_classes, [train, val], [test])
    grid = check_l2_grid(l2_grid, DEFAULT_L2_GRID)

    transform = fit_transform(train.x, normalize, standardize)

    def prepare(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(transform(x))  # (N, D) float64

    xt, yt = prepare(train.x), torch.from_numpy(train.y)
    xv, yv = prepare(val.x), torch.from_numpy(val.y)

    if num_threads is None:
        num_threads = default_threads(len(yt) + len(yv), xt.shape[1], num_classes)
    start = time.perf_counter()
    with torch_threads(num_threads):
        sweep = sweep_l2(xt, yt, xv, yv, num_classes, grid, max_iter=max_iter, tol=tol)
        final, iterations = sweep.best, sweep.num_iterations
        if refit_on_trainval:
            xtv, ytv = torch.cat([xt, xv]), torch.cat([yt, yv])
            final = fit_logreg(xtv, ytv, num_classes, final.l2, init=final, max_iter=max_iter, tol=tol)
            iterations += final.num_iterations
    fit_seconds = time.perf_counter() - start

    scores = final.scores(prepare(test.x)).numpy()  # (N_test, C)
    pred = scores.argmax(axis=1)
    confusion = confusion_matrix(test.y, pred, num_classes)
    return LinearProbeResult(
        top1=float(np.mean(pred == test.y)),
        top5=topk_accuracy(scores, test.y, 5),
        mean_per_class_recall=mean_per_class_recall(confusion),
        chosen_l2=sweep.best.l2,
        val_top1_by_l2=sweep.val_top1_by_l2,
        confusion=confusion,
        per_class_recall=per_class_recall(confusion),
        test_pred=pred,
        fit_seconds=fit_seconds,
        num_iterations=iterations,
        num_classes=num_classes,
    )
