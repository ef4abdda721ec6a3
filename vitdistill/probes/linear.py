"""Linear probe: L2-regularised multinomial logistic regression, CLIP-style l2 sweep.

The objective for weights ``W`` (C, D) and bias ``b`` (C,) on N training rows is

    loss(W, b) = mean_i CE(W x_i + b, y_i) + l2 / 2 * ||W||_F^2        (bias unpenalised)

which is scikit-learn's ``LogisticRegression`` objective divided by ``C * N``: the same model as
``LogisticRegression(C=1 / (l2 * N))`` fitted on the same N rows (:func:`sklearn_c`). Note that
the refit on train + val keeps l2, so its scikit-learn equivalent uses that larger N. It is
solved with full-batch L-BFGS and analytic gradients until max |gradient| <= ``tol``
(scikit-learn's lbfgs criterion and default), by a solver written for this objective
(:func:`minimise`): the bias is a column of ones, so logits and gradient are one product each,
and the strong-Wolfe line search runs on the logits alone, so an iteration costs two products
with the features, which dominate its cost.

Protocol (:func:`linear_probe`): sweep ``l2`` from strong to weak regularisation on train, each
fit warm-started by extrapolating the last two solutions along the path and by the L-BFGS memory
of the previous fit (:class:`Curvature`), preconditioned by the top principal directions of the
train features (:class:`Preconditioner`), in float32; pick the l2 with the best val top-1 (ties
go to the stronger regularisation); refit at that l2 on train (+ val), warm-started from the
train fit, finished in float64 so the model meets ``tol`` in float64; score once on test. Test
data is only read after the choice, so it cannot influence it.

Features (:class:`FeatureTransform`, fitted on train only) are L2-normalised per row
(``normalize``), centred on the train mean, and standardised (``standardize``): each dimension is
divided by its train standard deviation and by sqrt(D), so rows keep a mean squared norm of 1 and
the l2 grid means the same with or without it. Centring is an exact reparameterisation, since the
bias is unpenalised (W is unchanged and b absorbs ``-W mu``), so it is always done. Standardising
changes the model (the penalty acts on standardised dimensions, as with MAE's non-affine
BatchNorm before its linear probe) and conditions the problem much better: on anisotropic
features the unstandardised result can move by several points with the solver tolerance, and
with it the agreement with other solvers. Standardised, the near-unregularised end of the grid can
still be barely determined at tol 1e-4 (on the digits cache the val top-1 of l2 <= 3e-7 differs by
one image depending on where a solver stops, which decides the choice), so compare solvers against
a converged reference (``benchmarks/bench_linear_probe.py`` prints one).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from vitdistill.probes.inputs import (
    check_l2_grid,
    check_split,
    check_splits,
    l2_normalize,
    read_rows,
    require_classes,
    resolve_num_classes,
    row_chunks,
    unit_rows,
)
from vitdistill.probes.metrics import confusion_matrix, mean_per_class_recall, per_class_recall, topk_hits
from vitdistill.errors import DataError

# Half-decade steps, CLIP-style. For unit-norm features, l2 = 1 already gives a near-constant
# classifier and 1e-7 is close to unregularised (scikit-learn C = 1e7 / N).
DEFAULT_L2_GRID: tuple[float, ...] = tuple(float(v) for v in 10.0 ** np.linspace(-7.0, 0.0, 15))
# Gradient tolerance with scikit-learn's meaning for lbfgs: stop when max |grad| <= tol.
DEFAULT_TOL = 1e-4
# L-BFGS memory, as scikit-learn/scipy (maxcor=10).
HISTORY_SIZE = 10
# Line search: sufficient decrease (Armijo) and strong-Wolfe curvature constants.
ARMIJO = 1e-4
CURVATURE = 0.5
LINE_SEARCH_TRIES = 20
# Top principal directions of the train rows that the L-BFGS preconditioner flattens (Preconditioner).
PRECONDITIONER_RANK = 8
# The l2 sweep only decides the choice on val; the refit is finished in float64 (refit()).
SWEEP_DTYPE = torch.float32
# Rows are built (features -> transform -> solver dtype) in chunks of about this many float64 bytes.
ROW_BUILD_CHUNK_BYTES = 2**23
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
    classifier: LinearClassifier | None = None  # the fitted probe (transform + weights), to reuse elsewhere

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
class LinearClassifier:
    """A fitted linear probe as data: raw features -> logits through the fitted transform. Saved as a plain
    ``.npz`` (no pickle), so every stage that reports a teacher number uses this one model."""

    normalize: bool
    mean: np.ndarray  # (D,) float64
    scale: np.ndarray  # (D,) float64
    weight: np.ndarray  # (C, D) float64
    bias: np.ndarray  # (C,) float64
    l2: float

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(N, D) raw features -> (N, C) float64 scores."""
        t = FeatureTransform(self.normalize, self.mean, self.scale)(np.asarray(x, dtype=np.float64))
        return t @ self.weight.T + self.bias

    def save(self, url: str) -> None:
        import io

        from vitdistill.cache import fs

        buf = io.BytesIO()
        np.savez(buf, normalize=np.array(self.normalize), mean=self.mean, scale=self.scale, weight=self.weight,
                 bias=self.bias, l2=np.array(self.l2))
        fs.write_bytes_atomic(url, buf.getvalue())

    @classmethod
    def load(cls, url: str) -> LinearClassifier:
        import io

        from vitdistill.cache import fs

        try:
            z = np.load(io.BytesIO(fs.read_bytes(url)), allow_pickle=False)
            return cls(bool(z["normalize"]), z["mean"], z["scale"], z["weight"], z["bias"], float(z["l2"]))
        except (ValueError, KeyError, OSError) as e:
            raise DataError(f"{url}: not a saved linear probe ({e})") from None


@dataclass
class LogRegModel:
    """A fitted multinomial logistic regression, on features already passed through the transform."""

    weight: torch.Tensor  # (C, D) float64
    bias: torch.Tensor  # (C,) float64
    l2: float
    num_iterations: int = 0

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T + self.bias  # (N, C)

    def theta(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``[W | b]`` (C, D + 1), the solver's parameters (see :class:`Rows`); :meth:`Fit.model` inverts it."""
        return torch.cat([self.weight, self.bias[:, None]], dim=1).to(dtype)


@dataclass
class Sweep:
    """Result of the l2 sweep on train, scored on val."""

    val_top1_by_l2: dict[float, float]
    best: LogRegModel  # model at the chosen l2, fitted on train
    num_iterations: int  # L-BFGS iterations over the whole sweep
    curvature: Curvature  # L-BFGS memory at ``best``, to warm-start the refit with
    precond: Preconditioner  # from the train rows


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
    """Fit the module's preprocessing on train features, in float64, reading them chunk by chunk (two
    passes: the mean, then the squared deviations from it, as ``np.std`` computes them).

    Standardising gives constant train dimensions a scale of 0: they carry no train signal (the
    penalty keeps their weights at 0 anyway) and would otherwise blow up on other splits.
    """
    n, dim = x_train.shape
    total = np.zeros(dim)
    for rows in row_chunks(n, dim):
        total += unit_rows(x_train, rows, normalize).sum(axis=0)
    mean = total / n  # (D,)
    if not standardize:
        return FeatureTransform(normalize, mean, np.ones_like(mean))
    squares = np.zeros(dim)
    for rows in row_chunks(n, dim):
        squares += np.square(unit_rows(x_train, rows, normalize) - mean).sum(axis=0)
    std = np.sqrt(squares / n)  # (D,)
    varying = std > 1e-8 * std.max()  # (D,) bool
    scale = np.zeros_like(mean)
    scale[varying] = 1.0 / (std[varying] * np.sqrt(varying.sum()))
    return FeatureTransform(normalize, mean, scale)


def prior_init(y: torch.Tensor, num_classes: int, dim: int) -> LogRegModel:
    """W = 0 and b = log class frequencies: the optimum as l2 -> infinity (absent classes get -30)."""
    counts = torch.bincount(y, minlength=num_classes).to(torch.float64)  # (C,)
    bias = torch.log(counts / counts.sum()).clamp_min(-30.0)
    return LogRegModel(torch.zeros(num_classes, dim, dtype=torch.float64, device=y.device), bias, l2=float("inf"))


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


def one_hot_columns(y: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """(N,) labels -> (C, N) one-hot columns on ``y``'s device."""
    onehot = torch.zeros(num_classes, len(y), dtype=dtype, device=y.device)
    onehot[y, torch.arange(len(y), device=y.device)] = 1.0
    return onehot


@dataclass
class Rows:
    """Rows prepared for the solver, with the bias folded in as a trailing column of ones.

    The parameters are then one matrix ``theta = [W | b]`` (C, D + 1), the logits one product
    ``theta @ x.T`` and the gradient one product ``resid @ x``.
    """

    x: torch.Tensor  # (N, D + 1): features, then ones
    onehot: torch.Tensor  # (C, N)

    @classmethod
    def build(cls, x: torch.Tensor, y: torch.Tensor, num_classes: int, dtype: torch.dtype) -> Rows:
        """From features already transformed, (N, D) on the device they are solved on."""
        xa = torch.ones(x.shape[0], x.shape[1] + 1, dtype=dtype, device=x.device)
        xa[:, :-1] = x
        return cls(xa, one_hot_columns(y, num_classes, dtype))

    @classmethod
    def from_features(cls, xs: list[np.ndarray], y: torch.Tensor, transform: FeatureTransform, num_classes: int,
                      dtype: torch.dtype) -> Rows:
        """From raw features (the splits ``xs`` one after the other, arrays or memory maps), passed through
        ``transform`` in float64 chunk by chunk and stored once, in ``dtype`` on ``y``'s device: no whole
        float64 copy is made unless ``dtype`` is float64. The transform's float64 temporaries (the
        normalised rows, minus the mean, times the scale) are ~4 chunks at a time, so the chunks are
        ROW_BUILD_CHUNK_BYTES (8 MiB), not the 64 MiB of a read: they were the probe's peak, ~260 MiB
        above the rows themselves. The transform is row-wise, so the rows are the same either way."""
        dim = xs[0].shape[1]
        xa = torch.ones(len(y), dim + 1, dtype=dtype, device=y.device)  # (N, D + 1)
        at = 0
        for x in xs:
            for rows in row_chunks(len(x), dim, chunk_bytes=ROW_BUILD_CHUNK_BYTES):
                xa[at + rows.start:at + rows.stop, :-1] = torch.from_numpy(transform(read_rows(x, rows))).to(y.device)
            at += len(x)
        return cls(xa, one_hot_columns(y, num_classes, dtype))

    def to(self, dtype: torch.dtype) -> Rows:
        return Rows(self.x.to(dtype), self.onehot.to(dtype))

    def grad(self, theta: torch.Tensor, logits: torch.Tensor, l2: float) -> torch.Tensor:
        """Gradient (C, D + 1) of the objective at ``theta``, given its ``logits = theta @ x.T``."""
        resid = torch.softmax(logits, dim=0).sub_(self.onehot)  # (C, N)
        g = resid @ self.x  # (C, D + 1)
        g.div_(self.x.shape[0])
        g[:, :-1].add_(theta[:, :-1], alpha=l2)  # the bias column is not penalised
        return g


@dataclass
class Preconditioner:
    """L-BFGS's initial inverse Hessian ``H0``, from the top principal directions of the train rows.

    Near the prior the cross-entropy Hessian in W is about ``(1/C) X^T X / N`` per class, plus l2
    (softmax curvature is ~1/C for C balanced classes), and in b about ``1/C``: the bias is the
    stiffest direction and the top eigenvectors of ``X^T X / N`` the next ones, far above the rest
    (features are centred and scaled to a mean squared row norm of 1, so the D eigenvalues average
    1/D). ``H0`` brings those k + 1 directions down to the curvature of the (k+1)-th eigenvalue and
    leaves the rest to L-BFGS's usual scalar. It only shapes the steps: the optimum is unchanged.
    """

    basis: torch.Tensor  # (D, k) top eigenvectors of X^T X / N
    eigvals: torch.Tensor  # (k + 1,) float64 matching eigenvalues, descending; the last is the level
    num_classes: int

    @classmethod
    def estimate(cls, x: torch.Tensor, num_classes: int, rank: int, oversample: int = 8) -> Preconditioner:
        """Top ``rank + 1`` eigenpairs of ``x.T @ x / N`` (x (N, D) centred) by two power iterations.

        A randomized subspace iteration with a fixed seed: a handful of thin products instead of a
        D x D eigendecomposition, and the same result on every run. Exact when the block spans D.
        """
        n, dim = x.shape
        width = min(dim, rank + 1 + oversample)
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(dim, width, generator=gen, dtype=torch.float64).to(x.device, x.dtype)  # (D, width)
        for _ in range(2):
            q = torch.linalg.qr(x.T @ (x @ q)).Q  # (D, width) orthonormal
        xq = (x @ q).double()  # (N, width)
        eigvals, vecs = torch.linalg.eigh(xq.T @ xq / n)  # ascending
        eigvals, vecs = eigvals.flip(0), vecs.flip(1)
        keep = min(rank, width - 1)
        basis = q @ vecs[:, :keep].to(x.dtype)  # (D, k)
        return cls(basis, eigvals[: keep + 1].clamp_min(0.0), num_classes)

    def to(self, dtype: torch.dtype) -> Preconditioner:
        return Preconditioner(self.basis.to(dtype), self.eigvals, self.num_classes)

    def apply(self, q: torch.Tensor, l2: float) -> torch.Tensor:
        """``H0 @ q`` for a (C, D + 1) gradient-shaped ``q``, up to L-BFGS's scalar."""
        a = 1.0 / self.num_classes  # softmax curvature near the prior
        level = a * float(self.eigvals[-1]) + l2
        shrink = (level / (a * self.eigvals[:-1] + l2) - 1.0).to(q.dtype)  # (k,)
        out = q.clone()
        out[:, :-1] += ((q[:, :-1] @ self.basis) * shrink) @ self.basis.T
        out[:, -1] *= level / a
        return out


@dataclass
class Curvature:
    """L-BFGS memory: the last steps ``s`` and gradient changes ``y`` (each (C, D + 1)), at ``l2``."""

    s: list[torch.Tensor]
    y: list[torch.Tensor]
    l2: float

    def at(self, l2: float) -> Curvature:
        """The same pairs for the objective at ``l2``: its Hessian differs by (l2 - self.l2) on W.

        Reusing the memory along the path means a new fit starts with the curvature the last one
        learned instead of rebuilding it from a scaled gradient step.
        """
        y = []
        for s_i, y_i in zip(self.s, self.y, strict=True):
            y_i = y_i.clone()
            y_i[:, :-1].add_(s_i[:, :-1], alpha=l2 - self.l2)
            y.append(y_i)
        return Curvature(list(self.s), y, l2)

    def push(self, s: torch.Tensor, y: torch.Tensor) -> None:
        """Keep the pair if it has positive curvature (always, up to rounding: the objective is convex)."""
        if float(torch.vdot(s.flatten(), y.flatten())) > 1e-10 * float(torch.vdot(y.flatten(), y.flatten())):
            self.s.append(s)
            self.y.append(y)
            if len(self.s) > HISTORY_SIZE:
                del self.s[0], self.y[0]

    def direction(self, g: torch.Tensor, precond: Preconditioner) -> torch.Tensor:
        """Two-loop recursion: ``-H g`` with ``H`` the L-BFGS inverse Hessian built on ``H0``."""
        pairs = [(s.flatten(), y.flatten()) for s, y in zip(self.s, self.y, strict=True)]
        rho = [1.0 / float(torch.vdot(s, y)) for s, y in pairs]
        q = g.flatten().clone()
        alpha = []
        for (s, y), r in zip(reversed(pairs), reversed(rho), strict=True):
            alpha.append(r * float(torch.vdot(s, q)))
            q.add_(y, alpha=-alpha[-1])
        q = precond.apply(q.view_as(g), self.l2).flatten()
        if pairs:  # scale H0 by s.y / y.H0.y from the newest pair, as usual
            s, y = pairs[-1]
            q.mul_(float(torch.vdot(s, y)) / float(torch.vdot(y, precond.apply(self.y[-1], self.l2).flatten())))
        else:  # no curvature yet: a short first step, which the line search then sizes
            q.mul_(min(1.0, 1.0 / float(g.abs().sum())))
        for (s, y), r, a in zip(pairs, rho, reversed(alpha), strict=True):
            q.add_(s, alpha=a - r * float(torch.vdot(y, q)))
        return q.neg_().view_as(g)


def line_search(
    logits: torch.Tensor, step_logits: torch.Tensor, onehot: torch.Tensor, wd: float, dd: float, l2: float
) -> float:
    """Step length t along a descent direction d meeting the strong Wolfe conditions; 0 if none found.

    ``phi(t) = f(theta + t d)`` only needs the (C, N) logits ``logits + t * step_logits`` (with
    ``step_logits = d @ x.T``) and the change of the penalty, a quadratic in t from ``wd = W.dW``
    and ``dd = |dW|^2``: every trial is O(C N), without touching x. Trials follow safeguarded
    Newton steps on phi' from t = 1, in float64 whatever the solver dtype, with ``phi(t) - phi(0)``
    summed from ``log1p(sum_c p_c expm1(t z_c))`` so that it stays exact for the tiny steps of a
    tight tolerance.
    """
    n = logits.shape[1]
    logp0 = torch.log_softmax(logits.double(), dim=0)  # (C, N)
    p0 = logp0.exp()
    z = step_logits.double()  # (C, N)
    z_true = float((z * onehot).sum()) / n  # mean change of the true-class logit per unit t
    slope0 = float((p0 * z).sum()) / n - z_true + l2 * wd  # phi'(0) < 0
    lo, hi, t = 0.0, math.inf, 1.0
    best_t, best_change = 0.0, 0.0
    for _ in range(LINE_SEARCH_TRIES):
        tz = (t * z).clamp_max(700.0)  # (C, N); keeps expm1 finite on absurd trial steps
        lse_change = torch.log1p((p0 * torch.expm1(tz)).sum(dim=0))  # (N,) lse(l + t z) - lse(l)
        change = float(lse_change.sum()) / n - t * z_true + l2 * (t * wd + 0.5 * t * t * dd)  # phi(t) - phi(0)
        p = torch.softmax(logp0 + tz, dim=0)  # (C, N)
        pz = (p * z).sum(dim=0)  # (N,)
        slope = float(pz.sum()) / n - z_true + l2 * (wd + t * dd)  # phi'(t)
        sufficient = change <= ARMIJO * t * slope0
        if sufficient and abs(slope) <= CURVATURE * abs(slope0):
            return t
        if change < best_change:
            best_t, best_change = t, change
        if not sufficient or slope > 0:
            hi = t
        else:
            lo = t
        curvature = float((p * z * z).sum() - pz.square().sum()) / n + l2 * dd  # phi''(t)
        t_next = t - slope / curvature if curvature > 0 else math.nan
        if not lo < t_next < hi:  # Newton left the bracket: bisect, or expand while unbounded
            t_next = 0.5 * (lo + hi) if math.isfinite(hi) else 4.0 * t
        t = t_next
    return best_t


@dataclass
class Fit:
    """Solver state at a solution of the objective at ``l2``."""

    theta: torch.Tensor  # (C, D + 1): [W | b]
    l2: float
    curvature: Curvature
    num_iterations: int = 0

    def model(self) -> LogRegModel:
        theta = self.theta.to(torch.float64)
        return LogRegModel(theta[:, :-1].contiguous(), theta[:, -1].contiguous(), self.l2, self.num_iterations)


def minimise(
    rows: Rows,
    theta: torch.Tensor,
    l2: float,
    precond: Preconditioner,
    curvature: Curvature | None = None,
    *,
    max_iter: int = 1000,
    tol: float = DEFAULT_TOL,
) -> Fit:
    """L-BFGS from ``theta`` (C, D + 1) until max |gradient| <= ``tol``, in the dtype of ``rows``.

    Two products with x per iteration (the step's logits, then the new gradient): the line search
    works on logits alone, and the logits are updated along the step, not recomputed.
    ``curvature`` is memory to start from (see :meth:`Curvature.at`).
    """
    memory = Curvature([], [], l2) if curvature is None else curvature.at(l2)
    logits = theta @ rows.x.T  # (C, N)
    g = rows.grad(theta, logits, l2)
    iterations = 0
    while float(g.abs().max()) > tol and iterations < max_iter:
        d = memory.direction(g, precond)  # (C, D + 1)
        if float(torch.vdot(g.flatten(), d.flatten())) >= 0:  # stale memory (rounding): restart from H0
            memory = Curvature([], [], l2)
            d = memory.direction(g, precond)
        step_logits = d @ rows.x.T  # (C, N)
        wd, dd = float((theta[:, :-1] * d[:, :-1]).sum()), float(d[:, :-1].square().sum())
        t = line_search(logits, step_logits, rows.onehot, wd, dd, l2)
        if t == 0.0:  # no step lowers the objective in this precision: as converged as it gets
            break
        theta = theta + t * d
        logits = logits + t * step_logits
        g_next = rows.grad(theta, logits, l2)
        memory.push(t * d, g_next - g)
        g = g_next
        iterations += 1
    return Fit(theta, l2, memory, iterations)


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
    """Minimise the module objective on (x (N, D), y (N,) int64) in x's dtype, from ``init`` or the prior."""
    if init is None:
        init = prior_init(y, num_classes, x.shape[1])
    theta = init.theta(x.dtype)  # (C, D + 1)
    precond = Preconditioner.estimate(x, num_classes, PRECONDITIONER_RANK)
    rows = Rows.build(x, y, num_classes, x.dtype)
    return minimise(rows, theta, l2, precond, max_iter=max_iter, tol=tol).model()


def extrapolate(prev: Fit | None, cur: Fit, l2: float) -> torch.Tensor:
    """Warm start theta for ``l2``: a secant step along the regularisation path, linear in log(l2).

    The path theta(l2) is smooth in log(l2), so continuing the last step lands much closer to
    the next optimum than ``cur`` itself. It is only a starting point: the fit is exact either way.
    """
    if prev is None:
        return cur.theta
    r = math.log(l2 / cur.l2) / math.log(cur.l2 / prev.l2)
    return cur.theta + r * (cur.theta - prev.theta)


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
    """Fit train from strong to weak l2 with warm starts; keep the best val top-1 (ties: stronger l2).

    Solved in SWEEP_DTYPE: the choice only needs val predictions, and float32 halves the cost of
    every product while its gradient stays accurate far below ``tol``.
    """
    rows = Rows.build(x_train, y_train, num_classes, SWEEP_DTYPE)
    val_rows = Rows.build(x_val, y_val, num_classes, SWEEP_DTYPE)
    return sweep_rows(rows, y_train, val_rows, y_val, num_classes, l2_grid, max_iter=max_iter, tol=tol)


def sweep_rows(
    rows: Rows,
    y_train: torch.Tensor,
    val_rows: Rows,
    y_val: torch.Tensor,
    num_classes: int,
    l2_grid: tuple[float, ...],
    *,
    max_iter: int = 1000,
    tol: float = DEFAULT_TOL,
) -> Sweep:
    """:func:`sweep_l2` on rows already built in SWEEP_DTYPE."""
    precond = Preconditioner.estimate(rows.x[:, :-1], num_classes, PRECONDITIONER_RANK)
    prior = prior_init(y_train, num_classes, rows.x.shape[1] - 1)
    theta = prior.theta(SWEEP_DTYPE)  # (C, D + 1)
    prev, fit = None, Fit(theta, prior.l2, Curvature([], [], prior.l2))
    best, best_correct = fit, -1
    val_top1: dict[float, float] = {}
    iterations = 0
    for l2 in sorted(l2_grid, reverse=True):
        theta = extrapolate(prev, fit, l2)
        on_path = fit if math.isfinite(fit.l2) else None  # the prior is no point to extrapolate from
        prev, fit = on_path, minimise(rows, theta, l2, precond, fit.curvature, max_iter=max_iter, tol=tol)
        iterations += fit.num_iterations
        correct = int(((fit.theta @ val_rows.x.T).argmax(dim=0) == y_val).sum())
        val_top1[l2] = correct / len(y_val)
        if correct > best_correct:  # strict: an equal later (weaker) l2 does not replace it
            best, best_correct = fit, correct
    return Sweep(dict(sorted(val_top1.items())), best.model(), iterations, best.curvature, precond)


def refit(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, sweep: Sweep, *, max_iter: int, tol: float
) -> LogRegModel:
    """Refit at the chosen l2 on (x, y), warm-started from the sweep: in SWEEP_DTYPE, then float64.

    The float64 pass starts at the float32 solution, so it usually only confirms max |gradient|
    <= ``tol`` in float64 (one logits and one gradient product), and iterates only where not: the
    returned model meets the tolerance in float64.
    """
    return refit_rows(lambda dtype: Rows.build(x, y, num_classes, dtype), sweep, max_iter=max_iter, tol=tol)


def refit_rows(build: Callable[[torch.dtype], Rows], sweep: Sweep, *, max_iter: int, tol: float) -> LogRegModel:
    """:func:`refit` on the rows ``build(dtype)`` gives, built once per pass: the float32 rows are freed
    before the float64 ones exist, so the peak is the float64 rows (the numerics of the final pass need
    them: its gradient is checked against ``tol`` in float64)."""
    l2 = sweep.best.l2
    theta = sweep.best.theta()  # (C, D + 1) float64
    rows = build(SWEEP_DTYPE)
    fast = minimise(rows, theta.to(SWEEP_DTYPE), l2, sweep.precond, sweep.curvature, max_iter=max_iter, tol=tol)
    del rows
    exact = minimise(build(torch.float64), fast.theta.double(), l2, sweep.precond.to(torch.float64),
                     max_iter=max_iter, tol=tol)
    exact.num_iterations += fast.num_iterations
    return exact.model()


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
    device: str | None = None,
) -> LinearProbeResult:
    """Select l2 on val, refit on train (+ val), report test top-1/top-5/per-class recall.

    ``num_classes`` defaults to one more than the largest train/val label; test labels never
    enlarge it (a test label outside that range is a DataError asking for ``num_classes``).
    ``num_threads`` sets torch's intra-op threads during the fit and restores them after; by
    default small problems use 1 thread and larger ones keep torch's setting. ``device``: where
    the L-BFGS runs (default the GPU when there is one, else the CPU).

    Memory: the solver needs the train (and val) rows in memory by nature; they are stored once,
    transformed, as float32 (N, D + 1) on the device, filled chunk by chunk from the features (which
    may be float16 memory maps), and the refit's float64 rows replace them. Test is scored chunk by
    chunk.
    """
    train = check_split("train", x_train, y_train)
    val = check_split("val", x_val, y_val)
    test = check_split("test", x_test, y_test)
    check_splits(train, val, test)
    require_classes(train)
    num_classes = resolve_num_classes(num_classes, [train, val], [test])
    grid = check_l2_grid(l2_grid, DEFAULT_L2_GRID)

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    transform = fit_transform(train.x, normalize, standardize)
    yt, yv = torch.from_numpy(train.y).to(dev), torch.from_numpy(val.y).to(dev)
    dim = train.x.shape[1]

    if num_threads is None:
        num_threads = default_threads(len(yt) + len(yv), dim, num_classes)
    start = time.perf_counter()
    with torch_threads(num_threads):
        rows, val_rows = (Rows.from_features([s.x], y, transform, num_classes, SWEEP_DTYPE) for s, y in
                          ((train, yt), (val, yv)))
        sweep = sweep_rows(rows, yt, val_rows, yv, num_classes, grid, max_iter=max_iter, tol=tol)
        del rows, val_rows
        final, iterations = sweep.best, sweep.num_iterations
        if refit_on_trainval:
            ytv = torch.cat([yt, yv])
            final = refit_rows(lambda dtype: Rows.from_features([train.x, val.x], ytv, transform, num_classes, dtype),
                               sweep, max_iter=max_iter, tol=tol)
            iterations += final.num_iterations
    fit_seconds = time.perf_counter() - start

    classifier = LinearClassifier(transform.normalize, transform.mean, transform.scale, final.weight.cpu().numpy(),
                                  final.bias.cpu().numpy(), final.l2)
    preds, hits5 = [], 0
    for part in row_chunks(len(test.y), dim):
        scores = classifier.logits(read_rows(test.x, part))  # (M, C) float64
        preds.append(scores.argmax(axis=1))
        hits5 += topk_hits(scores, test.y[part], 5)
    pred = np.concatenate(preds)  # (N_test,)
    confusion = confusion_matrix(test.y, pred, num_classes)
    return LinearProbeResult(
        top1=float(np.mean(pred == test.y)),
        top5=hits5 / len(test.y),
        mean_per_class_recall=mean_per_class_recall(confusion),
        chosen_l2=sweep.best.l2,
        val_top1_by_l2=sweep.val_top1_by_l2,
        confusion=confusion,
        per_class_recall=per_class_recall(confusion),
        test_pred=pred,
        fit_seconds=fit_seconds,
        num_iterations=iterations,
        num_classes=num_classes,
        classifier=classifier,
    )
