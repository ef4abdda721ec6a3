"""Numeric golden checks for the probes: linear (vs scikit-learn), few-shot ridge, kNN, plots.

Also proves that test data cannot influence any choice, and that bad input fails with a message
naming the split and what was expected.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from vitdistill.errors import ConfigError, DataError
from vitdistill.probes import (
    DEFAULT_L2_GRID,
    confusion_figure,
    fewshot_probe,
    knn_probe,
    linear_probe,
    per_class_table,
    sklearn_c,
)
from vitdistill.probes.fewshot import pm_one_targets, ridge_eigen
from vitdistill.probes.knn import knn_votes
from vitdistill.probes.linear import (
    Preconditioner,
    fit_logreg,
    fit_transform,
    logreg_loss_and_grad,
    refit,
    sweep_l2,
)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Small problems run fastest, and most reproducibly, on one thread; restore the setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gaussian_mixture(n_per_class: int, num_classes: int, dim: int, spread: float, seed: int):
    """Class c centred at spread * e_c plus unit noise: (N, D) float32 and (N,) int64, shuffled."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(num_classes), n_per_class)
    centres = spread * np.eye(num_classes, dim)  # (C, D)
    x = centres[y] + rng.standard_normal((len(y), dim))
    order = rng.permutation(len(y))
    return x[order].astype(np.float32), y[order]


def splits(num_classes: int = 4, dim: int = 8, spread: float = 3.0, n: tuple[int, int, int] = (60, 20, 20)):
    """(x_train, y_train, x_val, y_val, x_test, y_test) from independent draws of one mixture."""
    out = []
    for seed, n_per_class in enumerate(n):
        out.extend(gaussian_mixture(n_per_class, num_classes, dim, spread, seed))
    return out


# ---------------------------------------------------------------------------------------- linear


def test_linear_probe_separable_mixture_is_perfect():
    data = splits(num_classes=4, spread=12.0)
    res = linear_probe(*data)
    assert res.top1 == 1.0 and res.top5 == 1.0 and res.mean_per_class_recall == 1.0
    assert res.confusion.shape == (4, 4) and np.array_equal(res.confusion, np.diag(res.confusion.sum(axis=1)))
    assert np.array_equal(res.test_pred, data[5])
    assert set(res.val_top1_by_l2) == set(DEFAULT_L2_GRID) and res.chosen_l2 in DEFAULT_L2_GRID
    assert res.fit_seconds > 0


def test_linear_objective_matches_sklearn_at_the_mapped_c():
    """At each l2, our optimum is sklearn's with C = 1 / (l2 * N): same weights, same predictions."""
    x, y = gaussian_mixture(100, 3, 10, spread=1.5, seed=0)  # overlapping classes
    x, x_eval = x.astype(np.float64), gaussian_mixture(100, 3, 10, spread=1.5, seed=1)[0]
    for l2 in (1e-1, 1e-2, 1e-3):
        ours = fit_logreg(torch.from_numpy(x), torch.from_numpy(y), 3, l2, tol=1e-10, max_iter=5000)
        ref = LogisticRegression(C=sklearn_c(l2, len(y)), tol=1e-10, max_iter=5000).fit(x, y)
        w = ours.weight.numpy()  # (C, D)
        b = ours.bias.numpy()
        scale = np.abs(ref.coef_).max()
        assert np.abs(w - ref.coef_).max() < 1e-4 * scale, l2
        # softmax ignores a shared shift of the (unpenalised) biases, so compare them centred
        assert np.allclose(b - b.mean(), ref.intercept_ - ref.intercept_.mean(), atol=1e-4 * scale), l2
        pred = (x_eval @ w.T + b).argmax(axis=1)
        assert np.mean(pred == ref.predict(x_eval)) >= 0.99, l2


def test_linear_probe_protocol_matches_sklearn_within_one_point():
    """Same grid, same select-on-val / refit-on-train+val / test protocol, done with scikit-learn."""
    data = splits(num_classes=5, dim=12, spread=2.0, n=(80, 40, 200))
    grid = (1e-4, 1e-3, 1e-2, 1e-1)
    res = linear_probe(*data, l2_grid=grid)

    (xtr, ytr, xva, yva, xte, yte) = data
    transform = fit_transform(xtr.astype(np.float64), normalize=True, standardize=True)
    norm = [transform(x.astype(np.float64)) for x in (xtr, xva, xte)]
    val_top1 = {
        l2: LogisticRegression(C=sklearn_c(l2, len(ytr)), max_iter=1000).fit(norm[0], ytr).score(norm[1], yva)
        for l2 in grid
    }
    best = max(sorted(grid, reverse=True), key=lambda l2: val_top1[l2])  # first max: ties -> stronger l2
    xtv, ytv = np.concatenate(norm[:2]), np.concatenate([ytr, yva])
    sk_top1 = LogisticRegression(C=sklearn_c(best, len(ytv)), max_iter=1000).fit(xtv, ytv).score(norm[2], yte)
    assert abs(res.top1 - sk_top1) <= 0.01
    assert all(abs(res.val_top1_by_l2[l2] - val_top1[l2]) <= 0.01 for l2 in grid)


def test_feature_transform_is_fitted_on_train_and_keeps_unit_mean_square_norm():
    x, _ = gaussian_mixture(50, 3, 6, spread=2.0, seed=0)
    x[:, 4] = 0.0  # a dead dimension, still constant after row normalisation
    t = fit_transform(x.astype(np.float64), normalize=True, standardize=True)
    z = t(x.astype(np.float64))
    assert np.allclose(z.mean(axis=0), 0.0, atol=1e-12)
    assert np.mean(np.sum(z**2, axis=1)) == pytest.approx(1.0)
    assert t.scale[4] == 0.0 and np.all(z[:, 4] == 0.0)
    other = np.ones((2, 6))  # other splits get the train statistics, and the dead dimension stays 0
    assert np.allclose(t(other), (other / np.sqrt(6) - t.mean) * t.scale) and np.all(t(other)[:, 4] == 0.0)
    plain = fit_transform(x.astype(np.float64), normalize=False, standardize=False)
    assert np.allclose(plain(x.astype(np.float64)), x - x.mean(axis=0), atol=1e-6)


def test_warm_started_sweep_reaches_the_cold_start_optimum():
    x, y = gaussian_mixture(60, 3, 6, spread=1.5, seed=2)
    xv, yv = gaussian_mixture(30, 3, 6, spread=1.5, seed=3)
    xt, yt = torch.from_numpy(x.astype(np.float64)), torch.from_numpy(y)
    sweep = sweep_l2(xt, yt, torch.from_numpy(xv.astype(np.float64)), torch.from_numpy(yv), 3, DEFAULT_L2_GRID)
    cold = fit_logreg(xt, yt, 3, sweep.best.l2, tol=1e-9, max_iter=5000)
    onehot = torch.nn.functional.one_hot(yt, 3).T.to(torch.float64)  # (C, N)
    f_warm = float(logreg_loss_and_grad(xt, onehot, sweep.best.weight, sweep.best.bias, sweep.best.l2)[0])
    f_cold = float(logreg_loss_and_grad(xt, onehot, cold.weight, cold.bias, cold.l2)[0])
    assert f_warm == pytest.approx(f_cold, rel=1e-5, abs=1e-7)


def test_float32_sweep_then_refit_meets_the_tolerance_in_float64():
    """The sweep runs in float32; its choice and the refit still satisfy max |grad| <= tol in float64."""
    x, y = gaussian_mixture(80, 4, 20, spread=1.0, seed=4)
    xv, yv = gaussian_mixture(30, 4, 20, spread=1.0, seed=5)
    xt, yt = torch.from_numpy(x.astype(np.float64)), torch.from_numpy(y)
    xv, yv = torch.from_numpy(xv.astype(np.float64)), torch.from_numpy(yv)
    sweep = sweep_l2(xt, yt, xv, yv, 4, DEFAULT_L2_GRID)
    xtv, ytv = torch.cat([xt, xv]), torch.cat([yt, yv])
    final = refit(xtv, ytv, 4, sweep, max_iter=1000, tol=1e-4)
    for xs, ys, model in ((xt, yt, sweep.best), (xtv, ytv, final)):
        assert model.weight.dtype == torch.float64
        onehot = torch.nn.functional.one_hot(ys, 4).T.to(torch.float64)  # (C, N)
        _, grad_w, grad_b = logreg_loss_and_grad(xs, onehot, model.weight, model.bias, model.l2)
        assert max(float(grad_w.abs().max()), float(grad_b.abs().max())) <= 1e-4


@pytest.mark.parametrize("dim", [6, 40])  # the random block spans all of D, or 17 of 40 dims
def test_preconditioner_finds_the_top_principal_directions(dim):
    rng = np.random.default_rng(dim)
    x = torch.from_numpy(rng.standard_normal((200, dim)) * np.linspace(3.0, 0.1, dim))  # (N, D) anisotropic
    x = x - x.mean(dim=0)
    exact = torch.linalg.eigvalsh(x.T @ x / len(x)).flip(0)  # descending
    pre = Preconditioner.estimate(x, num_classes=3, rank=4)
    assert pre.basis.shape == (dim, 4) and pre.eigvals.shape == (5,)
    # Ritz values of a subspace never exceed the eigenvalues; two power iterations land close below
    assert torch.all(pre.eigvals <= exact[:5] + 1e-12) and torch.all(pre.eigvals >= 0.95 * exact[:5])
    if dim <= 4 + 1 + 8:
        assert torch.allclose(pre.eigvals, exact[:5], rtol=1e-10)
    assert torch.allclose(pre.basis.T @ pre.basis, torch.eye(4, dtype=torch.float64), atol=1e-10)


def test_linear_probe_choice_ignores_test_data():
    data = splits(num_classes=4, spread=1.5)
    base = linear_probe(*data)
    rng = np.random.default_rng(0)
    x_test, y_test = data[4], data[5]
    permuted = linear_probe(*data[:5], rng.permutation(y_test))
    corrupted = linear_probe(*data[:4], rng.standard_normal(x_test.shape).astype(np.float32) * 100, y_test[::-1].copy())
    for other in (permuted, corrupted):
        assert other.chosen_l2 == base.chosen_l2
        assert other.val_top1_by_l2 == base.val_top1_by_l2
    assert np.array_equal(permuted.test_pred, base.test_pred)  # labels are only read to score


def test_linear_probe_ties_go_to_stronger_regularisation():
    data = splits(num_classes=3, spread=20.0)  # every reasonable l2 is perfect on val
    res = linear_probe(*data, l2_grid=(1e-6, 1e-5, 1e-4))
    assert set(res.val_top1_by_l2.values()) == {1.0}
    assert res.chosen_l2 == 1e-4


def test_top5_is_top_c_below_five_classes():
    data = splits(num_classes=3, spread=0.5)
    res = linear_probe(*data, l2_grid=(1e-2,))
    assert res.top5 == 1.0 and res.top1 < 1.0
    assert np.isclose(res.mean_per_class_recall, np.nanmean(res.per_class_recall))


# -------------------------------------------------------------------------------------- few-shot


@pytest.mark.parametrize("n, dim", [(40, 6), (5, 12)])  # n >= D uses X^T X, n < D uses X X^T
def test_ridge_eigen_reuse_equals_direct_solve(n, dim):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, dim))
    y = rng.integers(0, 3, n)
    targets = pm_one_targets(y, 3)  # (n, C)
    fit = ridge_eigen(x, targets)
    xc, yc = x - x.mean(axis=0), targets - targets.mean(axis=0)
    x_eval = rng.standard_normal((7, dim))
    projected = fit.project(x_eval)
    for l2 in (2.0**-10, 1e-2, 1.0, 2.0**10):
        w_direct = np.linalg.solve(xc.T @ xc + l2 * np.eye(dim), xc.T @ yc)  # (D, C)
        b_direct = targets.mean(axis=0) - x.mean(axis=0) @ w_direct
        w, b = fit.weights(l2)
        assert np.allclose(w, w_direct, rtol=1e-8, atol=1e-10)
        assert np.allclose(b, b_direct, rtol=1e-8, atol=1e-10)
        assert np.allclose(fit.scores(projected, l2), x_eval @ w_direct + b_direct, rtol=1e-8, atol=1e-10)


def test_fewshot_samples_come_from_train_and_choice_ignores_test():
    data = splits(num_classes=4, spread=4.0, n=(30, 20, 20))
    x_train, y_train = data[0], data[1]
    res = fewshot_probe(*data, shots=(1, 5, 10), seeds=(0, 1))
    for (k, _seed), rows in res.train_indices.items():
        assert rows.min() >= 0 and rows.max() < len(y_train)
        assert np.array_equal(np.bincount(y_train[rows], minlength=4), [k] * 4)
    assert set(res.train_indices[(1, 0)]) <= set(res.train_indices[(5, 0)])  # nested per seed
    assert res.mean_top1[10] > 0.9 and res.short_classes == {1: [], 5: [], 10: []}
    assert math.isclose(res.mean_top1[5], np.mean([res.top1[(5, 0)], res.top1[(5, 1)]]))

    rng = np.random.default_rng(1)
    noisy_x = rng.standard_normal(data[4].shape).astype(np.float32)
    other = fewshot_probe(*data[:4], noisy_x, rng.permutation(data[5]), shots=(1, 5, 10), seeds=(0, 1))
    assert other.chosen_l2 == res.chosen_l2 and other.val_top1_by_l2 == res.val_top1_by_l2
    assert all(np.array_equal(other.train_indices[key], rows) for key, rows in res.train_indices.items())
    # only the sampled train rows matter: scrambling every other train row changes nothing
    rows = res.train_indices[(5, 0)]
    scrambled = rng.standard_normal(x_train.shape).astype(np.float32) * 1000
    scrambled[rows] = x_train[rows]
    single = fewshot_probe(*data, shots=(5,), seeds=(0,))
    same = fewshot_probe(scrambled, *data[1:], shots=(5,), seeds=(0,))
    assert same.top1 == single.top1 and same.val_top1_by_l2 == single.val_top1_by_l2


def test_fewshot_short_and_missing_classes():
    x, y = gaussian_mixture(10, 3, 5, spread=4.0, seed=0)
    keep = ~((y == 2) & (np.cumsum(y == 2) > 3))  # class 2 keeps 3 train rows
    val = gaussian_mixture(5, 3, 5, spread=4.0, seed=1)
    res = fewshot_probe(x[keep], y[keep], *val, *val, shots=(2, 3, 5), seeds=(0,))
    assert res.short_classes == {2: [], 3: [], 5: [2]}
    assert sorted(res.mean_top1) == [2, 3] and res.most_shots == 3 and (5, 0) not in res.train_indices
    assert res.skipped == [5] and res.skip_note(5) == "skipped: class 2 has 3 train samples, fewer than 5"
    with pytest.raises(DataError, match="train: class 1 has no samples"):
        fewshot_probe(x[y != 1], y[y != 1], *val, *val, shots=(1,), num_classes=3)


# ------------------------------------------------------------------------------------------- kNN


def unit(angle_cos: float, side: int) -> list[float]:
    """A 2-D unit vector whose cosine with (1, 0) is ``angle_cos``, above (+1) or below (-1) the axis."""
    return [angle_cos, side * math.sqrt(1.0 - angle_cos**2)]


def test_knn_hand_computed_votes_and_temperature():
    # query (1, 0); neighbours: class 0 at cos 0.9, class 1 at cos 0.5 and 0.45, class 0 at cos -1
    train = np.array([unit(0.9, 1), unit(0.5, -1), unit(0.45, 1), [-1.0, 0.0]], dtype=np.float32)
    labels = np.array([0, 1, 1, 0])
    query = np.array([[1.0, 0.0]], dtype=np.float32)
    for temperature, expected in ((0.07, 0), (1.0, 1)):
        q, bank, bank_labels = torch.from_numpy(query), torch.from_numpy(train), torch.from_numpy(labels)
        votes = knn_votes(q, bank, bank_labels, (3,), temperature, 2)
        hand = [math.exp(0.9 / temperature), math.exp(0.5 / temperature) + math.exp(0.45 / temperature)]
        hand = [v / math.exp(0.9 / temperature) for v in hand]  # relative to the nearest neighbour
        assert np.allclose(votes[3].numpy()[0], hand, rtol=1e-5)
        res = knn_probe(train, labels, query, np.array([expected]), ks=(3,), temperature=temperature)
        assert res.top1 == {3: 1.0} and res.top5 == {3: 1.0} and res.test_pred[3].tolist() == [expected]
    # k=1 keeps only the nearest neighbour, whatever the temperature
    assert knn_probe(train, labels, query, np.array([0]), ks=(1,), temperature=1.0).top1 == {1: 1.0}


def test_knn_chunked_equals_unchunked():
    x, y = gaussian_mixture(100, 6, 16, spread=4.0, seed=0)
    xq, yq = gaussian_mixture(23, 6, 16, spread=4.0, seed=1)
    whole = knn_probe(x, y, xq, yq, ks=(1, 10, 20), chunk_size=10_000)
    chunked = knn_probe(x, y, xq, yq, ks=(1, 10, 20), chunk_size=7)
    both = knn_probe(x, y, xq, yq, ks=(1, 10, 20), chunk_size=7, bank_chunk=13)  # bank in parts smaller than k
    for r in (chunked, both):
        assert whole.top1 == r.top1 and whole.top5 == r.top5
        assert all(np.array_equal(whole.test_pred[k], r.test_pred[k]) for k in (1, 10, 20))
    assert 0.8 < whole.top1[20] <= whole.top5[20]


def test_knn_rejects_k_above_train_size():
    x, y = gaussian_mixture(3, 2, 4, spread=2.0, seed=0)
    with pytest.raises(DataError, match="train: 6 samples; expected at least k=10"):
        knn_probe(x, y, x, y, ks=(10,))
    with pytest.raises(ConfigError, match="temperature must be positive"):
        knn_probe(x, y, x, y, ks=(1,), temperature=0.0)


# ------------------------------------------------------------------------------------- bad input


def replace(data: list, **changes) -> list:
    """The six split arrays with some replaced, by name."""
    names = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
    return [changes.get(name, value) for name, value in zip(names, data, strict=True)]


def with_nan(x: np.ndarray) -> np.ndarray:
    out = x.copy()
    out[3, 1] = np.nan
    return out


# name -> (break the splits, message expected); splits() has 240/80/80 rows, 8 dims, 4 classes
BAD_INPUTS = {
    "labels_missing": (lambda d: replace(d, y_train=None), "train: labels are missing"),
    "one_class": (
        lambda d: replace(d, y_train=np.zeros_like(d[1])),
        r"train: labels contain 1 distinct class\(es\) \[0\]; expected at least 2",
    ),
    "dim_mismatch": (lambda d: replace(d, x_val=d[2][:, :5]), "val: features have dim 5; expected 8 to match train"),
    "length_mismatch": (lambda d: replace(d, y_test=d[5][:-1]), "test: 80 feature rows but 79 labels; expected equal"),
    "non_finite": (
        lambda d: replace(d, x_train=with_nan(d[0])),
        "train: 1 of 240 feature rows contain NaN or inf; expected finite features",
    ),
    "empty_split": (
        lambda d: replace(d, x_val=d[2][:0], y_val=d[3][:0]),
        "val: split is empty; expected at least one sample",
    ),
    "test_label_out_of_range": (
        lambda d: replace(d, y_test=d[5] + 10),
        r"test: label 13 is out of range; expected labels below 4 \(inferred from train/val\); pass num_classes",
    ),
    "float_labels": (
        lambda d: replace(d, y_val=d[3].astype(np.float32)),
        "val: labels have dtype float32; expected integer class ids",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_linear_probe_bad_input(case):
    breaker, message = BAD_INPUTS[case]
    with pytest.raises(DataError, match=message):
        linear_probe(*breaker(splits()), l2_grid=(1e-2,))


@pytest.mark.parametrize("case", ["labels_missing", "dim_mismatch", "non_finite", "empty_split"])
def test_fewshot_and_knn_bad_input(case):
    breaker, message = BAD_INPUTS[case]
    args = breaker(splits())
    with pytest.raises(DataError, match=message):
        fewshot_probe(*args, shots=(1,), seeds=(0,))
    if case in ("labels_missing", "non_finite"):  # the train-split failures apply to kNN too
        with pytest.raises(DataError, match=message):
            knn_probe(args[0], args[1], args[4], args[5], ks=(1,))


def test_bad_grid_is_a_config_error():
    with pytest.raises(ConfigError, match="l2_grid must be"):
        linear_probe(*splits(), l2_grid=(0.0, 1.0))


# ----------------------------------------------------------------------------------------- plots


def test_per_class_table_hand_computed():
    confusion = np.array([[8, 2, 0], [1, 4, 0], [0, 0, 0]])
    rows = per_class_table(confusion, ["cat", "dog", "owl"])
    assert [r["class"] for r in rows] == ["cat", "dog", "owl"]
    assert [r["support"] for r in rows] == [10, 5, 0]
    assert rows[0]["recall"] == pytest.approx(0.8) and rows[0]["precision"] == pytest.approx(8 / 9)
    assert rows[1]["recall"] == pytest.approx(0.8) and rows[1]["precision"] == pytest.approx(4 / 6)
    assert math.isnan(rows[2]["recall"]) and math.isnan(rows[2]["precision"])


def test_confusion_figure_annotates_small_matrices_without_pyplot_state(tmp_path):
    import matplotlib.pyplot as plt

    small = confusion_figure(np.array([[3, 1], [0, 4]]), ["a", "b"], "small")
    image = small.axes[0].images[0].get_array()
    assert np.allclose(image, [[0.75, 0.25], [0.0, 1.0]])
    assert sorted(t.get_text() for t in small.axes[0].texts) == ["0.00", "0.25", "0.75", "1.00"]
    big = confusion_figure(np.eye(25, dtype=int), [str(i) for i in range(25)], "big")
    assert len(big.axes[0].texts) == 0
    small.savefig(tmp_path / "cm.png")
    assert (tmp_path / "cm.png").stat().st_size > 0
    assert plt.get_fignums() == []
    with pytest.raises(DataError, match="class_names: 1 names; expected 2"):
        confusion_figure(np.eye(2), ["a"], "bad")


# ---------------------------------------------------------------------------- memory-mapped features


def spilled(tmp_path, name: str, x: np.ndarray) -> np.ndarray:
    """``x`` as a read-only float16 memory map, as ``FeatureCache.load(spill_dir=...)`` returns it."""
    out = np.lib.format.open_memmap(tmp_path / f"{name}.npy", mode="w+", dtype=np.float16, shape=x.shape)
    out[:] = x
    out.flush()
    del out
    return np.load(tmp_path / f"{name}.npy", mmap_mode="r")


def half_splits(tmp_path, **kw):
    """splits() rounded to float16: as memory maps, and the same values as float32 arrays in memory."""
    data = splits(**kw)
    maps = [spilled(tmp_path, f"x{i}", a) if i % 2 == 0 else a for i, a in enumerate(data)]
    same = [np.asarray(m, dtype=np.float32) if i % 2 == 0 else m for i, m in enumerate(maps)]
    return maps, same


@pytest.fixture
def tiny_chunks(monkeypatch):
    """A few rows per chunk, so that every chunked reader loops over several chunks."""
    import vitdistill.probes.inputs as inputs

    monkeypatch.setattr(inputs, "CHUNK_BYTES", 8 * 8 * 7)  # 7 rows of 8 float64


def test_check_split_keeps_a_memory_map_and_counts_bad_rows_per_chunk(tmp_path, tiny_chunks):
    from vitdistill.probes.inputs import check_split

    x = spilled(tmp_path, "x", splits()[0])
    s = check_split("train", x, np.zeros(len(x), dtype=np.int64))
    assert isinstance(s.x, np.memmap) and np.shares_memory(s.x, x)  # validated without a copy
    bad = splits()[0].copy()
    bad[[3, 20, 21]] = np.inf  # rows in two different chunks of 7
    bad[3, 0] = np.nan
    with pytest.raises(DataError, match="train: 3 of 240 feature rows contain NaN or inf; expected finite features"):
        check_split("train", spilled(tmp_path, "bad", bad), np.zeros(len(bad), dtype=np.int64))


def test_knn_on_a_float16_memory_map_equals_the_same_values_in_memory(tmp_path):
    maps, same = half_splits(tmp_path, num_classes=5, spread=2.0)
    args = dict(ks=(1, 5, 20), chunk_size=17, bank_chunk=50)  # several query chunks against several bank parts
    mapped = knn_probe(maps[0], maps[1], maps[4], maps[5], **args)
    memory = knn_probe(same[0], same[1], same[4], same[5], **args)
    whole = knn_probe(same[0], same[1], same[4], same[5], ks=(1, 5, 20), chunk_size=10_000, bank_chunk=10_000)
    for r in (mapped, whole):
        assert r.top1 == memory.top1 and r.top5 == memory.top5
        assert all(np.array_equal(r.test_pred[k], memory.test_pred[k]) for k in (1, 5, 20))


def test_fewshot_on_a_float16_memory_map_equals_the_whole_array_computation(tmp_path, tiny_chunks):
    from vitdistill.probes.inputs import l2_normalize

    maps, same = half_splits(tmp_path, num_classes=4, spread=2.0)
    args = dict(shots=(1, 5), seeds=(0, 1))
    mapped, memory = fewshot_probe(*maps, **args), fewshot_probe(*same, **args)
    assert mapped.top1 == memory.top1 and mapped.val_top1_by_l2 == memory.val_top1_by_l2
    assert mapped.chosen_l2 == memory.chosen_l2
    # the whole-array reference: normalise every split at once, fit the sample, score all of val and test
    xtr, ytr, xva, yva, xte, yte = (a.astype(np.float64) if i % 2 == 0 else a for i, a in enumerate(same))
    xtr, xva, xte = l2_normalize(xtr), l2_normalize(xva), l2_normalize(xte)
    for (k, seed), rows in mapped.train_indices.items():
        fit = ridge_eigen(xtr[rows], pm_one_targets(ytr[rows], 4))
        l2 = mapped.chosen_l2[k]
        assert mapped.top1[(k, seed)] == np.mean(fit.scores(fit.project(xte), l2).argmax(axis=1) == yte)


def test_linear_probe_on_a_float16_memory_map_equals_the_same_values_in_memory(tmp_path, tiny_chunks):
    maps, same = half_splits(tmp_path, num_classes=4, spread=1.5)
    mapped = linear_probe(*maps, l2_grid=(1e-4, 1e-2), device="cpu")
    memory = linear_probe(*same, l2_grid=(1e-4, 1e-2), device="cpu")
    assert mapped.val_top1_by_l2 == memory.val_top1_by_l2 and mapped.chosen_l2 == memory.chosen_l2
    assert np.array_equal(mapped.test_pred, memory.test_pred) and mapped.top5 == memory.top5
    assert np.array_equal(mapped.classifier.weight, memory.classifier.weight)


def test_linear_probe_in_chunks_equals_one_chunk(monkeypatch):
    """Statistics summed over chunks and rows filled chunk by chunk give the one-chunk fit, up to rounding."""
    import vitdistill.probes.inputs as inputs

    data = splits(num_classes=4, spread=1.5)
    whole = linear_probe(*data, l2_grid=(1e-4, 1e-2))
    monkeypatch.setattr(inputs, "CHUNK_BYTES", 8 * 8 * 7)
    chunked = linear_probe(*data, l2_grid=(1e-4, 1e-2))
    assert chunked.val_top1_by_l2 == whole.val_top1_by_l2 and np.array_equal(chunked.test_pred, whole.test_pred)
    assert np.allclose(chunked.classifier.mean, whole.classifier.mean, rtol=1e-12, atol=1e-15)
    assert np.allclose(chunked.classifier.weight, whole.classifier.weight, rtol=1e-5, atol=1e-6)
