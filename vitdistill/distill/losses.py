"""Distillation objectives: small modules that return dicts of named losses, as timm's distillation task.

    loss_fn = create_distill_loss(alpha=0.5, weights={"kd": 1.0, "feature": 1.0}, temperature=2.0)
    losses = loss_fn(student(x), batch)   # {"loss", "ce_loss", "kd_loss", "feature_loss"}

A term reads the student's outputs (``logits``, ``kd_logits``, ``feat``; see
:class:`vitdistill.distill.students.Student`) and the batch (``label``, ``teacher_logits``,
``teacher_emb``). The total is ``alpha * ce + (1 - alpha) * sum_k w_k * term_k``; every term is
returned as well, so every one is logged.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from vitdistill.registry import Registry

Batch = dict[str, torch.Tensor]
Outputs = dict[str, torch.Tensor]

LOSSES: Registry[nn.Module] = Registry("loss")


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target loss: T^2 * KL(softmax(t / T) || softmax(s / T)), mean over the batch.

    (B, C), (B, C) -> scalar. Computed in float32 from log-softmaxes (``log_target=True``), so large
    logits neither overflow nor give log(0).
    """
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, C)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (B, C)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


def kl_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) at T = 1 per row: (B, C), (B, C) -> (B,)."""
    log_p_s = F.log_softmax(student_logits.float(), dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float(), dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over rows with a label (label >= 0): (B, C), (B,) -> scalar; 0 with a gradient if none."""
    valid = labels >= 0
    if not bool(valid.any()):
        return logits.float().sum() * 0.0
    return F.cross_entropy(logits[valid].float(), labels[valid])


def mixed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mix_labels: torch.Tensor,
                        lam: torch.Tensor) -> torch.Tensor:
    """CE to the mixed label ``lam * y + (1 - lam) * y_mix``, over the labels that exist (-1: none):
    (B, C), (B,), (B,), (B,) -> scalar, the weighted mean; 0 with a gradient if no row has a label."""
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, C)
    total, weight = logp.sum() * 0.0, logp.new_zeros(())
    for y, w in ((labels, lam), (mix_labels, 1.0 - lam)):
        valid = y >= 0
        if bool(valid.any()):
            total = total - (w[valid] * logp[valid].gather(1, y[valid, None])[:, 0]).sum()
            weight = weight + w[valid].sum()
    return total / weight.clamp_min(1e-12) if float(weight) > 0 else total


@LOSSES.register("ce")
class CrossEntropy(nn.Module):
    """Ground-truth labels on the task head (rows without a label, -1, are ignored); mixed images
    (``mix_lam``, ``mix_label`` in the batch) learn the mixed label."""

    def __init__(self, **_: Any) -> None:
        super().__init__()

    def forward(self, out: Outputs, batch: Batch) -> torch.Tensor:
        if "mix_lam" in batch:
            return mixed_cross_entropy(out["logits"], batch["label"], batch["mix_label"], batch["mix_lam"])
        return masked_cross_entropy(out["logits"], batch["label"])


@LOSSES.register("kd")
class SoftDistillation(nn.Module):
    """KL to the teacher's softened distribution, on the teacher-space head."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, out: Outputs, batch: Batch) -> torch.Tensor:
        return kd_kl(out["kd_logits"], batch["teacher_logits"], self.temperature)


@LOSSES.register("hard")
class HardDistillation(nn.Module):
    """DeiT's hard-label distillation: cross-entropy to the teacher's argmax."""

    def __init__(self, **_: Any) -> None:
        super().__init__()

    def forward(self, out: Outputs, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(out["kd_logits"].float(), batch["teacher_logits"].argmax(-1))


@LOSSES.register("feature")
class FeatureDistillation(nn.Module):
    """1 - cosine similarity between the projected student embedding and the teacher's embedding."""

    def __init__(self, **_: Any) -> None:
        super().__init__()

    def forward(self, out: Outputs, batch: Batch) -> torch.Tensor:
        feat, target = out["feat"].float(), batch["teacher_emb"].float()  # (B, Dt), (B, Dt)
        return (1.0 - F.cosine_similarity(feat, target, dim=-1)).mean()


def list_losses(pattern: str = "*") -> list[str]:
    return LOSSES.list(pattern)


NEEDS_TEACHER_LOGITS = ("kd", "hard")  # terms that read ``kd_logits`` and ``teacher_logits``
NEEDS_TEACHER_EMB = ("feature",)  # terms that read ``feat`` and ``teacher_emb``


class DistillLoss(nn.Module):
    """``alpha * ce + (1 - alpha) * sum_k w_k * term_k``; returns every term and the total as ``loss``."""

    def __init__(self, alpha: float, terms: dict[str, nn.Module], weights: dict[str, float]) -> None:
        super().__init__()
        self.alpha = alpha
        self.ce = CrossEntropy()
        self.terms = nn.ModuleDict(terms)
        self.weights = dict(weights)

    def forward(self, out: Outputs, batch: Batch) -> dict[str, torch.Tensor]:
        losses = {"ce_loss": self.ce(out, batch)}
        distill = losses["ce_loss"].new_zeros(())
        for name, term in self.terms.items():
            losses[f"{name}_loss"] = term(out, batch)
            distill = distill + self.weights[name] * losses[f"{name}_loss"]
        losses["loss"] = self.alpha * losses["ce_loss"] + (1.0 - self.alpha) * distill
        return losses


def create_distill_loss(alpha: float, weights: dict[str, float], temperature: float = 1.0) -> DistillLoss:
    """Terms named in ``weights`` (zero weights dropped), each built from the loss registry."""
    kept = {n: w for n, w in weights.items() if w > 0}
    terms = {}
    for name in kept:
        factory: Callable[..., nn.Module] = LOSSES.get(name)
        terms[name] = factory(temperature=temperature)
    return DistillLoss(alpha, terms, kept)
