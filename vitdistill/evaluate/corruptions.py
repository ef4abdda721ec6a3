"""Image corruptions at severities 1-5, deterministic given a seed: ImageNet-C's and two structural ones.

Every corruption maps uint8 images ``(N, H, W, 3)`` to uint8 images of the same shape. The
random draws depend on ``seed`` and the corruption's name but not on the severity, so the same
noise (or the same occluded cells, or the same tile order) is scaled up with severity and the
damage grows monotonically. Severity parameters (:data:`SEVERITIES`) follow ImageNet-C
(Hendrycks & Dietterich 2019) where they are size-free; the blur sigmas are smaller than
ImageNet-C's, which assume 224 px images. ``patch_shuffle`` cuts g x g tiles of side ``H // g``;
where g does not divide the side, the remainder strip stays in place.

    noisy = corrupt(images, "gaussian_noise", severity=3, seed=0)  # (N, H, W, 3) uint8
"""

from __future__ import annotations

import io
import zlib
import numpy as np
from PIL import Image

from vitdistill.errors import ConfigError, DataError
from vitdistill.evaluate.base import check_images
from vitdistill.registry import Registry

SEVERITY_LEVELS = (1, 2, 3, 4, 5)

# One parameter per severity 1..5.
SEVERITIES: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),  # noise std on the [0, 1] scale (ImageNet-C)
    "gaussian_blur": (1.0, 1.5, 2.0, 2.5, 3.0),  # sigma in pixels (ImageNet-C's 1..6 suit 224 px, not 16-64)
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),  # factor on the deviation from the channel mean (ImageNet-C)
    "jpeg": (25, 18, 15, 10, 7),  # JPEG quality (ImageNet-C)
    "occlusion": (0.1, 0.2, 0.3, 0.4, 0.5),  # fraction of an 8x8 cell grid painted grey
    "patch_shuffle": (2, 3, 4, 6, 8),  # grid side: the image is cut in g x g tiles that are permuted
}

_OCCLUSION_GRID = 8
_OCCLUSION_FILL = 128

CORRUPTIONS: Registry[np.ndarray] = Registry("corruption")


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """Float pixels on the 0..255 scale, rounded and clipped to uint8."""
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


@CORRUPTIONS.register("gaussian_noise")
def gaussian_noise(images: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    noise = rng.standard_normal(images.shape)  # (N, H, W, 3), the same for every severity
    return _to_uint8(np.clip(images / 255.0 + std * noise, 0.0, 1.0) * 255.0)


def _blur_axis(x: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    """Convolve ``x`` along ``axis`` with an odd 1-D ``kernel``, reflecting at the borders."""
    r = len(kernel) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    padded = np.pad(x, pad, mode="reflect" if x.shape[axis] > r else "edge")
    n = x.shape[axis]
    return sum(w * np.take(padded, np.arange(k, k + n), axis=axis) for k, w in enumerate(kernel))


@CORRUPTIONS.register("gaussian_blur")
def gaussian_blur(images: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    r = max(1, int(np.ceil(3 * sigma)))
    t = np.arange(-r, r + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (t / sigma) ** 2)
    kernel /= kernel.sum()  # (2r + 1,)
    x = _blur_axis(images.astype(np.float64), kernel, axis=1)  # (N, H, W, 3)
    return _to_uint8(_blur_axis(x, kernel, axis=2))


@CORRUPTIONS.register("contrast")
def contrast(images: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    x = images.astype(np.float64)
    means = x.mean(axis=(1, 2), keepdims=True)  # (N, 1, 1, 3)
    return _to_uint8((x - means) * factor + means)


@CORRUPTIONS.register("jpeg")
def jpeg(images: np.ndarray, quality: float, rng: np.random.Generator) -> np.ndarray:
    out = np.empty_like(images)
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image, "RGB").save(buffer, format="JPEG", quality=int(quality))
        out[i] = np.asarray(Image.open(buffer).convert("RGB"))
    return out


@CORRUPTIONS.register("occlusion")
def occlusion(images: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    n, h, w, _ = images.shape
    g = _OCCLUSION_GRID
    rows, cols = np.linspace(0, h, g + 1).astype(int), np.linspace(0, w, g + 1).astype(int)
    order = rng.permuted(np.tile(np.arange(g * g), (n, 1)), axis=1)  # (N, g*g), same for every severity
    k = int(round(fraction * g * g))
    out = images.copy()
    for i in range(n):
        for cell in order[i, :k]:
            r, c = divmod(int(cell), g)
            out[i, rows[r] : rows[r + 1], cols[c] : cols[c + 1]] = _OCCLUSION_FILL
    return out


@CORRUPTIONS.register("patch_shuffle")
def patch_shuffle(images: np.ndarray, grid: float, rng: np.random.Generator) -> np.ndarray:
    """Permute the g x g tiles of side ``H // g`` (a remainder strip at the bottom/right stays put)."""
    n, h, w, c = images.shape
    g = int(grid)
    th, tw = h // g, w // g
    perm = rng.permuted(np.tile(np.arange(g * g), (n, 1)), axis=1)  # (N, g*g)
    identity = (perm == np.arange(g * g)).all(axis=1)
    perm[identity] = np.roll(np.arange(g * g), 1)  # never leave an image unshuffled
    tiles = images[:, : g * th, : g * tw].reshape(n, g, th, g, tw, c).transpose(0, 1, 3, 2, 4, 5)
    tiles = tiles.reshape(n, g * g, th, tw, c)[np.arange(n)[:, None], perm]  # (N, g*g, th, tw, 3)
    out = images.copy()
    tiles = tiles.reshape(n, g, g, th, tw, c).transpose(0, 1, 3, 2, 4, 5)  # (N, g, th, g, tw, 3)
    out[:, : g * th, : g * tw] = tiles.reshape(n, g * th, g * tw, c)
    return out


def list_corruptions(pattern: str = "*") -> list[str]:
    return CORRUPTIONS.list(pattern)


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """``images`` (N, H, W, 3) uint8 under corruption ``name`` at ``severity`` in 1..5; same shape and dtype."""
    images = check_images(images)
    fn = CORRUPTIONS.get(name)
    if severity not in SEVERITY_LEVELS:
        raise ConfigError(f"severity {severity!r}; expected one of {', '.join(map(str, SEVERITY_LEVELS))}")
    if min(images.shape[1:3]) < _OCCLUSION_GRID:
        raise DataError(f"images: side {min(images.shape[1:3])} px; corruptions need at least {_OCCLUSION_GRID} px")
    rng = np.random.default_rng([abs(seed), int(seed < 0), zlib.crc32(name.encode())])
    return fn(images, SEVERITIES[name][severity - 1], rng)
