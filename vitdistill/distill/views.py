"""Augmented views as data: a crop box and a flip, drawn deterministically and rendered at any size.

    view = sample_view(view_rng(seed, epoch, key), height, width, scale=(0.5, 1), ratio=(3/4, 4/3), hflip=0.5)
    x_student = render(img, view, 64)    # the same crop and flip ...
    x_teacher = render(img, view, 224)   # ... at each model's own resolution

A view is a pure function of (seed, index, key), never of a global RNG, so the online and cached
modes see the same views (epoch e online = stored view e in cached mode), a resumed run sees the
views it would have seen, and each DDP rank draws its images' views independently.

Function matching (Beyer et al. 2022) mixes each view with a partner's: :func:`mix_partner` draws the
partner among the other samples of the same shard and lambda ~ Beta(alpha, alpha), again from
(seed, index, key) alone, so the cached mode stores (partner, lambda) with the view and replays the
exact mixed image the teacher saw.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class View:
    """A crop box in source pixels (top, left, height, width) and a horizontal flip."""

    top: int
    left: int
    height: int
    width: int
    flip: bool

    def to_list(self) -> list[int]:
        return [self.top, self.left, self.height, self.width, int(self.flip)]

    @classmethod
    def from_list(cls, v: list[int]) -> View:
        t, l, h, w, f = (int(a) for a in v)
        return cls(t, l, h, w, bool(f))


@dataclass(frozen=True)
class InputSpec:
    """How one model wants its input: square side and per-channel mean/std of [0, 1] pixels."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> normalised."""
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std


def view_rng(seed: int, index: int, key: str) -> np.random.Generator:
    """The generator of view ``index`` (the epoch online, the stored view cached) of sample ``key``."""
    digest = hashlib.sha1(f"{seed}/{index}/{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def sample_view(rng: np.random.Generator, height: int, width: int, scale: tuple[float, float],
                ratio: tuple[float, float], hflip: float) -> View:
    """torchvision's RandomResizedCrop box (10 tries, then a central crop) plus a flip with prob ``hflip``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    box = None
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            box = (int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w)
            break
    if box is None:  # central crop at the nearest allowed aspect ratio
        in_ratio = width / height
        if in_ratio < ratio[0]:
            w, h = width, int(round(width / ratio[0]))
        elif in_ratio > ratio[1]:
            h, w = height, int(round(height * ratio[1]))
        else:
            w, h = width, height
        box = ((height - h) // 2, (width - w) // 2, h, w)
    return View(*box, flip=bool(rng.random() < hflip))


def mix_partner(seed: int, index: int, key: str, candidates: list[str], alpha: float) -> tuple[str, float] | None:
    """Mixup partner and weight of view ``index`` of ``key``: a uniform draw among ``candidates`` other than
    ``key`` (the samples of its shard), lambda ~ Beta(alpha, alpha); None when off or alone."""
    if alpha <= 0 or len(candidates) < 2:
        return None
    rng = view_rng(seed, index, key + "#mix")
    j = int(rng.integers(len(candidates) - 1))
    partner = candidates[j] if candidates[j] != key else candidates[-1]
    return partner, float(rng.beta(alpha, alpha))


def full_view(height: int, width: int) -> View:
    """The evaluation view: the whole image, unflipped."""
    return View(0, 0, height, width, False)


def render(img: torch.Tensor, view: View, size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, size, size) float32 in [0, 1]: crop, flip, bilinear resize (antialiased)."""
    crop = img[:, view.top:view.top + view.height, view.left:view.left + view.width]  # (3, h, w)
    if view.flip:
        crop = crop.flip(-1)
    x = crop.unsqueeze(0).float().div_(255.0)  # (1, 3, h, w)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x[0]


Mix = tuple[torch.Tensor, View, float]  # partner image (3, H, W) uint8, its view, the weight of the first image


def render_batch(images: list[torch.Tensor], views: list[View], spec: InputSpec,
                 mixes: list[Mix | None] | None = None) -> torch.Tensor:
    """B images and their views -> (B, 3, S, S) normalised model input; with ``mixes``, row i is
    ``lam * view_i + (1 - lam) * partner view`` (mixup in pixel space, before normalising)."""
    rows = []
    for i, (img, v) in enumerate(zip(images, views)):
        x = render(img, v, spec.size)
        mix = mixes[i] if mixes else None
        if mix is not None:
            p_img, p_view, lam = mix
            x = lam * x + (1.0 - lam) * render(p_img, p_view, spec.size)
        rows.append(x)
    return spec.normalize(torch.stack(rows))
