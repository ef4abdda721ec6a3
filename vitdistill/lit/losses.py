"""Contrastive image-text losses for LiT, as modules that return dicts of named losses.

    loss_fn = create_lit_loss("softmax")                     # CLIP / LiT, logit scale t = 10 at init
    out = loss_fn(img, txt, positives)                       # {"loss", "contrastive_loss", "temperature"}

``img`` (N, E) and ``txt`` (M, E) are L2-normalised; ``positives`` (N, M) bool marks the matching
pairs. Passing the mask (rather than assuming pair i <-> i) is how duplicate captions are handled:
the trainer feeds each distinct caption of a batch once (M <= N), so "a photo of a 3" shared by
twenty images is one text column with twenty positive images, never a false negative of itself.
For captions generated from class names, all prompts of a class are marked positive for each
other's images too (see :mod:`vitdistill.lit.data`). With several positives in a row, the softmax
loss is -log of the probability mass on the positives (:func:`multi_positive_ce`), which is 0 when
all mass is on them and ordinary cross-entropy when there is one.

"temperature" follows LiT's usage: the learnable multiplier ``t = exp(log_t)`` of the cosine
similarities (CLIP's logit scale, the inverse of a softmax temperature), initialised at 10 and
clamped to at most 100 as in CLIP.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vitdistill.registry import Registry

MAX_LOGIT_SCALE = 100.0  # CLIP's clamp: keeps the logits bounded early in training

LIT_LOSSES: Registry[nn.Module] = Registry("lit loss")


def create_lit_loss(name: str, **kwargs) -> nn.Module:
    return LIT_LOSSES.create(name, **kwargs)


def list_lit_losses(pattern: str = "*") -> list[str]:
    return LIT_LOSSES.list(pattern)


def multi_positive_ce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -log(probability mass on the row's positives): (R, K), (R, K) bool -> ().

    With exactly one positive per row this is ordinary cross-entropy. Rows without a positive
    are skipped.
    """
    pos_logits = logits.masked_fill(~positives, float("-inf"))  # (R, K)
    per_row = torch.logsumexp(logits, dim=1) - torch.logsumexp(pos_logits, dim=1)  # (R,)
    keep = positives.any(dim=1)  # (R,)
    return per_row[keep].mean()


def softmax_contrastive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                             positives: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss: (image->text CE + text->image CE) / 2, multi-positive aware.

    img (N, E), txt (M, E) unit vectors; scale () the logit scale; positives (N, M) bool.
    """
    logits = scale * img @ txt.T  # (N, M)
    return 0.5 * (multi_positive_ce(logits, positives) + multi_positive_ce(logits.T, positives.T))


def sigmoid_contrastive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                             positives: torch.Tensor) -> torch.Tensor:
    """SigLIP: every (image, text) pair is a binary problem, label +1 on positives, -1 elsewhere.

    -sum_ij log sigmoid(z_ij (t <x_i, y_j> + b)) / N, normalised by the number of images as in
    SigLIP. img (N, E), txt (M, E); scale, bias (); positives (N, M) bool.
    """
    logits = scale * img @ txt.T + bias  # (N, M)
    z = positives.to(logits.dtype) * 2 - 1  # (N, M) in {-1, +1}
    return -F.logsigmoid(z * logits).sum() / img.shape[0]


class SoftmaxContrastiveLoss(nn.Module):
    """CLIP / LiT softmax loss with a learnable logit scale ``t = exp(log_t)``."""

    def __init__(self, init_temperature: float = 10.0, **_: object) -> None:
        super().__init__()
        self.log_t = nn.Parameter(torch.tensor(math.log(init_temperature)))

    def temperature(self) -> torch.Tensor:
        return self.log_t.exp().clamp(max=MAX_LOGIT_SCALE)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, positives: torch.Tensor) -> dict[str, torch.Tensor]:
        t = self.temperature()
        loss = softmax_contrastive_loss(img, txt, t, positives)
        return {"loss": loss, "contrastive_loss": loss.detach(), "temperature": t.detach()}


class SigmoidContrastiveLoss(nn.Module):
    """SigLIP loss with a learnable logit scale (init 10) and bias (init -10)."""

    def __init__(self, init_temperature: float = 10.0, init_bias: float = -10.0, **_: object) -> None:
        super().__init__()
        self.log_t = nn.Parameter(torch.tensor(math.log(init_temperature)))
        self.bias = nn.Parameter(torch.tensor(float(init_bias)))

    def temperature(self) -> torch.Tensor:
        return self.log_t.exp().clamp(max=MAX_LOGIT_SCALE)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, positives: torch.Tensor) -> dict[str, torch.Tensor]:
        t = self.temperature()
        loss = sigmoid_contrastive_loss(img, txt, t, self.bias, positives)
        return {"loss": loss, "contrastive_loss": loss.detach(), "temperature": t.detach(), "bias": self.bias.detach()}


@LIT_LOSSES.register("softmax")
def softmax(**kwargs) -> nn.Module:
    return SoftmaxContrastiveLoss(**kwargs)


@LIT_LOSSES.register("sigmoid")
def sigmoid(**kwargs) -> nn.Module:
    return SigmoidContrastiveLoss(**kwargs)
