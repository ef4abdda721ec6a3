"""Linear probe: L2-regularised multinomial logistic regression, CLIP-style l2 sweep.

The objective for weights ``W`` (C, D) and bias ``b`` (C,) on N training rows is

    loss(W, b) = mean_i CE(W x_i + b, y_i) + l2 / 2 * ||W||_F^2        (bias unpenalised)

which is scikit-learn's ``LogisticRegression`` objective divided by ``C * N``: the same model as
``LogisticRegression(C=1 / (l2 * N))`` fitted on the same N rows (:func:`sklearn_c`). It is
solved in float64 with full-batch L-BFGS (``torch.optim.LBFGS``, strong-Wolfe line search) and
analytic gradients.

Protocol (:func:`linear_probe`): sweep ``l2`` from strong to weak regularisation on train, each
fit warm-started from the previous solution; pick the l2 with the best val top-1 (ties go to the
stronger regularisation); refit at that l2 on train (+ val); score once on test. Test data is only
read after the choice, so it cannot influence it.

Features are optionally L2-normalised per row (``normalize``) and always centred on the train
mean. Centring is an exact reparameterisation, since the bias is unpenalised (W is unchanged and
b absorbs ``-W mu``), so it changes no prediction; it only conditions the problem better.
"""

from __future__ import annotations

import math
import time
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

# Half-decade steps from 1e-7 (close to unregularised for unit-norm features) to 1 (a constant
# classifier). With unit-norm features the useful optimum sits inside this range for N from ~1e2 to ~1e6.
DEFAULT_L2_GRID: tuple[float, ...] = tuple(float(v) for v in 10.0 ** np.linspace(-7.0, 0.0, 15))
# Gradient tolerance with scikit-learn's meaning for lbfgs: stop when max |grad| <= tol.
DEFAULT_TOL = 1e-4
# L-BFGS memory, as scikit-learn/scipy (maxcor=10); torch's default of 100 only adds overhead here.
HISTORY_SIZE = 10


@dataclass
class LinearProbeResult:
    top1: float
    top5: float  # top-min(5, C)
    mean_per_class_recall: float  # over classes present in test
    chosen_l2: float
    val_top1_by_l2: dict[float, float]
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
    """A fitted multinomial logistic regression on centred features."""

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


def preprocess_features(x: np.ndarray, normalize: bool) -> np.ndarray:
    """Row L2 normalisation if ``normalize``, else the features as they are (float64)."""
    return l2_normalize(x) if normalize else x


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
    logits = weight @ x.T + bias[:, None]  # (C, N)
    lse = torch.logsumexp(logits, dim=0)  # (N,)
    loss = (lse.sum() - (logits * onehot).sum()) / n + 0.5 * l2 * weight.square().sum()
    resid = (torch.exp(logits - lse) - onehot) / n  # (C, N) = d mean-CE / d logits
    grad_w = resid @ x + l2 * weight  # (C, D)
    grad_b = resid.sum(dim=1)  # (C,)
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
) -> LinearProbeResult:
    """Select l2 on val, refit on train (+ val), report test top-1/top-5/per-class recall.

    ``num_classes`` defaults to one more than the largest train/val label; test labels never
    enlarge it (a test label outside that range is a DataError asking for ``num_classes``).
    """
    train = check_split("train", x_train, y_train)
    val = check_split("val", x_val, y_val)
    test = check_split("test", x_test, y_test)
    check_splits(train, val, test)
    require_classes(train)
    num_classes = resolve_num_classes(num_classes, [train, val], [test])
    grid = check_l2_grid(l2_grid, DEFAULT_L2_GRID)

    mean = preprocess_features(train.x, normalize).mean(axis=0)  # (D,)

    def prepare(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(preprocess_features(x, normalize) - mean)  # (N, D) float64

    xt, yt = prepare(train.x), torch.from_numpy(train.y)
    xv, yv = prepare(val.x), torch.from_numpy(val.y)

    start = time.perf_counter()
    sweep = sweep_l2(xt, yt, xv, yv, num_classes, grid, max_iter=max_iter, tol=tol)
    final, iterations = sweep.best, sweep.num_iterations
    if refit_on_trainval:
        final = fit_logreg(
            torch.cat([xt, xv]), torch.cat([yt, yv]), num_classes, final.l2, init=final, max_iter=max_iter, tol=tol
        )
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
