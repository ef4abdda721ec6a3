"""Evaluating a distilled student: accuracy, agreement with the teacher, cost, and features for a probe.

    s = predict(student, images, images.indices("test"), spec)           # logits, kd_logits, emb
    t_emb, t_logits = teacher_outputs(teacher, images, idx, teacher_spec)
    distance(s["kd_logits"], t_logits)     # {"agreement": top-1 agreement, "kl": KL(teacher || student)}
    gflops(student, spec.size)             # one image, torch.utils.flop_counter
    feats = student_features(student, images, spec)   # {"train": (emb, labels), "val": ..., "test": ...}
    linear_probe(*feats["train"], *feats["val"], *feats["test"])

Every view here is the evaluation view (the whole image, unflipped), rendered at each model's side.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vitdistill.distill.data import ImageSet
from vitdistill.distill.losses import kl_per_sample
from vitdistill.distill.views import InputSpec, full_view, render_batch
from vitdistill.models.teachers import Teacher

EVAL_BATCH = 256


def _views(images: ImageSet, idx: np.ndarray) -> tuple[list[torch.Tensor], list]:
    imgs = [images.images[i] for i in idx]
    return imgs, [full_view(img.shape[1], img.shape[2]) for img in imgs]


@torch.no_grad()
def predict(model: nn.Module, images: ImageSet, indices: np.ndarray, spec: InputSpec,
            batch_size: int = EVAL_BATCH) -> dict[str, np.ndarray]:
    """The student's outputs (eval mode) on the evaluation views: ``logits`` (N, C), ``emb`` (N, D), ..."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(indices), batch_size):
        imgs, views = _views(images, indices[start:start + batch_size])
        out = model(render_batch(imgs, views, spec).to(device))
        for k, v in out.items():
            parts.setdefault(k, []).append(v.float().cpu().numpy())
    model.train(was_training)
    return {k: np.concatenate(v) for k, v in parts.items()}


def teacher_outputs(teacher: Teacher, images: ImageSet, indices: np.ndarray, spec: InputSpec,
                    batch_size: int = EVAL_BATCH) -> tuple[np.ndarray, np.ndarray | None]:
    """The teacher on the evaluation views: embedding (N, Dt) and logits (N, Ct) or None."""
    embs, logits = [], []
    for start in range(0, len(indices), batch_size):
        imgs, views = _views(images, indices[start:start + batch_size])
        e, lg = teacher(render_batch(imgs, views, spec))
        embs.append(e.cpu().numpy())
        if lg is not None:
            logits.append(lg.cpu().numpy())
    return np.concatenate(embs), (np.concatenate(logits) if logits else None)


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy over labelled rows: (N, C), (N,) -> float."""
    valid = labels >= 0
    return float((logits[valid].argmax(-1) == labels[valid]).mean()) if valid.any() else float("nan")


def distance(student_logits: np.ndarray, teacher_logits: np.ndarray) -> dict[str, float]:
    """big_vision's distill distance evaluator: top-1/top-5 agreement and mean KL(teacher || student)."""
    s, t = torch.from_numpy(student_logits), torch.from_numpy(teacher_logits)  # (N, C) each
    k = min(5, t.shape[1])
    t_top = t.argmax(-1)
    return {
        "agreement": float((s.argmax(-1) == t_top).float().mean()),
        "agreement_top5": float((s.topk(k, dim=-1).indices == t_top[:, None]).any(-1).float().mean()),
        "kl": float(kl_per_sample(s, t).mean()),
    }


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def gflops(model: nn.Module, size: int) -> float:
    """Forward GFLOPs (multiply-add = 2) of one (1, 3, size, size) image, counted by torch."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(1, 3, size, size, device=device))
    model.train(was_training)
    return counter.get_total_flops() / 1e9


def student_features(model: nn.Module, images: ImageSet, spec: InputSpec,
                     batch_size: int = EVAL_BATCH) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Pooled student embeddings per split, for a linear probe: split -> ((N, D) float32, (N,) labels)."""
    out = {}
    for split in ("train", "val", "test"):
        idx = images.indices(split)
        if len(idx):
            out[split] = (predict(model, images, idx, spec, batch_size)["emb"], images.labels[idx])
    return out
