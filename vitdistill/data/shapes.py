"""Procedural shapes x colours x textures: a seeded, captioned dataset with cue-conflict images.

Every image is one filled shape on a light, noisy background. The class label is the shape
(:data:`CLASSES`); the colour is uniform at random; the texture drawn inside the shape is the
class's *typical* texture (``TEXTURES[label]``) with probability ``texture_correlation`` and a
uniform random texture otherwise, so texture is a partial shortcut to the label, like texture in
ImageNet. Pose (position, scale, rotation) and the texture's period, orientation and phase vary.

Cue-conflict images (Geirhos et al., "ImageNet-trained CNNs are biased towards texture") put the
typical texture of one class inside the shape of another. :func:`shape_bias` scores decisions on
them exactly as the model-vs-human toolbox does.

Sample ``i`` is a pure function of ``(seed, i)``: its generator is seeded from both, so it is the
same whether it is drawn alone, as part of ``generate_shapes(n)`` for any ``n``, or on any worker.

    >>> s = shape_sample(17, seed=0)
    >>> s.key, s.label, s.caption
    ('shapes-0-000017', 0, 'a purple checkered circle')
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

from vitdistill.errors import ConfigError

GENERATOR_VERSION = 1  # bump whenever a given (seed, index, size) may render differently

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart")

# TEXTURES[i] is the typical texture of CLASSES[i].
TEXTURES: tuple[str, ...] = ("striped", "dotted", "checkered", "wavy", "grid", "ringed")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 90, 220),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 190),
    "orange": (240, 130, 30),
}

# (colour, shape) pairs for compositional hold-out: pass ``exclude_combos=HELDOUT_COMBOS`` when
# generating training data, so that every shape and every colour is still seen, but never these
# pairings (one colour per shape, each colour once).
HELDOUT_COMBOS: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "circle"),
        ("green", "square"),
        ("blue", "triangle"),
        ("yellow", "star"),
        ("purple", "cross"),
        ("orange", "heart"),
    }
)

_SUPERSAMPLE = 4  # the shape mask is drawn at 4x and box-filtered down: anti-aliased edges
_MARK_SHADE = 0.35  # texture marks are the shape colour times this
_PERIOD_FRACTION = (0.095, 0.125)  # texture period as a fraction of the image side
_RADIUS_FRACTION = (0.22, 0.36)  # shape circumradius as a fraction of the image side
_MIN_SIZE = 8  # below this the largest shape plus its margin does not fit
_NOISE_STD = 5.0  # pixel noise (0..255 scale) over the whole image
_STREAM_SHAPES, _STREAM_CUE = 0, 1  # keep the two sample families on unrelated random streams


@dataclass(frozen=True)
class ShapeSample:
    """One regular sample: ``label`` indexes :data:`CLASSES` and equals ``CLASSES.index(shape)``."""

    image: Image.Image  # RGB, size x size
    label: int
    shape: str
    colour: str
    texture: str
    caption: str  # "a blue striped triangle"
    key: str  # "shapes-{seed}-{index:06d}", a valid webdataset key


@dataclass(frozen=True)
class CueConflictSample:
    """One cue-conflict sample: the shape of ``shape_label``, the typical texture of ``texture_label``.

    Both labels index :data:`CLASSES`; they are equal for 1 in ``len(CLASSES)`` samples (congruent
    images, which :func:`shape_bias` excludes, as the model-vs-human toolbox does).
    """

    image: Image.Image
    shape_label: int
    texture_label: int
    shape: str
    colour: str
    texture: str
    caption: str
    key: str  # "cue-{seed}-{index:06d}"


# ----------------------------------------------------------------------------- geometry


def _unit(xy: np.ndarray) -> np.ndarray:
    """Scale an outline ``(n, 2)`` centred on the origin to circumradius 1, so that it fits the pose."""
    return xy / np.hypot(xy[:, 0], xy[:, 1]).max()


def _regular_polygon(n: int, phase: float = 0.0) -> np.ndarray:
    t = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([np.cos(t), np.sin(t)], axis=1)  # (n, 2)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return _regular_polygon(2 * points, phase=-np.pi / 2) * radii[:, None]


def _cross(half_width: float = 0.34) -> np.ndarray:
    w = half_width
    return _unit(
        np.array(
            [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1), (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1)],
            dtype=float,
        )
    )


def _heart(n: int = 48) -> np.ndarray:
    t = 2 * np.pi * np.arange(n) / n
    xy = np.stack([16 * np.sin(t) ** 3, -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))], 1)
    return _unit(xy - (xy.max(0) + xy.min(0)) / 2)  # centred on its bounding box


# Outlines with circumradius <= 1 about the origin, one per class.
_OUTLINES: dict[str, np.ndarray] = {
    "circle": _regular_polygon(64),
    "square": _regular_polygon(4, phase=np.pi / 4) * 0.95,
    "triangle": _regular_polygon(3, phase=-np.pi / 2),
    "star": _star(),
    "cross": _cross(),
    "heart": _heart(),
}


def _shape_mask(shape: str, size: int, centre: np.ndarray, radius: float, angle: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of ``shape`` placed at ``centre`` (pixels), ``(size, size)``."""
    c, s = np.cos(angle), np.sin(angle)
    pts = _OUTLINES[shape] @ np.array([[c, s], [-s, c]]) * radius + centre  # (n, 2), rotated by angle
    big = Image.new("L", (size * _SUPERSAMPLE, size * _SUPERSAMPLE), 0)
    ImageDraw.Draw(big).polygon([tuple(p) for p in pts * _SUPERSAMPLE], fill=255)
    return np.asarray(big.reduce(_SUPERSAMPLE), dtype=np.float32) / 255.0


# ----------------------------------------------------------------------------- textures
# Each texture maps coordinates (u, v) in pixels, in the texture's own rotated frame, and a period
# to a signed distance: positive inside a mark. ``_coverage`` turns it into a 1-pixel soft edge.


def _fold(x: np.ndarray, period: float) -> np.ndarray:
    """Distance from ``x`` to the nearest multiple of ``period``."""
    return np.abs((x + period / 2) % period - period / 2)


def _striped(u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    return p / 4 - _fold(u, p)


def _dotted(u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    return 0.28 * p - np.hypot(_fold(u, p), _fold(v, p))


def _checkered(u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    cell = 0.6 * p
    parity = (np.floor(u / cell) + np.floor(v / cell)) % 2
    return np.where(parity == 0, 1.0, -1.0) * np.minimum(_fold(u, cell), _fold(v, cell))


def _wavy(u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    return p / 4 - _fold(u + 0.4 * p * np.sin(2 * np.pi * v / (2.5 * p)), p)


def _grid(u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    return 0.14 * p - np.minimum(_fold(u, p), _fold(v, p))


def _ringed(u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    return p / 4 - _fold(np.hypot(u, v), p)


_TEXTURE_FNS: dict[str, Callable[[np.ndarray, np.ndarray, float], np.ndarray]] = {
    "striped": _striped,
    "dotted": _dotted,
    "checkered": _checkered,
    "wavy": _wavy,
    "grid": _grid,
    "ringed": _ringed,
}


@lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(x, y)``, each ``(size, size)``, read-only (shared by the cache)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _texture_coverage(texture: str, size: int, origin: np.ndarray, angle: float, period: float) -> np.ndarray:
    """Where texture marks are, in [0, 1], ``(size, size)``; the frame is rotated by ``angle`` at ``origin``."""
    x, y = _pixel_grid(size)
    dx, dy = x - origin[0], y - origin[1]
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    return np.clip(0.5 + _TEXTURE_FNS[texture](u, v, period), 0.0, 1.0)


# ----------------------------------------------------------------------------- rendering


def render_shape(rng: np.random.Generator, shape: str, colour: str, texture: str, size: int = 64) -> Image.Image:
    """Draw ``shape`` in ``colour`` with ``texture`` at a random pose on a light noisy background.

    Draws a fixed number of values from ``rng`` whatever the arguments, so callers that draw
    before or after it stay aligned.
    """
    for kind, name, valid in (("shape", shape, CLASSES), ("colour", colour, COLOURS), ("texture", texture, TEXTURES)):
        if name not in valid:
            raise ConfigError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(valid)}")
    if size < _MIN_SIZE:
        raise ConfigError(f"image size must be at least {_MIN_SIZE} pixels, got {size}")
    radius = size * rng.uniform(*_RADIUS_FRACTION)
    slack = size / 2 - radius - 1
    centre = size / 2 + rng.uniform(-slack, slack, size=2)
    shape_angle = rng.uniform(0, 2 * np.pi)
    period = size * rng.uniform(*_PERIOD_FRACTION)
    texture_angle = rng.uniform(0, np.pi)
    origin = centre + rng.uniform(-0.5, 0.5, size=2) * radius  # random phase; the centre of the rings
    background = rng.uniform(205, 240) + rng.uniform(-8, 8, size=3)  # (3,) light, slightly tinted
    noise = rng.normal(0.0, _NOISE_STD, size=(size, size, 3))

    alpha = _shape_mask(shape, size, centre, radius, shape_angle)[..., None]  # (H, W, 1)
    marks = _texture_coverage(texture, size, origin, texture_angle, period)[..., None]  # (H, W, 1)
    fill = np.asarray(COLOURS[colour], dtype=np.float32) * (1.0 - (1.0 - _MARK_SHADE) * marks)  # (H, W, 3)
    pixels = background * (1.0 - alpha) + fill * alpha + noise
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "RGB")


def make_caption(colour: str, texture: str, shape: str) -> str:
    """``"a blue striped triangle"``, ``"an orange dotted heart"``."""
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {texture} {shape}"


# ----------------------------------------------------------------------------- sampling


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    """The generator of one sample: a pure function of (stream, seed, index); any int seed works."""
    if index < 0:
        raise ConfigError(f"sample index must be >= 0, got {index}")
    return np.random.default_rng([stream, index, abs(seed), int(seed < 0)])


def _combo_set(exclude_combos: Iterable[Sequence[str]]) -> frozenset[tuple[str, str]]:
    """``exclude_combos`` as a set of ``(colour, shape)`` tuples (lists from YAML/JSON work too), checked."""
    combos = frozenset(tuple(c) for c in exclude_combos)
    for combo in combos:
        if len(combo) != 2 or combo[0] not in COLOURS or combo[1] not in CLASSES:
            raise ConfigError(
                f"exclude_combos entry {combo!r} is not a (colour, shape) pair; "
                f"colours: {', '.join(COLOURS)}; shapes: {', '.join(CLASSES)}"
            )
    for shape in CLASSES:
        if all((c, shape) in combos for c in COLOURS):
            raise ConfigError(f"exclude_combos removes every colour of {shape!r}; keep at least one")
    return combos


def shape_sample(
    index: int,
    seed: int = 0,
    size: int = 64,
    texture_correlation: float = 0.7,
    exclude_combos: Iterable[Sequence[str]] = (),
) -> ShapeSample:
    """Sample ``index`` of the dataset ``seed``: identical however and wherever it is drawn.

    ``texture_correlation`` is the probability of the class's typical texture; otherwise the
    texture is uniform over all textures (the typical one included). A colour that would pair
    with the shape as one of ``exclude_combos`` (``(colour, shape)`` pairs) is redrawn from the
    remaining colours; samples without such a pair are the same as with no exclusions.
    """
    if not 0.0 <= texture_correlation <= 1.0:
        raise ConfigError(f"texture_correlation must be in [0, 1], got {texture_correlation}")
    combos = _combo_set(exclude_combos)
    rng = _rng(seed, index, _STREAM_SHAPES)
    label = int(rng.integers(len(CLASSES)))
    typical = rng.random() < texture_correlation
    random_texture = int(rng.integers(len(TEXTURES)))
    colour_draw, redraw = rng.random(2)

    shape = CLASSES[label]
    texture = TEXTURES[label] if typical else TEXTURES[random_texture]
    names = list(COLOURS)
    colour = names[int(colour_draw * len(names))]
    if (colour, shape) in combos:
        allowed = [c for c in names if (c, shape) not in combos]
        colour = allowed[int(redraw * len(allowed))]
    image = render_shape(rng, shape, colour, texture, size)
    return ShapeSample(
        image=image,
        label=label,
        shape=shape,
        colour=colour,
        texture=texture,
        caption=make_caption(colour, texture, shape),
        key=f"shapes-{seed}-{index:06d}",
    )


def generate_shapes(
    n: int,
    seed: int = 0,
    size: int = 64,
    texture_correlation: float = 0.7,
    exclude_combos: Iterable[Sequence[str]] = (),
    start: int = 0,
) -> Iterator[ShapeSample]:
    """Samples ``start .. start + n - 1`` of :func:`shape_sample`, in index order."""
    exclude_combos = _combo_set(exclude_combos)
    for index in range(start, start + n):
        yield shape_sample(index, seed, size, texture_correlation, exclude_combos)


def cue_conflict_labels(index: int) -> tuple[int, int]:
    """``(shape_label, texture_label)`` of cue-conflict sample ``index``.

    Consecutive indices walk all ``len(CLASSES) ** 2`` pairs, so any ``n`` that is a multiple of
    36 covers every pair equally often (the 6 congruent pairs included).
    """
    k = len(CLASSES)
    pair = index % (k * k)
    return pair // k, pair % k


def cue_conflict_sample(index: int, seed: int = 0, size: int = 64) -> CueConflictSample:
    """Shape ``CLASSES[s]`` filled with ``TEXTURES[t]``, ``(s, t) = cue_conflict_labels(index)``."""
    shape_label, texture_label = cue_conflict_labels(index)
    rng = _rng(seed, index, _STREAM_CUE)
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    shape, texture = CLASSES[shape_label], TEXTURES[texture_label]
    return CueConflictSample(
        image=render_shape(rng, shape, colour, texture, size),
        shape_label=shape_label,
        texture_label=texture_label,
        shape=shape,
        colour=colour,
        texture=texture,
        caption=make_caption(colour, texture, shape),
        key=f"cue-{seed}-{index:06d}",
    )


def generate_cue_conflict(n: int, seed: int = 0, size: int = 64, start: int = 0) -> Iterator[CueConflictSample]:
    """Cue-conflict samples ``start .. start + n - 1`` (see :func:`cue_conflict_labels`)."""
    for index in range(start, start + n):
        yield cue_conflict_sample(index, seed, size)


# ----------------------------------------------------------------------------- evaluation


def shape_bias(
    pred: Sequence[int] | np.ndarray, shape_labels: Sequence[int] | np.ndarray, texture_labels: Sequence[int] | np.ndarray
) -> dict[str, float]:
    """Shape bias on cue-conflict decisions, as in Geirhos et al. and the model-vs-human toolbox.

    Images whose shape class equals their texture class are dropped (``n_conflict`` are left).
    Of those, a decision for the shape class is a shape hit, one for the texture class a texture
    hit, and any other decision is ignored: ``shape_bias = shape_hits / (shape_hits + texture_hits)``
    over the ``n_used = shape_hits + texture_hits`` images that count (NaN when there are none).
    ``shape_match`` and ``texture_match`` are the hit counts divided by ``n_conflict``.
    """
    pred, shape_labels, texture_labels = (np.asarray(a).ravel() for a in (pred, shape_labels, texture_labels))
    if not pred.shape == shape_labels.shape == texture_labels.shape:
        raise ConfigError(
            f"shape_bias needs equal lengths, got pred {pred.size}, shape_labels {shape_labels.size}, "
            f"texture_labels {texture_labels.size}"
        )
    conflict = shape_labels != texture_labels
    shape_hits = int(np.sum(conflict & (pred == shape_labels)))
    texture_hits = int(np.sum(conflict & (pred == texture_labels)))
    n_used = shape_hits + texture_hits
    n_conflict = int(conflict.sum())
    return {
        "shape_bias": shape_hits / n_used if n_used else float("nan"),
        "shape_hits": shape_hits,
        "texture_hits": texture_hits,
        "n_used": n_used,
        "n_conflict": n_conflict,
        "shape_match": shape_hits / n_conflict if n_conflict else float("nan"),
        "texture_match": texture_hits / n_conflict if n_conflict else float("nan"),
    }
