"""The procedural shapes dataset: determinism, label statistics, cue conflict and shape bias."""

from __future__ import annotations

import doctest
import itertools
from collections import Counter

import numpy as np
import pytest

from vitdistill.data import shapes
from vitdistill.data.shapes import (
    CLASSES,
    COLOURS,
    HELDOUT_COMBOS,
    TEXTURES,
    cue_conflict_sample,
    generate_cue_conflict,
    generate_shapes,
    make_caption,
    render_shape,
    shape_bias,
    shape_sample,
)
from vitdistill.errors import ConfigError

STATS_SIZE = 16  # attributes do not depend on the image size, so statistics use tiny images


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def attributes(sample) -> tuple:
    return sample.label, sample.shape, sample.colour, sample.texture, sample.caption, sample.key


def test_module_docstring_example_holds():
    assert doctest.testmod(shapes).failed == 0


def test_vocabulary_is_consistent():
    assert len(TEXTURES) == len(CLASSES) == len(set(CLASSES))
    assert len(set(TEXTURES)) == len(TEXTURES)
    assert all(len(rgb) == 3 and all(0 <= c <= 255 for c in rgb) for rgb in COLOURS.values())
    assert all(c in COLOURS and s in CLASSES for c, s in HELDOUT_COMBOS)


def test_random_access_matches_generation_order():
    batch = list(generate_shapes(20, seed=5))
    alone = shape_sample(17, seed=5)
    assert attributes(alone) == attributes(batch[17])
    assert np.array_equal(pixels(alone.image), pixels(batch[17].image))
    offset = next(generate_shapes(1, seed=5, start=17))
    assert np.array_equal(pixels(offset.image), pixels(alone.image))
    assert alone.key == "shapes-5-000017"


def test_samples_are_reproducible():
    a, b = shape_sample(3, seed=1), shape_sample(3, seed=1)
    assert attributes(a) == attributes(b) and np.array_equal(pixels(a.image), pixels(b.image))


def test_different_seeds_and_indices_differ():
    base = pixels(shape_sample(0, seed=0).image)
    for other in (shape_sample(0, seed=1), shape_sample(1, seed=0), shape_sample(0, seed=-1)):
        assert not np.array_equal(base, pixels(other.image))
    seed0 = [attributes(shape_sample(i, seed=0))[:4] for i in range(30)]
    assert seed0 != [attributes(shape_sample(i, seed=1))[:4] for i in range(30)]


def test_attributes_do_not_depend_on_image_size():
    for i in range(10):
        small, large = shape_sample(i, size=STATS_SIZE), shape_sample(i, size=96)
        assert attributes(small) == attributes(large)


def test_labels_captions_and_keys_agree():
    for s in generate_shapes(60, seed=2, size=STATS_SIZE):
        assert CLASSES[s.label] == s.shape
        assert s.colour in COLOURS and s.texture in TEXTURES
        assert s.caption == make_caption(s.colour, s.texture, s.shape)
        assert s.caption.split()[-3:] == [s.colour, s.texture, s.shape]
        assert "." not in s.key  # webdataset splits keys at dots


def test_caption_article():
    assert make_caption("blue", "striped", "triangle") == "a blue striped triangle"
    assert make_caption("orange", "dotted", "heart") == "an orange dotted heart"


@pytest.mark.parametrize("size", [16, 64, 100])
def test_images_are_rgb_of_the_requested_size_and_not_constant(size):
    for s in itertools.chain(generate_shapes(6, size=size), generate_cue_conflict(6, size=size)):
        assert s.image.mode == "RGB" and s.image.size == (size, size)
        arr = pixels(s.image)
        assert arr.std() > 10  # a shape on a background, not a flat image


def test_every_shape_and_texture_draws_differently():
    def draw(shape, texture):
        return pixels(render_shape(np.random.default_rng(0), shape, "blue", texture, 48))

    by_texture = [draw("circle", t) for t in TEXTURES]
    by_shape = [draw(s, "striped") for s in CLASSES]
    for images in (by_texture, by_shape):
        for a, b in itertools.combinations(images, 2):
            assert np.abs(a - b).mean() > 1.0


def test_render_shape_rejects_unknown_names_and_tiny_images():
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError, match="valid shapes: circle"):
        render_shape(rng, "oval", "blue", "striped")
    with pytest.raises(ConfigError, match="valid textures"):
        render_shape(rng, "circle", "blue", "plaid")
    with pytest.raises(ConfigError, match="at least"):
        shape_sample(0, size=4)


def test_classes_are_roughly_balanced():
    counts = Counter(s.label for s in generate_shapes(3000, seed=0, size=STATS_SIZE))
    assert sorted(counts) == list(range(len(CLASSES)))
    assert all(abs(c - 500) < 75 for c in counts.values()), counts  # ~3.5 standard deviations


@pytest.mark.parametrize("correlation", [0.0, 0.7, 1.0])
def test_typical_texture_frequency_follows_texture_correlation(correlation):
    samples = list(generate_shapes(3000, seed=1, size=STATS_SIZE, texture_correlation=correlation))
    typical = np.mean([s.texture == TEXTURES[s.label] for s in samples])
    # a random texture is the typical one 1 time in len(TEXTURES)
    expected = correlation + (1 - correlation) / len(TEXTURES)
    assert abs(typical - expected) < 0.03


def test_texture_correlation_out_of_range_is_rejected():
    with pytest.raises(ConfigError, match="texture_correlation"):
        shape_sample(0, texture_correlation=1.5)


def test_exclude_combos_are_never_produced_and_leave_other_samples_unchanged():
    held = list(generate_shapes(600, seed=4, size=STATS_SIZE, exclude_combos=HELDOUT_COMBOS))
    full = list(generate_shapes(600, seed=4, size=STATS_SIZE))
    assert not {(s.colour, s.shape) for s in held} & HELDOUT_COMBOS
    assert {(s.colour, s.shape) for s in full} & HELDOUT_COMBOS  # the exclusion had work to do
    for h, f in zip(held, full):
        assert (h.label, h.texture) == (f.label, f.texture)
        if (f.colour, f.shape) not in HELDOUT_COMBOS:
            assert attributes(h) == attributes(f)
    assert {s.colour for s in held} == set(COLOURS)


def test_bad_exclude_combos_are_rejected():
    with pytest.raises(ConfigError, match="colours:"):
        shape_sample(0, exclude_combos=[("teal", "circle")])
    with pytest.raises(ConfigError, match="every colour"):
        shape_sample(0, exclude_combos=[(c, "star") for c in COLOURS])


def test_exclude_combos_accept_lists_as_read_from_yaml():
    as_lists = [list(c) for c in HELDOUT_COMBOS]
    held = list(generate_shapes(200, size=STATS_SIZE, exclude_combos=as_lists))
    assert not {(s.colour, s.shape) for s in held} & HELDOUT_COMBOS


def test_cue_conflict_covers_every_pair_evenly():
    k = len(CLASSES)
    samples = list(generate_cue_conflict(2 * k * k, seed=0, size=STATS_SIZE))
    pairs = Counter((s.shape_label, s.texture_label) for s in samples)
    assert set(pairs) == set(itertools.product(range(k), range(k)))
    assert set(pairs.values()) == {2}
    for s in samples:
        assert s.shape == CLASSES[s.shape_label] and s.texture == TEXTURES[s.texture_label]
        assert s.caption == make_caption(s.colour, s.texture, s.shape)
    assert len({s.key for s in samples}) == len(samples)


def test_cue_conflict_random_access_and_independence_from_regular_samples():
    batch = list(generate_cue_conflict(10, seed=3))
    alone = cue_conflict_sample(7, seed=3)
    assert alone.key == batch[7].key == "cue-3-000007"
    assert np.array_equal(pixels(alone.image), pixels(batch[7].image))
    assert not np.array_equal(pixels(alone.image), pixels(shape_sample(7, seed=3).image))


def test_shape_bias_follows_the_model_vs_human_formula():
    shape_labels = [0, 1, 2, 3, 4, 5]
    texture_labels = [1, 2, 3, 3, 0, 1]
    pred = [0, 2, 2, 3, 1, 4]
    # 0: shape hit; 1: texture hit; 2: shape hit; 3: congruent, excluded; 4, 5: neither class, ignored
    out = shape_bias(pred, shape_labels, texture_labels)
    assert out["shape_hits"] == 2 and out["texture_hits"] == 1
    assert out["n_used"] == 3 and out["n_conflict"] == 5
    assert out["shape_bias"] == pytest.approx(2 / 3)
    assert out["shape_match"] == pytest.approx(2 / 5) and out["texture_match"] == pytest.approx(1 / 5)


def test_shape_bias_extremes_and_edge_cases():
    s, t = np.array([0, 1, 2]), np.array([1, 2, 0])
    assert shape_bias(s, s, t)["shape_bias"] == 1.0
    assert shape_bias(t, s, t)["shape_bias"] == 0.0
    assert np.isnan(shape_bias([0, 1], [0, 1], [0, 1])["shape_bias"])  # only congruent images
    with pytest.raises(ConfigError, match="equal lengths"):
        shape_bias([0], [0, 1], [1, 0])


def test_classes_are_learnable_from_pixels():
    """A linear probe on the Fourier magnitude of 16x16 grey images (translation invariant, since
    the shapes move) beats chance by far; it reaches about 0.89 on 500 held-out images."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    from sklearn.preprocessing import StandardScaler

    samples = list(generate_shapes(2000, seed=7))
    grey = np.stack([np.asarray(s.image.convert("L").resize((16, 16)), dtype=np.float32) / 255 for s in samples])
    feats = np.log1p(np.abs(np.fft.rfft2(grey - grey.mean(axis=(1, 2), keepdims=True)))).reshape(len(samples), -1)
    labels = np.array([s.label for s in samples])
    scaler = StandardScaler().fit(feats[:1500])
    probe = linear_model.LogisticRegression(max_iter=300, C=0.1).fit(scaler.transform(feats[:1500]), labels[:1500])
    accuracy = (probe.predict(scaler.transform(feats[1500:])) == labels[1500:]).mean()
    assert accuracy > 2 / len(CLASSES)


def test_shapes_stay_inside_the_image():
    """The pose keeps a one-pixel margin, so the image border shows only background."""
    for s in generate_shapes(300, seed=8, size=32):
        arr = pixels(s.image)
        border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])  # (4 * 32, 3)
        assert np.abs(border - np.median(border, axis=0)).max() < 40, s.key
